// Fused CPU passes of OREPA's kernel generators (mmreparam._ext).
//
// The generators' matrix products stay with torch (MKL / oneDNN); what is here are the
// kernel-sized elementwise passes around them (scalings, layout changes, per-row dot
// products, the depthwise -> pointwise branch), each done in one pass over memory instead
// of several torch operators with their temporaries. mmreparam/models/layers/orepa_function.py
// holds the same passes written with torch operators (the reference, and the path for other
// devices); tests/test_models/test_layers/test_orepa_function.py checks one against the other.
//
// Layouts (all contiguous; o outputs, g groups, og = o / g, ig / mg per-group input /
// internal channels, kk = k * k taps, p patterns, m depthwise multiplier):
//   origin (o, ig, kk)   coef (o, p, ig)   v_coef (p, o)   pattern (o, p, kk)   conv2 (o, mg, kk)
//   seq_t (o, kk, ig)    pw (o, ig * m)    dw (g * ig * m, kk)  vectors (o)
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

namespace {

void check_cpu(const at::Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.scalar_type() == dtype, name, " has dtype ", t.scalar_type(), ", expected ",
              dtype);
}

// Rows per parallel task: enough work per task that scheduling stays negligible.
int64_t grain(int64_t row_size) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, row_size)); }

}  // namespace

// conv2 (o, mg, kk) -> out (o, kk, mg) with out[r, t, m] = v[r] * conv2[r, m, t].
at::Tensor scaled_transpose(const at::Tensor& x, const at::Tensor& v) {
  TORCH_CHECK(x.dim() == 3, "scaled_transpose: x must be (rows, a, b)");
  check_cpu(x, "x", x.scalar_type());
  check_cpu(v, "v", x.scalar_type());
  const int64_t rows = x.size(0), a = x.size(1), b = x.size(2);
  TORCH_CHECK(v.numel() == rows, "scaled_transpose: v must have one value per row");
  auto out = at::empty({rows, b, a}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "scaled_transpose", [&] {
    const scalar_t* px = x.data_ptr<scalar_t>();
    const scalar_t* pv = v.data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain(a * b), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t s = pv[r];
        const scalar_t* src = px + r * a * b;
        scalar_t* dst = po + r * a * b;
        for (int64_t i = 0; i < a; ++i)
          for (int64_t j = 0; j < b; ++j) dst[j * a + i] = s * src[i * b + j];
      }
    });
  });
  return out;
}

// Short vector loops over a contiguous channel row (the innermost dimension everywhere
// below); dot products over rows and whole kernels are summed in double. They bound the speed of the passes, so each is compiled for several instruction
// sets and the best one the processor has is picked when the library loads (GCC's
// target_clones); "default" is the portable baseline.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define MMREPARAM_CLONES \
  __attribute__((target_clones("arch=skylake-avx512", "arch=haswell", "default")))
#else
#define MMREPARAM_CLONES
#endif

#define MMREPARAM_ROW_OPS(T)                                                           \
  MMREPARAM_CLONES void row_axpy(T* __restrict__ y, const T* __restrict__ x, T a,      \
                                 int64_t n) {                                          \
    _Pragma("omp simd") for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];              \
  }                                                                                    \
  MMREPARAM_CLONES void row_axpyz(T* __restrict__ y, const T* __restrict__ x,          \
                                  const T* __restrict__ z, T a, int64_t n) {           \
    _Pragma("omp simd") for (int64_t i = 0; i < n; ++i) y[i] += a * x[i] * z[i];       \
  }                                                                                    \
  MMREPARAM_CLONES double row_dot(const T* __restrict__ a, const T* __restrict__ b,    \
                                  int64_t n) {                                         \
    double s = 0; /* float rows: double sums, as long as the row */                    \
    _Pragma("omp simd reduction(+ : s)") for (int64_t i = 0; i < n; ++i)               \
        s += double(a[i]) * double(b[i]);                                              \
    return s;                                                                          \
  }                                                                                    \
  MMREPARAM_CLONES void row_scale(T* y, const T* x, T a, /* y == x allowed */         \
                                  int64_t n) {                                         \
    _Pragma("omp simd") for (int64_t i = 0; i < n; ++i) y[i] = a * x[i];               \
  }

MMREPARAM_ROW_OPS(float)
MMREPARAM_ROW_OPS(double)

// dw (g * ig * m, kk) -> (g, m, kk, ig): the depthwise taps with the channel innermost.
at::Tensor dw_channel_last(const at::Tensor& dw, int64_t groups, int64_t ig, int64_t m,
                           int64_t kk) {
  return dw.view({groups, ig, m, kk}).permute({0, 2, 3, 1}).contiguous();
}

// K[o, i, t] = v0[o] origin[o, i, t] + sum_q v_coef[q, o] coef[o, q, i] pattern[o, q, t]
//              + v_seq[o] seq_t[o, t, i]
//              + v5[o] sum_j pw[o, i m + j] dw[(gi ig + i) m + j, t]      (gi: group of o)
// Per output channel the sum is built in (kk, ig) layout, where every term is a vector loop
// over input channels, and written out transposed.
at::Tensor orepa_combine(const at::Tensor& origin, const at::Tensor& v0, const at::Tensor& coef,
                         const at::Tensor& v_coef, const at::Tensor& pattern,
                         const at::Tensor& seq_t, const at::Tensor& v_seq, const at::Tensor& pw,
                         const at::Tensor& dw, const at::Tensor& v5, int64_t groups) {
  const auto dtype = origin.scalar_type();
  for (const auto& [t, n] : {std::pair{&origin, "origin"}, {&v0, "v0"}, {&coef, "coef"},
                             {&v_coef, "v_coef"}, {&pattern, "pattern"}, {&seq_t, "seq_t"},
                             {&v_seq, "v_seq"}, {&pw, "pw"}, {&dw, "dw"}, {&v5, "v5"}})
    check_cpu(*t, n, dtype);
  const int64_t o = origin.size(0), ig = origin.size(1), kk = origin.size(2);
  const int64_t p = coef.size(1), m = pw.size(1) / ig, og = o / groups;
  TORCH_CHECK(seq_t.numel() == o * kk * ig && dw.numel() == groups * ig * m * kk &&
                  pattern.numel() == o * p * kk && coef.numel() == o * p * ig &&
                  v_coef.numel() == p * o,
              "orepa_combine: inconsistent shapes");
  auto kernel = at::empty({o, ig, kk}, origin.options());
  const auto dw_t = dw_channel_last(dw, groups, ig, m, kk);
  AT_DISPATCH_FLOATING_TYPES(dtype, "orepa_combine", [&] {
    const scalar_t *P_origin = origin.data_ptr<scalar_t>(), *P_v0 = v0.data_ptr<scalar_t>(),
                   *P_coef = coef.data_ptr<scalar_t>(), *P_vc = v_coef.data_ptr<scalar_t>(),
                   *P_pat = pattern.data_ptr<scalar_t>(),
                   *P_seq = seq_t.data_ptr<scalar_t>(), *P_vs = v_seq.data_ptr<scalar_t>(),
                   *P_pw = pw.data_ptr<scalar_t>(),
                   *P_dwt = dw_t.data_ptr<scalar_t>(), *P_v5 = v5.data_ptr<scalar_t>();
    scalar_t* P_k = kernel.data_ptr<scalar_t>();
    at::parallel_for(0, o, grain(ig * kk), [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> block(kk * ig), pw_t(m * ig);
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t a0 = P_v0[r], a5 = P_v5[r];
        const scalar_t* pat = P_pat + r * p * kk;
        const scalar_t* dwt = P_dwt + (r / og) * m * kk * ig;
        row_scale(block.data(), P_seq + r * kk * ig, P_vs[r], kk * ig);
        for (int64_t q = 0; q < p; ++q)
          for (int64_t t = 0; t < kk; ++t)
            row_axpy(block.data() + t * ig, P_coef + (r * p + q) * ig,
                     P_vc[q * o + r] * pat[q * kk + t], ig);
        const scalar_t* pwr = P_pw + r * ig * m;
        for (int64_t i = 0; i < ig; ++i)
          for (int64_t j = 0; j < m; ++j) pw_t[j * ig + i] = pwr[i * m + j];
        for (int64_t j = 0; j < m; ++j)
          for (int64_t t = 0; t < kk; ++t)
            row_axpyz(block.data() + t * ig, pw_t.data() + j * ig, dwt + (j * kk + t) * ig, a5,
                      ig);
        const scalar_t* w = P_origin + r * ig * kk;
        scalar_t* out = P_k + r * ig * kk;
        for (int64_t i = 0; i < ig; ++i)
          for (int64_t t = 0; t < kk; ++t)
            out[i * kk + t] = a0 * w[i * kk + t] + block[t * ig + i];
      }
    });
  });
  return kernel;
}

// One pass over the kernel gradient G (o, ig, kk). Returns
//   g_origin = v0 G;  g_v0[o] = <G[o], origin[o]>;
//   g_coef[o, q, i] = v_coef[q, o] h[o, q, i] and g_v_coef[q, o] = <h[o, q], coef[o, q]>
//     with h[o, q, i] = sum_t pattern[o, q, t] G[o, i, t];
//   g_pw[o, i m + j] = v5[o] u[o, i, j] with u[o, i, j] = sum_t G[o, i, t] dw[(gi ig + i) m + j, t];
//   g_v5[o] = sum_{i, j} pw[o, i m + j] u[o, i, j];
//   g_dw[(gi ig + i) m + j, t] = sum_{o in group gi} v5[o] pw[o, i m + j] G[o, i, t];
//   grad_t (o, kk, ig) = G transposed (for the 1x1 -> kxk products).
// g_dw sums over output channels: each task accumulates its own copy, and the copies are
// added in task order, so the result does not depend on thread timing.
std::vector<at::Tensor> orepa_grad_pass(const at::Tensor& grad, const at::Tensor& origin,
                                        const at::Tensor& v0, const at::Tensor& coef,
                                        const at::Tensor& v_coef, const at::Tensor& pattern,
                                        const at::Tensor& pw, const at::Tensor& dw,
                                        const at::Tensor& v5, int64_t groups) {
  const auto dtype = origin.scalar_type();
  for (const auto& [t, n] : {std::pair{&grad, "grad"}, {&origin, "origin"}, {&v0, "v0"},
                             {&coef, "coef"}, {&v_coef, "v_coef"}, {&pattern, "pattern"}, {&pw, "pw"}, {&dw, "dw"}, {&v5, "v5"}})
    check_cpu(*t, n, dtype);
  const int64_t o = origin.size(0), ig = origin.size(1), kk = origin.size(2);
  const int64_t p = pattern.size(1), m = pw.size(1) / ig, og = o / groups;
  TORCH_CHECK(grad.numel() == o * ig * kk && dw.numel() == groups * ig * m * kk &&
                  coef.numel() == o * p * ig && v_coef.numel() == p * o,
              "orepa_grad_pass: inconsistent shapes");
  auto g_origin = at::empty({o, ig, kk}, origin.options());
  auto g_v0 = at::empty({o}, origin.options());
  auto g_coef = at::empty({o, p, ig}, origin.options());
  auto g_v_coef = at::empty({p, o}, origin.options());
  auto g_pw = at::empty({o, ig * m}, origin.options());
  auto g_v5 = at::empty({o}, origin.options());
  auto grad_t = at::empty({o, kk, ig}, origin.options());
  const auto dw_t = dw_channel_last(dw, groups, ig, m, kk);
  const int64_t dw_size = groups * m * kk * ig;
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), o));
  auto partial = at::zeros({tasks, dw_size}, origin.options());
  AT_DISPATCH_FLOATING_TYPES(dtype, "orepa_grad_pass", [&] {
    const scalar_t *G = grad.data_ptr<scalar_t>(), *W = origin.data_ptr<scalar_t>(),
                   *V0 = v0.data_ptr<scalar_t>(), *COEF = coef.data_ptr<scalar_t>(),
                   *VC = v_coef.data_ptr<scalar_t>(), *PAT = pattern.data_ptr<scalar_t>(),
                   *PW = pw.data_ptr<scalar_t>(), *DWT = dw_t.data_ptr<scalar_t>(),
                   *V5 = v5.data_ptr<scalar_t>();
    scalar_t *GO = g_origin.data_ptr<scalar_t>(), *GV0 = g_v0.data_ptr<scalar_t>(),
             *GC = g_coef.data_ptr<scalar_t>(), *GVC = g_v_coef.data_ptr<scalar_t>(),
             *GPW = g_pw.data_ptr<scalar_t>(),
             *GV5 = g_v5.data_ptr<scalar_t>(), *GT = grad_t.data_ptr<scalar_t>(),
             *PART = partial.data_ptr<scalar_t>();
    at::parallel_for(0, tasks, 1, [&](int64_t task_begin, int64_t task_end) {
      std::vector<scalar_t> pw_t(m * ig), u_t(m * ig);
      for (int64_t task = task_begin; task < task_end; ++task) {
        scalar_t* acc = PART + task * dw_size;
        for (int64_t r = o * task / tasks; r < o * (task + 1) / tasks; ++r) {
          const scalar_t a0 = V0[r], a5 = V5[r];
          const scalar_t* g = G + r * ig * kk;
          const scalar_t* pat = PAT + r * p * kk;
          const scalar_t* dwt = DWT + (r / og) * m * kk * ig;
          scalar_t* acc_g = acc + (r / og) * m * kk * ig;
          scalar_t* go = GO + r * ig * kk;
          row_scale(go, g, a0, ig * kk);
          GV0[r] = row_dot(g, W + r * ig * kk, ig * kk);
          scalar_t* gt = GT + r * kk * ig;
          for (int64_t i = 0; i < ig; ++i)
            for (int64_t t = 0; t < kk; ++t) gt[t * ig + i] = g[i * kk + t];
          for (int64_t q = 0; q < p; ++q) {
            scalar_t* gc = GC + (r * p + q) * ig;
            std::fill(gc, gc + ig, scalar_t(0));
            for (int64_t t = 0; t < kk; ++t) row_axpy(gc, gt + t * ig, pat[q * kk + t], ig);
            GVC[q * o + r] = row_dot(gc, COEF + (r * p + q) * ig, ig);
            row_scale(gc, gc, VC[q * o + r], ig);
          }
          const scalar_t* pwr = PW + r * ig * m;
          for (int64_t i = 0; i < ig; ++i)
            for (int64_t j = 0; j < m; ++j) pw_t[j * ig + i] = pwr[i * m + j];
          std::fill(u_t.begin(), u_t.end(), scalar_t(0));
          double s5 = 0;
          for (int64_t j = 0; j < m; ++j) {
            scalar_t* uj = u_t.data() + j * ig;
            for (int64_t t = 0; t < kk; ++t) {
              row_axpyz(uj, gt + t * ig, dwt + (j * kk + t) * ig, scalar_t(1), ig);
              row_axpyz(acc_g + (j * kk + t) * ig, pw_t.data() + j * ig, gt + t * ig, a5, ig);
            }
            s5 += row_dot(pw_t.data() + j * ig, uj, ig);
          }
          GV5[r] = s5;
          scalar_t* gpw = GPW + r * ig * m;
          for (int64_t i = 0; i < ig; ++i)
            for (int64_t j = 0; j < m; ++j) gpw[i * m + j] = a5 * u_t[j * ig + i];
        }
      }
    });
  });
  // The tasks' partial sums in task order, back to dw's (g * ig * m, kk) layout.
  auto g_dw = partial.sum(0).view({groups, m, kk, ig}).permute({0, 3, 1, 2}).reshape(dw.sizes());
  return {g_origin, g_v0, g_coef, g_v_coef, g_pw, g_dw, g_v5, grad_t};
}

// From u (o, kk, mg) = grad_t @ conv1^T and conv2 (o, mg, kk):
//   g_conv2[o, m, t] = v[o] u[o, t, m],  g_v[o] = sum_{m, t} u[o, t, m] conv2[o, m, t],
//   conv2_ts[o, t, m] = v[o] conv2[o, m, t]  (the scaled, transposed conv2 for g_conv1).
std::vector<at::Tensor> orepa_seq_pass(const at::Tensor& u, const at::Tensor& conv2,
                                       const at::Tensor& v) {
  const auto dtype = conv2.scalar_type();
  check_cpu(u, "u", dtype);
  check_cpu(conv2, "conv2", dtype);
  check_cpu(v, "v", dtype);
  const int64_t o = conv2.size(0), mg = conv2.size(1), kk = conv2.size(2);
  TORCH_CHECK(u.numel() == o * kk * mg && v.numel() == o, "orepa_seq_pass: inconsistent shapes");
  auto g_conv2 = at::empty({o, mg, kk}, conv2.options());
  auto g_v = at::empty({o}, conv2.options());
  auto conv2_ts = at::empty({o, kk, mg}, conv2.options());
  AT_DISPATCH_FLOATING_TYPES(dtype, "orepa_seq_pass", [&] {
    const scalar_t *U = u.data_ptr<scalar_t>(), *C = conv2.data_ptr<scalar_t>(),
                   *V = v.data_ptr<scalar_t>();
    scalar_t *GC = g_conv2.data_ptr<scalar_t>(), *GV = g_v.data_ptr<scalar_t>(),
             *CT = conv2_ts.data_ptr<scalar_t>();
    at::parallel_for(0, o, grain(mg * kk), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t s = V[r];
        const scalar_t* ur = U + r * kk * mg;
        const scalar_t* cr = C + r * mg * kk;
        scalar_t* gr = GC + r * mg * kk;
        scalar_t* tr = CT + r * kk * mg;
        double dot = 0;
        for (int64_t mi = 0; mi < mg; ++mi)
          for (int64_t t = 0; t < kk; ++t) {
            const scalar_t ut = ur[t * mg + mi], c = cr[mi * kk + t];
            dot += double(ut) * double(c);
            gr[mi * kk + t] = s * ut;
            tr[t * mg + mi] = s * c;
          }
        GV[r] = dot;
      }
    });
  });
  return {g_conv2, g_v, conv2_ts};
}

// For rows r of a and b (same shape): (a * v[r] per row, <a[r], b[r]>, and a * v2[r] per row
// when v2 is given). With inplace=true the first scaled rows overwrite a (after the dot
// products and the second scaling are taken from the original values).
std::vector<at::Tensor> row_scale_dot(at::Tensor a, const at::Tensor& v, const at::Tensor& b,
                                      bool inplace, const c10::optional<at::Tensor>& v2) {
  const auto dtype = a.scalar_type();
  check_cpu(a, "a", dtype);
  check_cpu(v, "v", dtype);
  check_cpu(b, "b", dtype);
  const int64_t rows = a.size(0), n = a.numel() / std::max<int64_t>(1, rows);
  TORCH_CHECK(b.numel() == a.numel() && b.size(0) == rows && v.numel() == rows,
              "row_scale_dot: inconsistent shapes");
  if (v2.has_value()) {
    check_cpu(*v2, "v2", dtype);
    TORCH_CHECK(v2->numel() == rows, "row_scale_dot: v2 must have one value per row");
  }
  auto scaled = inplace ? a : at::empty_like(a);
  auto scaled2 = v2.has_value() ? at::empty_like(a) : at::Tensor();
  auto dots = at::empty({rows}, a.options());
  AT_DISPATCH_FLOATING_TYPES(dtype, "row_scale_dot", [&] {
    const scalar_t *A = a.data_ptr<scalar_t>(), *B = b.data_ptr<scalar_t>(),
                   *V = v.data_ptr<scalar_t>();
    scalar_t *S = scaled.data_ptr<scalar_t>(), *D = dots.data_ptr<scalar_t>();
    scalar_t* S2 = v2.has_value() ? scaled2.data_ptr<scalar_t>() : nullptr;
    const scalar_t* V2 = v2.has_value() ? v2->data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, rows, grain(n), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t s = V[r];
        if (S2 != nullptr) row_scale(S2 + r * n, A + r * n, V2[r], n);
        double dot = 0;
_Pragma("omp simd reduction(+ : dot)")
        for (int64_t j = r * n; j < (r + 1) * n; ++j) {
          const scalar_t x = A[j];
          dot += double(x) * double(B[j]);
          S[j] = s * x;
        }
        D[r] = dot;
      }
    });
  });
  return {scaled, dots, scaled2};
}

// In place: a[r] = va[r] a[r] + vb[r] b[r].
at::Tensor rows_axpby_(at::Tensor a, const at::Tensor& va, const at::Tensor& b,
                       const at::Tensor& vb) {
  const auto dtype = a.scalar_type();
  check_cpu(a, "a", dtype);
  check_cpu(va, "va", dtype);
  check_cpu(b, "b", dtype);
  check_cpu(vb, "vb", dtype);
  const int64_t rows = a.size(0), n = a.numel() / std::max<int64_t>(1, rows);
  TORCH_CHECK(b.numel() == a.numel() && va.numel() == rows && vb.numel() == rows,
              "rows_axpby_: inconsistent shapes");
  AT_DISPATCH_FLOATING_TYPES(dtype, "rows_axpby_", [&] {
    scalar_t* A = a.data_ptr<scalar_t>();
    const scalar_t *B = b.data_ptr<scalar_t>(), *VA = va.data_ptr<scalar_t>(),
                   *VB = vb.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain(n), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t x = VA[r], y = VB[r];
_Pragma("omp simd")
        for (int64_t j = r * n; j < (r + 1) * n; ++j) A[j] = x * A[j] + y * B[j];
      }
    });
  });
  return a;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused CPU passes of OREPA's kernel generators (see orepa_function.py)";
  m.def("scaled_transpose", &scaled_transpose, "(o, a, b) -> v[o] * x[o].T as (o, b, a)");
  m.def("orepa_combine", &orepa_combine, "OREPA kxk kernel from its branch terms");
  m.def("orepa_grad_pass", &orepa_grad_pass, "one pass over an OREPA kxk kernel gradient");
  m.def("orepa_seq_pass", &orepa_seq_pass, "gradients of the 1x1 -> kxk branch's kxk factor");
  m.def("row_scale_dot", &row_scale_dot, "rows scaled by v (and v2), and row-wise dot products",
        py::arg("a"), py::arg("v"), py::arg("b"), py::arg("inplace") = false,
        py::arg("v2") = py::none());
  m.def("rows_axpby_", &rows_axpby_, "a[r] = va[r] a[r] + vb[r] b[r], in place");
}

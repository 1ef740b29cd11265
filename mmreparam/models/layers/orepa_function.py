"""OREPA's kernel generation as one autograd node with a hand-written backward pass.

Written with autograd's ordinary operators, the generator of a ``kxk`` OREPA block runs
some twenty elementwise passes over kernel-sized tensors (scalings, layout copies, sums of
branch kernels) in the forward and backward passes, next to three large matrix products.
When the batch is small those passes cost as much as the products. The functions here keep
the products as few large GEMMs and do the rest in a handful of *passes*, each one sweep over
kernel-sized memory; nothing kernel-sized is kept for the backward pass (the inputs are
parameters, which autograd keeps anyway).

The passes exist twice, with the same arguments and results:

- :class:`TorchPasses`: torch operators, for any device and dtype;
- :class:`CPUPasses`: the compiled extension ``mmreparam._ext`` (``mmreparam/csrc/``), one
  loop per pass, used for float32 / float64 CPU tensors when it is built (``pip install``
  builds it; ``MMREPARAM_WITH_OPS=0`` skips it).

Both are exact (no approximation): ``tests/test_models/test_layers/test_orepa_function.py``
checks each pass of one against the other and the functions with
``torch.autograd.gradcheck`` in float64 on both.
"""
import logging
from typing import Any, NamedTuple, Optional, Sequence, Tuple

import torch
from mmengine.logging import print_log
from torch import Tensor
from torch.autograd.function import once_differentiable

try:
    from mmreparam import _ext
except ImportError:  # built without the extension (MMREPARAM_WITH_OPS=0)
    _ext = None

_EXT_DTYPES = (torch.float32, torch.float64)


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """``(a[o] * b[o]).sum()`` for each row ``o`` of two same-shaped contiguous tensors."""
    rows = a.shape[0]
    return torch.linalg.vecdot(a.reshape(rows, -1), b.reshape(rows, -1))


def _scaled(src: Tensor, scale: Tensor, out_shape, permutation) -> Tensor:
    """``src * scale`` written into a new contiguous tensor of ``out_shape`` through
    ``permutation``: one pass that scales and changes the memory layout."""
    out = src.new_empty(out_shape)
    torch.mul(src, scale, out=out.permute(*permutation))
    return out


class TorchPasses:
    """The generators' elementwise passes, written with torch operators (any device/dtype).

    Layouts (contiguous; ``o`` outputs, ``g`` groups, ``og = o / g``, ``ig`` / ``mg``
    per-group input / internal channels, ``kk`` taps, ``p`` patterns, ``m`` depthwise
    multiplier): ``origin (o, ig, kk)``, ``coef (o, p, ig)``, ``v_coef (p, o)``,
    ``pattern (o, p, kk)``, ``conv2 (o, mg, kk)``, ``seq_t (o, kk, ig)``, ``pw (o, ig * m)``,
    ``dw (g * ig * m, kk)``, vectors ``(o,)``.
    """

    @staticmethod
    def scaled_transpose(x: Tensor, v: Tensor) -> Tensor:
        """``(o, a, b) -> (o, b, a)``: ``out[r] = v[r] * x[r].T``, contiguous."""
        o, a, b = x.shape
        return _scaled(x, v.reshape(o, 1, 1), (o, b, a), (0, 2, 1))

    @staticmethod
    def combine(origin: Tensor, v0: Tensor, coef: Tensor, v_coef: Tensor, pattern: Tensor,
                seq_t: Tensor, v_seq: Tensor, pw: Tensor, dw: Tensor, v_dwpw: Tensor,
                groups: int) -> Tensor:
        """The kernel ``(o, ig, kk)``: ``v0 * origin + (v_coef^T * coef)^T @ pattern +
        v_seq * seq_t^T + v_dwpw * (pw (x) dw)``."""
        o, ig, kk = origin.shape
        g, og, mult = groups, o // groups, pw.shape[1] // ig
        kernel = origin * v0.reshape(o, 1, 1)
        kernel.addcmul_(seq_t.transpose(1, 2), v_seq.reshape(o, 1, 1))
        kernel.baddbmm_((coef * v_coef.t()[:, :, None]).transpose(1, 2), pattern)
        # depthwise -> pointwise: per (group, input channel), (og, mult) @ (mult, kk).
        pw_p = pw.reshape(g, og, ig, mult).transpose(1, 2).reshape(g * ig, og, mult)
        dwpw = torch.bmm(pw_p, dw.reshape(g * ig, mult, kk)).reshape(g, ig, og, kk)
        kernel.reshape(g, og, ig, kk).addcmul_(dwpw.transpose(1, 2), v_dwpw.reshape(g, og, 1, 1))
        return kernel

    @staticmethod
    def grad_pass(grad: Tensor, origin: Tensor, v0: Tensor, coef: Tensor, v_coef: Tensor,
                  pattern: Tensor, pw: Tensor, dw: Tensor, v_dwpw: Tensor, groups: int):
        """From the kernel gradient ``grad (o, ig, kk)``: the gradients of ``origin``, ``v0``,
        ``coef``, ``v_coef``, ``pw``, ``dw`` and ``v_dwpw``, and ``grad`` transposed to
        ``(o, kk, ig)``."""
        o, ig, kk = origin.shape
        g, og, mult = groups, o // groups, pw.shape[1] // ig
        g_origin = grad * v0.reshape(o, 1, 1)
        g_v0 = _rowdot(grad, origin)
        h = torch.bmm(pattern, grad.transpose(1, 2))  # (o, p, ig)
        g_v_coef = (h * coef).sum(-1).t()
        g_coef = h.mul_(v_coef.t()[:, :, None])
        grad_t = grad.transpose(1, 2).contiguous()
        grad_p = grad.reshape(g, og, ig, kk).transpose(1, 2).reshape(g * ig, og, kk)
        pw_p = pw.reshape(g, og, ig, mult).transpose(1, 2)  # (g, ig, og, mult) view
        u = torch.bmm(grad_p, dw.reshape(g * ig, mult, kk).transpose(1, 2))
        u = u.reshape(g, ig, og, mult)
        g_v5 = (u * pw_p).sum(dim=(1, 3)).reshape(o)
        g_pw = _scaled(u, v_dwpw.reshape(g, 1, og, 1), (g, og, ig, mult), (0, 2, 1, 3))
        pw_s = (pw_p * v_dwpw.reshape(g, 1, og, 1)).reshape(g * ig, og, mult)
        g_dw = torch.bmm(pw_s.transpose(1, 2), grad_p).reshape(dw.shape)
        return g_origin, g_v0, g_coef, g_v_coef, g_pw.reshape(pw.shape), g_dw, g_v5, grad_t

    @staticmethod
    def seq_pass(u: Tensor, conv2: Tensor, v: Tensor):
        """From ``u (o, kk, mg)``: ``conv2``'s gradient ``v * u^T``, ``v``'s gradient
        ``<u^T, conv2>`` per row, and ``conv2`` scaled and transposed (``(o, kk, mg)``)."""
        o = conv2.shape[0]
        u_t = u.transpose(1, 2).contiguous()
        g_v = _rowdot(u_t, conv2)
        return u_t.mul_(v.reshape(o, 1, 1)), g_v, TorchPasses.scaled_transpose(conv2, v)

    @staticmethod
    def row_scale_dot(a: Tensor, v: Tensor, b: Tensor, inplace: bool = False,
                      v2: Optional[Tensor] = None):
        """``(a * v[r] per row r, <a[r], b[r]>, a * v2[r] per row or None)`` for 2-d ``a``
        and ``b``; ``inplace`` overwrites ``a`` with the first scaled rows."""
        dots = _rowdot(a, b)
        scaled2 = None if v2 is None else a * v2[:, None]
        return (a.mul_(v[:, None]) if inplace else a * v[:, None]), dots, scaled2

    @staticmethod
    def rows_axpby_(a: Tensor, va: Tensor, b: Tensor, vb: Tensor) -> Tensor:
        """In place, for 2-d ``a`` and ``b``: ``a[r] = va[r] * a[r] + vb[r] * b[r]``."""
        return a.mul_(va[:, None]).addcmul_(b, vb[:, None])


class CPUPasses:
    """The passes of :class:`TorchPasses` as single loops (``mmreparam._ext``; float32 and
    float64 CPU tensors)."""

    @staticmethod
    def scaled_transpose(x, v):
        """See :meth:`TorchPasses.scaled_transpose`."""
        return _ext.scaled_transpose(x.contiguous(), v.contiguous())

    @staticmethod
    def combine(origin, v0, coef, v_coef, pattern, seq_t, v_seq, pw, dw, v_dwpw, groups):
        """See :meth:`TorchPasses.combine`."""
        return _ext.orepa_combine(*(t.contiguous() for t in (
            origin, v0, coef, v_coef, pattern, seq_t, v_seq, pw, dw, v_dwpw)), groups)

    @staticmethod
    def grad_pass(grad, origin, v0, coef, v_coef, pattern, pw, dw, v_dwpw, groups):
        """See :meth:`TorchPasses.grad_pass`."""
        return tuple(_ext.orepa_grad_pass(*(t.contiguous() for t in (
            grad, origin, v0, coef, v_coef, pattern, pw, dw, v_dwpw)), groups))

    @staticmethod
    def seq_pass(u, conv2, v):
        """See :meth:`TorchPasses.seq_pass`."""
        return tuple(_ext.orepa_seq_pass(u.contiguous(), conv2.contiguous(), v.contiguous()))

    @staticmethod
    def row_scale_dot(a, v, b, inplace=False, v2=None):
        """See :meth:`TorchPasses.row_scale_dot`."""
        a = a.contiguous()  # a copy if it was not: in place is then on the copy
        return tuple(_ext.row_scale_dot(a, v.contiguous(), b.contiguous(), inplace,
                                        None if v2 is None else v2.contiguous()))

    @staticmethod
    def rows_axpby_(a, va, b, vb):
        """See :meth:`TorchPasses.rows_axpby_` (``a`` must be contiguous)."""
        return _ext.rows_axpby_(a, va.contiguous(), b.contiguous(), vb.contiguous())


_warned_no_ext = []


def passes_for(tensor: Tensor):
    """The passes for ``tensor``'s device and dtype: :class:`CPUPasses` for float32 /
    float64 CPU tensors when the extension is built, else :class:`TorchPasses`."""
    if tensor.device.type != 'cpu' or tensor.dtype not in _EXT_DTYPES:
        return TorchPasses
    if _ext is None:
        if not _warned_no_ext:
            _warned_no_ext.append(True)
            print_log('mmreparam._ext is not built: OREPA generates its kernels on the CPU '
                      'with torch operators (slower). Reinstall mmreparam with a C++ '
                      'compiler to build it.', logger='current', level=logging.WARNING)
        return TorchPasses
    return CPUPasses


class KxkInputs(NamedTuple):
    """The tensor inputs of :func:`orepa_kernel`, by name; :func:`orepa_kernel_grads` takes
    which of them need a gradient and returns their gradients in the same form."""
    origin: Any
    v_origin: Any
    coef: Any
    v_coef: Any
    pattern: Any
    conv2: Any
    conv1: Any
    v_seq: Any
    pw: Any
    dw: Any
    v_dwpw: Any


def orepa_kernel(passes, origin: Tensor, v_origin: Tensor, coef: Tensor, v_coef: Tensor,
                 pattern: Tensor, conv2: Tensor, conv1: Tensor, v_seq: Tensor, pw: Tensor,
                 dw: Tensor, v_dwpw: Tensor, groups: int) -> Tensor:
    """One generator's kernel (no autograd), with the given passes:
    ``K = v0*W + sum_q vq * (Cq (x) Pq) + v3 * (E (x) D) + v_dwpw * (PW (x) DW)``.

    Shapes (``o`` outputs, ``g`` groups, ``ig``/``og``/``mg`` per-group input/output/internal
    channels, ``m`` mult of the depthwise branch, ``kk = k * k``):

    - ``origin`` ``(o, ig, k, k)`` and ``v_origin`` ``(o,)``: the plain ``kxk`` branch;
    - ``coef`` ``(o, p, ig)``, ``v_coef`` ``(p, o)`` and ``pattern`` ``(o, p, kk)`` (no
      gradient): ``p`` branches that are a ``1x1`` weight (scaled per output channel) times a
      fixed per-channel ``kxk`` pattern (average, prior, centre);
    - ``conv2`` ``(o, mg, k, k)``, ``conv1`` ``(g * mg, ig)`` and ``v_seq`` ``(o,)``: the
      ``1x1 -> kxk`` branch;
    - ``pw`` ``(o, ig * m)``, ``dw`` ``(g * ig * m, kk)`` and ``v_dwpw`` ``(o,)``: the depthwise
      ``kxk -> 1x1`` branch;
    - ``passes``: :class:`TorchPasses` or :class:`CPUPasses` (:func:`passes_for`).

    Returns the ``(o, ig, k, k)`` kernel. The ``1x1 -> kxk`` product reads ``conv2`` in place
    (a ``(kk, mg) @ (mg, ig)`` product per output channel); the backward products
    (:func:`orepa_kernel_grads`) are one GEMM per group each, on ``(og * kk, ...)`` operands.
    ``B`` generators of one shape with ``g`` groups each are one generator with ``B * g``
    groups whose tensors are theirs concatenated along the outputs
    (:class:`OREPABatchKernelFunction`). The same kernel, written branch by branch as in the
    paper: :func:`~mmreparam.models.layers.orepa.orepa_kernel_reference`.
    """
    o, ig, kh, kw = origin.shape
    kk, g = kh * kw, groups
    og, mg = o // g, conv2.shape[1]
    # seq_t[o] = conv2[o]^T @ conv1 (its group's): conv2 read transposed, conv1 shared.
    seq_t = origin.new_empty(g, og, kk, ig)
    conv2_g, conv1_g = conv2.reshape(g, og, mg, kk), conv1.reshape(g, mg, ig)
    if g == 1:  # conv1 broadcast over the outputs without a copy
        torch.bmm(conv2_g[0].transpose(1, 2), conv1_g[0].expand(og, mg, ig), out=seq_t[0])
    else:  # one product for all groups (and all generators of a batch)
        torch.matmul(conv2_g.transpose(2, 3), conv1_g[:, None], out=seq_t)
    kernel = passes.combine(origin.reshape(o, ig, kk), v_origin, coef, v_coef, pattern,
                            seq_t.reshape(o, kk, ig), v_seq, pw, dw, v_dwpw, g)
    return kernel.reshape(o, ig, kh, kw)


def orepa_kernel_grads(passes, needs, grad: Tensor, origin: Tensor, v_origin: Tensor,
                       coef: Tensor, v_coef: Tensor, pattern: Tensor, conv2: Tensor,
                       conv1: Tensor, v_seq: Tensor, pw: Tensor, dw: Tensor, v_dwpw: Tensor,
                       groups: int) -> tuple:
    """The gradients of :func:`orepa_kernel`'s 11 tensor inputs from the kernel's gradient
    ``grad``, as a :class:`KxkInputs`; ``needs`` (a :class:`KxkInputs` of bools, or the
    same in a plain sequence) says which are wanted (the others are None)."""
    needs = KxkInputs(*needs)
    g = groups
    o, ig, kh, kw = origin.shape
    kk, og, mg = kh * kw, o // g, conv2.shape[1]
    grad = grad.reshape(o, ig, kk).contiguous()
    (g_origin, g_v_origin, g_coef, g_v_coef, g_pw, g_dw, g_v_dwpw,
     grad_t) = passes.grad_pass(grad, origin.reshape(o, ig, kk), v_origin, coef, v_coef,
                                pattern, pw, dw, v_dwpw, g)
    g_conv2 = g_conv1 = g_v_seq = None
    conv2_3d = conv2.reshape(o, mg, kk)
    if needs.conv2 or needs.v_seq:
        # d/d conv2[o, m, t] (unscaled) = sum_i grad[o, i, t] conv1[m, i], as (o, kk, mg)
        u = torch.bmm(grad_t.reshape(g, og * kk, ig),
                      conv1.reshape(g, mg, ig).transpose(1, 2))
        g_conv2, g_v_seq, conv2_ts = passes.seq_pass(u.reshape(o, kk, mg), conv2_3d, v_seq)
        g_conv2 = g_conv2.reshape(conv2.shape)
    elif needs.conv1:
        conv2_ts = passes.scaled_transpose(conv2_3d, v_seq)
    if needs.conv1:
        # d/d conv1[m, i] = sum_{o, t} v_seq[o] conv2[o, m, t] grad[o, i, t]
        g_conv1 = torch.bmm(conv2_ts.reshape(g, og * kk, mg).transpose(1, 2),
                            grad_t.reshape(g, og * kk, ig)).reshape(conv1.shape)
    grads = (g_origin.reshape(origin.shape), g_v_origin, g_coef, g_v_coef, None, g_conv2,
             g_conv1, g_v_seq, g_pw, g_dw, g_v_dwpw)
    return KxkInputs(*(t if need else None for t, need in zip(grads, needs)))


class Kernel1x1Inputs(NamedTuple):
    """The tensor inputs of :func:`orepa_1x1_kernel`, by name; :func:`orepa_1x1_kernel_grads`
    takes which of them need a gradient and returns their gradients in the same form."""
    origin: Any
    v_origin: Any
    conv2: Any
    conv1: Any
    v_product: Any


def orepa_1x1_kernel(passes, origin: Tensor, v_origin: Tensor, conv2: Tensor, conv1: Tensor,
                     v_product: Tensor) -> Tensor:
    """``K = v0 * W + v1 * (C2 @ C1)``: the kernels of a batch of OREPA ``1x1`` blocks (no
    autograd).

    ``W`` is ``(b, o, i)``, ``C2`` ``(b, o, m)``, ``C1`` ``(b, m, i)``, ``v0`` and ``v1``
    ``(b * o,)`` for ``b`` blocks (one block: ``b = 1``); ``passes`` as
    :func:`orepa_kernel`. Returns the ``(b, o, i)`` kernels. The per-row scales are applied
    to the product's output and, in the backward pass (:func:`orepa_1x1_kernel_grads`), to
    whichever GEMM operand is smaller, so no scaled copy of a weight is kept.
    """
    b, o, i = origin.shape
    kernel = passes.rows_axpby_(torch.bmm(conv2, conv1).reshape(b * o, i), v_product,
                                origin.reshape(b * o, i), v_origin)
    return kernel.reshape(b, o, i)


def orepa_1x1_kernel_grads(passes, needs, grad: Tensor, origin: Tensor, v_origin: Tensor,
                           conv2: Tensor, conv1: Tensor, v_product: Tensor) -> tuple:
    """The gradients of :func:`orepa_1x1_kernel`'s 5 inputs, as a :class:`Kernel1x1Inputs`
    (None where not ``needs``, a :class:`Kernel1x1Inputs` of bools or a plain sequence)."""
    needs = Kernel1x1Inputs(*needs)
    b, o, i = origin.shape
    m = conv2.shape[2]
    grad = grad.reshape(b, o, i).contiguous()
    # d/d conv1 = (v1 * conv2)^T @ grad: scale the smaller operand; grad's scaled copy
    # comes out of the same pass as origin's gradient.
    scale_grad = needs.conv1 and conv2.numel() >= grad.numel()
    g_origin, g_v_origin, grad_s = passes.row_scale_dot(
        grad.reshape(b * o, i), v_origin, origin.reshape(b * o, i),
        v2=v_product if scale_grad else None)
    g_conv2 = g_conv1 = g_v_product = None
    if needs.conv2 or needs.v_product:
        u = torch.bmm(grad, conv1.transpose(1, 2))  # d/d conv2, unscaled
        g_conv2, g_v_product, _ = passes.row_scale_dot(
            u.reshape(b * o, m), v_product, conv2.reshape(b * o, m), inplace=True)
        g_conv2 = g_conv2.reshape(b, o, m)
    if needs.conv1:
        g_conv1 = (torch.bmm(conv2.transpose(1, 2), grad_s.reshape(b, o, i)) if scale_grad
                   else torch.bmm((conv2 * v_product.reshape(b, o, 1)).transpose(1, 2), grad))
    grads = (g_origin.reshape(b, o, i), g_v_origin, g_conv2, g_conv1, g_v_product)
    return Kernel1x1Inputs(*(t if need else None for t, need in zip(grads, needs)))


def _cat(tensors, dim: int = 0) -> Tensor:
    """``torch.cat`` without a copy for one tensor."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim)


class KxkBatchLayout(NamedTuple):
    """How :class:`OREPABatchKernelFunction` reads its inputs.

    ``batch`` generators with ``groups`` groups each; ``coef`` weights per generator (the
    ``1x1`` weights of the pattern branches); the rows of each generator's ``vector`` that
    scale the ``origin``, pattern (``coef_rows``), ``1x1 -> kxk`` (``seq``) and depthwise
    (``dwpw``) branches; ``passes`` as :func:`orepa_kernel`.
    """
    batch: int
    groups: int
    coef: int
    origin_row: int
    coef_rows: Tuple[int, ...]
    seq_row: int
    dwpw_row: int
    passes: type


#: The kinds of parameter of one ``kxk`` generator, in the order the batch Function takes
#: them (``coef`` stands for ``layout.coef`` kinds).
KXK_KINDS = ('origin', 'coef', 'idconv1', 'conv2', 'dw', 'pw', 'vector')


class KxkKinds(NamedTuple):
    """Something per kind of :data:`KXK_KINDS` (``coefs``: a tuple, one per coef weight)."""
    origin: Any
    coefs: Tuple
    idconv1: Any
    conv2: Any
    dw: Any
    pw: Any
    vector: Any

    @classmethod
    def split(cls, items: Sequence, batch: int, coefs: int) -> 'KxkKinds':
        """``items`` laid out as the batch Function takes its parameters (``batch`` of each
        kind in :data:`KXK_KINDS` order, ``coefs`` coef kinds), as tuples by kind."""
        chunks = [tuple(items[i:i + batch]) for i in range(0, len(items), batch)]
        return cls(chunks[0], tuple(chunks[1:1 + coefs]), *chunks[1 + coefs:])


class OREPABatchKernelFunction(torch.autograd.Function):
    """The kernels of ``B`` OREPA ``kxk`` generators of one shape, as one node.

    The parameters come in as they are stored, kind by kind (``B`` origins, then ``B``
    of each coef weight, ``B`` ``1x1`` offsets of the ``1x1 -> kxk`` branch, ``B``
    ``conv2``, ``B`` depthwise, ``B`` pointwise weights, ``B`` vectors: see
    :data:`KXK_KINDS`); they are concatenated along the outputs and generated as one
    generator with ``B * groups`` groups (:func:`orepa_kernel`). The backward pass
    computes the gradients of the concatenation in one go and gives each parameter a
    contiguous slice of them, so autograd takes them as they are (no per-parameter copy,
    no per-row gather of the branch scales).

    Args (of ``apply``):
        layout (KxkBatchLayout): The batch.
        pattern (Tensor): ``(B * o, p, kk)`` fixed patterns of the coef branches.
        identity (Tensor): ``(B * g * mg, ig, 1, 1)`` identity added to the offsets.
        *params: The parameters, as above.

    Returns:
        Tensor: The ``(B * o, ig, k, k)`` kernels, generator after generator.
    """

    @staticmethod
    def forward(ctx, layout: KxkBatchLayout, pattern: Tensor, identity: Tensor,
                *params: Tensor) -> Tensor:
        b, p = layout.batch, layout.coef
        origins, coefs, idconv1, conv2, dw, pw, vectors = KxkKinds.split(params, b, p)
        o, ig, kh, kw = origins[0].shape
        n = vectors[0].shape[0]
        # (b * o, p, ig): generator-major outputs, then pattern, then inputs.
        coef = torch.stack([c.reshape(o, ig) for q in range(p) for c in coefs[q]], dim=0)
        coef = coef.reshape(p, b * o, ig).transpose(0, 1).contiguous()
        rows = _cat([v[None] for v in vectors]).transpose(0, 1).reshape(n, b * o)
        v_coef = torch.stack([rows[r] for r in layout.coef_rows])
        tensors = (_cat(origins), rows[layout.origin_row], coef, v_coef, pattern,
                   _cat(conv2), (_cat(idconv1) + identity).reshape(-1, ig),
                   rows[layout.seq_row], _cat(pw).reshape(b * o, -1),
                   _cat(dw).reshape(-1, kh * kw), rows[layout.dwpw_row])
        ctx.layout = layout
        ctx.save_for_backward(*tensors)
        ctx.shapes = [t.shape for t in params]
        return orepa_kernel(layout.passes, *tensors, b * layout.groups)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        layout = ctx.layout
        b, p = layout.batch, layout.coef
        saved = ctx.saved_tensors
        origin = saved[0]
        o, ig = origin.shape[0] // b, origin.shape[1]
        needs = ctx.needs_input_grad[3:]  # per parameter
        kinds = KxkKinds.split(needs, b, p)
        need_vector = any(kinds.vector)  # its rows scale every branch
        core_needs = KxkInputs(
            origin=any(kinds.origin), v_origin=need_vector,
            coef=any(any(c) for c in kinds.coefs), v_coef=need_vector, pattern=False,
            conv2=any(kinds.conv2), conv1=any(kinds.idconv1), v_seq=need_vector,
            pw=any(kinds.pw), dw=any(kinds.dw), v_dwpw=need_vector)
        (g_origin, g_v_origin, g_coef, g_v_coef, _, g_conv2, g_conv1, g_v_seq, g_pw, g_dw,
         g_v_dwpw) = orepa_kernel_grads(layout.passes, core_needs, grad, *saved,
                                        b * layout.groups)
        per_kind = []
        per_kind.append(g_origin.split(o) if g_origin is not None else None)
        if g_coef is not None:  # (b * o, p, ig) -> (p, b, o, ig) contiguous
            g_coef = g_coef.reshape(b, o, p, ig).permute(2, 0, 1, 3).contiguous()
            per_kind += [g_coef[q] for q in range(p)]
        else:
            per_kind += [None] * p
        per_kind.append(None if g_conv1 is None else g_conv1.reshape(b, -1))
        per_kind.append(None if g_conv2 is None else g_conv2.reshape(b, -1))
        per_kind.append(None if g_dw is None else g_dw.reshape(b, -1))
        per_kind.append(None if g_pw is None else g_pw.reshape(b, -1))
        if need_vector:
            by_row = {layout.origin_row: g_v_origin, layout.seq_row: g_v_seq,
                      layout.dwpw_row: g_v_dwpw}
            by_row.update({r: g_v_coef[j] for j, r in enumerate(layout.coef_rows)})
            n = ctx.shapes[-1][0]
            per_kind.append(torch.stack([by_row[r].reshape(b, o) for r in range(n)], dim=1))
        else:
            per_kind.append(None)
        grads = []
        for kind, values in enumerate(per_kind):
            for i in range(b):
                shape = ctx.shapes[kind * b + i]
                need = needs[kind * b + i]
                grads.append(values[i].reshape(shape) if need and values is not None
                             else None)
        return (None, None, None, *grads)


class OREPA1x1BatchKernelFunction(torch.autograd.Function):
    """The kernels of ``B`` OREPA ``1x1`` blocks of one shape, as one node.

    ``apply(passes, *params)``: ``B`` origins ``(o, i, 1, 1)``, ``B`` ``conv2``
    ``(o, m, 1, 1)``, ``B`` ``conv1`` ``(m, i, 1, 1)`` and ``B`` vectors ``(2, o)``, as
    stored; generated as one batch of :func:`orepa_1x1_kernel` on their concatenation, each
    parameter's gradient a contiguous slice. Returns the ``(B, o, i)`` kernels.
    """

    @staticmethod
    def forward(ctx, passes: type, *params: Tensor) -> Tensor:
        b = len(params) // 4
        origins, conv2, conv1, vectors = (params[i * b:(i + 1) * b] for i in range(4))
        o, i = origins[0].shape[:2]
        rows = _cat([v[None] for v in vectors]).transpose(0, 1).reshape(2, b * o)
        tensors = (_cat(origins).reshape(b, o, i), rows[0], _cat(conv2).reshape(b, o, -1),
                   _cat(conv1).reshape(b, -1, i), rows[1])
        ctx.passes, ctx.shapes = passes, [t.shape for t in params]
        ctx.save_for_backward(*tensors)
        return orepa_1x1_kernel(passes, *tensors)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        needs = ctx.needs_input_grad[1:]  # per parameter
        b = len(needs) // 4
        # kinds, as forward takes them: origins, conv2, conv1, vectors
        need_origin, need_conv2, need_conv1, need_vector = (
            any(needs[i * b:(i + 1) * b]) for i in range(4))
        core_needs = Kernel1x1Inputs(origin=need_origin, v_origin=need_vector,
                                     conv2=need_conv2, conv1=need_conv1,
                                     v_product=need_vector)
        g_origin, g_v0, g_conv2, g_conv1, g_v1 = orepa_1x1_kernel_grads(
            ctx.passes, core_needs, grad, *ctx.saved_tensors)
        o = g_origin.shape[1] if g_origin is not None else ctx.shapes[0][0]
        g_vector = (torch.stack([g_v0.reshape(b, o), g_v1.reshape(b, o)], dim=1)
                    if need_vector else None)
        grads = []
        for kind, values in enumerate((g_origin, g_conv2, g_conv1, g_vector)):
            for i in range(b):
                need = needs[kind * b + i]
                grads.append(values[i].reshape(ctx.shapes[kind * b + i])
                             if need and values is not None else None)
        return (None, *grads)

"""OREPA's kernel generation as one autograd node with a hand-written backward pass.

Written with autograd's ordinary operators, the generator of a ``kxk`` OREPA block runs
some twenty elementwise passes over kernel-sized tensors (scalings, layout copies, sums of
branch kernels) in the forward and backward passes, next to three large matrix products.
When the batch is small those passes cost as much as the products. This module computes
the same kernel and gradients with the products laid out as few large GEMMs and about a
third of the elementwise passes; nothing kernel-sized is kept for the backward pass (the
inputs are parameters, which autograd keeps anyway).

The function is exact (no approximation): ``tests/test_models/test_layers/test_orepa_function.py``
checks it against autograd with ``torch.autograd.gradcheck`` in float64.
"""
import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


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


class OREPAKernelFunction(torch.autograd.Function):
    """``K = v0*W + coef @ pattern + v3 * (E (x) D) + v5 * (PW (x) DW)`` for one generator.

    Shapes (``o`` outputs, ``g`` groups, ``ig``/``og``/``mg`` per-group input/output/internal
    channels, ``m`` mult of the depthwise branch, ``kk = k * k``):

    - ``origin`` ``(o, ig, k, k)`` and ``v_origin`` ``(o,)``: the plain ``kxk`` branch;
    - ``coef`` ``(o, ig, p)`` and ``pattern`` ``(o, p, kk)`` (no gradient): branches that are a
      ``1x1`` weight times a fixed per-channel ``kxk`` pattern (average, prior, centre);
    - ``conv2`` ``(o, mg, k, k)``, ``conv1`` ``(g * mg, ig)`` and ``v_seq`` ``(o,)``: the
      ``1x1 -> kxk`` branch;
    - ``pw`` ``(o, ig * m)``, ``dw`` ``(g * ig * m, kk)`` and ``v_dwpw`` ``(o,)``: the depthwise
      ``kxk -> 1x1`` branch.

    Returns the ``(o, ig, k, k)`` kernel.
    """

    @staticmethod
    def forward(ctx, origin: Tensor, v_origin: Tensor, coef: Tensor, pattern: Tensor,
                conv2: Tensor, conv1: Tensor, v_seq: Tensor, pw: Tensor, dw: Tensor,
                v_dwpw: Tensor, groups: int) -> Tensor:
        o, ig, kh, kw = origin.shape
        kk, g = kh * kw, groups
        og, mg = o // g, conv2.shape[1]
        mult = pw.shape[1] // ig
        kernel = (origin.reshape(o, ig, kk) * v_origin.reshape(o, 1, 1))
        kernel.baddbmm_(coef, pattern)
        # 1x1 -> kxk: one GEMM per group, (og*kk, mg) @ (mg, ig), read back transposed.
        conv2_t = conv2.reshape(g, og, mg, kk).transpose(2, 3).reshape(g, og * kk, mg)
        seq = torch.bmm(conv2_t, conv1.reshape(g, mg, ig)).reshape(o, kk, ig)
        kernel.addcmul_(seq.transpose(1, 2), v_seq.reshape(o, 1, 1))
        # depthwise -> pointwise: per (group, input channel), (og, mult) @ (mult, kk).
        pw_p = pw.reshape(g, og, ig, mult).transpose(1, 2).reshape(g * ig, og, mult)
        dwpw = torch.bmm(pw_p, dw.reshape(g * ig, mult, kk)).reshape(g, ig, og, kk)
        kernel.reshape(g, og, ig, kk).addcmul_(dwpw.transpose(1, 2),
                                               v_dwpw.reshape(g, og, 1, 1))
        ctx.groups = groups
        ctx.save_for_backward(origin, v_origin, coef, pattern, conv2, conv1, v_seq, pw, dw,
                              v_dwpw)
        return kernel.reshape(o, ig, kh, kw)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        (origin, v_origin, coef, pattern, conv2, conv1, v_seq, pw, dw,
         v_dwpw) = ctx.saved_tensors
        g = ctx.groups
        o, ig, kh, kw = origin.shape
        kk, og, mg = kh * kw, o // g, conv2.shape[1]
        mult = pw.shape[1] // ig
        grad = grad.reshape(o, ig, kk).contiguous()
        needs = ctx.needs_input_grad
        g_origin = g_v_origin = g_coef = g_conv2 = g_conv1 = g_v_seq = None
        g_pw = g_dw = g_v_dwpw = None

        if needs[0]:
            g_origin = (grad * v_origin.reshape(o, 1, 1)).reshape(origin.shape)
        if needs[1]:
            g_v_origin = _rowdot(grad, origin)
        if needs[2]:
            g_coef = torch.bmm(grad, pattern.transpose(1, 2))

        if needs[4] or needs[5] or needs[6]:
            grad_t = grad.transpose(1, 2).reshape(g, og * kk, ig)  # (o, kk, ig), one copy
            if needs[4] or needs[6]:
                # d/d conv2[o, m, t] (unscaled) = sum_i grad[o, i, t] conv1[m, i]
                u = torch.bmm(grad_t, conv1.reshape(g, mg, ig).transpose(1, 2))
                u = u.reshape(o, kk, mg).transpose(1, 2).contiguous()  # conv2's layout
                if needs[6]:
                    g_v_seq = _rowdot(u, conv2)
                if needs[4]:
                    g_conv2 = u.mul_(v_seq.reshape(o, 1, 1)).reshape(conv2.shape)
            if needs[5]:
                # d/d conv1[m, i] = sum_{o, t} v_seq[o] conv2[o, m, t] grad[o, i, t]
                conv2_s = _scaled(conv2.reshape(g, og, mg, kk), v_seq.reshape(g, og, 1, 1),
                                  (g, mg, og, kk), (0, 2, 1, 3))
                g_conv1 = torch.bmm(conv2_s.reshape(g, mg, og * kk), grad_t).reshape(
                    conv1.shape)

        if needs[7] or needs[8] or needs[9]:
            grad_p = grad.reshape(g, og, ig, kk).transpose(1, 2).reshape(g * ig, og, kk)
            dw_g = dw.reshape(g * ig, mult, kk)
            pw_p = pw.reshape(g, og, ig, mult).transpose(1, 2)  # (g, ig, og, mult) view
            if needs[7] or needs[9]:
                u = torch.bmm(grad_p, dw_g.transpose(1, 2)).reshape(g, ig, og, mult)
                if needs[9]:
                    g_v_dwpw = (u * pw_p).sum(dim=(1, 3)).reshape(o)
                if needs[7]:
                    g_pw = _scaled(u, v_dwpw.reshape(g, 1, og, 1), (g, og, ig, mult),
                                   (0, 2, 1, 3)).reshape(pw.shape)
            if needs[8]:
                pw_s = (pw_p * v_dwpw.reshape(g, 1, og, 1)).reshape(g * ig, og, mult)
                g_dw = torch.bmm(pw_s.transpose(1, 2), grad_p).reshape(dw.shape)
        return (g_origin, g_v_origin, g_coef, None, g_conv2, g_conv1, g_v_seq, g_pw, g_dw,
                g_v_dwpw, None)


class OREPA1x1KernelFunction(torch.autograd.Function):
    """``K = v0 * W + v1 * (C2 @ C1)``: the kernel of OREPA's ``1x1`` block, as one node.

    ``W`` is ``(o, i)``, ``C2`` ``(o, m)``, ``C1`` ``(m, i)``, ``v0`` and ``v1`` ``(o,)``. The
    per-row scales are applied to the product's output and, in the backward pass, to
    whichever GEMM operand is smaller, so no scaled copy of a weight is kept.
    """

    @staticmethod
    def forward(ctx, origin: Tensor, v_origin: Tensor, conv2: Tensor, conv1: Tensor,
                v_product: Tensor) -> Tensor:
        kernel = torch.mm(conv2, conv1).mul_(v_product[:, None])
        kernel.addcmul_(origin, v_origin[:, None])
        ctx.save_for_backward(origin, v_origin, conv2, conv1, v_product)
        return kernel

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        origin, v_origin, conv2, conv1, v_product = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad = grad.contiguous()
        g_origin = grad * v_origin[:, None] if needs[0] else None
        g_v_origin = _rowdot(grad, origin) if needs[1] else None
        g_conv2 = g_conv1 = g_v_product = None
        if needs[2] or needs[4]:
            u = torch.mm(grad, conv1.t())  # d/d conv2, unscaled
            if needs[4]:
                g_v_product = _rowdot(u, conv2)
            if needs[2]:
                g_conv2 = u.mul_(v_product[:, None])
        if needs[3]:
            if conv2.numel() <= grad.numel():
                g_conv1 = torch.mm((conv2 * v_product[:, None]).t(), grad)
            else:
                g_conv1 = torch.mm(conv2.t(), grad * v_product[:, None])
        return g_origin, g_v_origin, g_conv2, g_conv1, g_v_product

"""The fused OREPA generator: exact kernel and exact gradients."""
import pytest
import torch

from mmreparam.models.layers import OREPA, OREPA1x1, OREPAVGGBlock
from mmreparam.models.layers.fuse import dw_pw_to_full, merge_1x1_kxk
from mmreparam.models.layers.orepa_function import OREPA1x1KernelFunction, OREPAKernelFunction
from mmreparam.testing import literal_orepa_kernel, randomize_parameters

F64 = torch.float64


def branch_tensors(out, in_, groups, k, internal, mult, patterns, seed=0):
    """Random branch tensors shaped as OREPAKernelFunction takes them."""
    gen = torch.Generator().manual_seed(seed)
    ig = in_ // groups

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64).requires_grad_()

    return (rand(out, ig, k, k), rand(out), rand(out, ig, patterns),
            torch.randn(out, patterns, k * k, generator=gen, dtype=F64),
            rand(out, internal // groups, k, k), rand(internal, ig), rand(out),
            rand(out, ig * mult), rand(in_ * mult, k * k), rand(out))


def reference_kernel(origin, v_origin, coef, pattern, conv2, conv1, v_seq, pw, dw, v_dwpw,
                     groups):
    """The same kernel with autograd's ordinary operators and the fold math of fuse.py."""
    o, ig, kh, kw = origin.shape
    seq = merge_1x1_kxk(conv1, None, conv2, None, groups)[0]
    dwpw = dw_pw_to_full(dw.reshape(-1, 1, kh, kw), pw.reshape(o, -1, 1, 1), ig * groups,
                         groups)
    return (origin * v_origin.reshape(o, 1, 1, 1) + (coef @ pattern).reshape(origin.shape)
            + seq * v_seq.reshape(o, 1, 1, 1) + dwpw * v_dwpw.reshape(o, 1, 1, 1))


CASES = [  # out, in, groups, k, internal, mult, patterns
    (4, 3, 1, 3, 3, 2, 3),
    (6, 4, 2, 3, 8, 2, 2),
    (4, 6, 2, 5, 6, 3, 3),
    (3, 3, 3, 3, 6, 1, 2),
]


@pytest.mark.parametrize('case', CASES)
def test_gradcheck(case):
    tensors = branch_tensors(*case)
    groups = case[2]
    assert torch.autograd.gradcheck(lambda *t: OREPAKernelFunction.apply(*t, groups), tensors)


@pytest.mark.parametrize('case', CASES)
def test_fused_equals_reference(case):
    groups = case[2]
    fused_in = branch_tensors(*case, seed=1)
    ref_in = [t.detach().clone().requires_grad_(t.requires_grad) for t in fused_in]
    fused = OREPAKernelFunction.apply(*fused_in, groups)
    ref = reference_kernel(*ref_in, groups)
    torch.testing.assert_close(fused, ref, rtol=1e-12, atol=1e-12)
    # A non-contiguous incoming gradient, as conv backward may give.
    grad = torch.randn(fused.shape[::-1], dtype=F64).permute(3, 2, 1, 0)
    fused.backward(grad)
    ref.backward(grad)
    for a, b in zip(fused_in, ref_in):
        if a.requires_grad:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)


def test_only_requested_gradients():
    tensors = branch_tensors(*CASES[1])
    frozen = [t.detach() if i in (0, 4, 8) else t for i, t in enumerate(tensors)]
    OREPAKernelFunction.apply(*frozen, 2).sum().backward()
    for i, t in enumerate(tensors):
        if i in (0, 4, 8) or not t.requires_grad:
            assert t.grad is None
        else:
            assert t.grad is not None and t.grad.abs().sum() > 0


@pytest.mark.parametrize('block_type', [OREPA, OREPAVGGBlock])
def test_block_gradients_match_paper_equations(block_type):
    """Gradients of every generator parameter equal those of the paper's branch equations."""
    torch.manual_seed(0)
    block = block_type(8, 16, 3).double()
    generator = block if block_type is OREPA else block.rbr_dense
    randomize_parameters(generator, ('vector', 'idconv1'))
    weight = torch.randn(16, 8, 3, 3, dtype=F64)
    params = [p for p in generator.parameters() if p.requires_grad and p.dim() > 1]
    ours = torch.autograd.grad((generator.generate_kernel() * weight).sum(), params)
    paper = torch.autograd.grad((literal_orepa_kernel(generator) * weight).sum(), params)
    assert len(params) >= 7
    for a, b in zip(ours, paper):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)


def test_autocast_generates_in_full_precision():
    block = OREPA(8, 8, 3)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        kernel = block.generate_kernel()
    assert kernel.dtype == torch.float32
    torch.testing.assert_close(kernel, block.generate_kernel())


def test_second_order_gradients_are_refused_clearly():
    tensors = branch_tensors(*CASES[0])
    kernel = OREPAKernelFunction.apply(*tensors, 1)
    (grad, ) = torch.autograd.grad(kernel.square().sum(), tensors[0], create_graph=True)
    with pytest.raises(RuntimeError, match='once_differentiable|differentiable'):
        grad.sum().backward()


@pytest.mark.parametrize('out, mid, in_', [(5, 3, 3), (3, 3, 5), (4, 2, 6), (2, 6, 3)])
def test_1x1_gradcheck(out, mid, in_):
    gen = torch.Generator().manual_seed(2)
    tensors = [torch.randn(*shape, generator=gen, dtype=F64).requires_grad_()
               for shape in ((out, in_), (out, ), (out, mid), (mid, in_), (out, ))]
    assert torch.autograd.gradcheck(OREPA1x1KernelFunction.apply, tensors)
    w, v0, c2, c1, v1 = tensors
    expected = w * v0[:, None] + (c2 * v1[:, None]) @ c1
    torch.testing.assert_close(OREPA1x1KernelFunction.apply(*tensors), expected,
                               rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize('in_, out', [(4, 8), (8, 4)])
def test_1x1_block_gradients_match_formula(in_, out):
    block = OREPA1x1(in_, out).double()
    randomize_parameters(block, ('vector', 'conv1', 'conv2'), seed=3)
    weight = torch.randn(out, in_, 1, 1, dtype=F64)
    params = list(block.parameters())[:4]
    assert [p.shape[0] for p in params][-1] == 2  # the vector
    v = block.vector
    formula = (block.weight_or1x1_origin * v[0].reshape(-1, 1, 1, 1)
               + torch.einsum('om,mi->oi', block.weight_or1x1_l2i_conv2[:, :, 0, 0],
                              block.weight_or1x1_l2i_conv1[:, :, 0, 0])[..., None, None]
               * v[1].reshape(-1, 1, 1, 1))
    ours = torch.autograd.grad((block.generate_kernel() * weight).sum(), params)
    paper = torch.autograd.grad((formula * weight).sum(), params)
    for a, b in zip(ours, paper):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_meta_device_shapes():
    """Shape probing on the meta device works (autocast does not exist there)."""
    with torch.device('meta'):
        assert OREPA(8, 4, 3, groups=2)(torch.randn(1, 8, 5, 5)).shape == (1, 4, 5, 5)
        assert OREPA1x1(8, 16)(torch.randn(1, 8, 5, 5)).shape == (1, 16, 5, 5)

"""The fused OREPA generator: exact kernel and exact gradients, with both implementations
of its passes (torch operators, and the compiled CPU extension)."""
import logging
import os
from typing import Optional

import pytest
import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from mmreparam.models.layers import OREPA, OREPA1x1, OREPAVGGBlock, orepa_function
from mmreparam.models.layers.fuse import dw_pw_to_full, merge_1x1_kxk
from mmreparam.models.layers.orepa_function import (
    CPUPasses,
    TorchPasses,
    orepa_1x1_kernel,
    orepa_1x1_kernel_grads,
    orepa_kernel,
    orepa_kernel_grads,
    passes_for,
)
from mmreparam.testing import literal_orepa_kernel, randomize_parameters

F64 = torch.float64
PASSES = [TorchPasses, CPUPasses]


class OREPAKernelFunction(torch.autograd.Function):
    """:func:`~mmreparam.models.layers.orepa_function.orepa_kernel` and its hand-written
    backward (``orepa_kernel_grads``) as one autograd node for one generator, the way the
    library runs them for a batch (``OREPABatchKernelFunction``).

    ``apply(*tensors, groups, passes=None)``: the 11 tensors as ``orepa_kernel`` takes them;
    ``passes`` None picks by device and dtype (``passes_for``). Returns the
    ``(o, ig, k, k)`` kernel.
    """

    @staticmethod
    def forward(ctx, origin: Tensor, v_origin: Tensor, coef: Tensor, v_coef: Tensor,
                pattern: Tensor, conv2: Tensor, conv1: Tensor, v_seq: Tensor, pw: Tensor,
                dw: Tensor, v_dwpw: Tensor, groups: int,
                passes: Optional[type] = None) -> Tensor:
        passes = passes or passes_for(origin)
        tensors = (origin, v_origin, coef, v_coef, pattern, conv2, conv1, v_seq, pw, dw,
                   v_dwpw)
        ctx.groups, ctx.passes = groups, passes
        ctx.save_for_backward(*tensors)
        return orepa_kernel(passes, *tensors, groups)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        return orepa_kernel_grads(ctx.passes, ctx.needs_input_grad[:11], grad,
                                  *ctx.saved_tensors, ctx.groups) + (None, None)


class OREPA1x1KernelFunction(torch.autograd.Function):
    """:func:`~mmreparam.models.layers.orepa_function.orepa_1x1_kernel` and its hand-written
    backward (``orepa_1x1_kernel_grads``) as one autograd node.

    ``apply(origin, v_origin, conv2, conv1, v_product, passes=None)``, shaped as
    ``orepa_1x1_kernel`` takes them; ``passes`` as :class:`OREPAKernelFunction`. Returns the
    ``(b, o, i)`` kernels.
    """

    @staticmethod
    def forward(ctx, origin: Tensor, v_origin: Tensor, conv2: Tensor, conv1: Tensor,
                v_product: Tensor, passes: Optional[type] = None) -> Tensor:
        passes = passes or passes_for(origin)
        ctx.passes = passes
        ctx.save_for_backward(origin, v_origin, conv2, conv1, v_product)
        return orepa_1x1_kernel(passes, origin, v_origin, conv2, conv1, v_product)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        return orepa_1x1_kernel_grads(ctx.passes, ctx.needs_input_grad[:5], grad,
                                      *ctx.saved_tensors) + (None, )


def test_extension_is_built():
    """``pip install`` builds mmreparam._ext; only MMREPARAM_WITH_OPS=0 may leave it out."""
    if os.environ.get('MMREPARAM_WITH_OPS') == '0':
        pytest.skip('built with MMREPARAM_WITH_OPS=0')
    assert orepa_function._ext is not None
    assert passes_for(torch.zeros(1)) is CPUPasses
    assert passes_for(torch.zeros(1, dtype=F64)) is CPUPasses


def branch_tensors(out, in_, groups, k, internal, mult, patterns, seed=0):
    """Random branch tensors shaped as OREPAKernelFunction takes them."""
    gen = torch.Generator().manual_seed(seed)
    ig = in_ // groups

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64).requires_grad_()

    return (rand(out, ig, k, k), rand(out), rand(out, patterns, ig), rand(patterns, out),
            torch.randn(out, patterns, k * k, generator=gen, dtype=F64),
            rand(out, internal // groups, k, k), rand(internal, ig), rand(out),
            rand(out, ig * mult), rand(in_ * mult, k * k), rand(out))


def reference_kernel(origin, v_origin, coef, v_coef, pattern, conv2, conv1, v_seq, pw, dw,
                     v_dwpw, groups):
    """The same kernel with autograd's ordinary operators and the fold math of fuse.py."""
    o, ig, kh, kw = origin.shape
    seq = merge_1x1_kxk(conv1, None, conv2, None, groups)[0]
    dwpw = dw_pw_to_full(dw.reshape(-1, 1, kh, kw), pw.reshape(o, -1, 1, 1), ig * groups,
                         groups)
    coef_kernel = (coef * v_coef.t()[..., None]).transpose(1, 2) @ pattern
    return (origin * v_origin.reshape(o, 1, 1, 1) + coef_kernel.reshape(origin.shape)
            + seq * v_seq.reshape(o, 1, 1, 1) + dwpw * v_dwpw.reshape(o, 1, 1, 1))


CASES = [  # out, in, groups, k, internal, mult, patterns
    (4, 3, 1, 3, 3, 2, 3),
    (6, 4, 2, 3, 8, 2, 2),
    (4, 6, 2, 5, 6, 3, 3),
    (3, 3, 3, 3, 6, 1, 2),
]


@pytest.mark.parametrize('passes', PASSES)
@pytest.mark.parametrize('case', CASES)
def test_gradcheck(case, passes):
    tensors = branch_tensors(*case)
    groups = case[2]
    assert torch.autograd.gradcheck(lambda *t: OREPAKernelFunction.apply(*t, groups, passes),
                                    tensors)


@pytest.mark.parametrize('passes', PASSES)
@pytest.mark.parametrize('case', CASES)
def test_fused_equals_reference(case, passes):
    groups = case[2]
    fused_in = branch_tensors(*case, seed=1)
    ref_in = [t.detach().clone().requires_grad_(t.requires_grad) for t in fused_in]
    fused = OREPAKernelFunction.apply(*fused_in, groups, passes)
    ref = reference_kernel(*ref_in, groups)
    torch.testing.assert_close(fused, ref, rtol=1e-12, atol=1e-12)
    # A non-contiguous incoming gradient, as conv backward may give.
    grad = torch.randn(fused.shape[::-1], dtype=F64).permute(3, 2, 1, 0)
    fused.backward(grad)
    ref.backward(grad)
    for a, b in zip(fused_in, ref_in):
        if a.requires_grad:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('passes', PASSES)
def test_only_requested_gradients(passes):
    tensors = branch_tensors(*CASES[1])
    frozen = [t.detach() if i in (0, 3, 5, 9) else t for i, t in enumerate(tensors)]
    OREPAKernelFunction.apply(*frozen, 2, passes).sum().backward()
    for i, t in enumerate(tensors):
        if i in (0, 3, 5, 9) or not t.requires_grad:
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


@pytest.mark.parametrize('passes', PASSES)
@pytest.mark.parametrize('batch', [1, 3])
@pytest.mark.parametrize('out, mid, in_', [(5, 3, 3), (3, 3, 5), (4, 2, 6), (2, 6, 3)])
def test_1x1_gradcheck(out, mid, in_, batch, passes):
    gen = torch.Generator().manual_seed(2)
    tensors = [torch.randn(*shape, generator=gen, dtype=F64).requires_grad_()
               for shape in ((batch, out, in_), (batch * out, ), (batch, out, mid),
                             (batch, mid, in_), (batch * out, ))]
    assert torch.autograd.gradcheck(lambda *t: OREPA1x1KernelFunction.apply(*t, passes),
                                    tensors)
    w, v0, c2, c1, v1 = tensors
    expected = w * v0.reshape(batch, out, 1) + (c2 * v1.reshape(batch, out, 1)) @ c1
    torch.testing.assert_close(OREPA1x1KernelFunction.apply(*tensors, passes), expected,
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


# Each pass of the compiled extension against its torch-operator twin.
PASS_CASES = [  # out, in, groups, k, internal, mult, patterns
    (8, 6, 1, 3, 6, 8, 3),
    (6, 4, 2, 3, 8, 2, 2),
    (4, 6, 2, 5, 6, 3, 3),
    (9, 3, 3, 3, 6, 1, 2),
    (64, 48, 1, 3, 48, 8, 3),
]


def pass_inputs(case, dtype, seed=0):
    out, in_, groups, k, internal, mult, patterns = case
    gen = torch.Generator().manual_seed(seed)
    ig, mg, kk = in_ // groups, internal // groups, k * k

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64).to(dtype)

    return dict(origin=rand(out, ig, kk), v0=rand(out), coef=rand(out, patterns, ig),
                v_coef=rand(patterns, out), pattern=rand(out, patterns, kk),
                seq_t=rand(out, kk, ig), v_seq=rand(out), pw=rand(out, ig * mult),
                dw=rand(in_ * mult, kk), v5=rand(out), grad=rand(out, ig, kk),
                conv2=rand(out, mg, kk), u=rand(out, kk, mg), groups=groups)


def assert_all_close(a, b, dtype):
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == F64 else dict(rtol=2e-5, atol=2e-5)
    a, b = (a, ) if torch.is_tensor(a) else a, (b, ) if torch.is_tensor(b) else b
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.shape == y.shape and x.dtype == y.dtype and x.is_contiguous()
        torch.testing.assert_close(x, y, **tol)


@pytest.mark.skipif(orepa_function._ext is None, reason='mmreparam._ext is not built')
@pytest.mark.parametrize('dtype', [F64, torch.float32])
@pytest.mark.parametrize('case', PASS_CASES)
def test_cpu_passes_equal_torch_passes(case, dtype):
    t = pass_inputs(case, dtype)
    g = t['groups']
    calls = {
        'scaled_transpose': lambda P: P.scaled_transpose(t['conv2'], t['v_seq']),
        'combine': lambda P: P.combine(t['origin'], t['v0'], t['coef'], t['v_coef'],
                                       t['pattern'], t['seq_t'], t['v_seq'], t['pw'], t['dw'],
                                       t['v5'], g),
        'grad_pass': lambda P: P.grad_pass(t['grad'], t['origin'], t['v0'], t['coef'],
                                           t['v_coef'], t['pattern'], t['pw'], t['dw'],
                                           t['v5'], g),
        'seq_pass': lambda P: P.seq_pass(t['u'], t['conv2'], t['v_seq']),
        'row_scale_dot': lambda P: P.row_scale_dot(t['pw'], t['v0'], t['pw'] + 1,
                                                   v2=t['v5'])[:3],
        'rows_axpby_': lambda P: P.rows_axpby_(t['pw'].clone(), t['v0'], t['pw'] * 2, t['v5']),
    }
    for name, call in calls.items():
        assert_all_close(call(CPUPasses), call(TorchPasses), dtype)
    # In place: the scaled rows overwrite the input, the dot products use its old values.
    a = t['pw'].clone()
    scaled, dots, none = CPUPasses.row_scale_dot(a, t['v0'], t['pw'], inplace=True)
    assert scaled.data_ptr() == a.data_ptr() and none is None
    assert_all_close((a, dots), (t['pw'] * t['v0'][:, None], (t['pw'] * t['pw']).sum(1)),
                     dtype)


@pytest.mark.skipif(orepa_function._ext is None, reason='mmreparam._ext is not built')
def test_grad_pass_is_deterministic_and_thread_count_independent():
    t = pass_inputs((64, 32, 2, 3, 32, 8, 3), torch.float32, seed=4)
    args = [t[n] for n in ('grad', 'origin', 'v0', 'coef', 'v_coef', 'pattern', 'pw', 'dw',
                           'v5', 'groups')]
    first, second = CPUPasses.grad_pass(*args), CPUPasses.grad_pass(*args)
    for a, b in zip(first, second):
        assert torch.equal(a, b)  # the depthwise sum over outputs is added in a fixed order
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = CPUPasses.grad_pass(*args)
    finally:
        torch.set_num_threads(threads)
    assert_all_close(single, first, torch.float32)


@pytest.mark.skipif(orepa_function._ext is None, reason='mmreparam._ext is not built')
def test_extension_rejects_mixed_dtypes_clearly():
    t = pass_inputs(PASS_CASES[0], torch.float32)
    with pytest.raises(RuntimeError, match='v has dtype Double, expected Float'):
        CPUPasses.scaled_transpose(t['conv2'], t['v_seq'].double())
    with pytest.raises(RuntimeError, match='inconsistent shapes'):
        CPUPasses.seq_pass(t['u'][:, :-1], t['conv2'], t['v_seq'])


def test_passes_for_other_dtypes_and_devices():
    assert passes_for(torch.zeros(1, dtype=torch.bfloat16)) is TorchPasses
    assert passes_for(torch.zeros(1, dtype=torch.float16)) is TorchPasses
    assert passes_for(torch.zeros(1, device='meta')) is TorchPasses


def test_without_extension_torch_passes_and_one_warning(monkeypatch):
    logged = []
    monkeypatch.setattr(orepa_function, '_ext', None)
    monkeypatch.setattr(orepa_function, '_warned_no_ext', [])
    monkeypatch.setattr(orepa_function, 'print_log',
                        lambda msg, **kwargs: logged.append((msg, kwargs)))
    block = OREPA(4, 4, 3).double()
    assert passes_for(torch.zeros(1)) is TorchPasses
    kernel = block.generate_kernel()
    assert passes_for(torch.zeros(1)) is TorchPasses
    assert len(logged) == 1 and 'mmreparam._ext is not built' in logged[0][0]
    assert logged[0][1]['level'] == logging.WARNING
    monkeypatch.undo()
    torch.testing.assert_close(kernel, block.generate_kernel(), rtol=1e-13, atol=1e-13)


def test_half_precision_generator_uses_torch_passes():
    """Kernels of a half-precision module (no autocast) are generated with torch operators."""
    block = OREPA(8, 8, 3)
    kernel32 = block.generate_kernel()
    kernel16 = block.bfloat16().generate_kernel()
    assert kernel16.dtype == torch.bfloat16
    torch.testing.assert_close(kernel16.float(), kernel32, rtol=5e-2, atol=5e-2)

"""Re-parameterize upstream OpenMMLab backbones and measure it (``tools/reparam_table.py``).

For each backbone (built through its toolbox's registry at its usual width) and each block
type, :func:`mmreparam.reparameterize` and :func:`mmreparam.fold` are run and measured
(:func:`measure`):

- pairs: conv -> BN pairs converted / pairs the block type can take (``eligible``), and
  how many conv -> BN pairs were found in all; why the others stay plain (``reasons``);
- exp. err: relative output difference of the re-parameterized model against the plain one
  (eval mode, float32, randomized BN statistics);
- fold err: of the folded model against the re-parameterized one, after every branch was
  switched on (randomized branch scales and BNs), in float32 and in float64;
- fp32 rounding: of the re-parameterized model in float32 against itself in float64 (the
  floor of a float32 comparison: the float32 fold error is the two models' rounding
  errors added, so it can reach about twice this);
- load err: of a fresh upstream model, into which the folded state_dict loaded with
  ``strict=True``, against the re-parameterized one;
- grads: parameters of the new blocks that got a finite gradient in a training step / the
  blocks' trainable parameters (a switched-off branch gets its gradient through its scale);
- params: trainable parameters of the re-parameterized model / of the upstream model;
- step x: CPU time of one training step (forward and backward, batch 2) of the
  re-parameterized model over that of the plain one: the two models' steps alternate (so
  both see the same machine load) and the medians of ``steps`` steps each are divided.
"""
import copy

import torch
from mmengine.registry import MODELS

from ..apis import fold, reparameterize
from ..models.layers import ReparamBlock
from ..testing import randomize_bn, randomize_parameters
from .timing import interleaved

REPARAMS = ('OREPA', 'DBB', 'ACB', 'RepVGG')

HRNET_W18 = dict(
    stage1=dict(num_modules=1, num_branches=1, block='BOTTLENECK', num_blocks=(4, ),
                num_channels=(64, )),
    stage2=dict(num_modules=1, num_branches=2, block='BASIC', num_blocks=(4, 4),
                num_channels=(18, 36)),
    stage3=dict(num_modules=4, num_branches=3, block='BASIC', num_blocks=(4, 4, 4),
                num_channels=(18, 36, 72)),
    stage4=dict(num_modules=3, num_branches=4, block='BASIC', num_blocks=(4, 4, 4, 4),
                num_channels=(18, 36, 72, 144)))

#: name -> config of the upstream backbone (the sizes of a common model of each).
BACKBONES = {
    'mmdet CSPNeXt-tiny (RTMDet)': dict(type='mmdet.CSPNeXt', deepen_factor=0.167,
                                        widen_factor=0.375),
    'mmdet CSPDarknet-s (YOLOX)': dict(type='mmdet.CSPDarknet', deepen_factor=0.33,
                                       widen_factor=0.5),
    'mmdet Darknet-53 (YOLOv3)': dict(type='mmdet.Darknet', depth=53),
    'mmdet RegNetX-400MF': dict(type='mmdet.RegNet', arch='regnetx_400mf'),
    'mmdet HRNetV2-W18': dict(type='mmdet.HRNet', extra=HRNET_W18),
    'mmdet ResNet-50': dict(type='mmdet.ResNet', depth=50),
    'mmseg BiSeNetV2': dict(type='mmseg.BiSeNetV2'),
    'mmseg Fast-SCNN': dict(type='mmseg.FastSCNN'),
    'mmseg STDC1': dict(type='mmseg.STDCNet', stdc_type='STDCNet1', in_channels=3,
                        channels=(32, 64, 256, 512, 1024), bottleneck_type='cat',
                        num_convs=4, norm_cfg=dict(type='BN'), act_cfg=dict(type='ReLU'),
                        with_final_conv=False),
    'mmseg MobileNetV3-small': dict(type='mmseg.MobileNetV3', arch='small'),
    'mmpretrain MobileNetV2': dict(type='mmpretrain.MobileNetV2'),
    'mmpretrain EfficientNet-B0': dict(type='mmpretrain.EfficientNet', arch='b0'),
    'mmpretrain ShuffleNetV2': dict(type='mmpretrain.ShuffleNetV2'),
    'mmpretrain VGG-11-BN': dict(type='mmpretrain.VGG', depth=11, norm_cfg=dict(type='BN'),
                                 num_classes=-1),
}


def build(cfg: dict) -> torch.nn.Module:
    """The model of ``cfg`` (a copy is built: the registry pops keys), in eval mode."""
    model = MODELS.build(copy.deepcopy(cfg))
    model.eval()
    return model


def outputs(model: torch.nn.Module, x: torch.Tensor) -> list:
    """``model(x)`` as a list of tensors (one output or a tuple of them)."""
    out = model(x)
    return list(out) if isinstance(out, (list, tuple)) else [out]


@torch.no_grad()
def max_rel(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor) -> float:
    """Largest relative difference (in float64) of ``b``'s outputs from ``a``'s, both in
    eval mode, each given ``x`` in its own dtype."""
    a.eval()
    b.eval()
    out_a = outputs(a, x.to(next(a.parameters()).dtype))
    out_b = outputs(b, x.to(next(b.parameters()).dtype))
    return max(((p.double() - q.double()).abs().max() / p.double().abs().max()).item()
               for p, q in zip(out_a, out_b))


def train_step(model: torch.nn.Module, x: torch.Tensor) -> None:
    """One forward and backward pass."""
    loss = sum(o.float().square().mean() for o in outputs(model, x))
    loss.backward()


def step_ratio(plain: torch.nn.Module, rep: torch.nn.Module, x: torch.Tensor,
               steps: int) -> float:
    """Median training-step time of ``rep`` over that of ``plain``, their steps alternating
    (:func:`~.timing.interleaved`, one warm-up step each)."""
    def step(model):
        def run():
            train_step(model, x)
            model.zero_grad(set_to_none=True)
        return run

    for model in (plain, rep):
        model.train()
    times = interleaved(dict(plain=step(plain), rep=step(rep)), steps, warmup=1, device='cpu')
    return times['rep']['median'] / times['plain']['median']


def block_grads(rep: torch.nn.Module, x: torch.Tensor) -> str:
    """``with / of``: the blocks' trainable parameters with a finite gradient after a step."""
    rep.train()
    rep.zero_grad(set_to_none=True)
    train_step(rep, x)
    params = [p for m in rep.modules() if isinstance(m, ReparamBlock)
              for p in m.parameters() if p.requires_grad]
    with_grad = sum(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in params)
    rep.zero_grad(set_to_none=True)
    return f'{with_grad}/{len(params)}'


def params(model: torch.nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())


def reasons(report) -> str:
    """Why the pairs left plain were left plain, counted by reason (``'3x reason; ...'``),
    from a :attr:`reparam_report`."""
    counts = {}
    for _, reason in report.left_plain:
        key = reason.split(' (got')[0].split(': ')[0]
        counts[key] = counts.get(key, 0) + 1
    return '; '.join(f'{n}x {reason}' for reason, n in counts.items())


def measure(cfg: dict, reparam: str, size: int, steps: int) -> dict:
    """Re-parameterize the backbone of ``cfg`` with ``reparam`` blocks and measure it.

    Args:
        cfg (dict): The upstream backbone's config (a value of :data:`BACKBONES`).
        reparam (str): The block type (``reparam=`` of :func:`mmreparam.reparameterize`).
        size (int): Input side (batch 2).
        steps (int): Timed training steps of each model for the step ratio.

    Returns:
        dict: The row's values (see the module's documentation), for :func:`format_row`.

    Raises:
        ValueError: ``size`` or ``steps`` is below 1.
    """
    if size < 1 or steps < 1:  # steps 0 would fail only at the step ratio's median
        raise ValueError(f'size and steps must be positive, got size={size}, steps={steps}')
    torch.manual_seed(0)
    plain = randomize_bn(build(cfg), seed=1)
    x = torch.randn(2, 3, size, size)
    rep = reparameterize(plain, reparam)
    report = rep.reparam_report
    row = dict(pairs=f'{len(report.converted)}/{report.eligible} of '
               f'{len(report.converted) + len(report.left_plain)}',
               exp=max_rel(plain, rep, x), grads=block_grads(rep, x),
               step=step_ratio(plain, rep, x, steps))
    randomize_parameters(rep, ('vector', 'idconv1.weight'), seed=2)
    randomize_bn(rep, seed=3)
    rep64 = copy.deepcopy(rep).double()
    # The float32 model's own rounding error: the floor of any float32 comparison.
    row['rounding'] = max_rel(rep64, rep, x)
    row['fold64'] = max_rel(rep64, fold(rep64), x)
    folded = fold(rep)
    row['fold'] = max_rel(rep, folded, x)
    fresh = build(cfg)
    fresh.load_state_dict(folded.state_dict(), strict=True)
    row.update(load=max_rel(rep, fresh, x), params=f'{params(rep) / 1e6:.2f}M / '
               f'{params(fresh) / 1e6:.2f}M', reasons=reasons(report))
    return row


#: The table's heading and separator lines.
HEADER = ('| backbone | reparam | pairs converted/eligible of found | exp. err | fold err | '
          'fold err fp64 | fp32 rounding | load err | grads | params train / deploy | step x | '
          'left plain |\n'
          '|---|---|---|---|---|---|---|---|---|---|---|---|')


def format_row(name: str, reparam: str, row: dict) -> str:
    """One Markdown row under :data:`HEADER`: :func:`measure`'s values, or ``failed: ...``
    when ``row`` holds an ``error``."""
    if 'error' in row:
        return f'| {name} | {reparam} | failed: {row["error"]} |' + ' |' * 9
    return (f'| {name} | {reparam} | {row["pairs"]} | {row["exp"]:.1e} '
            f'| {row["fold"]:.1e} | {row["fold64"]:.1e} | {row["rounding"]:.1e} '
            f'| {row["load"]:.1e} | {row["grads"]} | {row["params"]} | {row["step"]:.2f} '
            f'| {row["reasons"]} |')


__all__ = ['BACKBONES', 'REPARAMS', 'HEADER', 'measure', 'format_row', 'max_rel', 'step_ratio',
           'block_grads']

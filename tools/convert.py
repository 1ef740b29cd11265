"""Convert a checkpoint (official OREPA / DBB / RepVGG / RepMLP-ResNet, mmpretrain, torchvision,
mmdet, timm repvgg_* / resnet*d) into mmreparam's layout for one backbone.

    python tools/convert.py ResNet-50_OREPA.pth.tar r50_orepa.pth --arch ResNet-50
    python tools/convert.py resnet50-0676ba61.pth r50_dbb.pth --arch ResNet-50 --reparam DBB
    python tools/convert.py RepVGG-A0-train.pth a0_deploy.pth --arch RepVGG-A0 --deploy
    python tools/convert.py timm_resnet50d.pth r50d_orepa.pth --arch resnet50d --reparam OREPA
    python tools/convert.py RepMLP-Res50-light-224_train.pth light.pth \
        --arch RepMLP-Res50-light-224 --deploy

The output is ``{'state_dict': <backbone state_dict>, 'meta': {...}}``, loadable with
``init_cfg=dict(type='Pretrained', checkpoint=DST)`` on the same backbone. A conversion that
leaves a tensor of the backbone without a value, or a checkpoint tensor unused or
mismatched, writes nothing and exits with 1 (``--allow-partial`` writes it all the same,
the rest at the backbone's initial values); so does a checkpoint with NaN or Inf values
(``--allow-nonfinite``). ``--reparam``
defaults to the blocks the checkpoint was trained with (required for plain ResNets). A
train-form RepMLP-ResNet is converted with ``--deploy`` by loading it as trained and folding
it (the loader converts conv blocks between the forms, not RepMLP units).
"""
import argparse
import os
import re
import sys

from mmreparam import __version__
from mmreparam.checkpoint import CheckpointError, detect_format, load_pretrained, read_state_dict
from mmreparam.cli import parse_key_values, run_tool
from mmreparam.fileio import save_checkpoint_atomic
from mmreparam.models import RepMLPResNet, RepVGG, ResNet

BACKBONES = dict(ResNet=ResNet, RepVGG=RepVGG, RepMLPResNet=RepMLPResNet)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Convert a checkpoint into the mmreparam layout of one backbone.')
    parser.add_argument('src', help='checkpoint to convert (file or URL)')
    parser.add_argument('dst', help='output file')
    parser.add_argument('--arch', required=True,
                        help='ResNet-{18,34,50,101,152}, ResNeXt-{50,101}[-GxWd], '
                        'ResNetV1c-N, ResNetV1d-N (timm: resnetNd), RepVGG-{A0,...,D2se} '
                        '(timm: repvgg_a0 ...) or '
                        'RepMLP-Res50-{light,bottleneck}[-224]')
    parser.add_argument('--reparam', default=None,
                        help='block type (base, ACB, DBB, OREPA, RepVGG, OREPA_VGG); '
                        'defaults to the one of the checkpoint')
    parser.add_argument('--deploy', action='store_true', help='write the folded form')
    parser.add_argument('--prefix', default=None,
                        help="keep only keys under this prefix (default: 'backbone.' if any)")
    parser.add_argument('--set', nargs='+', default=[], metavar='KEY=VALUE',
                        help='extra backbone arguments, e.g. base_channels=32')
    parser.add_argument('--allow-partial', action='store_true',
                        help='write DST even if some tensors are missing, unused or '
                        'mismatched (those keep the initial values)')
    parser.add_argument('--allow-nonfinite', action='store_true',
                        help='convert a checkpoint with NaN or Inf values')
    return parser.parse_args(argv)


def backbone_cfg(arch: str, reparam: str, deploy: bool, extra: dict) -> dict:
    """The mmreparam backbone config named by ``arch``."""
    resnet = re.fullmatch(r'(?i)resnet(v1c|v1d)?-?(\d+)(d)?', arch)  # resnet50d: timm's
    resnext = re.fullmatch(r'(?i)resnext-?(\d+)(?:-(\d+)x(\d+)d)?', arch)
    repvgg = re.fullmatch(r'(?i)repvgg[-_]?([a-z0-9]+)', arch)
    repmlp = re.fullmatch(r'(?i)repmlp[-_]?res(?:net)?[-_]?50[-_](light|bottleneck)(?:[-_]224)?',
                          arch)
    if resnet:
        variant, depth, timm_d = resnet.groups()
        variant = variant or (timm_d and 'v1d')
        cfg = dict(type='ResNet', depth=int(depth))
        if variant:
            cfg.update(deep_stem=True, avg_down=variant.lower() == 'v1d')
    elif resnext:
        depth, groups, width = resnext.groups()
        cfg = dict(type='ResNet', depth=int(depth), groups=int(groups or 32),
                   base_width=int(width or 4))
    elif repvgg:
        name = repvgg.group(1)
        cfg = dict(type='RepVGG', arch=name[0].upper() + name[1:].lower())
    elif repmlp:
        cfg = dict(type='RepMLPResNet', arch=repmlp.group(1).lower())
    else:
        raise ValueError(f'unknown --arch {arch!r}')
    return dict(cfg, reparam=reparam, deploy=deploy, **extra)


class PartialConversion(RuntimeError):
    """The conversion left tensors missing, unused or mismatched (without --allow-partial)."""


def _folded_blocks(model) -> list:
    """Names of the outermost modules that fold (blocks, RepMLP units) and are not folded yet."""
    names = [name for name, module in model.named_modules()
             if getattr(module, 'folded', True) is False]
    return [name for name in names  # the outermost ones
            if not any(name.startswith(outer + '.') for outer in names)]


def _problems(report) -> list:
    return [(title, keys) for title, keys in (('mismatched', report.mismatched),
                                              ('unused', report.unexpected),
                                              ('missing', report.missing)) if keys]


def convert(args) -> None:
    """Read, convert, save atomically, print a summary."""
    state, prefix = read_state_dict(args.src, args.prefix)
    fmt = detect_format(state)
    reparam = args.reparam or fmt.reparam
    if reparam is None:
        raise ValueError(f'{fmt.description} does not say which blocks to use: pass --reparam')
    cfg = backbone_cfg(args.arch, reparam, args.deploy, parse_key_values(args.set))
    # RepMLP units are not converted between the forms when loading: fold after loading.
    fold = args.deploy and cfg['type'] == 'RepMLPResNet' and fmt.folded is False
    kwargs = {k: v for k, v in cfg.items() if k != 'type'}
    model = BACKBONES[cfg['type']](**dict(kwargs, deploy=cfg['deploy'] and not fold))
    # read again (from the page or download cache), so that its errors name the file
    report = load_pretrained(model, args.src, prefix=args.prefix,
                             allow_nonfinite=args.allow_nonfinite)
    if report.partial and not args.allow_partial:
        counts = ', '.join(f'{len(keys)} {title} (e.g. {keys[0]})'
                           for title, keys in _problems(report))
        raise PartialConversion(
            f'partial conversion, {args.dst} not written: {counts}; '
            '--allow-partial writes it with those tensors at their initial values')
    if fold:
        unfolded = _folded_blocks(model)
        model.switch_to_deploy()
        report.converted_blocks += [f'{name} (folded after loading)' for name in unfolded
                                    if name not in _folded_blocks(model)]
    out = dict(state_dict=model.state_dict(),
               meta=dict(mmreparam_version=__version__, source=os.fspath(args.src),
                         source_format=fmt.description, prefix=prefix, backbone=cfg))
    save_checkpoint_atomic(out, args.dst)  # DST is complete or untouched
    print(f'format: {fmt.description}' + (f" (prefix '{prefix}')" if prefix else ''))
    print(f'backbone: {cfg}')
    print(f'converted: {report.summary()}')
    for title, keys in _problems(report):  # only with --allow-partial
        more = f' ... ({len(keys) - 5} more)' if len(keys) > 5 else ''
        print(f'  {title}: {", ".join(keys[:5])}{more}')
    print(f'saved {args.dst}')


def main(argv=None) -> int:
    """Entry point; returns the exit status (1 with one ``error:`` line on bad input)."""
    return run_tool(None, convert, parse_args(argv),
                    errors=(CheckpointError, PartialConversion, OSError, ValueError,
                            TypeError))


if __name__ == '__main__':
    sys.exit(main())

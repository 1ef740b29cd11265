"""Write a RepOptimizer scales file: from a hyper-search checkpoint, or the constant scales.

    python tools/repopt_scales.py extract HS_CKPT OUT [--arch B1]
    python tools/repopt_scales.py const B1 OUT

``extract`` reads the trainable scales of a hyper-search model: an mmreparam checkpoint of
``RepOptVGG(mode='hs')`` (alone or inside a classifier) or an official one (e.g. the released
``RepOpt-VGG-B1-scales.pth``), or re-writes a scales file; with ``--arch`` it checks them
against that RepOpt-VGG. ``const`` writes the HS model's initial scales for an arch. The
output (``{'scales': ..., 'meta': ...}``) is what ``RepOptVGG(scales=OUT)`` and the
``RepOptimizerConstructor``'s ``scales`` read. It is written atomically.
"""
import argparse
import os
import sys


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest='command', required=True)
    extract = sub.add_parser('extract', help='scales of a hyper-search checkpoint')
    extract.add_argument('src', help='HS checkpoint (mmreparam or official) or scales file')
    extract.add_argument('out', help='output scales file')
    extract.add_argument('--arch', help='check the scales against RepOpt-VGG-ARCH (e.g. B1)')
    const = sub.add_parser('const', help="the constant scales ('same as HS initialization')")
    const.add_argument('arch', help='RepOpt-VGG arch, e.g. B1 or RepOpt-VGG-B1')
    const.add_argument('out', help='output scales file')
    for command in (extract, const):
        command.add_argument('--set', nargs='+', default=[], metavar='KEY=VALUE',
                             help='extra RepOptVGG arguments, e.g. base_channels=32')
    return parser.parse_args(argv)


def build_backbone(arch: str, extra: dict):
    """A RepOptVGG of ``arch`` on the meta device (shapes only, no memory)."""
    import torch

    from mmreparam.models.backbones import RepOptVGG
    name = arch[len('RepOpt-VGG-'):] if arch.lower().startswith('repopt-vgg-') else arch
    with torch.device('meta'):
        return name, RepOptVGG(name, **extra)


def summary(scales) -> str:
    """Block count and the mean 3x3 / 1x1 scale of the first and last blocks."""
    names = list(scales)
    parts = [f'{name}: conv {scales[name]["conv"].mean():.3f}, '
             f'1x1 {scales[name]["conv_1x1"].mean():.3f}' for name in (names[0], names[-1])]
    identity = sum('identity' in entry for entry in scales.values())
    return f'{len(names)} blocks ({identity} with identity); ' + '; '.join(parts)


def run(args) -> None:
    """Read or build the scales, check them, save atomically, print a summary."""
    from mmreparam.cli import parse_key_values
    from mmreparam.engine.optimizers import load_scales, save_scales
    from mmreparam.models.backbones.repopt_scales import constant_scales
    extra = parse_key_values(args.set)
    if args.command == 'const':
        name, backbone = build_backbone(args.arch, extra)
        scales = constant_scales(backbone)
        meta = dict(arch=name, source='const')
    else:
        if not os.path.isfile(args.src):
            raise FileNotFoundError(f'checkpoint {args.src!r} does not exist')
        scales = load_scales(args.src)
        meta = dict(source=os.path.abspath(args.src))
        if args.arch:
            name, backbone = build_backbone(args.arch, extra)
            backbone.check_scales(scales, repr(args.src))
            meta['arch'] = name
    save_scales(scales, args.out, meta=dict(meta, backbone_args=extra))
    print(f'scales: {summary(scales)}')
    print(f'saved {args.out}')


def main(argv=None) -> int:
    """Entry point; returns the exit status (1 with one ``error:`` line on bad input)."""
    args = parse_args(argv)
    from mmreparam.cli import run_tool
    from mmreparam.models.backbones.repopt_scales import ScalesError
    return run_tool(None, run, args, errors=(ScalesError, OSError, ValueError, TypeError))


if __name__ == '__main__':
    sys.exit(main())

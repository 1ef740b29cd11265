"""Write the synthetic demo data sets: ``python tools/generate_data.py [--root DIR]``.

A COCO-format detection set (``ROOT/det``) and a Cityscapes-format segmentation set
(``ROOT/seg``) of shapes on textured backgrounds; deterministic for a given ``--seed``.
"""
import argparse
import sys

from mmreparam.cli import run_tool
from mmreparam.datasets import generate_cityscapes_segmentation, generate_coco_detection


def run(args):
    """The tool's body: check the sizes, write both data sets."""
    if args.num_train < 1 or args.num_val < 1 or args.size < 32:
        raise ValueError('need --num-train/--num-val >= 1, --size >= 32')
    det = generate_coco_detection(f'{args.root}/det', args.num_train, args.num_val,
                                  args.size, args.seed)
    seg = generate_cityscapes_segmentation(f'{args.root}/seg', args.num_train,
                                           args.num_val, args.size, args.seed + 1)
    print(f'detection: {det["train"]}, {det["val"]}')
    print(f'segmentation: {seg["train"]}, {seg["val"]}')


def main() -> int:
    """Entry point; returns the exit status (1 with one ``error:`` line on bad input)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--root', default='work_dirs/demo/data')
    parser.add_argument('--num-train', type=int, default=64)
    parser.add_argument('--num-val', type=int, default=16)
    parser.add_argument('--size', type=int, default=128, help='image side in pixels')
    parser.add_argument('--seed', type=int, default=0)
    return run_tool('tools/generate_data.py', run, parser.parse_args(),
                    errors=(OSError, ValueError))


if __name__ == '__main__':
    sys.exit(main())

"""What the CRC-32 check of :func:`mmreparam.checkpoint.safe_load` costs on a ResNet-50.

    python tools/checkpoint_crc_cost.py [--repeat 7]

Saves the state_dict of a ResNet-50 (``mmreparam.ResNet(depth=50, reparam='base')``, the
size of a torchvision ResNet-50 checkpoint without its classifier) into a temporary
directory and times ``safe_load`` with and without ``verify_crc`` (median of ``--repeat``
loads each, after one warm-up read, so the file is in the page cache as it is after a
download or a training run). Prints one line.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import torch


def median_seconds(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--repeat', type=int, default=7, help='loads per variant')
    args = parser.parse_args(argv)
    from mmreparam.checkpoint.safe_load import safe_load, verify_zip_crc
    from mmreparam.models import ResNet
    state = ResNet(depth=50, reparam='base').state_dict()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, 'r50.pth')
        torch.save({'state_dict': state}, path)
        size = os.path.getsize(path) / 2**20
        safe_load(path)  # warm-up: page cache, allow-list
        plain = median_seconds(lambda: safe_load(path, verify_crc=False), args.repeat)
        checked = median_seconds(lambda: safe_load(path), args.repeat)
        crc = median_seconds(lambda: verify_zip_crc(path), args.repeat)
    print(f'ResNet-50 checkpoint ({size:.0f} MiB): safe_load {plain * 1e3:.0f} ms without the '
          f'CRC check, {checked * 1e3:.0f} ms with it (the check alone: {crc * 1e3:.0f} ms, '
          f'+{crc / plain * 100:.0f}%); median of {args.repeat}, torch '
          f'{torch.__version__}, {torch.get_num_threads()} threads')
    return 0


if __name__ == '__main__':
    sys.exit(main())

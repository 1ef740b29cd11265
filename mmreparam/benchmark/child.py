"""``python -m mmreparam.benchmark.child JSON RESULT``: one training-step measurement
(:func:`~mmreparam.benchmark.cost.train_step_cost` with the JSON's arguments) in a fresh
process, so that its peak memory is its own; writes the result as JSON to the file
``RESULT``."""
import json
import sys

import torch

from ..fileio import atomic_write
from .cost import train_step_cost

if __name__ == '__main__':
    kwargs, result_path = json.loads(sys.argv[1]), sys.argv[2]
    if kwargs['device'] == 'cpu':
        torch.set_flush_denormal(True)  # as the parent does (see benchmark.run_benchmark)
    result = train_step_cost(**kwargs)

    def write(tmp: str) -> None:
        with open(tmp, 'w') as f:
            json.dump(result, f)

    atomic_write(result_path, write)

"""``python -m mmreparam.benchmark.child JSON``: one training-step measurement
(:func:`~mmreparam.benchmark.cost.train_step_cost` with the JSON's arguments) in a fresh
process, so that its peak memory is its own; prints the result as JSON on the last line."""
import json
import sys

import torch

from .cost import train_step_cost

if __name__ == '__main__':
    kwargs = json.loads(sys.argv[1])
    if kwargs['device'] == 'cpu':
        torch.set_flush_denormal(True)  # as the parent does (see benchmark.run_benchmark)
    print(json.dumps(train_step_cost(**kwargs)))

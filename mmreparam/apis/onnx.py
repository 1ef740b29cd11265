"""ONNX export of folded models, its check with onnxruntime, and its op census."""
import inspect
from collections import Counter
from typing import Dict

import numpy as np
import torch
import torch.nn as nn

from ..fileio import atomic_write


class _FirstOutputs(nn.Module):
    """Wrap a backbone so that its tuple of features becomes plain ONNX outputs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        out = self.model(x)
        return tuple(out) if isinstance(out, (list, tuple)) else out


def export_onnx(model: nn.Module, example: torch.Tensor, path: str, opset: int = 17) -> str:
    """Export ``model`` (eval mode, CPU) with the TorchScript-based ``torch.onnx`` exporter.

    The exporter's eval-mode peephole fuses any remaining Conv + BatchNorm, so an unfolded
    model and its fold export to the same graph structure; a folded model exports directly.
    Written atomically.

    Returns:
        str: ``path``.
    """
    model = _FirstOutputs(model).eval()

    # torch >= 2.5 takes dynamo= (and later defaults to True); before, TorchScript only.
    kwargs = dict(dynamo=False) if 'dynamo' in inspect.signature(torch.onnx.export).parameters \
        else {}

    def write(tmp):
        with torch.no_grad():
            torch.onnx.export(model, (example, ), tmp, opset_version=opset,
                              input_names=['input'], do_constant_folding=True, **kwargs)

    atomic_write(path, write)
    return path


def onnx_op_counts(path: str) -> Dict[str, int]:
    """Number of nodes of each op type in an ONNX file."""
    import onnx
    graph = onnx.load(path).graph
    return dict(sorted(Counter(node.op_type for node in graph.node).items()))


@torch.no_grad()
def onnxruntime_error(path: str, model: nn.Module, example: torch.Tensor) -> float:
    """Max relative difference between onnxruntime's outputs and PyTorch's (max-norm)."""
    import onnxruntime as ort
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    outputs = session.run(None, {'input': example.numpy()})
    reference = _FirstOutputs(model).eval()(example)
    reference = reference if isinstance(reference, tuple) else (reference, )
    diff = max(float(np.abs(o - r.numpy()).max()) for o, r in zip(outputs, reference))
    scale = max(float(r.abs().max()) for r in reference)
    return diff / scale if scale > 0 else diff


__all__ = ['export_onnx', 'onnx_op_counts', 'onnxruntime_error']

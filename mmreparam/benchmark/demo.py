"""The demo's measurements (``tools/demo.py``): parameters, latency and int8 quantization
of a trained model and its fold, and the results table."""
import copy
import os.path as osp

import torch

from .timing import timed


def latency(model: torch.nn.Module, inputs: dict, repeats: int = 10) -> float:
    """Median seconds of one forward (eval, no grad) after two warm-up runs."""
    with torch.inference_mode():
        return timed(lambda: model(**inputs), repeats, warmup=2, device='cpu')['median']


def measure(config: str, checkpoint: str, int8_dir: str, root: str, calib_images: int,
            eval_images: int) -> dict:
    """Parameters and latency of the train-time model and its fold, on one val batch, and
    the int8 quantization of the fold.

    Args:
        config (str): The training config, relative to ``root``.
        checkpoint (str): Its trained weights.
        int8_dir (str): Where the int8 model and its report go.
        root (str): The folder the config's data paths are relative to.
        calib_images (int): Calibration images of :func:`~mmreparam.apis.quantize_int8`.
        eval_images (int): Held-back images of :func:`~mmreparam.apis.quantize_int8`.

    Returns:
        dict: ``params``, ``params_folded``, ``latency``, ``latency_folded`` (seconds, one
        image) and ``int8`` (the quantization report).
    """
    from mmengine.config import Config
    from mmengine.runner import Runner

    from ..apis import fold, quantize_int8
    from ..cli.model import build_model, load_weights
    root = osp.abspath(root)
    cfg = Config.fromfile(osp.join(root, config))
    for split in ('val', 'test'):
        dataset = cfg[f'{split}_dataloader'].dataset
        dataset.data_root = osp.join(root, dataset.data_root)
        evaluator = cfg.get(f'{split}_evaluator')
        if evaluator and evaluator.get('ann_file'):
            evaluator.ann_file = osp.join(root, evaluator.ann_file)
    model = build_model(cfg)
    load_weights(model, checkpoint)
    model.eval()
    folded = fold(model)
    loader = Runner.build_dataloader(cfg.test_dataloader)
    batch = model.data_preprocessor(copy.deepcopy(next(iter(loader))), False)
    inputs = dict(inputs=batch['inputs'][:1], data_samples=batch['data_samples'][:1],
                  mode='tensor')
    stats = dict(params=sum(p.numel() for p in model.parameters()),
                 params_folded=sum(p.numel() for p in folded.parameters()),
                 latency=latency(model, inputs), latency_folded=latency(folded, inputs))
    stats['int8'] = quantize_int8(folded, cfg, int8_dir, calib_images=calib_images,
                                  eval_images=eval_images, latency_runs=10)
    return stats


def results_table(rows) -> str:
    """The demo's table (markdown), one row per task: ``(label, metric name, {'train-time':
    value, 'folded': value}, measure()'s stats, the deploy checkpoint's fold_error)``."""
    lines = [
        '| model | metric, train-time | metric, folded | metric, int8 (float ONNX) | '
        'fold error (max rel) | int8 vs float features: worst cosine, rel. error | '
        'params train-time / folded | CPU latency train-time / folded (1 image) | '
        'onnxruntime latency float / int8 (backbone + neck if any) |',
        '|---|---|---|---|---|---|---|---|---|'
    ]
    for label, metric, metrics, stats, err in rows:
        int8 = stats['int8']
        outputs = int8['outputs']
        lines.append(
            f'| {label} | {metrics["train-time"]:.3f} | {metrics["folded"]:.3f} | '
            f'{int8["int8"]["metrics"][metric]:.3f} '
            f'({int8["float"]["metrics"][metric]:.3f}) | '
            f'{err.get("max_rel", float("nan")):.2g} | '
            f'{min(o["cosine_min"] for o in outputs):.4f}, '
            f'{max(o["rel_error"] for o in outputs):.3f} | '
            f'{stats["params"] / 1e6:.1f}M / {stats["params_folded"] / 1e6:.1f}M | '
            f'{stats["latency"] * 1e3:.0f} ms / {stats["latency_folded"] * 1e3:.0f} ms | '
            f'{int8["float"]["latency_ms"]:.0f} ms / {int8["int8"]["latency_ms"]:.0f} ms |')
    return '\n'.join(lines)


__all__ = ['latency', 'measure', 'results_table']

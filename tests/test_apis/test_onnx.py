"""ONNX export of a folded OREPA-R50: same graph as a plain ResNet-50, onnxruntime agrees."""
import pytest
import torch

import mmreparam
from mmreparam.apis.onnx import export_onnx, onnx_op_counts, onnxruntime_error
from mmreparam.models.backbones import ResNet
from mmreparam.testing import randomize_bn, randomize_parameters

pytest.importorskip('onnxruntime')


def test_folded_orepa_r50_exports_like_a_plain_resnet50(tmp_path):
    from mmdet.models.backbones import ResNet as DetResNet
    torch.manual_seed(0)
    orepa = ResNet(50, reparam='OREPA', base_channels=8, init_cfg=None)
    randomize_parameters(orepa, ('vector', 'idconv1'), seed=1)
    orepa = randomize_bn(orepa, seed=2).eval()
    folded = mmreparam.fold(orepa)
    plain = DetResNet(50, base_channels=8, stem_channels=8)
    plain.eval()
    x = torch.randn(1, 3, 64, 64)
    ours = export_onnx(folded, x, str(tmp_path / 'orepa_folded.onnx'))
    ref = export_onnx(plain, x, str(tmp_path / 'resnet50.onnx'))
    counts, ref_counts = onnx_op_counts(ours), onnx_op_counts(ref)
    # The exporter leaves a no-op Identity where it fuses each of mmdet's separate BNs.
    ref_counts.pop('Identity', None)
    assert counts == ref_counts, (counts, ref_counts)
    assert counts['Conv'] == 53 and 'BatchNormalization' not in counts
    assert onnxruntime_error(ours, folded, x) < 1e-4
    # ... and it computes what the train-time model computes.
    assert onnxruntime_error(ours, orepa, x) < 1e-4

"""A checkpoint of the other form (train-time vs folded) is refused, not silently skipped."""
import pytest
import torch
from mmengine.runner.checkpoint import load_checkpoint, load_state_dict

import mmreparam
from mmreparam.checkpoint import CheckpointError
from mmreparam.models.backbones import RepVGG, ResNet


def small(deploy=False, **kwargs):
    return ResNet(18, base_channels=8, reparam='OREPA', deploy=deploy, **kwargs)


def test_train_checkpoint_into_deploy_model(tmp_path):
    path = tmp_path / 'train.pth'
    torch.save({'state_dict': small().state_dict()}, path)
    with pytest.raises(CheckpointError, match='is folded .deploy=True. but the checkpoint '
                                              'holds train-time weights'):
        load_checkpoint(small(deploy=True), str(path), map_location='cpu')


def test_deploy_checkpoint_into_train_model():
    folded = mmreparam.fold(small()).state_dict()
    with pytest.raises(CheckpointError, match='train-time model but the checkpoint holds '
                                              'folded weights'):
        load_state_dict(small(), folded, strict=False)


def test_whole_model_prefix_and_repvgg():
    model = torch.nn.Sequential(RepVGG('A0', deploy=True))
    with pytest.raises(CheckpointError, match=r"prefix '0\.'"):
        load_state_dict(model, torch.nn.Sequential(RepVGG('A0')).state_dict(), strict=False)


def test_matching_forms_still_load():
    model = small()
    load_state_dict(small(), model.state_dict(), strict=True)
    folded = mmreparam.fold(model)
    target = small(deploy=True)
    load_state_dict(target, folded.state_dict(), strict=True)
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(target.eval()(x), folded.eval()(x))


def test_keys_of_other_modules_do_not_count():
    """A whole-model dict loaded into the backbone alone: other modules' keys are not its."""
    state = dict(small().state_dict(), **{'head.reparam_conv.weight': torch.zeros(1)})
    load_state_dict(small(), state, strict=False)  # same form: loads
    folded = dict(mmreparam.fold(small()).state_dict(), **{'head.fc.weight': torch.zeros(1)})
    with pytest.raises(CheckpointError, match="e.g. 'stem.reparam_conv"):
        load_state_dict(small(), folded, strict=False)

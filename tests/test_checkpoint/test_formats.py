"""Format detection (``detect_format``, ``blocks_reparam``): block types recognised by
the blocks' own state markers, unknown official-style layouts named, not guessed."""
import pytest
import torch
from helpers import reparam_types

from mmreparam.checkpoint import CheckpointError, detect_format, load_pretrained
from mmreparam.models import RepVGG, ResNet

pytestmark = pytest.mark.usefixtures('single_thread')


def test_unknown_official_style_layout_is_named_not_guessed(tmp_path):
    """``stage0.*`` keys that are neither an OREPA/DBB ResNet, a RepVGG nor a RepMLP-ResNet
    (here: a Sequential stem and plain units, as the RepMLP code's ``block_type='base'``) are
    reported as an unknown layout, not read as a RepVGG."""
    state = {'stage0.0.conv.weight': torch.zeros(8, 3, 7, 7), 'stage0.0.bn.weight': torch.ones(8),
             'stage1.0.conv1.conv.weight': torch.zeros(8, 8, 1, 1)}
    fmt = detect_format(state)
    assert fmt.name == 'unknown' and 'unknown layout' in fmt.description
    torch.save(state, tmp_path / 'foreign.pth')
    with pytest.raises(CheckpointError, match='unknown layout'):
        load_pretrained(RepVGG('A0', base_channels=8), tmp_path / 'foreign.pth')


def test_block_type_detection_follows_the_blocks():
    """The converter recognises blocks by the blocks' own state_markers: every block type's
    state, in any model, is recognised with its reparam."""
    from mmreparam.checkpoint.formats import blocks_reparam
    for reparam in reparam_types():
        model = ResNet(depth=18, reparam=reparam, base_channels=8, stem_channels=32)
        assert blocks_reparam(model.state_dict()) == reparam
        assert detect_format(model.state_dict()).reparam == reparam
    vgg = RepVGG('A0', reparam='QARepVGG', base_channels=8)
    assert detect_format(vgg.state_dict()).reparam == 'QARepVGG'

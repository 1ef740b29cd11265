"""The block types come from one place: the blocks registered in MODELS and their own
declarations (reparam_names, chosen_kernel_sizes, state_markers)."""
import pytest
import torch
from torch import nn

import mmreparam
from mmreparam.models.layers import ConvBN, ReparamBlock, RepVGGBlock, SEBlock, SELayer
from mmreparam.models.layers.base import block_type_of_state, block_types
from mmreparam.models.layers.branches import ConvBNBranch
from mmreparam.models.layers.factory import (
    REPARAM_TYPES,
    build_reparam_conv,
    describe_choice,
    reparam_block_type,
    reparam_of_block_type,
)
from mmreparam.models.layers.fuse import pad_kernel
from mmreparam.registry import MODELS
from mmreparam.testing import randomize_bn


def test_every_name_and_companion_comes_from_the_blocks():
    assert set(REPARAM_TYPES) == {'base', 'ACB', 'DBB', 'OREPA', 'RepVGG', 'QARepVGG',
                                  'OREPA_VGG'}
    for name, block in REPARAM_TYPES.items():
        assert name in block.reparam_names and reparam_of_block_type(block) == name
    assert reparam_block_type('OREPA', 1).__name__ == 'OREPA1x1'
    assert reparam_block_type('OREPA', 1, groups=2) is ConvBN
    assert reparam_block_type('OREPA', 7).__name__ == 'OREPALargeConv'
    assert describe_choice('DBB') == '1 < k < 7'
    assert 'k = 1 and groups=1 (OREPA1x1)' in describe_choice('OREPA')


@pytest.fixture
def toy_block():
    """A block type registered the way a new one is, removed from MODELS afterwards."""

    class ToyNoIdentity(ReparamBlock):
        """``kxk-BN + 1x1-BN``: RepVGG without its identity branch."""
        _min_kernel_size = 3
        default_kernel_size = 3
        state_markers = ('toy_kxk.conv.weight', )
        reparam_names = ('ToyNoIdentity', )

        def _build_branches(self):
            common = dict(stride=self.stride, groups=self.groups)
            self.toy_kxk = ConvBNBranch(self.in_channels, self.out_channels, self.kernel_size,
                                        self.norm_cfg, padding=self.padding,
                                        dilation=self.dilation, **common)
            self.toy_1x1 = ConvBNBranch(self.in_channels, self.out_channels, 1,
                                        self.norm_cfg, **common)

        def _forward_branches(self, x):
            return self.toy_kxk(x) + self.toy_1x1(x)

        def get_equivalent_kernel_bias(self):
            kernel, bias = self.toy_kxk.get_equivalent_kernel_bias()
            k1, b1 = self.toy_1x1.get_equivalent_kernel_bias()
            return kernel + pad_kernel(k1, self.kernel_size), bias + b1

    MODELS.register_module(module=ToyNoIdentity)
    try:
        yield ToyNoIdentity
    finally:
        MODELS._module_dict.pop('ToyNoIdentity')
    assert 'ToyNoIdentity' not in REPARAM_TYPES


def test_a_registered_block_is_picked_up_everywhere(toy_block):
    assert REPARAM_TYPES['ToyNoIdentity'] is toy_block
    assert toy_block in block_types()
    assert block_type_of_state(toy_block(4, 4).state_dict()) is toy_block
    assert reparam_block_type('ToyNoIdentity', 3) is toy_block
    assert reparam_block_type('ToyNoIdentity', 1) is ConvBN
    assert type(build_reparam_conv('ToyNoIdentity', 4, 4, 3)) is toy_block
    model = randomize_bn(mmreparam.ResNet(18, reparam='ToyNoIdentity', base_channels=8,
                                          init_cfg=None)).double().eval()
    assert type(model.layer1[0].conv1) is toy_block
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    for out, ref in zip(mmreparam.fold(model)(x), model(x)):
        assert torch.allclose(out, ref, rtol=1e-9, atol=1e-9)


def test_the_official_se_is_selayer_with_a_zero_width_bottleneck_allowed():
    se, layer = SEBlock(8, 2), SELayer(8, squeeze_channels=2)
    layer.load_state_dict(se.state_dict())
    x = torch.randn(2, 8, 5, 5)
    assert torch.equal(se(x), layer(x))
    assert isinstance(RepVGGBlock(16, 16, use_se=True).se, SEBlock)  # 16 // 16 = 1
    assert RepVGGBlock(8, 8, use_se=True).se.down.out_channels == 0  # as the official
    with pytest.raises(ValueError, match='positive int'):
        SELayer(8, squeeze_channels=0)
    assert isinstance(se.down, nn.Conv2d)

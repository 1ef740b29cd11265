"""Registered backbones: ``mmreparam.ResNet``, ``mmreparam.RepVGG``, ``mmreparam.RepMLPResNet``."""
from .repmlp_resnet import RepMLPResNet
from .repvgg import RepVGG
from .resnet import ResNet

__all__ = ['ResNet', 'RepVGG', 'RepMLPResNet']

"""Registered backbones: ``mmreparam.ResNet`` and ``mmreparam.RepVGG``."""
from .repvgg import RepVGG
from .resnet import ResNet

__all__ = ['ResNet', 'RepVGG']

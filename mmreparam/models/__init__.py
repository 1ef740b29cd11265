"""Models: re-parameterizable layers and backbones (registered in ``mmreparam.MODELS``)."""
from .layers import *  # noqa: F401,F403

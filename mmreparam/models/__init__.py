"""Models: re-parameterizable layers and backbones (registered in ``mmreparam.MODELS``)."""
from .backbones import *  # noqa: F401,F403
from .layers import *  # noqa: F401,F403
from .regularizers import *  # noqa: F401,F403

"""Small shared helpers and type aliases."""
from typing import Optional, Union

from mmengine.config import ConfigDict

ConfigType = Union[dict, ConfigDict]
OptConfigType = Optional[ConfigType]

__all__ = ['ConfigType', 'OptConfigType']

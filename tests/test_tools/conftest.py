"""Fixtures of the end-to-end tool tests."""
import pytest
from helpers import tool


@pytest.fixture(scope='session')
def data(tmp_path_factory):
    """A small generated detection and segmentation data set (``det/``, ``seg/``; 6 train
    and 4 val images of 96 pixels), generated once by ``tools/generate_data.py``; read only."""
    root = tmp_path_factory.mktemp('data')
    tool('generate_data.py', '--root', root, '--num-train', 6, '--num-val', 4, '--size', 96)
    return root

"""Shared test configuration."""
import logging
import os
import sys

import pytest
import torch
from hypothesis import settings
from mmengine.logging import MMLogger

# Deterministic property tests in CI (same examples every run); more examples locally via
# HYPOTHESIS_PROFILE=dev.
settings.register_profile('ci', derandomize=True, deadline=None, max_examples=25,
                          print_blob=True)
settings.register_profile('dev', deadline=None, max_examples=200)
settings.load_profile(os.environ.get('HYPOTHESIS_PROFILE', 'ci'))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _mmengine_log_streams():
    """Point mmengine's console handlers at this test's stdout.

    An MMLogger keeps the stream it was created with; when a test that runs a tool in-process
    creates it under pytest's capture, that stream is closed afterwards and later log calls
    print "--- Logging error ---" into the next test's stderr.
    """
    for logger in MMLogger._instance_dict.values():
        for handler in logger.handlers:
            if type(handler) is logging.StreamHandler:  # console, not file handlers
                handler.stream = sys.stdout  # setStream would flush the closed one
    yield


@pytest.fixture(scope='session')
def load_tool():
    """A function that imports ``tools/<name>.py`` as a module (tools/ is not a package)."""
    from helpers import load_tool
    return load_tool


@pytest.fixture(scope='module')
def single_thread():
    """One torch thread for a module of tiny tensors (much faster than two on a busy
    machine); use it with ``pytestmark = pytest.mark.usefixtures('single_thread')``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='session')
def orepa_r50(tmp_path_factory):
    """An official OREPA ResNet-50 (tiny, see ``official_checkpoints.R50``): its train
    checkpoint as the official train.py saves it, its deploy state_dict, its fused convs."""
    from official_checkpoints import official_resnet, save_official_train
    train, deploy, convs = official_resnet('OREPA', 50)
    folder = tmp_path_factory.mktemp('orepa_r50')
    torch.save(deploy, folder / 'deploy.pth')
    return dict(train=save_official_train(folder / 'ResNet-50_OREPA.pth.tar', train,
                                          'ResNet-50'),
                deploy=folder / 'deploy.pth', convs=convs)

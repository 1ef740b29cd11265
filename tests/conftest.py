"""Shared test configuration."""
import importlib.util
import logging
import os
import sys
from pathlib import Path

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
    tools = Path(__file__).resolve().parents[1] / 'tools'

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, tools / f'{name}.py')
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load

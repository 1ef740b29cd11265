"""Shared test configuration."""
import os

import torch
from hypothesis import settings

# Deterministic property tests in CI (same examples every run); more examples locally via
# HYPOTHESIS_PROFILE=dev.
settings.register_profile('ci', derandomize=True, deadline=None, max_examples=25,
                          print_blob=True)
settings.register_profile('dev', deadline=None, max_examples=200)
settings.load_profile(os.environ.get('HYPOTHESIS_PROFILE', 'ci'))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

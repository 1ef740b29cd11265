"""Sphinx configuration of the mmreparam documentation (``make docs``)."""
import os
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))
sys.path.insert(0, ROOT)  # the checkout's mmreparam, not an installed copy

from mmreparam import __version__  # noqa: E402

project = 'mmreparam'
copyright = 'mmreparam contributors'
author = 'mmreparam contributors'
version = release = __version__

extensions = [
    'myst_parser',
    'sphinx.ext.autodoc',
    'sphinx.ext.napoleon',
    'sphinx.ext.viewcode',
]
source_suffix = {'.md': 'markdown'}
root_doc = 'index'
exclude_patterns = ['_build']

# Markdown: `#` anchors up to level 3 headings, so pages can link to sections.
myst_heading_anchors = 3
myst_enable_extensions = ['colon_fence']

# API reference from the Google-style docstrings.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_member_order = 'bysource'
autodoc_typehints = 'description'

html_theme = 'alabaster'
html_title = f'mmreparam {version}'

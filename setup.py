"""Install mmreparam: ``pip install -e .`` (the pinned stack: ``bash tools/bootstrap.sh``)."""
import re
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


def read_version():
    """Return ``__version__`` from ``mmreparam/version.py`` without importing the package."""
    text = (ROOT / 'mmreparam' / 'version.py').read_text()
    return re.search(r"__version__ = '([^']+)'", text).group(1)


def read_requirements(name):
    """Return the requirement lines of ``requirements/<name>.txt`` (comments dropped)."""
    lines = (ROOT / 'requirements' / f'{name}.txt').read_text().splitlines()
    return [line.split('#')[0].strip() for line in lines if line.split('#')[0].strip()]


setup(
    name='mmreparam',
    version=read_version(),
    description='Structural re-parameterization (OREPA, DBB, ACB, RepVGG) for OpenMMLab',
    long_description=(ROOT / 'README.md').read_text() if (ROOT / 'README.md').exists() else '',
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    python_requires='>=3.9',
    packages=find_packages(exclude=('tests', 'tests.*', 'configs', 'tools')),
    # mmcv is not on this list: it has no wheels on PyPI and is built by tools/bootstrap.sh.
    install_requires=read_requirements('runtime'),
    extras_require={'tests': read_requirements('tests')},
    zip_safe=False,
)

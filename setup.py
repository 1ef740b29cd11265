"""Install mmreparam: ``pip install --no-build-isolation .`` into an environment with torch,
mmengine and mmcv (e.g. ``pip install --no-build-isolation '.[mmdet]'``); the pinned stack of
the tests: ``bash tools/bootstrap.sh``.

The C++ extension ``mmreparam._ext`` (fused CPU passes of OREPA's kernel generators) is
built against the installed torch, so install without build isolation
(``pip install --no-build-isolation -e .``). ``MMREPARAM_WITH_OPS=0`` skips it: OREPA then
runs its CPU generator passes with torch operators (same results, slower).

Like mmdet, mmseg and mmpretrain, the wheel carries ``configs/``, ``tools/`` and
``model-index.yml`` in ``mmreparam/.mim``, where ``mim train mmreparam CONFIG``, ``mim test``
and ``mim search`` read them; an editable install links them there instead, so edits to the
configs and tools apply at once.
"""
import os
import re
import shutil
import warnings
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent
# Files and folders of the repository that mim reads from <package>/.mim.
MIM_FILES = ('configs', 'tools', 'model-index.yml')


def read_version():
    """Return ``__version__`` from ``mmreparam/version.py`` without importing the package."""
    text = (ROOT / 'mmreparam' / 'version.py').read_text()
    return re.search(r"__version__ = '([^']+)'", text).group(1)


def read_requirements(name):
    """Return the requirement lines of ``requirements/<name>.txt`` (comments dropped)."""
    lines = (ROOT / 'requirements' / f'{name}.txt').read_text().splitlines()
    return [line.split('#')[0].strip() for line in lines if line.split('#')[0].strip()]


def extensions():
    """``(ext_modules, cmdclass)`` for the C++ extension, or empty ones when skipped."""
    if os.environ.get('MMREPARAM_WITH_OPS', '1') == '0':
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as exc:
        raise SystemExit(
            'mmreparam builds its C++ extension against the installed torch: install torch '
            'first and use `pip install --no-build-isolation`, or set MMREPARAM_WITH_OPS=0 '
            f'to skip the extension ({exc})') from exc
    # -fopenmp: ATen's parallel_for is OpenMP in the header; torch's own libgomp is the one
    # loaded at run time (same soname), so there is one OpenMP runtime in the process.
    ext = CppExtension('mmreparam._ext', ['mmreparam/csrc/orepa_cpu.cpp'],
                       extra_compile_args=['-O3', '-fopenmp'], extra_link_args=['-fopenmp'])
    return [ext], {'build_ext': BuildExtension}


def add_mim_files(target: Path, link: bool) -> None:
    """Put :data:`MIM_FILES` into ``target`` (a ``mmreparam/.mim`` folder): copies, or with
    ``link`` relative symlinks to the repository's own (copies where symlinks fail)."""
    missing = [name for name in MIM_FILES if not (ROOT / name).exists()]
    if missing:
        raise SystemExit(f'mmreparam: {", ".join(missing)} missing from {ROOT}: the package '
                         'ships them in mmreparam/.mim for mim (build from a checkout or '
                         'the sdist)')
    target.mkdir(parents=True, exist_ok=True)
    for name in MIM_FILES:
        src, dst = ROOT / name, target / name
        if dst.is_symlink() or dst.is_file():
            dst.unlink()
        elif dst.is_dir():
            shutil.rmtree(dst)
        if link:
            try:
                dst.symlink_to(os.path.relpath(src, target))
                continue
            except OSError as exc:  # e.g. Windows without the symlink privilege
                warnings.warn(f'cannot link {dst} ({exc}); copying {src} instead')
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns('__pycache__', '*.pyc'))
        else:
            shutil.copyfile(src, dst)


class BuildPyWithMim(build_py):
    """``build_py`` that also adds :data:`MIM_FILES` as ``mmreparam/.mim``: copied into the
    build (wheels, and so sdists' wheels), linked in the source tree for editable installs."""

    def run(self):
        super().run()
        if getattr(self, 'editable_mode', False):  # setuptools >= 64
            add_mim_files(ROOT / 'mmreparam' / '.mim', link=True)
        else:
            add_mim_files(Path(self.build_lib) / 'mmreparam' / '.mim', link=False)


EXT_MODULES, CMDCLASS = extensions()
CMDCLASS['build_py'] = BuildPyWithMim

setup(
    name='mmreparam',
    version=read_version(),
    description='Structural re-parameterization (OREPA, DBB, ACB, RepVGG) for OpenMMLab',
    long_description=(ROOT / 'README.md').read_text() if (ROOT / 'README.md').exists() else '',
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    python_requires='>=3.9',
    packages=find_packages(exclude=('tests', 'tests.*', 'configs', 'tools')),
    # Ranges (requirements/install.txt); the pinned, tested stacks are runtime.txt and
    # compat.txt (tools/bootstrap.sh). mmcv is not listed: see install.txt.
    install_requires=read_requirements('install'),
    extras_require={
        'mmdet': ['mmdet>=3.0.0'],
        'mmseg': ['mmsegmentation>=1.0.0', 'ftfy', 'regex'],  # mmseg imports both undeclared
        'mmpretrain': ['mmpretrain>=1.0.0'],
        'deploy': read_requirements('deploy'),
        'tests': read_requirements('tests'),
    },
    ext_modules=EXT_MODULES,
    cmdclass=CMDCLASS,
    zip_safe=False,
)

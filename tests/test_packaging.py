"""Packaging: installing mmreparam into an environment that has its dependencies changes
nothing else, and its sdist, wheel and editable install carry what mim reads."""
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_install_requires_are_ranges_not_pins():
    lines = [line.split('#')[0].strip()
             for line in (ROOT / 'requirements' / 'install.txt').read_text().splitlines()]
    requirements = [line for line in lines if line]
    assert requirements and not [r for r in requirements if '==' in r], requirements
    assert {re.split('[<>=!~ ]', r)[0] for r in requirements} >= {'torch', 'mmengine'}


def test_pip_would_install_only_mmreparam_here():
    """pip's dry run against this environment (a pinned stack of make test or make
    test-compat), offline: the ranges are satisfied, nothing is upgraded or replaced."""
    proc = subprocess.run(
        [sys.executable, '-m', 'pip', 'install', '--dry-run', '--no-index',
         '--no-build-isolation', '--disable-pip-version-check', str(ROOT)],
        capture_output=True, text=True, timeout=600,
        env={'MMREPARAM_WITH_OPS': '0', 'PATH': '/usr/bin:/bin'})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    would = [line for line in proc.stdout.splitlines() if line.startswith('Would install')]
    assert len(would) == 1, proc.stdout[-2000:]
    assert would[0].split()[2:] == [f'mmreparam-{mmreparam_version()}'], would


def mmreparam_version():
    text = (ROOT / 'mmreparam' / 'version.py').read_text()
    return re.search(r"__version__ = '([^']+)'", text).group(1)


# --- mim support: the model index, and what the sdist and the wheel carry -------------------

MIM_FILES = ('configs', 'tools', 'model-index.yml')
NOT_SOURCE = {'.git', 'work_dirs', 'build', 'dist', 'data', '.whl', '.hypothesis',
              '.pytest_cache'}


def test_model_index_lists_every_config():
    """model-index.yml (what mim search reads) loads without errors and lists every config
    that defines a model, once, under a collection it defines, with its own architecture
    (mim search shows the model's list, not the collection's); no weights are claimed."""
    import modelindex
    index = modelindex.load(str(ROOT / 'model-index.yml'))
    errors = [e for e in index.collect_check_errors() if e['errors']]
    assert not errors, errors
    collections = {c.name for c in index.collections}
    names = [m.name for m in index.models]
    assert len(names) == len(set(names)), names
    for model in index.models:
        assert Path(model.config).stem == model.name, model.name
        assert (ROOT / model.config).is_file(), model.config
        assert model.in_collection in collections, model.name
        assert model.metadata.data.get('Architecture'), model.name
        assert not model.weights and not model.results, model.name  # none released
    model_configs = {
        path.relative_to(ROOT).as_posix() for path in (ROOT / 'configs').rglob('*.py')
        if '_base_' not in path.parts and re.search(r'^model = ', path.read_text(), re.M)}
    assert {m.config for m in index.models} == model_configs


def copy_source_tree(dst):
    """The checkout as a build sees it: no venvs, VCS, outputs, caches or compiled files."""
    def ignore(folder, names):
        top = Path(folder) == ROOT
        return {n for n in names
                if n in ('__pycache__', '.mim') or n.endswith(('.so', '.pyc'))
                or (top and (n in NOT_SOURCE or n.startswith('.venv') or n.endswith('.egg-info')))}
    shutil.copytree(ROOT, dst, ignore=ignore, symlinks=True)
    return dst


def build_hook(hook, src, out, with_ops=False):
    """Call a PEP 517 hook of setuptools' backend in ``src`` (what pip and ``python -m build``
    do for a project without pyproject.toml), offline; the C++ extension only ``with_ops``."""
    code = ('import sys; from setuptools import build_meta as b; '
            f'print(b.__legacy__.{hook}(sys.argv[1]))')
    proc = subprocess.run([sys.executable, '-c', code, str(out)], cwd=src, capture_output=True,
                          text=True, timeout=600,
                          env={**os.environ, 'MMREPARAM_WITH_OPS': '1' if with_ops else '0'})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return out / proc.stdout.split()[-1]


@pytest.fixture(scope='module')
def builds(tmp_path_factory):
    """An editable build, then an sdist, of a copy of the checkout; then a wheel built from
    the unpacked sdist, as ``python -m build`` does."""
    tmp = tmp_path_factory.mktemp('builds')
    src = copy_source_tree(tmp / 'src')
    editable = build_hook('build_editable', src, tmp)
    sdist = build_hook('build_sdist', src, tmp)
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp / 'unpacked', filter='data')
    wheel = build_hook('build_wheel', tmp / 'unpacked' / sdist.name[:-len('.tar.gz')],
                       tmp / 'unpacked')
    return dict(src=src, editable=editable, sdist=sdist, wheel=wheel)


def repo_files(*folders):
    return {p.relative_to(ROOT).as_posix() for folder in folders
            for p in (ROOT / folder).rglob('*')
            if p.is_file() and '__pycache__' not in p.parts and p.suffix != '.pyc'}


def test_editable_install_links_the_mim_files(builds):
    mim = builds['src'] / 'mmreparam' / '.mim'
    for name in MIM_FILES:
        assert (mim / name).is_symlink(), name
        assert os.readlink(mim / name) == f'../../{name}'  # relative: the checkout may move
        assert (mim / name).resolve() == (builds['src'] / name).resolve()


def test_sdist_is_the_source_tree(builds):
    """Everything a wheel is built from (an editable build's links left out)."""
    with tarfile.open(builds['sdist']) as tar:
        top = builds['sdist'].name[:-len('.tar.gz')] + '/'
        names = {n[len(top):] for n in tar.getnames() if n.startswith(top)}
    expected = repo_files('configs', 'tools', 'requirements', 'mmreparam/csrc') | {
        'setup.py', 'MANIFEST.in', 'README.md', 'model-index.yml'}
    assert expected <= names, sorted(expected - names)
    assert not [n for n in names if '.mim' in n or n.endswith(('.so', '.pyc'))]


def test_wheel_carries_configs_tools_and_model_index_for_mim(builds):
    with zipfile.ZipFile(builds['wheel']) as whl:
        names = set(whl.namelist())
        index = whl.read('mmreparam/.mim/model-index.yml').decode()
    expected = {f'mmreparam/.mim/{f}' for f in repo_files('configs', 'tools')}
    assert expected <= names, sorted(expected - names)
    assert (ROOT / 'model-index.yml').read_text() == index
    for metafile in re.findall(r'^  - (configs/\S+/metafile\.yml)$', index, re.M):
        assert f'mmreparam/.mim/{metafile}' in names, metafile
    assert not [n for n in names if '__pycache__' in n or n.endswith(('.so', '.pyc'))]


def test_installed_wheel_works_where_mim_looks(builds, tmp_path):
    """The wheel, installed into a new venv (no dependencies: it sees this environment's
    torch, mmengine and mmcv through a .pth, but not the editable install's import hook),
    imports from there; ``<distribution location>/mmreparam/.mim/tools`` holds train.py and
    test.py (where mim 0.3.9's train / test look); train.py answers mim's ``-h`` probe; an
    OREPA block folds, with the torch operators (no extension) and the one warning about it."""
    venv = tmp_path / 'venv'
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(venv)], check=True,
                   timeout=300)
    python = venv / 'bin' / 'python'
    site = venv / 'lib' / f'python{sys.version_info[0]}.{sys.version_info[1]}' / 'site-packages'
    deps = [p for p in sys.path if p.endswith('site-packages')]
    (site / 'dependencies.pth').write_text('\n'.join(deps) + '\n')
    proc = subprocess.run(
        [sys.executable, '-m', 'pip', 'install', '--no-deps', '--no-index', '--quiet',
         '--disable-pip-version-check', '--target', str(site), str(builds['wheel'])],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    check = f'''
import os, warnings
warnings.simplefilter('ignore')
import pkg_resources, torch
import mmreparam
from mmreparam.models.layers import OREPA
assert mmreparam.__file__.startswith({str(site)!r}), mmreparam.__file__
tools = os.path.join(pkg_resources.get_distribution('mmreparam').location, 'mmreparam', '.mim',
                     'tools')
assert all(os.path.isfile(os.path.join(tools, t)) for t in ('train.py', 'test.py')), tools
torch.manual_seed(0)
block = OREPA(4, 8, 3, padding=1).eval()
for bn in [m for m in block.modules() if isinstance(m, torch.nn.BatchNorm2d)]:
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.uniform_(0.5, 2)
    bn.bias.data.uniform_(-1, 1)
x = torch.randn(2, 4, 9, 9)
with torch.no_grad():
    expected = block(x)
    block.fold()
    err = (block(x) - expected).abs().max() / expected.abs().max()
assert err < 1e-5, float(err)
print(tools)
'''
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    proc = subprocess.run([python, '-c', check], cwd=tmp_path, capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert (proc.stdout + proc.stderr).count('mmreparam._ext is not built') == 1, proc.stdout
    tools = Path(proc.stdout.split()[-1])
    proc = subprocess.run([python, str(tools / 'train.py'), '-h'], cwd=tmp_path,
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and 'tools/train.py' in proc.stdout, proc.stderr[-3000:]


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_with_torch(tmp_path):
    """The README's path into an existing environment, on a new venv: torch, mmengine and
    mmcv-lite first (this environment's versions), then the wheel, built with its C++
    extension against this torch. pip adds mmreparam and nothing else; the extension loads
    and an OREPA block folds; mmreparam/.mim holds the configs and tools (minutes: torch)."""
    import mmcv
    import mmengine
    import torch
    wheel = build_hook('build_wheel', copy_source_tree(tmp_path / 'src'), tmp_path,
                       with_ops=True)
    venv = tmp_path / 'venv'
    python = str(venv / 'bin' / 'python')

    def pip(*args):
        proc = subprocess.run([python, '-m', 'pip', '--disable-pip-version-check', *args],
                              capture_output=True, text=True, timeout=1800)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        return proc.stdout

    try:
        subprocess.run([sys.executable, '-m', 'venv', str(venv)], check=True, timeout=300)
        pip('install', '--quiet', f'torch=={torch.__version__.split("+")[0]}',
            f'mmengine=={mmengine.__version__}', f'mmcv-lite=={mmcv.__version__}')
        before = set(pip('freeze').splitlines())
        pip('install', '--quiet', str(wheel))
        after = set(pip('freeze').splitlines())
        assert not before - after, before - after
        assert [line.split()[0] for line in after - before] == ['mmreparam'], after - before
        check = """
import os, torch, mmreparam
from mmreparam.models.layers import OREPA, orepa_function
assert orepa_function._ext is not None, 'the extension did not load'
mim = os.path.join(os.path.dirname(mmreparam.__file__), '.mim')
assert os.path.isfile(os.path.join(mim, 'tools', 'train.py'))
assert os.path.isfile(os.path.join(mim, 'configs', 'demo', 'metafile.yml'))
torch.manual_seed(0)
block = OREPA(4, 8, 3, padding=1).eval()
for bn in [m for m in block.modules() if isinstance(m, torch.nn.BatchNorm2d)]:
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
x = torch.randn(2, 4, 9, 9)
with torch.no_grad():
    expected = block(x)
    folded = mmreparam.fold(block)
    err = (folded(x) - expected).abs().max() / expected.abs().max()
assert err < 1e-5, float(err)
"""
        proc = subprocess.run([python, '-c', check], cwd=tmp_path, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    finally:
        shutil.rmtree(venv, ignore_errors=True)  # several GB (torch)

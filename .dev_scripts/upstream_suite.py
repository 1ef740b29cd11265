"""Run an upstream backbone test file against mmreparam's classes.

A development tool (for measuring, see docs/upstream_suites.md; not shipped with the wheel's
``tools/``). Usage::

    python .dev_scripts/upstream_suite.py work_dirs/upstream/mmdet-3.3.0/test_resnet.py
    python .dev_scripts/upstream_suite.py FILE --sections --json work_dirs/upstream/mmdet.json
    python .dev_scripts/upstream_suite.py FILE -- -k bottleneck  # arguments after -- to pytest
    python .dev_scripts/upstream_suite.py FILE --upstream  # the baseline: upstream's classes

The test file (mmdet's or mmseg's ``tests/test_models/test_backbones/test_resnet.py``,
mmpretrain's ``test_repvgg.py``, ...) is copied, with the helper modules it imports
relatively (``from .utils import ...``, taken from its folder), into a temporary package and
run with pytest in this process. Once they are imported, each name they imported that is one
of these upstream classes is replaced by mmreparam's counterpart (everything else, helpers,
torch, mmcv and the rest of the upstream package, stays as it is):

- mmdet / mmseg ``ResNet``: ``mmreparam.ResNet`` with ``reparam='base'``;
- mmseg ``ResNetV1c``: the same with ``deep_stem=True``;
- mmdet / mmseg ``ResNetV1d``: the same with ``deep_stem=True, avg_down=True``;
- mmdet / mmseg ``BasicBlock``, ``Bottleneck``: mmreparam's units, ``reparam='base'``;
- mmdet / mmseg ``ResLayer``, mmdet ``SimplifiedBasicBlock``: a stand-in that raises
  NotImplementedError (mmreparam has no such class);
- mmpretrain ``RepVGG``: ``mmreparam.RepVGG`` with ``reparam='RepVGG'``;
- mmpretrain ``RepVGGBlock``: ``mmreparam.models.layers.RepVGGBlock``.

A replacement builds mmreparam's class with the defaults above, and ``isinstance(x, Name)``
checks mmreparam's class, so helpers such as ``is_block()`` see our units. The report lists
the names replaced in each module.

The upstream suites are written as a few long test functions; a function fails at its first
difference and says nothing about the rest. With ``--sections`` each test function is run
section by section instead: a section starts at each top-level ``with`` statement and after
it, and at each top-level comment line (upstream starts each case with ``# Test ...``);
sections of assignments only join the next one. The sections of a function run in order in
one namespace, so later ones see what earlier ones assigned, and a failing section does not
stop the next. Assertions there are rewritten as pytest rewrites them where its rewriter can
be used.

Prints pytest's report, then one line per test (or section): outcome, the line it failed
at and the error, then a summary; ``--json PATH`` writes the same as JSON. The exit status is
0 when every test passed, 1 otherwise (and 1 with one message on bad input). The tool
downloads nothing; a test that asks for a download (mmseg's ``torchvision://`` checkpoint)
fails offline, as it would with upstream's classes.
"""
import argparse
import ast
import datetime
import importlib.metadata
import inspect
import io
import json
import os
import re
import shutil
import sys
import tempfile
import tokenize
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest

#: Upstream class (module path, name) -> (mmreparam target, constructor defaults); the
#: targets are imported when the suite runs (_targets()).
SUBSTITUTES = {
    ('mmdet.models.backbones.resnet', 'ResNet'): ('ResNet', dict(reparam='base')),
    ('mmdet.models.backbones.resnet', 'ResNetV1d'):
        ('ResNet', dict(reparam='base', deep_stem=True, avg_down=True)),
    ('mmdet.models.backbones.resnet', 'BasicBlock'): ('BasicBlock', dict(reparam='base')),
    ('mmdet.models.backbones.resnet', 'Bottleneck'): ('Bottleneck', dict(reparam='base')),
    ('mmseg.models.backbones.resnet', 'ResNet'): ('ResNet', dict(reparam='base')),
    ('mmseg.models.backbones.resnet', 'ResNetV1c'):
        ('ResNet', dict(reparam='base', deep_stem=True)),
    ('mmseg.models.backbones.resnet', 'ResNetV1d'):
        ('ResNet', dict(reparam='base', deep_stem=True, avg_down=True)),
    ('mmseg.models.backbones.resnet', 'BasicBlock'): ('BasicBlock', dict(reparam='base')),
    ('mmseg.models.backbones.resnet', 'Bottleneck'): ('Bottleneck', dict(reparam='base')),
    ('mmpretrain.models.backbones.repvgg', 'RepVGG'): ('RepVGG', dict(reparam='RepVGG')),
    ('mmpretrain.models.backbones.repvgg', 'RepVGGBlock'): ('RepVGGBlock', {}),
}
#: Upstream class (module path, name) -> why mmreparam has no counterpart.
MISSING = {
    ('mmdet.models.layers.res_layer', 'ResLayer'):
        'stages are built by mmreparam.ResNet itself (ResNet._make_res_layer)',
    ('mmdet.models.layers.res_layer', 'SimplifiedBasicBlock'):
        'mmreparam.ResNet has no SimplifiedBasicBlock (a norm-less BasicBlock of mmdet)',
    ('mmseg.models.utils.res_layer', 'ResLayer'):
        'stages are built by mmreparam.ResNet itself (ResNet._make_res_layer)',
}
#: The packages whose versions the report names.
VERSIONED = ('mmreparam', 'torch', 'mmcv', 'mmengine', 'mmdet', 'mmsegmentation',
             'mmpretrain')


def _targets() -> Dict[str, type]:
    import mmreparam
    from mmreparam.models.backbones.resnet import BasicBlock, Bottleneck
    from mmreparam.models.layers import RepVGGBlock
    return dict(ResNet=mmreparam.ResNet, BasicBlock=BasicBlock, Bottleneck=Bottleneck,
                RepVGG=mmreparam.RepVGG, RepVGGBlock=RepVGGBlock)


class _StandIn(type):
    """Metaclass of a replacement: calling it builds ``target`` with ``defaults`` (the
    caller's keywords win), ``isinstance``/``issubclass`` check ``target``; a stand-in with
    ``target=None`` raises NotImplementedError with ``reason`` when called."""

    def __call__(cls, *args, **kwargs):
        if cls.target is None:
            raise NotImplementedError(f'{cls.__name__}: {cls.reason}')
        return cls.target(*args, **{**cls.defaults, **kwargs})

    def __instancecheck__(cls, obj):
        return cls.target is not None and isinstance(obj, cls.target)

    def __subclasscheck__(cls, sub):
        return cls.target is not None and issubclass(sub, cls.target)


def stand_in(name: str, target: Optional[type], defaults: Optional[dict] = None,
             reason: str = '') -> type:
    """A class named ``name`` that stands for ``target`` built with ``defaults``."""
    described = (f'{target.__module__}.{target.__qualname__}({defaults or ""})'
                 if target is not None else f'missing: {reason}')
    return _StandIn(name, (), dict(target=target, defaults=dict(defaults or {}),
                                   reason=reason, described=described,
                                   __doc__=f'Stand-in for {described}.'))


def substitute_names(module) -> Dict[str, str]:
    """Replace, in ``module``'s globals, the upstream classes of :data:`SUBSTITUTES` and
    :data:`MISSING` by stand-ins; return ``{name: what it stands for}``."""
    targets = _targets()
    replaced = {}
    for name, value in list(vars(module).items()):
        if not inspect.isclass(value) or isinstance(value, _StandIn):
            continue
        key = (value.__module__, value.__name__)
        if key in SUBSTITUTES:
            target, defaults = SUBSTITUTES[key]
            new = stand_in(name, targets[target], defaults)
        elif key in MISSING:
            new = stand_in(name, None, reason=MISSING[key])
        else:
            continue
        setattr(module, name, new)
        replaced[name] = new.described
    return replaced


# ----------------------------------------------------------------------------- sections
def _comment_lines(source: str) -> Dict[int, str]:
    """Line number -> text of each comment that is alone on its line."""
    comments = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT and not tok.line[:tok.start[1]].strip():
            comments[tok.start[0]] = tok.string.lstrip('#').strip()
    return comments


def split_sections(func: ast.FunctionDef, comments: Dict[int, str]
                   ) -> List[Tuple[List[ast.stmt], str]]:
    """Split a test function's body into sections (see the module docstring): a list of
    ``(statements, title)``, the title being the first comment in or just above it."""
    body = [stmt for stmt in func.body
            if not (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)
                    and isinstance(stmt.value.value, str))]  # the docstring
    if not body:
        return []
    groups: List[List[ast.stmt]] = []
    previous_end = func.body[0].lineno - 1
    for stmt in body:
        commented = any(previous_end < line < stmt.lineno for line in comments)
        starts = (not groups or isinstance(stmt, ast.With) or commented
                  or isinstance(groups[-1][-1], ast.With))
        if starts:
            groups.append([stmt])
        else:
            groups[-1].append(stmt)
        previous_end = stmt.end_lineno
    merged: List[List[ast.stmt]] = []
    pending: List[ast.stmt] = []
    for group in groups:
        if all(isinstance(s, (ast.Assign, ast.AnnAssign)) for s in group):
            pending += group
            continue
        merged.append(pending + group)
        pending = []
    if pending:
        merged.append(pending)
    sections = []
    for group in merged:
        first, last = group[0].lineno, group[-1].end_lineno
        above = [line for line in comments if line < first]
        inside = sorted(line for line in comments if first <= line <= last)
        title_line = inside[0] if inside else (max(above) if above else None)
        while title_line and not inside and title_line - 1 in comments:
            title_line -= 1  # the first line of a comment block
        title = comments.get(title_line, '') if title_line else ''
        sections.append((group, title))
    return sections


def _compile_section(stmts: List[ast.stmt], path: str, source: bytes, config):
    module = ast.Module(body=list(stmts), type_ignores=[])
    try:  # pytest's assertion messages, where its (internal) rewriter is usable
        from _pytest.assertion.rewrite import rewrite_asserts
        rewrite_asserts(module, source, path, config)
    except Exception:  # noqa: BLE001 - plain asserts are still right, only terser
        pass
    ast.fix_missing_locations(module)
    for node in ast.walk(module):  # the rewriter's imports have no end: give them one
        if getattr(node, 'end_lineno', None) is not None and node.end_lineno < node.lineno:
            node.end_lineno, node.end_col_offset = node.lineno, node.col_offset
    return compile(module, path, 'exec')


class SectionItem(pytest.Item):
    """One section of an upstream test function, run in the function's shared namespace."""

    def __init__(self, *, code, lines, title, shared, **kwargs):
        super().__init__(**kwargs)
        self.code, self.lines, self.title, self.shared = code, lines, title, shared

    def runtest(self):
        """Run the section's statements in the namespace of its function: a copy of the
        test module's globals (taken when its first section runs, after the substitution),
        shared by the function's sections."""
        if 'globals' not in self.shared:
            self.shared['globals'] = dict(vars(self.parent.obj))
        exec(self.code, self.shared['globals'])

    def reportinfo(self):
        """Where the section is: the copied file and its first line."""
        return self.path, self.lines[0] - 1, self.name

    def repr_failure(self, excinfo):
        """pytest's usual report, cut to the frames of the test file and below."""
        return self._repr_failure_py(excinfo, style='short')


# ----------------------------------------------------------------------------- the plugin
class UpstreamPlugin:
    """The pytest plugin of one run: substitutes names, makes sections, records results."""

    def __init__(self, package_dir: Path, test_copy: Path, sections: bool,
                 substitute: bool = True):
        self.package_dir, self.test_copy, self.sections = package_dir, test_copy, sections
        self.substitute = substitute
        self.replaced: Dict[str, Dict[str, str]] = {}
        self.results: Dict[str, dict] = {}
        self.order: List[str] = []

    def _substitute_loaded(self):
        for name, module in list(sys.modules.items()):
            path = getattr(module, '__file__', None)
            if ('.' in name and path and Path(path).parent == self.package_dir
                    and name not in self.replaced):  # the test module and its helpers
                self.replaced[name] = substitute_names(module) if self.substitute else {}

    @pytest.hookimpl(tryfirst=True)
    def pytest_pycollect_makeitem(self, collector, name, obj):
        """With ``--sections``: one :class:`SectionItem` per section of a test function."""
        self._substitute_loaded()
        if not (self.sections and isinstance(collector, pytest.Module)
                and name.startswith('test') and inspect.isfunction(obj)
                and not inspect.signature(obj).parameters):
            return None
        source = Path(collector.path).read_text()
        tree = ast.parse(source)
        func = next((node for node in tree.body
                     if isinstance(node, ast.FunctionDef) and node.name == name), None)
        if func is None:
            return None
        shared: dict = {}
        items = []
        for stmts, title in split_sections(func, _comment_lines(source)):
            lines = (stmts[0].lineno, stmts[-1].end_lineno)
            code = _compile_section(stmts, str(collector.path), source.encode(),
                                    collector.config)
            items.append(SectionItem.from_parent(
                collector, name=f'{name}[L{lines[0]}-{lines[1]}]', code=code, lines=lines,
                title=title, shared=shared))
        return items

    def pytest_collection_modifyitems(self, items):
        """Substitute in every module of the package (the helpers too) before any test."""
        self._substitute_loaded()

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item, call):
        """Record each test's outcome, and where in the test file it failed."""
        outcome = yield
        report = outcome.get_result()
        entry = self.results.get(item.nodeid)
        if entry is None:
            entry = dict(id=item.nodeid.split('::', 1)[-1], outcome='passed', error=None,
                         line=None, title=getattr(item, 'title', ''))
            self.results[item.nodeid] = entry
            self.order.append(item.nodeid)
        if report.failed:
            entry['outcome'] = 'failed' if report.when == 'call' else 'error'
        elif report.skipped and entry['outcome'] == 'passed':
            entry['outcome'] = 'skipped'
        if call.excinfo is not None and entry['error'] is None and not report.skipped:
            entry['error'] = call.excinfo.exconly().strip().splitlines()[0][:300]
            for tb_entry in call.excinfo.traceback:
                if Path(str(tb_entry.path)) == self.test_copy:
                    entry['line'] = tb_entry.lineno + 1


# ----------------------------------------------------------------------------- the run
def _helpers(test_file: Path) -> List[Path]:
    """The sibling modules ``test_file`` imports relatively, and theirs."""
    found, todo = [], [test_file]
    while todo:
        tree = ast.parse(todo.pop().read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                names = [node.module] if node.module else [a.name for a in node.names]
                for name in names:
                    path = test_file.parent / f'{name.split(".")[0]}.py'
                    if not path.is_file():
                        raise FileNotFoundError(
                            f'{test_file} imports .{name}, but {path} is not there: put the '
                            'upstream helper module next to the test file')
                    if path not in found:
                        found.append(path)
                        todo.append(path)
    return found


def _versions() -> Dict[str, Optional[str]]:
    versions = {}
    for name in VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def run_suite(test_file: Path, sections: bool = False,
              pytest_args: Optional[List[str]] = None, substitute: bool = True) -> dict:
    """Run ``test_file`` with mmreparam's classes in place of upstream's (with upstream's
    own when not ``substitute``: the baseline); return the report (what ``--json``
    writes)."""
    test_file = Path(test_file)
    if not test_file.is_file():
        raise FileNotFoundError(f'no test file {test_file}')
    helpers = _helpers(test_file)
    with tempfile.TemporaryDirectory(prefix='upstream_suite_') as tmp:
        package = 'upstream_' + re.sub(r'\W', '_', test_file.parent.name).lower()
        package_dir = Path(tmp, package)
        package_dir.mkdir()
        (package_dir / '__init__.py').write_text('')
        for path in [test_file, *helpers]:
            shutil.copyfile(path, package_dir / path.name)
        ini = Path(tmp, 'pytest.ini')
        ini.write_text('[pytest]\n')
        test_copy = package_dir / test_file.name
        plugin = UpstreamPlugin(package_dir, test_copy, sections, substitute)
        args = [str(test_copy), '-c', str(ini), '--rootdir', tmp, '-p', 'no:cacheprovider',
                '-q', '--tb=short', '-o', 'python_files=test_*.py', *(pytest_args or [])]
        code = pytest.main(args, plugins=[plugin])
        for name in list(sys.modules):  # a second run in this process imports afresh
            if name == package or name.startswith(package + '.'):
                del sys.modules[name]
    if code not in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED):
        raise RuntimeError(f'pytest could not run {test_file} (exit code {int(code)})')
    tests = [plugin.results[nodeid] for nodeid in plugin.order]
    counts = {}
    for test in tests:
        counts[test['outcome']] = counts.get(test['outcome'], 0) + 1
    functions: Dict[str, bool] = {}
    for test in tests:
        function = test['id'].split('[', 1)[0]
        functions[function] = functions.get(function, True) and test['outcome'] == 'passed'
    return dict(file=str(test_file), date=datetime.date.today().isoformat(),
                mode='sections' if sections else 'functions', substituted=substitute,
                versions=_versions(),
                replaced={k.rsplit('.', 1)[-1]: v for k, v in plugin.replaced.items()},
                tests=tests, summary=dict(total=len(tests), **counts),
                functions=dict(total=len(functions),
                               passed=sum(functions.values())))


def format_report(report: dict) -> str:
    """The per-test table and the summary, as text."""
    classes = 'mmreparam' if report['substituted'] else "upstream's own"
    lines = [f'{report["file"]} ({report["mode"]}, {classes} classes), {report["date"]}',
             '  ' + ', '.join(f'{k} {v}' for k, v in report['versions'].items() if v)]
    for module, names in report['replaced'].items():
        for name, target in names.items():
            lines.append(f'  {module}.{name} -> {target}')
    width = max((len(t['id']) for t in report['tests']), default=10)
    for test in report['tests']:
        where = f'line {test["line"]}: ' if test['line'] else ''
        detail = f'  {where}{test["error"]}' if test['outcome'] != 'passed' else ''
        title = f'  # {test["title"]}' if test.get('title') and not detail else ''
        lines.append(f'{test["outcome"].upper():8} {test["id"]:{width}}{detail}{title}')
    summary = report['summary']
    lines.append(f'{summary.get("passed", 0)} of {summary["total"]} passed'
                 + ''.join(f', {summary[k]} {k}' for k in ('failed', 'error', 'skipped')
                           if summary.get(k)))
    if report['mode'] == 'sections':
        functions = report['functions']
        lines.append(f'test functions with every section passing: {functions["passed"]} of '
                     f'{functions["total"]}')
    return '\n'.join(lines)


def parse_args(argv=None):
    """The command line: the test file, ``--sections``, ``--json``; after ``--``, pytest's."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('test_file', help='upstream test file (its helpers next to it)')
    parser.add_argument('--sections', action='store_true',
                        help='run each test function section by section (see the docstring)')
    parser.add_argument('--json', metavar='PATH', help='also write the report as JSON')
    parser.add_argument('--upstream', action='store_true',
                        help="run with upstream's own classes (no replacement): the baseline")
    parser.epilog = 'Arguments after -- go to pytest (e.g. -- -k bottleneck).'
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index('--') if '--' in argv else len(argv)
    args = parser.parse_args(argv[:split])
    args.pytest_args = argv[split + 1:]
    return args


def main(argv=None) -> int:
    """Run the tool; return its exit status."""
    from mmreparam.cli import run_tool
    args = parse_args(argv)
    result = {}

    def body():
        result['report'] = run_suite(Path(args.test_file), args.sections, args.pytest_args,
                                     substitute=not args.upstream)

    status = run_tool('.dev_scripts/upstream_suite.py', body,
                      errors=(OSError, ValueError, RuntimeError, SyntaxError))
    if status:
        return status
    report = result['report']
    print(format_report(report))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, 'w') as f:
            json.dump(report, f, indent=1)
    return 0 if report['summary'].get('passed', 0) == report['summary']['total'] else 1


if __name__ == '__main__':
    sys.exit(main())

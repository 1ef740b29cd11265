"""The examples of the README and the documentation pages (docs/en) run as written: Python
snippets execute, config snippets load."""
import re
from pathlib import Path

from mmengine.config import Config

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / 'README.md'
DOCS = ROOT / 'docs' / 'en'
PAGES = [README, *sorted(p for p in DOCS.rglob('*.md') if '_build' not in p.parts)]


def blocks():
    """The ``python`` blocks of the README and the docs pages, each once (the README repeats
    some of the pages' examples)."""
    found = [b for page in PAGES
             for b in re.findall(r'```python\n(.*?)```', page.read_text(), flags=re.S)]
    return list(dict.fromkeys(found))


def test_readme_python_examples_run():
    code_blocks = [b for b in blocks() if '_base_' not in b]
    assert code_blocks, 'README has no python example'
    for code in code_blocks:
        exec(compile(code, str(README), 'exec'), {'__name__': '__readme__'})


def test_readme_config_examples_load_and_build(tmp_path):
    from mmengine.registry import init_default_scope

    from mmreparam.apis.deploy import models_registry
    configs = [b for b in blocks() if '_base_' in b]
    assert configs, 'README has no config example'
    for i, text in enumerate(configs):
        path = tmp_path / f'readme_{i}.py'
        path.write_text(text.replace('PATH/TO/mmreparam', str(ROOT)))
        cfg = Config.fromfile(str(path))
        assert cfg.model.backbone.type.startswith('mmreparam.')
        init_default_scope(cfg.default_scope)
        models_registry(cfg.default_scope).build(cfg.model)


def test_readme_transfer_snippet_gives_the_stem_its_lr_multiplier(tmp_path):
    """The stem lr x0.1 of the README's transfer snippet reaches the stem's parameters
    (with mmdet's frozen_stages=1 the stem had none to train, and every group kept lr)."""
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import init_default_scope

    from mmreparam.apis.deploy import models_registry
    text, = [b for b in blocks() if 'stem_lr_mult' in b]
    path = tmp_path / 'transfer.py'
    path.write_text(text.replace('PATH/TO/mmreparam', str(ROOT)))
    cfg = Config.fromfile(str(path))
    init_default_scope(cfg.default_scope)
    model = models_registry(cfg.default_scope).build(cfg.model)
    stem = {id(p) for p in model.backbone.stem.parameters()}
    assert stem and all(p.requires_grad for p in model.backbone.stem.parameters())
    optim = build_optim_wrapper(model, cfg.optim_wrapper)
    base_lr = cfg.optim_wrapper.optimizer.lr
    lrs = {id(p): group['lr'] for group in optim.param_groups for p in group['params']}
    assert stem <= lrs.keys(), 'stem parameters missing from the optimizer'
    assert {lrs[i] for i in stem} == {base_lr * 0.1}
    others = {lr for i, lr in lrs.items() if i not in stem}
    assert others == {base_lr}

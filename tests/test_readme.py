"""The README's examples run as written: Python snippets execute, config snippets load."""
import re
from pathlib import Path

from mmengine.config import Config

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / 'README.md'


def blocks():
    return re.findall(r'```python\n(.*?)```', README.read_text(), flags=re.S)


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

"""The README's Python examples run as written."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / 'README.md'


def test_readme_python_examples_run():
    blocks = re.findall(r'```python\n(.*?)```', README.read_text(), flags=re.S)
    assert blocks, 'README has no python example'
    for code in blocks:
        exec(compile(code, str(README), 'exec'), {'__name__': '__readme__'})

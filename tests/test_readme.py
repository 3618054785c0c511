"""The README's quick start runs as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_runs():
    text = README.read_text()
    section = text.split("## Quick start", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "README.md quick start", "exec"), {})


def test_readme_names_the_ci_commands():
    ci = (README.parent / ".ci" / "run").read_text()
    text = README.read_text()
    for cmd in ('pip install -e ".[test]"', "python -m mixerzoo demo", "python -m pytest", "python -m pytest -m slow"):
        assert cmd in text and cmd in ci, cmd

"""The README's example runs as written and matches examples/swap_blocks.py."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _swap_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Swap a ResBlock for an ODEBlock, and back", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_runs(capsys):
    code = _swap_example()
    assert len(code.strip().splitlines()) <= 22
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "back to ResNet exactly: True" in out


def test_readme_example_is_the_example_script():
    script = (ROOT / "examples" / "swap_blocks.py").read_text()
    assert _swap_example().strip() in script

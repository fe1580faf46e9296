"""The README's and docs' Python snippets run, and the README opens with the two commands."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"(<!-- skip-test -->\s*)?```python\n(.*?)```", re.S)


def _snippets() -> list[tuple[str, str]]:
    out = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        for i, m in enumerate(FENCE.finditer(path.read_text())):
            if not m.group(1):
                out.append((f"{path.relative_to(ROOT)}#{i}", m.group(2)))
    return out


SNIPPETS = _snippets()


def test_readme_opens_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(.*?)\n```", text, re.S)
    assert len(commands) >= 2
    demo, tests = commands[0], commands[1]
    assert text.index(demo) < text.index(tests) < text.index("```python")
    assert "pip install" in demo and "examples/quickstart.py" in demo
    assert "pip install" in tests and '".[dev]"' in tests and "pytest" in tests
    assert "<!-- test-command -->" in text.split(tests)[0].splitlines()[-2]


@pytest.mark.parametrize(("where", "code"), SNIPPETS, ids=[w for w, _ in SNIPPETS])
def test_snippet_runs(where: str, code: str, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, where, "exec"), {"__name__": "__snippet__"})

"""Every example runs end to end in --smoke mode, prints a table and writes a plot."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(
    p
    for p in (ROOT / "examples").glob("*.py")
    if p.name not in {"data.py", "_common.py", "reproduce.py"}  # reproduce: test_reproduce.py
)


def test_examples_exist():
    assert "quickstart.py" in {p.name for p in EXAMPLES}


@pytest.mark.slow
@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.stem)
def test_example_smoke(script: Path, tmp_path: Path):
    env = {**os.environ, "TORCH_RECAL_COMPILE": "0", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(script), "--smoke", "--no-progress", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "|---" in proc.stdout or "|-" in proc.stdout, "no results table printed"
    assert list(tmp_path.glob("*.png")), "no plot written"

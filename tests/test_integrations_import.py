"""The integrations import only with their extra, and say which one is missing.

Runs everywhere (the frameworks are hidden from ``import`` where they are installed).
"""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    ("module", "hidden", "extra"),
    [
        ("torch_recal.integrations.lightning", "lightning", "lightning"),
        ("torch_recal.integrations.transformers", "transformers", "hf"),
    ],
)
def test_import_without_the_framework_names_the_extra(monkeypatch, module, hidden, extra):
    for name in [m for m in sys.modules if m == hidden or m.startswith(hidden + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, hidden, None)  # import raises ImportError
    monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(ImportError, match=rf'pip install "torch-recal\[{extra}\]"'):
        __import__(module)


def test_core_and_integrations_package_import_no_framework():
    code = (
        "import sys, torch_recal, torch_recal.integrations\n"
        "loaded = [m for m in ('lightning', 'transformers', 'accelerate') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)

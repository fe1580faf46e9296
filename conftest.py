"""Root pytest configuration: the doctests of the optional trainer integrations are collected
only where their framework is installed (tests/integrations.py skips or, in CI's integration
venv, fails their tests instead)."""

from __future__ import annotations

import importlib.util

collect_ignore = ["tests/lightning_ddp_run.py"]  # a script that test_integrations_lightning runs
collect_ignore += [
    path
    for path, module in (
        ("torch_recal/integrations/lightning.py", "lightning"),
        ("torch_recal/integrations/transformers.py", "transformers"),
    )
    if importlib.util.find_spec(module) is None
]

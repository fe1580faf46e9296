"""Test configuration shared by every test module.

The library's inner ``torch.compile`` is off for the whole suite (eager is the reference);
tests marked ``compile`` switch it on themselves. Tests marked ``vision`` are skipped cleanly
when torchvision or timm cannot be imported.
"""

from __future__ import annotations

import importlib.util
import os

os.environ.setdefault("TORCH_RECAL_COMPILE", "0")

import pytest
import torch

torch.set_num_threads(1)  # the suite is many tiny ops: one thread avoids OpenMP overhead


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None and bool(__import__(name))
    except Exception:  # a broken install (e.g. torchvision built for another torch)
        return False


HAVE_VISION = _importable("torchvision") and _importable("timm")
if os.environ.get("TORCH_RECAL_REQUIRE_VISION") == "1" and not HAVE_VISION:
    raise RuntimeError("TORCH_RECAL_REQUIRE_VISION=1 but torchvision/timm cannot be imported")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAVE_VISION:
        return
    skip = pytest.mark.skip(reason="needs torchvision and timm (pip install 'torch-recal[vision]')")
    for item in items:
        if "vision" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)

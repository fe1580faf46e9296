"""Shared helpers of the trainer-integration tests (tests/test_integrations_*.py).

* :func:`need`: import an optional framework, or skip the test module cleanly; with
  ``TORCH_RECAL_REQUIRE_INTEGRATIONS=1`` (CI's integration venv) a missing framework is an
  error instead, so the tests cannot silently skip there.
* :class:`TinyNet` and :func:`tiny_data`: a small conv classifier and a fixed data set, fast
  on one CPU thread.
* ``COHERENT`` and the ``assert_*`` helpers: a ``CoherentStrongReg`` set-up whose gate
  switches off with a wide margin on :func:`tiny_data`, and comparisons of its runs.
* :func:`docs_blocks`: the ``python`` blocks of ``docs/integrations.md`` marked
  ``<!-- skip-test -->`` (they need an extra), so the integration tests run the very text of
  the docs.
"""

from __future__ import annotations

import importlib
import os
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torch_recal import DescentGate

ROOT = Path(__file__).resolve().parents[1]
REQUIRE = os.environ.get("TORCH_RECAL_REQUIRE_INTEGRATIONS") == "1"


def need(module: str) -> ModuleType:
    """Import ``module`` or skip the calling test module (an error when CI requires it)."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        if REQUIRE:
            raise RuntimeError(
                f"TORCH_RECAL_REQUIRE_INTEGRATIONS=1 but {module} cannot be imported: {error}"
            ) from error
        pytest.skip(f"needs {module} (the [lightning]/[hf] extras)", allow_module_level=True)


class TinyNet(nn.Module):
    """conv1 -> bn1 -> relu -> conv2 -> relu -> pool -> fc: a first conv for GGR, a norm to
    calibrate, two layers to sample, a dense head for RIFLE and the refit."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(16, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.conv2(h))
        return self.fc(self.pool(h).flatten(1))


def tiny_data(n: int = 48, classes: int = 3) -> tuple[Tensor, Tensor]:
    """``n`` images ``(1, 8, 8)`` whose label is set by the brightest quadrant (learnable)."""
    g = torch.Generator().manual_seed(123)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = torch.arange(n) % classes
    for i in range(n):
        r, c = divmod(int(y[i]), 2)
        x[i, 0, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4] += 1.5
    return x, y


def reference(x: Tensor) -> Tensor:
    """A deterministic GGR reference gradient of ``TinyNet.conv1``'s shape that depends on
    the batch (so the EMA state is a real average)."""
    base = torch.linspace(-1.0, 1.0, 36).reshape(4, 1, 3, 3)
    return base * (1.0 + x.mean())


_FENCE = re.compile(r"<!-- skip-test -->\s*```python\n(.*?)```", re.S)


def docs_blocks(marker: str) -> list[str]:
    """The skip-test ``python`` blocks of docs/integrations.md that contain ``marker``."""
    text = (ROOT / "docs" / "integrations.md").read_text()
    return [code for code in _FENCE.findall(text) if marker in code]


def state_equal(a: object, b: object) -> bool:
    """Plain-data states with tensors compared exactly."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(state_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(state_equal(u, v) for u, v in zip(a, b, strict=True))
    return a == b


# strength 0.3, fast averages, full strength at once: on TinyNet (SGD, lr 0.05, momentum 0.9,
# batches of 16) the gate is on for the first steps, then switches off with a wide margin
# (checked by `assert_clear_decisions`).
COHERENT = {
    "strength": 0.3,
    "criterion": DescentGate(progress="same-batch", smoothing=0.5),
    "warmup": 0,
}
COHERENT_EPOCHS = 6


def decisions(reg: Any) -> list[bool]:
    """The gate's decision at each step in ``reg.history``."""
    return [entry["active"] for entry in reg.history]


def assert_same_history(a: list[dict], b: list[dict]) -> None:
    """The same steps and decisions, the same measurements up to float rounding."""
    assert [e["active"] for e in a] == [e["active"] for e in b]
    assert [e["step"] for e in a] == [e["step"] for e in b]
    for key in ("progress", "cost", "strength"):
        torch.testing.assert_close([e[key] for e in a], [e[key] for e in b], rtol=1e-4, atol=0)


def assert_same_gate_state(a: dict, b: dict) -> None:
    """Counters and flags equal, averages equal up to float rounding."""
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], float):
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=0, msg=key)
        else:
            assert a[key] == b[key], key


def assert_clear_decisions(reg: Any, margin: float = 0.2) -> None:
    """Each decision of the run is far from its threshold: the averages, recomputed by hand
    from the history's progress and cost, are at least ``margin`` away from where the gate
    would flip (so a slightly different run, e.g. in bf16, must decide the same)."""
    beta = reg.criterion.smoothing
    progress = cost = None
    for entry, on_next in zip(reg.history, [*decisions(reg)[1:], None], strict=True):
        p, c = entry["progress"], entry["cost"]
        progress = p if progress is None else beta * progress + (1 - beta) * p
        cost = c if cost is None else beta * cost + (1 - beta) * c
        undo = cost / progress
        if on_next is not None:  # the gate: off above max_undo, on again below resume_undo
            gate = reg.criterion
            threshold = gate.max_undo if entry["active"] else gate.resume_undo
            assert abs(undo - threshold) >= margin, (entry["step"], undo)
            assert on_next == (undo <= threshold if entry["active"] else undo < threshold)


def bad_rows(m: ModuleType) -> list:
    """Bad-call rows (tests/badcalls.py) for the callbacks shared by both integration modules
    ``m`` (``torch_recal.integrations.lightning`` or ``.transformers``)."""
    from tests.badcalls import Bad

    rifle, layers, refit = m.RifleCallback, m.RandomLayerCallback, m.DenseRefitCallback
    calib, ggr, coh = m.CalibrateCallback, m.GGRCallback, m.CoherentRegCallback
    state = {"num_refits": 1, "last_epoch": 0, "last_step": 3}
    rows = [
        Bad("RifleCallback", lambda _: rifle(num_resets="1"), TypeError, "`num_resets`"),
        Bad("RifleCallback", lambda _: rifle(num_resets=-1), ValueError, "`num_resets`"),
        Bad("RifleCallback", lambda _: rifle(period=0), ValueError, "`period`"),
        Bad(
            "RifleCallback",
            lambda _: rifle(num_resets=1, period=2),
            ValueError,
            "`period`",
            id="RifleCallback-both",
        ),
        Bad("RifleCallback", lambda _: rifle(head=3), TypeError, "`head`"),
        Bad("RifleCallback", lambda _: rifle(head=[]), ValueError, "`head`"),
        Bad("RifleCallback", lambda _: rifle(total_epochs=0), ValueError, "`total_epochs`"),
        Bad("RifleCallback", lambda _: rifle(unit="batch"), ValueError, "`unit`"),
        Bad("RifleCallback", lambda _: rifle(init=3), TypeError, "`init`"),
        Bad(
            "RifleCallback",
            lambda _: rifle(reset_optimizer_state="yes"),
            TypeError,
            "`reset_optimizer_state`",
        ),
        Bad("RifleCallback", lambda _: rifle(seed=-1), ValueError, "`seed`"),
        Bad(
            "RifleCallback",
            lambda _: rifle(min_epochs_after_last=0),
            ValueError,
            "`min_epochs_after_last`",
        ),
        Bad(
            "RifleCallback.load_state_dict",
            lambda c: c.load_state_dict(5),
            TypeError,
            "`state_dict`",
            make=lambda: rifle(num_resets=1),
        ),
        Bad("RandomLayerCallback", lambda _: layers("net.conv2"), TypeError, "`layers`"),
        Bad("RandomLayerCallback", lambda _: layers([]), ValueError, "`layers`"),
        Bad("RandomLayerCallback", lambda _: layers([3]), TypeError, "`layers`", id="item"),
        Bad(
            "RandomLayerCallback",
            lambda _: layers(["a"], min_trainable=-1),
            ValueError,
            "`min_trainable`",
        ),
        Bad("RandomLayerCallback", lambda _: layers(["a"], seed="0"), TypeError, "`seed`"),
        Bad(
            "RandomLayerCallback", lambda _: layers(["a"], schedule=[1.5]), ValueError, "`schedule"
        ),
        Bad(
            "RandomLayerCallback",
            lambda _: layers(["a"], restore_at_end=1),
            TypeError,
            "`restore_at_end`",
        ),
        Bad(
            "RandomLayerCallback.load_state_dict",
            lambda c: c.load_state_dict([1]),
            TypeError,
            "`state_dict`",
            make=lambda: layers(["a"]),
        ),
        Bad("DenseRefitCallback", lambda _: refit(layer=3), TypeError, "`layer`"),
        Bad(
            "DenseRefitCallback", lambda _: refit(every_n_epochs=0), ValueError, "`every_n_epochs`"
        ),
        Bad(
            "DenseRefitCallback",
            lambda _: refit(at_end=False),
            ValueError,
            "`every_n_epochs`",
            id="never",
        ),
        Bad("DenseRefitCallback", lambda _: refit(at_end="no"), TypeError, "`at_end`"),
        Bad("DenseRefitCallback", lambda _: refit(loader=3), TypeError, "`loader`"),
        Bad("DenseRefitCallback", lambda _: refit(batch_fn=3), TypeError, "`batch_fn`"),
        Bad("DenseRefitCallback", lambda _: refit(ridge=-1.0), ValueError, "`ridge`"),
        Bad("DenseRefitCallback", lambda _: refit(targets="hot"), ValueError, "`targets`"),
        Bad("DenseRefitCallback", lambda _: refit(num_classes=0), ValueError, "`num_classes`"),
        Bad("DenseRefitCallback", lambda _: refit(step_size=2.0), ValueError, "`step_size`"),
        Bad("DenseRefitCallback", lambda _: refit(start="now"), ValueError, "`start`"),
        Bad("DenseRefitCallback", lambda _: refit(evaluate="x"), TypeError, "`evaluate`"),
        Bad(
            "DenseRefitCallback.load_state_dict",
            lambda c: c.load_state_dict({**state, "num_refits": -1}),
            ValueError,
            "`num_refits`",
            make=refit,
        ),
        Bad(
            "DenseRefitCallback.load_state_dict",
            lambda c: c.load_state_dict({**state, "last_step": "3"}),
            TypeError,
            "`last_step`",
            make=refit,
        ),
        Bad(
            "DenseRefitCallback.load_state_dict",
            lambda c: c.load_state_dict({**state, "last_step": -1}),
            ValueError,
            "`last_step`",
            make=refit,
            id="inconsistent",
        ),
        Bad(
            "DenseRefitCallback.load_state_dict",
            lambda c: c.load_state_dict({"num_refits": 1}),
            ValueError,
            "last_epoch",
            make=refit,
            id="partial",
        ),
        Bad("CalibrateCallback", lambda _: calib(reduction=0), ValueError, "`reduction`"),
        Bad("CalibrateCallback", lambda _: calib(reduction="4"), TypeError, "`reduction`"),
        Bad("CalibrateCallback", lambda _: calib(targets="bn1"), TypeError, "`targets`"),
        Bad("CalibrateCallback", lambda _: calib(eps_typo=1.0), TypeError, "`eps_typo`"),
        Bad("GGRCallback", lambda _: ggr(None), TypeError, "`ggr`"),
        *coherent_rows(coh),
    ]
    return [r.param() for r in rows]


def coherent_rows(coh: Any) -> list:
    """Rows for ``CoherentRegCallback``: each option as ``CoherentStrongReg`` checks it, the
    options that come from the trainer, ``params`` and ``load_state_dict``."""
    from tests.badcalls import Bad

    def ctor(error: type[BaseException], names: str, **kw: Any) -> Bad:
        shown = ",".join(f"{k}={v!r}" for k, v in kw.items())
        return Bad("CoherentRegCallback", lambda _: coh(**{"strength": 0.1, **kw}), error, names,
                   id=f"CoherentRegCallback-{shown}")  # fmt: skip

    return [
        ctor(TypeError, "`strength`", strength="0.1"),
        ctor(ValueError, "`strength`", strength=0.0),
        ctor(ValueError, "`strength`", strength=float("nan")),
        ctor(TypeError, "`kind`", kind=1),
        ctor(ValueError, "`kind`", kind="l3"),
        ctor(ValueError, "`l1_mode`", l1_mode="clip"),
        ctor(ValueError, "`criterion`", criterion="coherent"),
        ctor(ValueError, "`max_undo`", max_undo=0.0),
        ctor(ValueError, "`resume_undo`", resume_undo=0.9),
        ctor(ValueError, "`smoothing`", smoothing=1.0),
        ctor(ValueError, "`warmup`", warmup="later"),
        ctor(TypeError, "`warmup`", warmup=1.5),
        ctor(ValueError, "`takeoff`", takeoff=1.0),
        ctor(ValueError, "`max_ratio`", criterion="ratio", max_ratio=0.0),
        ctor(ValueError, "`min_cosine`", criterion="ratio", min_cosine=2.0),
        ctor(ValueError, "`window`", criterion="ratio", window=0),
        ctor(TypeError, "`reactivate`", criterion="ratio", reactivate="no"),
        ctor(TypeError, "`max_ratio`", max_ratio=2.0),  # not an option of the descent gate
        ctor(ValueError, "`target_sparsity`", target_sparsity=1.5),
        ctor(TypeError, "`strength`", strength=None),  # required without a budget
        ctor(ValueError, "`delay`", delay=-1),
        ctor(TypeError, "`weights_only`", weights_only=1),
        ctor(ValueError, "`history_size`", history_size=-1),
        ctor(TypeError, "`params`", params=3),
        ctor(TypeError, "`params`", params=nn.Linear(2, 2)),
        ctor(TypeError, "`lr`", lr=0.1),  # from the trainer's optimizer
        ctor(TypeError, "`optimizer`", optimizer=None),
        ctor(TypeError, "`scaler`", scaler=None),
        ctor(TypeError, "`strenght`", strenght=0.1),
        Bad(
            "CoherentRegCallback.load_state_dict",
            lambda c: c.load_state_dict([1]),
            TypeError,
            "`state_dict`",
            make=lambda: coh(strength=0.1),
        ),
    ]

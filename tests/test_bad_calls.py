"""Bad calls to every public entry point (docs/conventions.md, rules 1 and 4).

Each row asserts the exception type (wrong type: ``TypeError``; right type, bad value:
``ValueError``; out of order: ``RuntimeError``), that the message names the argument, and
that nothing changed (the object's state, the model, the optimizer). The last test checks
that every public constructor and function has at least one row.
"""

import dataclasses
import inspect

import pytest

import torch_recal
from tests import (
    bad_calls_calibration,
    bad_calls_coherent,
    bad_calls_generative,
    bad_calls_refit,
    bad_calls_shrink,
)
from tests.badcalls import Bad, run_bad_call

CASES: list[Bad] = [
    *bad_calls_coherent.CASES,
    *bad_calls_refit.CASES,
    *bad_calls_calibration.CASES,
    *bad_calls_generative.CASES,
    *bad_calls_shrink.CASES,
]


# --------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("case", [c.param() for c in CASES])
def test_bad_call_raises_names_the_argument_and_changes_nothing(case: Bad) -> None:
    run_bad_call(case)


def _public_callables() -> set[str]:
    names = set()
    for mod, prefix in (
        (torch_recal, ""),
        (torch_recal.functional, "functional."),
        (torch_recal.models, "models."),
    ):
        for name in mod.__all__:
            obj = getattr(mod, name)
            if inspect.ismodule(obj) or not callable(obj) or name.startswith("_"):
                continue
            if dataclasses.is_dataclass(obj) or (inspect.isclass(obj) and issubclass(obj, tuple)):
                continue  # result records (RefitResult, FilterStats, ...) are built by the library
            if not inspect.isclass(obj) and not inspect.signature(obj).parameters:
                continue  # nothing to pass wrongly (compile_enabled())
            names.add(prefix + name)
    return names


def test_every_public_entry_point_has_a_bad_call_row() -> None:
    covered = {c.entry.split(".")[0] if not c.entry.startswith(("functional.", "models."))
               else ".".join(c.entry.split(".")[:2]) for c in CASES}  # fmt: skip
    missing = sorted(_public_callables() - covered)
    assert not missing, f"public entry points without a bad-call row: {missing}"

"""Seeded random corruptions of every stateful piece's state (docs/conventions.md, rule 2).

For each piece of tests/test_state_protocol.py, a few hundred state dicts derived from a real
one by random edits (a key dropped or added, a value replaced by another type, by NaN/inf, by
a negative number, a tensor reshaped or poisoned) are loaded. Each load either raises
``TypeError``/``ValueError`` and leaves the piece exactly as it was, or succeeds only when the
edit kept the state valid, in which case the piece's ``state_dict()`` is the loaded state.
"""

from __future__ import annotations

import copy
import math
import random
from typing import Any

import pytest
import torch

from tests.badcalls import assert_same, snapshot
from tests.test_state_protocol import WORLDS


def _mutate(state: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    state = copy.deepcopy(state)
    key = rng.choice(sorted(state))
    value = state[key]
    kind = rng.randrange(8)
    if kind == 0:
        del state[key]
    elif kind == 1:
        state[f"extra_{rng.randrange(100)}"] = rng.choice([0, 1.0, "x", None])
    elif kind == 2:
        state[key] = rng.choice(["", "nan", [], {}, object.__name__, (1,)])
    elif kind == 3:
        state[key] = rng.choice([math.nan, math.inf, -math.inf])
    elif kind == 4:
        state[key] = rng.choice([-1, -(10**6), -0.5])
    elif kind == 5 and isinstance(value, torch.Tensor) and value.numel() > 1:
        state[key] = value.reshape(-1)[: rng.randrange(1, value.numel())].clone()
    elif kind == 6 and isinstance(value, torch.Tensor) and value.is_floating_point():
        poisoned = value.clone()
        poisoned.view(-1)[rng.randrange(value.numel())] = rng.choice([math.nan, math.inf])
        state[key] = poisoned
    else:
        state[key] = rng.choice([True, 3.5, "3"]) if not isinstance(value, bool) else 1
    return state


def _same_values(a: Any, b: Any) -> bool:
    """Equal as data: numbers by value (an int may load as a float), tensors exactly."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_values(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_values(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@pytest.mark.parametrize(
    "world_cls", WORLDS, ids=[w.__name__.removesuffix("World") for w in WORLDS]
)
def test_random_corruptions_raise_and_change_nothing(world_cls: Any) -> None:
    world = world_cls.build(seed=0)
    for i in range(world_cls.steps):
        world.advance(i)
    good = world.piece.state_dict()
    before = snapshot(world.piece)
    rng = random.Random(1234)
    raised = 0
    for _ in range(300):
        bad = _mutate(good, rng)
        try:
            world.piece.load_state_dict(bad)
        except (TypeError, ValueError):
            raised += 1
            assert_same(before, snapshot(world.piece), f"after load_state_dict({bad!r:.300})")
            continue
        # accepted: the edit must have kept a valid state, and now it is the state (a key an
        # older state lacks may be dropped: it loads with the value it implies)
        loaded = world.piece.state_dict()
        assert set(loaded) - set(bad) <= set(world_cls.optional_keys), f"accepted {bad!r:.300}"
        loaded = {k: v for k, v in loaded.items() if k in bad}
        assert _same_values(bad, loaded), f"accepted {bad!r:.300}"
        world.piece.load_state_dict(good)  # back to the real state for the next edit
        assert_same(before, snapshot(world.piece))
    assert raised > 200  # nearly every random edit is invalid

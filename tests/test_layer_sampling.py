"""RandomLayerTraining (torch_recal.layer_sampling): the fast-retraining paper's random layer
training, against hand-written expectations (which layers get a gradient, the paper's
``round((1 - r_a) n)`` frozen count, an uninterrupted run)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from tests.distributed import needs_fsdp2, run_distributed
from torch_recal import RandomLayerTraining


def test_random_layer_training_trains_a_suffix_and_stops_backward_early():
    torch.manual_seed(0)
    net = nn.Sequential(*[nn.Linear(4, 4) for _ in range(5)])
    rlt = RandomLayerTraining(list(net), min_trainable=2, seed=7)
    counts = set()
    for _ in range(30):
        m = sum(rlt.trainable)
        counts.add(m)
        assert 2 <= m <= 5
        assert rlt.trainable == [i >= 5 - m for i in range(5)]  # the last m layers
        net.zero_grad(set_to_none=True)
        net(torch.randn(3, 4)).sum().backward()
        for layer, on in zip(net, rlt.trainable, strict=True):
            assert (layer.weight.grad is not None) == on
        rlt.step()
    assert counts == {2, 3, 4, 5}  # every allowed count occurs


def test_random_layer_training_paper_schedule_resume_and_restore():
    layers = [nn.Linear(2, 2) for _ in range(8)]
    layers[0].bias.requires_grad_(False)  # frozen by the user: stays frozen
    paper = RandomLayerTraining.PAPER_SCHEDULE
    rlt = RandomLayerTraining(layers, seed=3, schedule=paper)
    frozen_counts, history = [], []
    for epoch in range(10):
        assert rlt.num_steps == rlt.epoch == epoch
        frozen_counts.append(8 - sum(rlt.trainable))
        history.append(rlt.trainable)
        for layer, on in zip(layers, rlt.trainable, strict=True):
            assert layer.weight.requires_grad == on
        assert not layers[0].bias.requires_grad
        if epoch < 8:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # the schedule's 8 step() calls are quiet
                rlt.step()
        elif epoch == 8:
            with pytest.warns(UserWarning, match="schedule"):
                rlt.step()
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # once
                rlt.step()
    # round((1 - r_a) * 8) frozen, r_a = [1, 1, .75, .75, .5, .5, .25, .25], then kept
    assert frozen_counts == [0, 0, 2, 2, 4, 4, 6, 6, 6, 6]
    assert len({tuple(t) for t in history[6:]}) > 1  # re-drawn every epoch
    # resume from epoch 4 repeats the uninterrupted run (a drawn seed takes the checkpoint's)
    other = RandomLayerTraining([nn.Linear(2, 2) for _ in range(8)], schedule=paper)
    state = rlt.state_dict()
    state["num_steps"] = 4
    other.load_state_dict(state)
    assert other.seed == 3
    replay = []
    with pytest.warns(UserWarning, match="schedule"):  # it passes epoch 8 again
        for _ in range(6):
            replay.append(other.trainable)
            other.step()
    assert replay == history[4:]
    rlt.restore()
    assert all(p.requires_grad for m in layers[1:] for p in m.parameters())
    assert not layers[0].bias.requires_grad


def test_load_state_dict_checks_the_configuration_and_changes_nothing():
    layers = [nn.Linear(2, 2) for _ in range(4)]
    rlt = RandomLayerTraining(layers, seed=1, schedule=[1.0, 0.5, 0.25])
    rlt.step()
    state = rlt.state_dict()
    flags = [p.requires_grad for m in layers for p in m.parameters()]
    bad = [
        ({**state, "seed": 2}, ValueError, "`seed`"),  # the constructor's seed differs
        ({**state, "schedule": [1.0, 0.5]}, ValueError, "`schedule`"),
        ({**state, "schedule": [5.0]}, ValueError, "`schedule[0]`"),
        ({**state, "min_trainable": 10}, ValueError, "`min_trainable`"),
        ({**state, "min_trainable": 2}, ValueError, "`min_trainable`"),
        ({**state, "num_steps": "x"}, TypeError, "`num_steps`"),
        ({**state, "epoch": 3}, ValueError, "unexpected ['epoch']"),
    ]
    for bad_state, error, names in bad:
        with pytest.raises(error) as info:
            rlt.load_state_dict(bad_state)
        assert names in str(info.value)
        assert rlt.state_dict() == state
        assert [p.requires_grad for m in layers for p in m.parameters()] == flags
    with pytest.raises(AttributeError):
        rlt.epoch = 5  # a read-only alias


def test_parameters_frozen_by_the_user_stay_frozen():
    frozen = nn.Linear(2, 2)
    frozen.weight.requires_grad_(False)
    rlt = RandomLayerTraining([nn.Linear(2, 2), frozen], min_trainable=2, seed=0)
    assert rlt.trainable == [True, True]
    assert not frozen.weight.requires_grad and frozen.bias.requires_grad


# ---------------------------------------------------------------------------------------------
# distributed


def _fsdp_random_layers_worker(rank, world_size):
    from torch.distributed.fsdp import fully_shard

    from torch_recal import RandomLayerTraining

    torch.manual_seed(0)
    layers = [nn.Linear(8, 8) for _ in range(4)]
    model = nn.Sequential(*[m for lin in layers for m in (lin, nn.ReLU())], nn.Linear(8, 3))
    for lin in layers:
        fully_shard(lin)
    fully_shard(model)
    rlt = RandomLayerTraining(layers, seed=None)  # the choice is broadcast from rank 0
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(rank))
    out = []
    for _ in range(4):
        rlt.step()
        before = [lin.weight.detach().full_tensor().clone() for lin in layers]
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        moved = [
            not torch.equal(lin.weight.detach().full_tensor(), b)
            for lin, b in zip(layers, before, strict=True)
        ]
        out.append((list(rlt.trainable), moved))
    return out


@pytest.mark.distributed
@needs_fsdp2
def test_random_layer_training_under_fsdp2_freezes_exactly_the_chosen_layers():
    r0, r1 = run_distributed(_fsdp_random_layers_worker)
    assert r0 == r1  # the same choice on every rank
    for trainable, moved in r0:
        assert moved == trainable  # frozen shards stay, trainable ones take the step
    assert len({tuple(t) for t, _ in r0}) > 1  # the choice changes between epochs

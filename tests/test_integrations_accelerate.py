"""accelerate: every stateful piece round-trips through ``register_for_checkpointing``
(``save_state``/``load_state`` resumes an uninterrupted run exactly), and surgery and refit
work on ``accelerator.unwrap_model(model)``. Skipped without accelerate (the ``[hf]`` extra).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from tests.integrations import TinyNet, docs_blocks, need, reference, state_equal, tiny_data

accelerate = need("accelerate")

from torch_recal import (  # noqa: E402
    GenerativeGradientLoss,
    NormalEquations,
    RandomLayerTraining,
    RifleScheduler,
    calibrate,
    is_calibrated,
    pinv_refit_dense,
)

EPOCHS = 4


def loader() -> DataLoader:
    x, y = tiny_data()
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)


def run(checkpoint: str, *, stop_after: int | None = None, resume: bool = False) -> dict:
    """A loop with every stateful piece registered; stops after epoch ``stop_after`` (saving
    the state), or resumes from the saved state."""
    accelerator = accelerate.Accelerator(cpu=True)
    torch.manual_seed(0)
    net = TinyNet()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    net, opt, data = accelerator.prepare(net, opt, loader())
    inner = accelerator.unwrap_model(net)
    torch.manual_seed(1)
    calibrate(inner, targets=["bn1"], optimizer=opt)  # surgery on the unwrapped model
    rifle = RifleScheduler(inner, total_epochs=EPOCHS, num_resets=1, seed=0)
    rlt = RandomLayerTraining([inner.bn1, inner.conv2], seed=1, schedule=[1.0, 0.5, 0.5, 0.5])
    ggr = GenerativeGradientLoss(inner.conv1.weight, reference, weight=0.1, ema=0.5)
    head_stats = NormalEquations(16, 3)  # the head's inputs over training
    accelerator.register_for_checkpointing(rifle, rlt, ggr, head_stats)
    features: list[torch.Tensor] = []
    inner.fc.register_forward_pre_hook(lambda m, args: features.append(args[0].detach()))
    start = 0
    if resume:
        accelerator.load_state(checkpoint)
        start = rifle.num_steps
    for epoch in range(start, EPOCHS):
        for x, y in data:
            features.clear()
            loss = F.cross_entropy(net(x), y)
            loss = loss + ggr(loss, x)
            accelerator.backward(loss)
            opt.step()
            opt.zero_grad()
            head_stats.update(features[0], F.one_hot(y, 3).double())
        rifle.step()
        rlt.step()
        if epoch == stop_after:
            accelerator.save_state(checkpoint)
            return {}
    refit = pinv_refit_dense(inner.fc, data, model=inner, ridge=1e-2, evaluate=False)
    return {
        "weights": {k: v.clone() for k, v in inner.state_dict().items()},
        "states": [o.state_dict() for o in (rifle, rlt, ggr, head_stats)],
        "refit": refit,
        "calibrated": is_calibrated(inner),
    }


@pytest.mark.parametrize("stop_after", [0, 2])
def test_save_state_load_state_resumes_every_piece_exactly(tmp_path, stop_after):
    full = run(str(tmp_path / "unused"))
    run(str(tmp_path / "ckpt"), stop_after=stop_after)
    resumed = run(str(tmp_path / "ckpt"), resume=True)
    assert full["calibrated"] and resumed["calibrated"]
    for key, value in full["weights"].items():
        torch.testing.assert_close(resumed["weights"][key], value, rtol=0, atol=0, msg=key)
    for a, b in zip(resumed["states"], full["states"], strict=True):
        assert state_equal(a, b)
    assert full["states"][0]["last_reset"] == 1 and full["states"][3]["count"] == 48 * EPOCHS


def test_refit_on_the_unwrapped_model_equals_the_plain_refit():
    accelerator = accelerate.Accelerator(cpu=True)
    torch.manual_seed(0)
    plain = TinyNet()
    wrapped = TinyNet()
    wrapped.load_state_dict(plain.state_dict())
    wrapped, data = accelerator.prepare(wrapped, loader())
    ours = pinv_refit_dense(accelerator.unwrap_model(wrapped).fc, data,
                            model=accelerator.unwrap_model(wrapped), ridge=1e-2)  # fmt: skip
    expected = pinv_refit_dense(plain.fc, loader(), model=plain, ridge=1e-2)
    torch.testing.assert_close(ours.weight, expected.weight)
    torch.testing.assert_close(accelerator.unwrap_model(wrapped).fc.bias, plain.fc.bias)
    assert ours.num_samples == expected.num_samples == 48


@pytest.mark.parametrize("code", docs_blocks("accelerate"))
def test_docs_accelerate_snippet_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/integrations.md", "exec"), {"__name__": "__snippet__"})

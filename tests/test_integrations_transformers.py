"""Hugging Face ``Trainer`` callbacks (torch_recal.integrations.transformers), real ``Trainer``.

References: the same pieces driven by hand in a plain loop (train), and an uninterrupted run
(resume from a checkpoint, also from inside an epoch and from the last step of an epoch).
Skipped without the ``[hf]`` extra.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from tests.badcalls import run_bad_call
from tests.integrations import (
    COHERENT,
    COHERENT_EPOCHS,
    TinyNet,
    assert_clear_decisions,
    assert_same_gate_state,
    assert_same_history,
    bad_rows,
    decisions,
    docs_blocks,
    need,
    reference,
    state_equal,
    tiny_data,
)

transformers = need("transformers")
need("accelerate")

from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from torch_recal import (  # noqa: E402
    CoherentStrongReg,
    GenerativeGradientLoss,
    RandomLayerTraining,
    RifleScheduler,
    calibrate,
    is_calibrated,
    pinv_refit_dense,
)
from torch_recal.integrations import transformers as integration  # noqa: E402
from torch_recal.integrations.transformers import (  # noqa: E402
    CalibrateCallback,
    CoherentRegCallback,
    DenseRefitCallback,
    GGRCallback,
    GGRTrainer,
    RandomLayerCallback,
    RifleCallback,
)

EPOCHS = 4
LR = 0.05
logging.getLogger("transformers").setLevel(logging.ERROR)


class Images(Dataset):
    def __init__(self) -> None:
        self.x, self.y = tiny_data()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.x[i], "labels": self.y[i]}


class HFNet(nn.Module):
    """A Hugging Face style model: keyword inputs, a dict with ``loss`` and ``logits``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = TinyNet()

    def forward(self, pixel_values, labels=None):
        logits = self.net(pixel_values)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


class Seed(TrainerCallback):
    """Seeds the global RNG right before the calibration layers are made."""

    def on_init_end(self, args, state, control, **kwargs):
        torch.manual_seed(1)


def arguments(tmp_path, **kwargs) -> TrainingArguments:
    options = dict(output_dir=str(tmp_path), per_device_train_batch_size=16,
                   num_train_epochs=EPOCHS, learning_rate=LR, lr_scheduler_type="constant",
                   weight_decay=0.0, max_grad_norm=0.0, seed=0, report_to="none",
                   save_strategy="no", logging_strategy="no", disable_tqdm=True, use_cpu=True,
                   train_sampling_strategy="sequential", dataloader_num_workers=0)  # fmt: skip
    options.update(kwargs)
    return TrainingArguments(**options)


def callbacks() -> list:
    return [
        Seed(),
        CalibrateCallback(targets=["net.bn1"]),
        RifleCallback(num_resets=1, seed=0),
        RandomLayerCallback(["net.bn1", "net.conv2"], seed=1, schedule=[1.0, 0.5, 0.5, 0.5]),
        DenseRefitCallback(every_n_epochs=3, ridge=1e-2),
    ]


def make_trainer(tmp_path, cbs=None, **kwargs) -> GGRTrainer:
    model = HFNet()
    ggr = GGRCallback(GenerativeGradientLoss(model.net.conv1.weight, reference, weight=0.1,
                                             ema=0.5))  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    return GGRTrainer(model=model, args=arguments(tmp_path, **kwargs), train_dataset=Images(),
                      callbacks=callbacks() if cbs is None else cbs, optimizers=(opt, None),
                      ggr=ggr)  # fmt: skip


def plain_loop() -> tuple[nn.Module, dict]:
    """The same run by hand with the library's pieces (the reference)."""
    model = HFNet()
    net = model.net
    ggr = GenerativeGradientLoss(net.conv1.weight, reference, weight=0.1, ema=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    torch.manual_seed(1)
    calibrate(model, targets=["net.bn1"], optimizer=opt)
    rifle = RifleScheduler(net, total_epochs=EPOCHS, num_resets=1, seed=0)
    rlt = RandomLayerTraining([net.bn1, net.conv2], seed=1, schedule=[1.0, 0.5, 0.5, 0.5])
    x, y = tiny_data()
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, len(y), 16)]
    refits = 0
    for epoch in range(EPOCHS):
        model.train()
        for xb, yb in batches:
            loss = model(xb, yb)["loss"]
            loss = loss + ggr(loss, xb)
            loss.backward()
            opt.step()
            opt.zero_grad()
        rifle.step()
        rlt.step()
        if (epoch + 1) % 3 == 0 or epoch == EPOCHS - 1:
            pinv_refit_dense(net.fc, batches, model=net, ridge=1e-2, evaluate=False)
            refits += 1
    rlt.restore()
    return model, {"rifle": rifle.state_dict(), "rlt": rlt.state_dict(),
                   "ggr": ggr.state_dict(), "refits": refits}  # fmt: skip


def states_of(trainer: GGRTrainer) -> dict:
    by_type = {type(c): c for c in trainer.callback_handler.callbacks}
    return {
        "rifle": by_type[RifleCallback].scheduler.state_dict(),
        "rlt": by_type[RandomLayerCallback].layer_training.state_dict(),
        "ggr": trainer.ggr_callback.ggr.state_dict(),
        "refits": by_type[DenseRefitCallback].num_refits,
    }


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=1e-5, atol=1e-6, msg=key)


def assert_same_states(a: dict, b: dict) -> None:
    assert state_equal(a["rifle"], b["rifle"]) and state_equal(a["rlt"], b["rlt"])
    assert a["refits"] == b["refits"]
    assert a["ggr"]["num_steps"] == b["ggr"]["num_steps"]
    torch.testing.assert_close(a["ggr"]["reference_ema"], b["ggr"]["reference_ema"])


def test_train_with_every_callback_equals_the_plain_loop(tmp_path):
    expected, expected_states = plain_loop()
    trainer = make_trainer(tmp_path)
    trainer.train()
    assert is_calibrated(trainer.model)
    assert_same_weights(trainer.model, expected)
    states = states_of(trainer)
    assert states["rifle"]["last_reset"] == 1 and states["refits"] == 2
    assert states["ggr"]["num_steps"] == 3 * EPOCHS
    assert_same_states(states, expected_states)
    assert all(p.requires_grad for p in trainer.model.parameters())


@pytest.mark.parametrize("step", [3, 7])
def test_resume_equals_the_uninterrupted_run(tmp_path, step):
    # step 3: the last step of epoch 0, saved before on_epoch_end; step 7: inside epoch 2
    full = make_trainer(tmp_path / "full", save_strategy="steps", save_steps=1)
    full.train()
    ckpt = tmp_path / "full" / f"checkpoint-{step}"
    saved = json.loads((ckpt / "trainer_state.json").read_text())["stateful_callbacks"]
    # saved before that step's epoch end: epochs completed *before* it
    assert saved["RifleCallback"]["attributes"]["torch_recal_state"]["num_steps"] == (step - 1) // 3
    assert saved["GGRCallback"]["attributes"]["torch_recal_state"]["num_steps"] == step

    resumed = make_trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert_same_weights(resumed.model, full.model)
    assert_same_states(states_of(resumed), states_of(full))


def test_reference_average_survives_the_json_checkpoint_exactly(tmp_path):
    full = make_trainer(tmp_path, cbs=[], save_strategy="steps", save_steps=2, num_train_epochs=1)
    full.train()
    text = (tmp_path / "checkpoint-2" / "trainer_state.json").read_text()
    saved = json.loads(text)["stateful_callbacks"]["GGRCallback"]["attributes"]
    from torch_recal.integrations._common import from_json

    state = from_json(saved["torch_recal_state"])
    # the average after two steps, recomputed by hand from the batches (ema = 0.5)
    x, _ = tiny_data()
    r0, r1 = reference(x[:16]), reference(x[16:32])
    assert torch.equal(state["reference_ema"], r0 * 0.5 + r1 * (1 - 0.5))


def test_restore_callback_states_flag_is_refused(tmp_path):
    with pytest.raises(ValueError, match="`restore_callback_states_from_checkpoint`"):
        make_trainer(tmp_path, restore_callback_states_from_checkpoint=True)


def test_calibrate_callback_added_too_late_raises(tmp_path):
    trainer = make_trainer(tmp_path, cbs=[], num_train_epochs=1)
    trainer.add_callback(CalibrateCallback(targets=["net.bn1"]))
    with pytest.raises(RuntimeError, match="not calibrated"):
        trainer.train()


def test_ggr_term_is_not_added_in_evaluation(tmp_path):
    trainer = make_trainer(tmp_path, cbs=[], num_train_epochs=1)
    metrics = trainer.evaluate(Images())
    assert trainer.ggr_callback.ggr.num_steps == 0 and "eval_loss" in metrics


def test_refit_runs_on_dict_batches_of_the_train_dataloader(tmp_path):
    refit = DenseRefitCallback("net.fc", every_n_epochs=1, ridge=1e-2, evaluate=True)
    trainer = make_trainer(tmp_path, cbs=[refit], num_train_epochs=1)
    trainer.train()
    assert refit.num_refits == 1 and refit.last_result.num_samples == 48
    expected = HFNet()
    expected.load_state_dict(trainer.model.state_dict())
    loader = DataLoader(Images(), batch_size=16)
    pinv_refit_dense(
        expected.net.fc,
        loader,
        model=expected,
        ridge=1e-2,
        evaluate=False,
        batch_fn=lambda b: ({"pixel_values": b["pixel_values"]}, b["labels"]),
    )
    torch.testing.assert_close(trainer.model.net.fc.weight, expected.net.fc.weight)


def test_bf16_autocast_train_with_ggr_gives_finite_weights(tmp_path):
    trainer = make_trainer(tmp_path, cbs=[], num_train_epochs=1, bf16=True)
    trainer.train()
    assert trainer.ggr_callback.ggr.num_steps == 3
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_plain_trainer_subclass_recipe_matches_ggr_trainer(tmp_path):
    class MyTrainer(Trainer):
        def __init__(self, *args, ggr, **kwargs):
            super().__init__(*args, **kwargs)
            self.ggr = ggr

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            x = inputs["pixel_values"]
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                                 num_items_in_batch=num_items_in_batch)  # fmt: skip
            if model.training:
                loss = loss + self.ggr.term(loss, x, self.accelerator.scaler)
            return (loss, outputs) if return_outputs else loss

    ours = make_trainer(tmp_path / "a", cbs=[], num_train_epochs=1)
    ours.train()
    model = HFNet()
    ggr = GGRCallback(GenerativeGradientLoss(model.net.conv1.weight, reference, weight=0.1,
                                             ema=0.5))  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    mine = MyTrainer(
        model=model,
        args=arguments(tmp_path / "b", num_train_epochs=1),
        train_dataset=Images(),
        callbacks=[ggr],
        optimizers=(opt, None),
        ggr=ggr,
    )
    mine.train()
    assert_same_weights(mine.model, ours.model)


# --------------------------------------------------------------------------- CoherentRegCallback
# tests/integrations.py's COHERENT set-up, and the Trainer clips the gradients
# (max_grad_norm=1) before the optimizer's step.
CLIP = 1.0


def coherent_trainer(tmp_path, **kwargs) -> Trainer:
    model = HFNet()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    options = dict(num_train_epochs=COHERENT_EPOCHS, max_grad_norm=CLIP)
    options.update(kwargs)
    return Trainer(model=model, args=arguments(tmp_path, **options), train_dataset=Images(),
                   callbacks=[CoherentRegCallback(**COHERENT)], optimizers=(opt, None))  # fmt: skip


def coherent_of(trainer: Trainer) -> CoherentStrongReg:
    return next(c for c in trainer.callback_handler.callbacks
                if isinstance(c, CoherentRegCallback)).reg  # fmt: skip


def coherent_loop() -> tuple[nn.Module, CoherentStrongReg]:
    """The reference: backward, clip, step, zero_grad, with ``CoherentStrongReg.attach``."""
    model = HFNet()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    reg = CoherentStrongReg(model.named_parameters(), optimizer=opt, **COHERENT)
    x, y = tiny_data()
    with reg.attach():
        for _ in range(COHERENT_EPOCHS):
            for i in range(0, len(y), 16):
                model(x[i : i + 16], y[i : i + 16])["loss"].backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
                opt.step()
                opt.zero_grad()
    return model, reg


def test_coherent_train_equals_the_hand_written_loop_with_attach(tmp_path):
    expected_model, expected = coherent_loop()
    trainer = coherent_trainer(tmp_path)
    trainer.train()
    reg = coherent_of(trainer)
    # attached to the torch optimizer inside accelerate's AcceleratedOptimizer
    assert reg.optimizer is trainer.optimizer.optimizer
    assert reg.names == expected.names == ["net.conv1.weight", "net.conv2.weight", "net.fc.weight"]
    assert_same_weights(trainer.model, expected_model)
    assert reg.num_steps == 3 * COHERENT_EPOCHS
    assert True in decisions(reg) and False in decisions(reg)  # the gate switched
    assert_same_history(list(reg.history), list(expected.history))
    assert_same_gate_state(reg.state_dict(), expected.state_dict())
    # detached in on_train_end: a further step leaves the regulariser as it was
    trainer.model(torch.randn(2, 1, 8, 8))["logits"].sum().backward()
    reg.optimizer.step()
    assert reg.num_steps == 3 * COHERENT_EPOCHS


@pytest.mark.parametrize("step", [3, 7])
def test_coherent_resume_equals_the_uninterrupted_run(tmp_path, step):
    # step 3: the last step of epoch 0; step 7: inside epoch 2, after the gate switched off
    full = coherent_trainer(tmp_path / "full", save_strategy="steps", save_steps=1)
    full.train()
    ckpt = tmp_path / "full" / f"checkpoint-{step}"
    saved = json.loads((ckpt / "trainer_state.json").read_text())["stateful_callbacks"]
    state = saved["CoherentRegCallback"]["attributes"]["torch_recal_state"]
    assert state["num_steps"] == step and state["is_active"] == (step == 3)

    resumed = coherent_trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert_same_weights(resumed.model, full.model)
    a, b = coherent_of(resumed), coherent_of(full)
    assert_same_gate_state(a.state_dict(), b.state_dict())
    assert_same_history(list(a.history), list(b.history)[step:])


def test_coherent_state_survives_the_json_checkpoint_exactly(tmp_path):
    trainer = coherent_trainer(tmp_path, save_strategy="steps", save_steps=4, num_train_epochs=2)
    trainer.train()
    from torch_recal.integrations._common import from_json

    text = (tmp_path / "checkpoint-4" / "trainer_state.json").read_text()
    entry = json.loads(text)["stateful_callbacks"]["CoherentRegCallback"]["attributes"]
    # the averages after four steps, recomputed by hand from the full run's history
    history = list(coherent_of(trainer).history)[:4]
    progress, cost = history[0]["progress"], history[0]["cost"]
    for e in history[1:]:
        progress = 0.5 * progress + 0.5 * e["progress"]
        cost = 0.5 * cost + 0.5 * e["cost"]
    state = from_json(entry["torch_recal_state"])
    assert state["num_steps"] == 4 and state["progress_ema"] == progress
    assert state["cost_ema"] == cost


def test_coherent_bf16_makes_the_fp32_decisions_without_nan(tmp_path):
    _, expected = coherent_loop()
    assert_clear_decisions(expected)
    trainer = coherent_trainer(tmp_path, bf16=True)
    trainer.train()
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert decisions(coherent_of(trainer)) == decisions(expected)


def test_coherent_takes_the_accelerated_optimizers_scaler_and_skips_its_inf_steps():
    # accelerate makes no GradScaler on CPU (fp16=True runs without one there), so the
    # Trainer's fp16 path is rebuilt from its parts: an AcceleratedOptimizer with a CPU scaler.
    from types import SimpleNamespace

    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer
    from transformers.trainer_callback import TrainerControl, TrainerState

    Accelerator(cpu=True)
    model = HFNet()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    scaler = torch.amp.GradScaler("cpu")
    prepared = AcceleratedOptimizer(opt, device_placement=False, scaler=scaler)
    callback = CoherentRegCallback(strength=0.1, warmup=0)
    args = SimpleNamespace(restore_callback_states_from_checkpoint=False)
    callback.on_train_begin(args, TrainerState(), TrainerControl(), model=model,
                            optimizer=prepared)  # fmt: skip
    reg = callback.reg
    assert reg.optimizer is opt and reg.scaler is scaler
    x, y = tiny_data(4)
    for factor, steps in [(1.0, 1), (float("inf"), 1), (1.0, 2)]:
        before = [p.detach().clone() for p in reg.params]
        prepared.zero_grad()
        scaler.scale(model(x, y)["loss"] * factor).backward()
        prepared.step()  # scaler.step(opt), then scaler.update()
        assert prepared.step_was_skipped == (factor != 1.0)  # accelerate's own account
        if prepared.step_was_skipped:  # no soft-threshold, no count on a skipped step
            assert all(torch.equal(a, p) for a, p in zip(before, reg.params, strict=True))
        assert reg.num_steps == steps
    assert reg.num_skipped == 0 and len(reg.history) == 2
    callback.on_train_end(args, TrainerState(), TrainerControl())


@pytest.mark.parametrize("case", bad_rows(integration))
def test_bad_call_raises_names_the_argument_and_changes_nothing(case):
    run_bad_call(case)


def test_hugging_face_only_arguments_are_checked():
    target = torch.zeros(2, requires_grad=True)
    with pytest.raises(TypeError, match="`input_key`"):
        GGRCallback(GenerativeGradientLoss(target, torch.ones(2)), input_key=3)
    with pytest.raises(TypeError, match="`ggr`"):
        GGRTrainer(ggr="no")
    callback = GGRCallback(GenerativeGradientLoss(target, torch.ones(2)), input_key="images")
    with pytest.raises(ValueError, match="`input_key`='images'"):
        callback.term(target.sum(), {"pixel_values": torch.ones(1, 2)})


@pytest.mark.parametrize("code", docs_blocks("transformers"))
def test_docs_hugging_face_snippet_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/integrations.md", "exec"), {"__name__": "__snippet__"})


def test_coherent_budget_ends_at_the_trainers_max_steps(tmp_path):
    """A constant lr (no end signal) and no total_steps: the callback gives the budget the
    Trainer's max_steps, so it is reached and frozen."""
    callback = CoherentRegCallback(target_sparsity=0.6)
    model = HFNet()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    args = arguments(tmp_path, num_train_epochs=COHERENT_EPOCHS)
    trainer = Trainer(
        model=model, args=args, train_dataset=Images(), callbacks=[callback], optimizers=(opt, None)
    )
    trainer.train()
    reg = callback.reg
    assert reg.criterion.total_steps == trainer.state.max_steps and reg.frozen
    weights = [p for p in reg.params]
    share = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert abs(share - 0.6) <= 0.01

"""Lightning callbacks (torch_recal.integrations.lightning) with a real ``lightning.Trainer``.

References: the same pieces driven by hand in a plain loop (fit), and an uninterrupted fit
(resume from a checkpoint). Skipped without the ``[lightning]`` extra.
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
import os
import socket
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.badcalls import run_bad_call
from tests.integrations import (
    COHERENT,
    COHERENT_EPOCHS,
    ROOT,
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

L = need("lightning.pytorch")

from torch_recal import (  # noqa: E402
    CoherentStrongReg,
    GenerativeGradientLoss,
    NormalEquations,
    RandomLayerTraining,
    RifleScheduler,
    calibrate,
    is_calibrated,
    pinv_refit_dense,
)
from torch_recal.criteria import legacy_options  # noqa: E402
from torch_recal.integrations import lightning as integration  # noqa: E402
from torch_recal.integrations._common import COHERENT_OPTIONS  # noqa: E402
from torch_recal.integrations.lightning import (  # noqa: E402
    CalibrateCallback,
    CoherentRegCallback,
    DenseRefitCallback,
    GGRCallback,
    RandomLayerCallback,
    RifleCallback,
)

EPOCHS = 4
LR = 0.05


class Seed(L.Callback):
    """Seeds the global RNG in ``setup`` so the calibration layers start equal everywhere."""

    def setup(self, trainer, pl_module, stage):
        torch.manual_seed(1)


class LitNet(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = TinyNet()
        self.ggr = GGRCallback(
            GenerativeGradientLoss(self.net.conv1.weight, reference, weight=0.1, ema=0.5)
        )

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        return loss + self.ggr.term(loss, x)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR, momentum=0.9)

    def configure_callbacks(self):
        return [self.ggr]


def loader() -> DataLoader:
    x, y = tiny_data()
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)


def callbacks() -> list[L.Callback]:
    return [
        Seed(),
        CalibrateCallback(targets=["net.bn1"]),
        RifleCallback(num_resets=1, seed=0),
        RandomLayerCallback(["net.bn1", "net.conv2"], seed=1, schedule=[1.0, 0.5, 0.5, 0.5]),
        DenseRefitCallback(every_n_epochs=3, ridge=1e-2),
    ]


def trainer(**kwargs) -> L.Trainer:
    options = dict(max_epochs=EPOCHS, accelerator="cpu", devices=1, logger=False,
                   enable_progress_bar=False, enable_model_summary=False,
                   enable_checkpointing=False, num_sanity_val_steps=0)  # fmt: skip
    options.update(kwargs)
    return L.Trainer(**options)


def plain_loop() -> tuple[nn.Module, dict]:
    """The same run, written by hand with the library's pieces (the reference)."""
    torch.manual_seed(0)
    net = TinyNet()
    ggr = GenerativeGradientLoss(net.conv1.weight, reference, weight=0.1, ema=0.5)
    torch.manual_seed(1)
    calibrate(net, targets=["bn1"])
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=0.9)
    rifle = RifleScheduler(net, total_epochs=EPOCHS, num_resets=1, seed=0)
    rlt = RandomLayerTraining([net.bn1, net.conv2], seed=1, schedule=[1.0, 0.5, 0.5, 0.5])
    data = loader()
    refits = 0
    for epoch in range(EPOCHS):
        net.train()
        for x, y in data:
            loss = F.cross_entropy(net(x), y)
            loss = loss + ggr(loss, x)
            opt.zero_grad()
            loss.backward()
            opt.step()
        rifle.step()
        rlt.step()
        if (epoch + 1) % 3 == 0 or epoch == EPOCHS - 1:
            pinv_refit_dense(net.fc, data, model=net, ridge=1e-2, evaluate=False)
            refits += 1
    rlt.restore()
    states = {"rifle": rifle.state_dict(), "rlt": rlt.state_dict(), "ggr": ggr.state_dict(),
              "refits": refits}  # fmt: skip
    return net, states


def states_of(cbs: list[L.Callback], ggr: GGRCallback) -> dict:
    by_type = {type(c): c for c in cbs}
    return {
        "rifle": by_type[RifleCallback].scheduler.state_dict(),
        "rlt": by_type[RandomLayerCallback].layer_training.state_dict(),
        "ggr": ggr.ggr.state_dict(),
        "refits": by_type[DenseRefitCallback].num_refits,
    }


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=1e-5, atol=1e-6, msg=key)


def test_fit_with_every_callback_equals_the_plain_loop():
    reference_net, reference_states = plain_loop()
    model, cbs = LitNet(), callbacks()
    trainer(callbacks=cbs).fit(model, loader())
    assert is_calibrated(model.net)
    assert_same_weights(model.net, reference_net)
    states = states_of(cbs, model.ggr)
    assert states["rifle"]["last_reset"] == 1 and states["refits"] == 2
    assert state_equal(states["rifle"], reference_states["rifle"])
    assert state_equal(states["rlt"], reference_states["rlt"])
    assert states["refits"] == reference_states["refits"]
    torch.testing.assert_close(states["ggr"]["reference_ema"],
                               reference_states["ggr"]["reference_ema"])  # fmt: skip
    assert states["ggr"]["num_steps"] == reference_states["ggr"]["num_steps"] == 3 * EPOCHS
    # every layer trainable again after the fit (restore_at_end)
    assert all(p.requires_grad for p in model.parameters())


def test_calibration_parameters_are_in_the_optimizer():
    model = LitNet()
    fit = trainer(callbacks=[CalibrateCallback(targets=["net.bn1"])], max_epochs=1)
    fit.fit(model, loader())
    held = {id(p) for g in fit.optimizers[0].param_groups for p in g["params"]}
    calibration = [p for n, p in model.named_parameters() if "calibration" in n]
    assert calibration and all(id(p) in held for p in calibration)


@pytest.mark.parametrize("resume_after", [0, 2])
def test_resume_from_an_epoch_checkpoint_equals_the_uninterrupted_fit(tmp_path, resume_after):
    saver = L.callbacks.ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1,
                                        filename="{epoch}")  # fmt: skip
    full, full_cbs = LitNet(), callbacks()
    trainer(callbacks=[*full_cbs, saver], enable_checkpointing=True).fit(full, loader())
    ckpt = tmp_path / f"epoch={resume_after}.ckpt"
    assert ckpt.exists()

    resumed, resumed_cbs = LitNet(), callbacks()
    trainer(callbacks=resumed_cbs).fit(resumed, loader(), ckpt_path=str(ckpt))
    assert_same_weights(resumed.net, full.net)
    a, b = states_of(resumed_cbs, resumed.ggr), states_of(full_cbs, full.ggr)
    assert state_equal(a["rifle"], b["rifle"]) and state_equal(a["rlt"], b["rlt"])
    assert state_equal(a["ggr"], b["ggr"]) and a["refits"] == b["refits"]


def test_resume_from_the_last_step_of_an_epoch_equals_the_uninterrupted_fit(tmp_path):
    # step 3 is the last batch of epoch 0: saved before the epoch-end hooks ran. (A resume
    # from inside an epoch is not exact in Lightning itself with a plain DataLoader.)
    step = 3
    saver = L.callbacks.ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_train_steps=1,
                                        filename="{step}")  # fmt: skip
    full, full_cbs = LitNet(), callbacks()
    trainer(callbacks=[*full_cbs, saver], enable_checkpointing=True).fit(full, loader())
    ckpt = tmp_path / f"step={step}.ckpt"
    assert ckpt.exists()

    resumed, resumed_cbs = LitNet(), callbacks()
    trainer(callbacks=resumed_cbs).fit(resumed, loader(), ckpt_path=str(ckpt))
    assert_same_weights(resumed.net, full.net)
    a, b = states_of(resumed_cbs, resumed.ggr), states_of(full_cbs, full.ggr)
    assert state_equal(a["rifle"], b["rifle"]) and state_equal(a["rlt"], b["rlt"])
    assert state_equal(a["ggr"], b["ggr"]) and a["refits"] == b["refits"]


def test_checkpoint_holds_each_callbacks_state(tmp_path):
    saver = L.callbacks.ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1,
                                        filename="{epoch}")  # fmt: skip
    model, cbs = LitNet(), callbacks()
    trainer(callbacks=[*cbs, saver], enable_checkpointing=True, max_epochs=2).fit(model, loader())
    saved = torch.load(tmp_path / "epoch=1.ckpt", weights_only=True)["callbacks"]
    rifle = next(v for k, v in saved.items() if k.startswith("RifleCallback"))
    assert rifle == {"num_steps": 2, "last_reset": 0, "schedule": [0], "total_epochs": 2,
                     "unit": "epoch", "seed": 0}  # fmt: skip
    rlt = saved["RandomLayerCallback{'layers': 'net.bn1,net.conv2'}"]
    assert rlt["num_steps"] == 2 and rlt["seed"] == 1
    assert saved["DenseRefitCallback"] == {"num_refits": 1, "last_epoch": 1, "last_step": 6}
    assert saved["GGRCallback"]["num_steps"] == 6


def test_sync_batchnorm_conversion_and_its_revert_keep_the_calibration():
    # What Trainer(sync_batchnorm=True) does under DDP (which needs GPUs for SyncBatchNorm):
    # Lightning's own plugin converts the norms after setup and reverts them after the fit.
    plugin = L.plugins.TorchSyncBatchNorm()
    seen = []

    class Convert(L.Callback):
        def setup(self, trainer, pl_module, stage):
            plugin.apply(pl_module)

        def on_train_start(self, trainer, pl_module):
            seen.append(type(pl_module.net.bn1))

        def on_fit_end(self, trainer, pl_module):
            plugin.revert(pl_module)

    model, reference = LitNet(), LitNet()
    trainer(callbacks=[Seed(), CalibrateCallback(targets=["net.bn1"]), Convert()]).fit(
        model, loader()
    )
    trainer(callbacks=[Seed(), CalibrateCallback(targets=["net.bn1"])]).fit(reference, loader())
    assert issubclass(seen[0], nn.SyncBatchNorm) and is_calibrated(model)
    assert type(model.net.bn1).__name__ == "Calibrated_BatchNormXd"  # Lightning's revert class
    # one process: SyncBatchNorm trains as BatchNorm did, through the calibration
    assert_same_weights(model.net, reference.net)
    x, _ = tiny_data()
    model.eval(), reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-6)


def test_rifle_step_unit_counts_optimizer_steps_with_accumulation():
    model = LitNet()
    rifle = RifleCallback(num_resets=1, unit="step", seed=0)
    trainer(callbacks=[rifle], max_epochs=2, accumulate_grad_batches=3).fit(model, loader())
    # 3 batches an epoch, accumulated 3 at a time: one optimizer step an epoch
    assert rifle.scheduler.total_epochs == 2
    assert rifle.scheduler.num_steps == 2 and rifle.scheduler.last_reset == 0


def test_rifle_reset_optimizer_state_finds_the_trainers_optimizer():
    model = LitNet()
    rifle = RifleCallback(num_resets=1, seed=0, reset_optimizer_state=True)
    fit = trainer(callbacks=[rifle], max_epochs=2)
    fit.fit(model, loader())
    assert rifle.scheduler.optimizer is fit.optimizers[0]
    assert rifle.scheduler.last_reset == 0


def test_refit_at_end_of_a_fit_cut_short_by_max_steps():
    model = LitNet()
    refit = DenseRefitCallback(ridge=1e-2)
    trainer(callbacks=[refit], max_steps=4).fit(model, loader())
    assert refit.num_refits == 1 and refit.last_result is not None
    expected = copy.deepcopy(model.net)  # the refit does not depend on the head's weights
    torch.nn.init.zeros_(expected.fc.weight)
    pinv_refit_dense(expected.fc, loader(), model=expected, ridge=1e-2, evaluate=False)
    torch.testing.assert_close(model.net.fc.weight, expected.fc.weight)


def test_rifle_without_a_head_it_can_find_says_how_to_pass_one():
    class Odd(LitNet):
        def __init__(self):
            super().__init__()
            self.other = nn.Linear(2, 2)  # two networks: no single one to look into

    with pytest.raises(ValueError, match="`head=`"):
        trainer(callbacks=[RifleCallback()], max_epochs=1).fit(Odd(), loader())


def test_bf16_autocast_fit_with_ggr_gives_finite_weights():
    model = LitNet()
    trainer(precision="bf16-mixed", max_epochs=1).fit(model, loader())
    assert model.ggr.ggr.num_steps == 3
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("case", bad_rows(integration))
def test_bad_call_raises_names_the_argument_and_changes_nothing(case):
    run_bad_call(case)


def test_a_bad_saved_state_is_refused_when_the_piece_is_built():
    rifle = RifleCallback(num_resets=1)
    rifle.load_state_dict({"num_steps": -1, "last_reset": None, "schedule": [0],
                           "total_epochs": 2, "unit": "epoch", "seed": None})  # fmt: skip
    with pytest.raises(ValueError, match="`num_steps`"):
        trainer(callbacks=[rifle], max_epochs=2).fit(LitNet(), loader())


# --------------------------------------------------------------------------- CoherentRegCallback
# tests/integrations.py's COHERENT set-up: the gate switches off with a wide margin.


class CoherentNet(L.LightningModule):
    def __init__(self, inf_at_step: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = TinyNet()
        self.inf_at_step = inf_at_step

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        if self.global_step == self.inf_at_step:
            loss = loss * float("inf")  # a step the GradScaler must skip
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR, momentum=0.9)


def coherent_loop() -> tuple[nn.Module, CoherentStrongReg]:
    """The reference: a hand-written loop with ``CoherentStrongReg.attach`` (no closure)."""
    torch.manual_seed(0)
    net = TinyNet()
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=0.9)
    reg = CoherentStrongReg(net.named_parameters(), optimizer=opt, **COHERENT)
    with reg.attach():
        for _ in range(COHERENT_EPOCHS):
            for x, y in loader():
                opt.zero_grad()
                F.cross_entropy(net(x), y).backward()
                opt.step()
    return net, reg


def coherent_fit(tmp_path=None, ckpt=None, **kwargs) -> tuple[CoherentNet, CoherentRegCallback]:
    model, callback = CoherentNet(kwargs.pop("inf_at_step", None)), CoherentRegCallback(**COHERENT)
    cbs: list[L.Callback] = [callback]
    if tmp_path is not None:
        cbs.append(L.callbacks.ModelCheckpoint(dirpath=tmp_path, save_top_k=-1,
                                               every_n_epochs=1, filename="{epoch}"))  # fmt: skip
        kwargs["enable_checkpointing"] = True
    fit = trainer(callbacks=cbs, max_epochs=COHERENT_EPOCHS, **kwargs)
    fit.fit(model, loader(), ckpt_path=None if ckpt is None else str(ckpt))
    return model, callback


def test_coherent_fit_equals_the_hand_written_loop_with_attach():
    # Lightning's default precision steps with optimizer.step(closure): backward runs inside
    # step(), so a regulariser that read .grad before the closure would see the last step's
    # gradients (or none) and differ from the plain loop.
    expected_net, expected = coherent_loop()
    model, callback = coherent_fit()
    reg = callback.reg
    assert reg.names == [f"net.{n}" for n in expected.names] == [
        "net.conv1.weight", "net.conv2.weight", "net.fc.weight"
    ]  # fmt: skip
    assert_same_weights(model.net, expected_net)
    assert reg.num_steps == expected.num_steps == 3 * COHERENT_EPOCHS
    assert True in decisions(reg) and False in decisions(reg)  # the gate switched
    assert_same_history(list(reg.history), list(expected.history))
    assert_same_gate_state(reg.state_dict(), expected.state_dict())
    assert_clear_decisions(expected)
    # detached at the end of the fit: a further step leaves the regulariser as it was
    opt = reg.optimizer
    model.net(torch.randn(2, 1, 8, 8)).sum().backward()
    opt.step()
    assert reg.num_steps == 3 * COHERENT_EPOCHS


@pytest.mark.parametrize("resume_after", [0, 2])
def test_coherent_resume_from_a_checkpoint_equals_the_uninterrupted_fit(tmp_path, resume_after):
    full, full_cb = coherent_fit(tmp_path)
    ckpt = tmp_path / f"epoch={resume_after}.ckpt"
    saved = torch.load(ckpt, weights_only=True)["callbacks"]["CoherentRegCallback"]
    assert saved["num_steps"] == 3 * (resume_after + 1)
    assert saved["is_active"] == (resume_after == 0)  # before / after the switch

    resumed, resumed_cb = coherent_fit(ckpt=ckpt)
    assert_same_weights(resumed.net, full.net)
    assert_same_gate_state(resumed_cb.reg.state_dict(), full_cb.reg.state_dict())
    tail = list(full_cb.reg.history)[saved["num_steps"] :]
    assert_same_history(list(resumed_cb.reg.history), tail)


def test_coherent_callback_reused_for_a_resumed_fit_starts_from_the_checkpoint(tmp_path):
    full, full_cb = coherent_fit(tmp_path)
    expected_weights = copy.deepcopy(full.net.state_dict())
    expected = full_cb.reg.state_dict()
    model = CoherentNet()
    fit = trainer(callbacks=[full_cb], max_epochs=COHERENT_EPOCHS)  # the same callback object
    fit.fit(model, loader(), ckpt_path=str(tmp_path / "epoch=2.ckpt"))
    assert full_cb.reg.num_steps == 3 * COHERENT_EPOCHS and len(full_cb.reg.history) == 9
    assert_same_gate_state(full_cb.reg.state_dict(), expected)
    assert_same_weights(model.net, _net_with(expected_weights))


def _net_with(weights: dict) -> nn.Module:
    net = TinyNet()
    net.load_state_dict(weights)
    return net


def test_coherent_bf16_mixed_makes_the_fp32_decisions_without_nan():
    _, expected = coherent_loop()
    assert_clear_decisions(expected)
    model, callback = coherent_fit(precision="bf16-mixed")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert decisions(callback.reg) == decisions(expected)
    assert all(math.isfinite(e["progress"]) for e in callback.reg.history)


def test_coherent_fp16_gets_the_trainers_scaler_and_skips_its_inf_steps():
    # Lightning turns precision="16-mixed" into bf16 on CPU; its plugin gives fp16 + scaler.
    from lightning.pytorch.plugins.precision import MixedPrecision

    plugin = MixedPrecision("16-mixed", "cpu")
    made: list[int] = []
    model = CoherentNet(inf_at_step=4)
    callback = CoherentRegCallback(**COHERENT)

    class Count(L.Callback):  # counts the optimizer's real updates, independently
        def on_fit_start(self, trainer, pl_module):
            trainer.optimizers[0].register_step_post_hook(lambda *a: made.append(1))

    fit = trainer(callbacks=[callback, Count()], max_epochs=2, plugins=[plugin])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit.fit(model, loader())
    assert callback.reg.scaler is plugin.scaler
    assert fit.global_step == 6 and len(made) < 6  # the inf step (at least) was skipped
    assert callback.reg.num_steps == len(made) and callback.reg.num_skipped == 0
    assert not [w for w in caught if "CoherentStrongReg" in str(w.message)]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_coherent_callback_takes_chosen_parameters_and_the_optimizer_holding_them():
    class TwoOptimizers(CoherentNet):
        def configure_optimizers(self):
            head = torch.optim.SGD(self.net.fc.parameters(), lr=LR)
            rest = [p for n, p in self.net.named_parameters() if not n.startswith("fc.")]
            return [torch.optim.SGD(rest, lr=LR), head]

        def training_step(self, batch, batch_idx):
            for opt in self.optimizers():
                opt.zero_grad()
            x, y = batch
            self.manual_backward(F.cross_entropy(self.net(x), y))
            for opt in self.optimizers():
                opt.step()

    model = TwoOptimizers()
    model.automatic_optimization = False
    callback = CoherentRegCallback(strength=1e-3, params=lambda m: m.net.fc.named_parameters())
    fit = trainer(callbacks=[callback], max_epochs=1)
    fit.fit(model, loader())
    assert callback.reg.names == ["weight"] and callback.reg.optimizer is fit.optimizers[1]
    assert callback.reg.num_steps == 3


def test_coherent_callback_detaches_when_the_fit_stops_with_an_error():
    class Fails(CoherentNet):
        def training_step(self, batch, batch_idx):
            if self.global_step == 2:
                raise KeyError("stop")
            return super().training_step(batch, batch_idx)

    callback = CoherentRegCallback(**COHERENT)
    fit = trainer(callbacks=[callback], max_epochs=1)
    model = Fails()
    with pytest.raises(KeyError, match="stop"):
        fit.fit(model, loader())
    assert callback.reg.num_steps == 2
    model.net(torch.randn(2, 1, 8, 8)).sum().backward()
    callback.reg.optimizer.step()  # no longer runs the regulariser
    assert callback.reg.num_steps == 2


def test_coherent_bad_saved_state_is_refused_before_anything_is_attached():
    callback = CoherentRegCallback(**COHERENT)
    state = CoherentStrongReg([nn.Parameter(torch.ones(2, 2))], lr=0.1, **COHERENT).state_dict()
    callback.load_state_dict({**state, "num_steps": -1})
    model = CoherentNet()
    fit = trainer(callbacks=[callback], max_epochs=1)
    with pytest.raises(ValueError, match="`num_steps`"):
        fit.fit(model, loader())
    assert callback.reg is None
    assert not fit.optimizers[0]._optimizer_step_pre_hooks


def test_coherent_callback_errors_name_the_callback():
    with pytest.raises(ValueError, match=r"^CoherentRegCallback: `kind` must be one of"):
        CoherentRegCallback(strength=0.1, kind="l3")  # type: ignore[typeddict-item]
    with pytest.raises(TypeError, match=r"^CoherentRegCallback: unexpected keyword .*`lr`"):
        CoherentRegCallback(strength=0.1, lr=0.1)  # type: ignore[call-arg]


def test_coherent_options_are_those_of_coherent_strong_reg():
    signature = inspect.signature(CoherentStrongReg.__init__).parameters
    keywords = {n for n, p in signature.items() if p.kind is p.KEYWORD_ONLY}
    legacy = set(legacy_options())  # the criteria's options, still accepted by keyword
    assert set(COHERENT_OPTIONS) == (keywords - {"strength", "lr", "optimizer", "scaler"}) | legacy


@pytest.mark.distributed
def test_ddp_on_two_processes_keeps_the_ranks_equal_and_refits_over_all_data(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_PORT": str(port), "TORCH_RECAL_COMPILE": "0"}
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "lightning_ddp_run.py"),
                          str(tmp_path)], env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    # the global RNG differs per rank: the new head and the layer draw were broadcast
    # (batch-norm running statistics are per rank under DDP: parameters only)
    params = [n for n, _ in TinyNet().named_parameters()]
    params += [n for n in r0["weights"] if "calibration" in n]
    for key in params:
        assert torch.equal(r0["weights"][key], r1["weights"][key]), key
    assert r0["rifle"] == r1["rifle"] and r0["rifle"]["last_reset"] == 0
    assert r0["layers"] == r1["layers"]
    assert r0["refits"] == r1["refits"] == 1 and r0["ggr_steps"] == 3 * 2
    assert r0["coherent"] == r1["coherent"] and r0["coherent"]["num_steps"] == 3 * 2
    assert r0["coherent_history"] == r1["coherent_history"]
    # the final refit summed both ranks' halves (each rank's share of the data as Lightning's
    # DistributedSampler drew it, its features from its own model): rebuilt here by hand
    assert r0["refit_samples"] == 48 and sorted(r0["indices"] + r1["indices"]) == list(range(48))
    x, y = tiny_data()
    stats = NormalEquations(16, 3)
    for state in (r0, r1):
        net = TinyNet()
        calibrate(net, targets=["bn1"])
        net.load_state_dict(state["weights"])
        net.eval()
        seen = []
        net.fc.register_forward_pre_hook(lambda m, args, seen=seen: seen.append(args[0]))
        with torch.no_grad():
            net(x[state["indices"]])
        stats.update(seen[0].double(), F.one_hot(y[state["indices"]], 3).double())
    solution = stats.solve(ridge=1e-2)
    torch.testing.assert_close(r0["weights"]["fc.weight"], solution.weight.float())
    torch.testing.assert_close(r0["weights"]["fc.bias"], solution.bias.float())


@pytest.mark.parametrize("code", docs_blocks("lightning"))
def test_docs_lightning_snippet_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    exec(compile(code, "docs/integrations.md", "exec"), {"__name__": "__snippet__"})


def test_coherent_budget_ends_at_the_trainers_step_count_at_a_constant_lr():
    """No scheduler (a constant lr gives no end signal) and no total_steps: the callback
    gives the budget the trainer's estimated_stepping_batches, so it is reached and frozen."""
    model, callback = CoherentNet(), CoherentRegCallback(target_sparsity=0.6)
    trainer(callbacks=[callback], max_epochs=COHERENT_EPOCHS).fit(model, loader())
    reg = callback.reg
    steps = COHERENT_EPOCHS * len(loader())
    assert reg.criterion.total_steps == steps and reg.frozen
    weights = [p for n, p in model.net.named_parameters() if n.endswith("weight") and p.ndim > 1]
    share = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert abs(share - 0.6) <= 0.01

"""Lightning callbacks (torch_recal.integrations.lightning) with a real ``lightning.Trainer``.

References: the same pieces driven by hand in a plain loop (fit), and an uninterrupted fit
(resume from a checkpoint). Skipped without the ``[lightning]`` extra.
"""

from __future__ import annotations

import copy
import logging
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.badcalls import run_bad_call
from tests.integrations import (
    ROOT,
    TinyNet,
    bad_rows,
    docs_blocks,
    need,
    reference,
    state_equal,
    tiny_data,
)

L = need("lightning.pytorch")

from torch_recal import (  # noqa: E402
    GenerativeGradientLoss,
    NormalEquations,
    RandomLayerTraining,
    RifleScheduler,
    calibrate,
    is_calibrated,
    pinv_refit_dense,
)
from torch_recal.integrations import lightning as integration  # noqa: E402
from torch_recal.integrations.lightning import (  # noqa: E402
    CalibrateCallback,
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

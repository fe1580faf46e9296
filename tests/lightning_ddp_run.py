"""A Lightning fit with ``strategy="ddp_find_unused_parameters_true"`` on 2 CPU processes.

Run by ``tests/test_integrations_lightning.py`` as ``python tests/lightning_ddp_run.py OUT``
(Lightning starts rank 1 by running the same command again). Each rank writes its model's
weights and the callbacks' states to ``OUT/rank{r}.pt``. RIFLE and the random layer choice
run without ``seed`` on purpose: what keeps the ranks equal is the broadcast from rank 0. The
coherent regulariser reads the gradients DDP has all-reduced: its decisions agree by
construction.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("TORCH_RECAL_COMPILE", "0")

import lightning.pytorch as L

from tests.integrations import COHERENT, TinyNet, reference, tiny_data
from torch_recal import GenerativeGradientLoss
from torch_recal.integrations.lightning import (
    CalibrateCallback,
    CoherentRegCallback,
    DenseRefitCallback,
    GGRCallback,
    RandomLayerCallback,
    RifleCallback,
)


class LitNet(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = TinyNet()
        self.ggr = GGRCallback(GenerativeGradientLoss(self.net.conv1.weight, reference, weight=0.1))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        return loss + self.ggr.term(loss, x)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def configure_callbacks(self):
        return [self.ggr]


class RankSeed(L.Callback):
    """A different global RNG on each rank: only the callbacks' broadcasts keep them equal."""

    def setup(self, trainer, pl_module, stage):
        torch.manual_seed(100 + trainer.global_rank)


def main(out: str) -> None:
    torch.set_num_threads(1)
    x, y = tiny_data()
    data = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False)
    rifle = RifleCallback(num_resets=1)  # no seed: rank 0's new head is broadcast
    layers = RandomLayerCallback(["net.bn1", "net.conv2"])  # no seed: drawn on rank 0
    refit = DenseRefitCallback(ridge=1e-2)
    coherent = CoherentRegCallback(**COHERENT)  # reads the all-reduced gradients
    model = LitNet()
    trainer = L.Trainer(
        max_epochs=2, accelerator="cpu", devices=2, strategy="ddp_find_unused_parameters_true",
        callbacks=[RankSeed(), CalibrateCallback(targets=["net.bn1"]), coherent, rifle, layers,
                   refit],
        logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(model, data)
    torch.save(
        {
            "weights": model.net.state_dict(),
            "rifle": rifle.scheduler.state_dict(),
            "layers": layers.layer_training.state_dict(),
            "refits": refit.num_refits,
            "refit_samples": refit.last_result.num_samples,
            "indices": list(trainer.train_dataloader.sampler),  # this rank's share of the data
            "ggr_steps": model.ggr.ggr.num_steps,
            "coherent": coherent.reg.state_dict(),
            "coherent_history": list(coherent.reg.history),
        },
        os.path.join(out, f"rank{trainer.global_rank}.pt"),
    )


if __name__ == "__main__":
    main(sys.argv[1])

"""Lightning callbacks for torch-recal's pieces (``pip install "torch-recal[lightning]"``).

Each callback drives one library piece at the right Lightning hook and keeps its state in
Lightning's checkpoints (``Callback.state_dict`` / ``load_state_dict``), so that
``trainer.fit(model, ckpt_path=...)`` resumes it exactly where an uninterrupted run would be:

* :class:`CalibrateCallback`: ``calibrate(pl_module)`` in ``setup``, which Lightning runs
  before ``configure_optimizers`` (the new parameters are in the optimizer) and before a
  checkpoint's weights are loaded (its calibration keys find their layers).
* :class:`RifleCallback`: a :class:`~torch_recal.RifleScheduler` over ``trainer.max_epochs``
  (or ``max_steps`` with ``unit="step"``), the head found with
  :func:`~torch_recal.find_classifier`, stepped after every training epoch.
* :class:`RandomLayerCallback`: :class:`~torch_recal.RandomLayerTraining`, a new draw after
  every training epoch; everything trainable again when training ends.
* :class:`DenseRefitCallback`: :func:`~torch_recal.pinv_refit_dense` of a dense layer over the
  train dataloader every ``every_n_epochs`` and/or after the last epoch.
* :class:`GGRCallback`: holds a :class:`~torch_recal.GenerativeGradientLoss` (its state is
  checkpointed, the trainer's ``GradScaler`` is passed for you); add ``callback.term(loss, x)``
  to the loss in ``training_step``.

* :class:`CoherentRegCallback`: a :class:`~torch_recal.CoherentStrongReg` attached to the
  optimizer's step hooks for the fit (it sees the gradients of Lightning's closure, after
  clipping and the ``GradScaler``'s unscaling; the scaler's skipped steps do nothing).

Pieces that depend on the optimizer or the model's final form are built in ``on_fit_start``
(after ``configure_optimizers`` and the strategy's wrapping), state that Lightning restores
before that is kept and loaded when they are built. Under ``strategy="ddp"`` every hook runs
on every rank: RIFLE's new head is broadcast from rank 0, the random layer choice is a pure
function of the seed, and the refit sums its statistics over ranks (each rank reads its
shard of the data through Lightning's ``DistributedSampler``). Random layer freezing under
DDP needs ``strategy="ddp_find_unused_parameters_true"``. See ``docs/integrations.md``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal

from torch import Tensor, nn
from typing_extensions import override

try:
    import lightning.pytorch as pl
except ImportError as _error:  # pragma: no cover - exercised by a test that hides lightning
    raise ImportError(
        'torch_recal.integrations.lightning needs Lightning: pip install "torch-recal[lightning]"'
    ) from _error

from torch_recal._batches import BatchFn
from torch_recal.generative import GenerativeGradientLoss
from torch_recal.integrations._common import (
    LayersSpec,
)
from torch_recal.integrations._drivers import (
    CalibrateInit,
    CoherentInit,
    GGRDriver,
    RandomLayerDriver,
    RefitDriver,
    RifleInit,
)
from torch_recal.layer_sampling import RandomLayerTraining
from torch_recal.refit import RefitResult

if TYPE_CHECKING:
    pass

__all__ = [
    "CalibrateCallback",
    "CoherentRegCallback",
    "DenseRefitCallback",
    "GGRCallback",
    "RandomLayerCallback",
    "RifleCallback",
]


def _run_length(trainer: pl.Trainer, unit: str) -> int | None:
    """``trainer.max_epochs`` (``unit="epoch"``) or the number of optimizer steps."""
    if unit == "epoch":
        epochs = trainer.max_epochs
        return None if epochs is None or epochs < 0 else int(epochs)
    if trainer.max_steps is not None and trainer.max_steps >= 0:
        return int(trainer.max_steps)
    steps = trainer.estimated_stepping_batches
    return int(steps) if steps != float("inf") else None


def _last_epoch(trainer: pl.Trainer) -> int | None:
    epochs = trainer.max_epochs
    return None if epochs is None or epochs < 0 else int(epochs) - 1


def _names(spec: Any) -> str:
    items = spec if isinstance(spec, (list, tuple)) else [spec]
    return ",".join(s if isinstance(s, str) else type(s).__name__ for s in items)


class _DriverCallback(pl.Callback):
    """A callback whose state is its driver's (saved in Lightning's checkpoints)."""

    _driver: Any  # a driver of ``_drivers.py``, set by the subclass

    @override
    def state_dict(self) -> dict[str, Any]:
        return self._driver.state_dict()  # type: ignore[no-any-return]

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._driver.load_state_dict(state_dict)


class CalibrateCallback(CalibrateInit, pl.Callback):
    """Insert :class:`~torch_recal.ResponseCalibration` layers when the fit starts.

    Runs :func:`~torch_recal.calibrate` on the ``LightningModule`` in ``setup``, for every
    stage: before ``configure_optimizers`` (so the optimizer holds the new parameters) and
    before a checkpoint's weights are restored (its calibration keys find their layers).
    ``calibrate`` is idempotent, so a second ``fit``/``test`` changes nothing. No state.
    ``Trainer(sync_batchnorm=True)`` rebuilds the norm layers after ``setup`` (and back at
    the end of the fit): a calibration that follows a norm moves with it.

    Paper: Xu et al., https://arxiv.org/abs/2411.13582

    Args:
        reduction: MLP reduction of each inserted layer (as in ``calibrate``).
        targets: ``None`` (the residual blocks ``calibrate`` recognises), module names
            relative to the ``LightningModule`` (e.g. ``["net.bn1"]``) or a predicate.
        **layer_kwargs: options of each :class:`~torch_recal.ResponseCalibration`.

    Example:
        >>> from torch_recal.integrations.lightning import CalibrateCallback
        >>> callback = CalibrateCallback(reduction=4)  # Trainer(callbacks=[callback])
        >>> callback.reduction
        4
    """

    @property
    def reduction(self) -> int:
        """The reduction of the inserted layers."""
        return self._driver.reduction

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._driver.apply(pl_module)


class RifleCallback(RifleInit, _DriverCallback):
    """RIFLE: re-initialise the classifier head a few times during fine-tuning.

    Builds a :class:`~torch_recal.RifleScheduler` when the fit starts and steps it after every
    training epoch (``unit="step"``: after every optimizer step). The run length defaults to
    ``trainer.max_epochs`` (``unit="step"``: ``max_steps``, else the estimated number of
    optimizer steps) and the head to :func:`~torch_recal.find_classifier` of the
    ``LightningModule``, or of the one network it wraps (``self.net``). The scheduler's
    state is saved in Lightning's checkpoints; a resumed fit re-initialises the head at the
    same epochs as an uninterrupted one (with ``seed``, to the same values).

    Paper: Li et al., https://arxiv.org/abs/2007.03349

    Args:
        num_resets: how many re-initialisations (default 1, the official experiments).
        period: re-initialise every ``period`` epochs instead of ``num_resets``.
        head: ``None`` (found automatically), a submodule name (``"net.fc"``), a module or a
            list of modules.
        total_epochs: the run length in ``unit``; default: the trainer's.
        unit: ``"epoch"`` or ``"step"``.
        init: ``init(head)`` re-initialises the head (default: its ``reset_parameters()``).
        reset_optimizer_state: also drop the head's optimizer state at each reset (the
            optimizer is the trainer's that holds the head).
        seed: make the new head's values deterministic (recommended: a resumed run then
            re-creates the same values).
        min_epochs_after_last: see :class:`~torch_recal.RifleScheduler`.

    Attributes:
        scheduler: the :class:`~torch_recal.RifleScheduler` (``None`` before the fit starts).

    Example:
        >>> from torch_recal.integrations.lightning import RifleCallback
        >>> callback = RifleCallback(num_resets=1, seed=0)  # Trainer(callbacks=[callback])
        >>> callback.scheduler is None  # built when the fit starts, from trainer.max_epochs
        True
    """

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._driver.build(pl_module, _run_length(trainer, self._driver.unit), trainer.optimizers)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._driver.resumed:
            step = self._driver.unit == "step"
            self._driver.sync(trainer.global_step if step else trainer.current_epoch)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:  # fmt: skip
        if self._driver.unit == "step":
            self._driver.sync(trainer.global_step)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._driver.unit == "epoch":
            self._driver.sync(trainer.current_epoch + 1)


class RandomLayerCallback(_DriverCallback):
    """Fast retraining's random layer training: a new random set of trainable layers after
    every training epoch.

    Builds a :class:`~torch_recal.RandomLayerTraining` when the fit starts (after
    ``configure_optimizers``, so frozen layers are not left out of the optimizer) and steps
    it after every training epoch; when training ends, every parameter gets back the
    ``requires_grad`` it had (``restore_at_end``). Its state is saved in Lightning's
    checkpoints: a resumed fit draws the same layers. Under DDP use
    ``strategy="ddp_find_unused_parameters_true"`` (frozen layers get no gradient).

    Paper: Wu, Zhang, Yang, https://arxiv.org/abs/2008.07387

    Args:
        layers: the candidate layers in forward order: submodule names of the
            ``LightningModule`` (``["net.layer1", "net.layer2"]``), modules, or a function
            ``pl_module -> modules``.
        min_trainable: the fewest layers trainable in any epoch.
        seed: seed of the per-epoch draws (recommended for exact resumes).
        schedule: per-epoch fraction of layers trained (the paper's:
            ``RandomLayerTraining.PAPER_SCHEDULE``), or ``None``.
        restore_at_end: make every layer trainable again when training ends.

    Attributes:
        layer_training: the :class:`~torch_recal.RandomLayerTraining` (``None`` before the
            fit starts).

    Example:
        >>> from torch_recal.integrations.lightning import RandomLayerCallback
        >>> callback = RandomLayerCallback(["net.conv2", "net.conv3"], seed=0)
        >>> callback.state_key
        "RandomLayerCallback{'layers': 'net.conv2,net.conv3'}"
    """

    def __init__(
        self,
        layers: LayersSpec,
        *,
        min_trainable: int = 1,
        seed: int | None = None,
        schedule: Sequence[float] | None = None,
        restore_at_end: bool = True,
    ) -> None:
        self._driver = RandomLayerDriver(
            layers, min_trainable=min_trainable, seed=seed, schedule=schedule,
            restore_at_end=restore_at_end,
        )  # fmt: skip
        self._key = None if callable(layers) else _names(layers)

    @property
    @override
    def state_key(self) -> str:
        if self._key is None:
            return super().state_key
        return self._generate_state_key(layers=self._key)

    @property
    def layer_training(self) -> RandomLayerTraining | None:
        """The per-epoch draw (built in ``on_fit_start``)."""
        return self._driver.piece  # type: ignore[no-any-return]

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._driver.build(pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._driver.resumed:
            self._driver.sync(trainer.current_epoch)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._driver.sync(trainer.current_epoch + 1)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._driver.finish()


class DenseRefitCallback(_DriverCallback):
    """Closed-form refit of a dense layer over the train data, every N epochs or at the end.

    After the training epochs ``every_n_epochs - 1, 2 * every_n_epochs - 1, ...`` and, with
    ``at_end``, after the last one (``trainer.max_epochs``), runs
    :func:`~torch_recal.pinv_refit_dense` on ``layer`` with the ``LightningModule`` as the
    model (its forward, in eval mode, under ``no_grad``) over ``trainer.train_dataloader`` (or
    ``loader``). It runs before Lightning's ``ModelCheckpoint`` saves that epoch, so the
    checkpoint holds the refitted weights. A fit that stops early (``max_steps``, early
    stopping) is refitted in ``on_train_end``, after its last checkpoint. Under DDP every rank
    reads its shard and the statistics are summed over ranks: all ranks get the same weights.

    Paper: Wu, Zhang, Yang, https://arxiv.org/abs/2008.07387

    Args:
        layer: ``None`` (the classifier, :func:`~torch_recal.find_classifier`), a submodule
            name or the module (an ``nn.Linear`` or an ``nn.Sequential`` stack).
        every_n_epochs: refit after every ``every_n_epochs`` epochs (``None``: only at the
            end).
        at_end: refit after the last epoch.
        loader: the data to refit on (default: the trainer's train dataloader; a loader
            without augmentation and shuffling is the paper's setting).
        batch_fn: maps a batch to ``(inputs, labels)`` (default: batches are pairs).
        ridge, targets, num_classes, step_size, start, evaluate: as in
            :func:`~torch_recal.pinv_refit_dense` (``evaluate`` adds a second pass for the
            train accuracy; off by default).

    Attributes:
        num_refits: refits done so far (saved in checkpoints).
        last_result: the :class:`~torch_recal.RefitResult` of the last refit in this process.

    Example:
        >>> from torch_recal.integrations.lightning import DenseRefitCallback
        >>> callback = DenseRefitCallback("net.fc", every_n_epochs=2, ridge=1e-3)
        >>> callback.num_refits, callback.last_result
        (0, None)
    """

    def __init__(
        self,
        layer: str | nn.Module | None = None,
        *,
        every_n_epochs: int | None = None,
        at_end: bool = True,
        loader: Iterable[Any] | None = None,
        batch_fn: BatchFn | None = None,
        ridge: float = 1e-3,
        targets: Literal["onehot", "bipolar", "raw"] = "onehot",
        num_classes: int | None = None,
        step_size: float = 1.0,
        start: Literal["zero", "current"] = "zero",
        evaluate: bool = False,
    ) -> None:
        self._driver = RefitDriver(
            layer, every_n_epochs=every_n_epochs, at_end=at_end, loader=loader,
            batch_fn=batch_fn,
            refit_kwargs={"ridge": ridge, "targets": targets, "num_classes": num_classes,
                          "step_size": step_size, "start": start, "evaluate": evaluate},
        )  # fmt: skip
        self._key = layer if isinstance(layer, str) else None

    @property
    @override
    def state_key(self) -> str:
        if self._key is None:
            return super().state_key
        return self._generate_state_key(layer=self._key)

    @property
    def num_refits(self) -> int:
        """Refits done so far."""
        return self._driver.num_refits

    @property
    def last_result(self) -> RefitResult | None:
        """The result of the last refit in this process."""
        return self._driver.last_result

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._driver.build(pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._driver.catch_up(trainer.current_epoch, trainer.global_step, _last_epoch(trainer),
                              trainer.train_dataloader)  # fmt: skip

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._driver.on_epoch_end(trainer.current_epoch, trainer.global_step,
                                  _last_epoch(trainer), trainer.train_dataloader)  # fmt: skip

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._driver.on_train_end(max(trainer.current_epoch - 1, 0), trainer.global_step,
                                  trainer.train_dataloader)  # fmt: skip


class GGRCallback(pl.Callback):
    """Generative gradient regularisation in a ``LightningModule``: the loss term, with its
    state in Lightning's checkpoints.

    Lightning calls the loss's backward itself, so the term is added where the loss is
    made: create the callback in the module, return it from ``configure_callbacks`` and add
    ``self.ggr.term(loss, x)`` in ``training_step``. The callback passes the trainer's
    ``GradScaler`` (``precision="16-mixed"``) to the loss, so its gradient is taken of the
    scaled loss; under ``"bf16-mixed"`` nothing more is needed. Its ``state_dict`` is the
    loss's (call counter, reference average), restored on resume.

    Paper: Reza & Jung, IEEE Access 2025, https://doi.org/10.1109/ACCESS.2025.3534216

    Args:
        ggr: the :class:`~torch_recal.GenerativeGradientLoss` (its ``target`` is the
            module's first conv weight).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torch_recal import GenerativeGradientLoss
        >>> from torch_recal.integrations.lightning import GGRCallback
        >>> conv = nn.Conv2d(1, 4, 3)
        >>> callback = GGRCallback(GenerativeGradientLoss(conv.weight, torch.ones(4, 1, 3, 3)))
        >>> loss = conv(torch.randn(2, 1, 5, 5)).square().mean()
        >>> term = callback.term(loss, torch.randn(2, 1, 5, 5))  # in training_step
        >>> callback.ggr.num_steps
        1
    """

    def __init__(self, ggr: GenerativeGradientLoss) -> None:
        self._driver = GGRDriver(ggr)
        self._trainer: pl.Trainer | None = None

    @property
    def ggr(self) -> GenerativeGradientLoss:
        """The loss."""
        return self._driver.ggr

    def term(self, loss: Tensor, x: Tensor) -> Tensor:
        """The regularisation term to add to ``loss`` (``loss`` unscaled, ``x`` the inputs)."""
        plugin = None if self._trainer is None else self._trainer.precision_plugin
        return self._driver.term(loss, x, getattr(plugin, "scaler", None))

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = None

    @override
    def state_dict(self) -> dict[str, Any]:
        return self._driver.ggr.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self._driver.ggr.load_state_dict(state_dict)


class CoherentRegCallback(CoherentInit, _DriverCallback):
    """Gradient-coherent strong L1/L2 regularisation for a Lightning fit.

    Builds a :class:`~torch_recal.CoherentStrongReg` when the fit starts, over the
    ``LightningModule``'s ``named_parameters()`` (or ``params(pl_module)``) and
    ``trainer.optimizers[0]`` (the first optimizer holding those parameters when there are
    several), and attaches it to that optimizer's step hooks
    (:meth:`~torch_recal.CoherentStrongReg.attach`): the regulariser runs inside
    ``optimizer.step(closure)``, after Lightning's closure computed the gradients and after
    gradient clipping; under ``precision="16-mixed"`` it gets the trainer's ``GradScaler``,
    reads unscaled gradients and does nothing on the steps the scaler skips. It is detached
    when training ends (also when it stops with an error). Its state (counters, gate and its
    averages) is saved in Lightning's checkpoints; a resumed fit makes the same gate
    decisions as an uninterrupted one. Frozen parameters are left out when it is built: list
    it before a :class:`RandomLayerCallback`, whose first draw freezes layers. One
    ``CoherentRegCallback`` per ``Trainer`` (Lightning refuses two: one checkpoint entry).

    Paper: Park et al., https://arxiv.org/abs/1811.08056

    Args:
        strength: the regularisation strength (lambda), a positive float; not needed with a
            budget (``target_sparsity=``), whose ``total_steps`` is then the trainer's
            ``estimated_stepping_batches`` unless given.
        params: ``None`` (the module's ``named_parameters()``) or a function
            ``pl_module -> parameters or (name, parameter) pairs``.
        **options: the :class:`~torch_recal.CoherentStrongReg` options (``kind``,
            ``criterion``, ``warmup``, ...), checked here; ``lr``, ``optimizer`` and
            ``scaler`` come from the trainer.

    Attributes:
        reg: the :class:`~torch_recal.CoherentStrongReg` (``None`` before the fit starts;
            kept after it, with its ``history``, for inspection).

    Example:
        >>> from torch_recal.integrations.lightning import CoherentRegCallback
        >>> callback = CoherentRegCallback(strength=1e-3, kind="l1")  # Trainer(callbacks=[...])
        >>> callback.reg is None  # built when the fit starts, on trainer.optimizers[0]
        True
    """

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        steps = trainer.estimated_stepping_batches
        total = int(steps) if isinstance(steps, (int, float)) and math.isfinite(steps) else None
        self._driver.build(pl_module, trainer.optimizers, scaler, total_steps=total)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._driver.detach()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._driver.detach()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._driver.detach()

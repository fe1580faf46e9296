"""Hugging Face ``Trainer`` callbacks for torch-recal's pieces (``pip install "torch-recal[hf]"``).

The same pieces as :mod:`torch_recal.integrations.lightning`, as ``TrainerCallback`` s:

* :class:`CalibrateCallback`: ``calibrate(model)`` when the ``Trainer`` is created
  (``on_init_end``), before it creates its optimizer in ``train()``.
* :class:`RifleCallback`: a :class:`~torch_recal.RifleScheduler` over
  ``num_train_epochs`` (``unit="step"``: ``max_steps``), stepped in ``on_epoch_end``
  (``on_step_end``).
* :class:`RandomLayerCallback`: :class:`~torch_recal.RandomLayerTraining`, a new draw in
  ``on_epoch_end``.
* :class:`DenseRefitCallback`: :func:`~torch_recal.pinv_refit_dense` over the train
  dataloader (its dict batches split into the model's inputs and ``labels``).
* :class:`GGRCallback` and :class:`GGRTrainer`: GGR's term added in ``compute_loss``.

* :class:`CoherentRegCallback`: a :class:`~torch_recal.CoherentStrongReg` attached to the
  step hooks of the ``Trainer``'s optimizer (unwrapped from accelerate's
  ``AcceleratedOptimizer``) from ``on_train_begin`` to ``on_train_end``.

State: every callback is an ``ExportableState``; its state goes into each checkpoint's
``trainer_state.json`` (``TrainerState.stateful_callbacks``, tensors written as exact
lists), and ``trainer.train(resume_from_checkpoint=...)`` restores it in ``on_train_begin``,
so a resumed run equals an uninterrupted one. The callbacks restore themselves: keep
``TrainingArguments(restore_callback_states_from_checkpoint=False)`` (the default), which
would re-create them from JSON without their model and options (they refuse it with a
``ValueError``). One callback of each class per ``Trainer``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn
from typing_extensions import override

try:
    from transformers import Trainer
    from transformers.trainer_callback import ExportableState, TrainerCallback
except ImportError as _error:  # pragma: no cover - exercised by a test that hides transformers
    raise ImportError(
        'torch_recal.integrations.transformers needs transformers: pip install "torch-recal[hf]"'
    ) from _error

from torch_recal._batches import BatchFn
from torch_recal._checks import check_instance
from torch_recal.generative import GenerativeGradientLoss
from torch_recal.integrations._common import (
    LayersSpec,
    completed_epochs,
    from_json,
    to_json,
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
from torch_recal.surgery import is_calibrated

if TYPE_CHECKING:
    pass

__all__ = [
    "CalibrateCallback",
    "CoherentRegCallback",
    "DenseRefitCallback",
    "GGRCallback",
    "GGRTrainer",
    "RandomLayerCallback",
    "RifleCallback",
]

_KEY = "torch_recal_state"


def hf_batch(batch: Any) -> tuple[Any, Any]:
    """``(inputs, labels)`` of a Hugging Face batch: a dict loses its ``labels`` key (the rest
    is passed to the model as keyword arguments); a pair is returned as it is."""
    if isinstance(batch, Mapping):
        if "labels" not in batch:
            raise TypeError(
                f"DenseRefitCallback: a dict batch without `labels` (keys {sorted(batch)}); "
                f"pass `batch_fn=` mapping a batch to (inputs, labels)"
            )
        return {k: v for k, v in batch.items() if k != "labels"}, batch["labels"]
    return batch  # type: ignore[no-any-return]


class _Stateful(TrainerCallback, ExportableState):  # type: ignore[misc]
    """Saves its driver's state in ``trainer_state.json`` and finds it again on resume."""

    _driver: Any  # a driver of ``_drivers.py``, set by the subclass

    def _state(self) -> dict[str, Any]:
        return self._driver.state_dict()  # type: ignore[no-any-return]

    def _load(self, state: Mapping[str, Any]) -> None:
        self._driver.load_state_dict(state)

    def state_dict(self) -> dict[str, Any]:
        """The piece's state as plain data (what the checkpoints hold, before JSON)."""
        return self._state()

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a :meth:`state_dict` (kept until the piece is built in ``on_train_begin``)."""
        self._load(state_dict)

    @override
    def state(self) -> dict[str, Any]:
        return {"args": {}, "attributes": {_KEY: to_json(self._state())}}

    def _check_args(self, args: Any) -> None:
        if getattr(args, "restore_callback_states_from_checkpoint", False):
            raise ValueError(
                f"{type(self).__name__}: TrainingArguments(`restore_callback_states_from_"
                f"checkpoint`=True) would re-create this callback from JSON, without its "
                f"model and options; leave it False: torch-recal's callbacks restore their "
                f"state from the checkpoint themselves"
            )

    def _saved(self, args: Any, state: Any) -> dict[str, Any] | None:
        """The state this callback saved in the checkpoint being resumed, or ``None``."""
        self._check_args(args)
        name = type(self).__name__
        entry = (state.stateful_callbacks or {}).get(name)
        if isinstance(entry, list):
            raise ValueError(f"{name}: use one {name} per Trainer (found {len(entry)})")
        if state.global_step == 0:  # a fresh run
            return None
        if entry is None:
            warnings.warn(
                f"{name}: the checkpoint being resumed holds no state for this callback; it "
                f"starts from the beginning of its schedule",
                UserWarning,
                stacklevel=3,
            )
            return None
        saved = from_json(entry.get("attributes", {}).get(_KEY))
        return saved if saved else None

    @override
    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._check_args(args)


class CalibrateCallback(CalibrateInit, TrainerCallback):  # type: ignore[misc]
    """Insert :class:`~torch_recal.ResponseCalibration` layers when the ``Trainer`` is created.

    Calls :func:`~torch_recal.calibrate` on the model in ``on_init_end``: before ``train()``
    creates the optimizer (or, with ``Trainer(optimizers=(opt, ...))``, adding the new
    parameters to ``opt`` as a param group) and before a checkpoint's weights are loaded.
    Pass it to ``Trainer(callbacks=[...])``: ``add_callback`` comes too late (``train()``
    raises ``RuntimeError`` then). Calling :func:`~torch_recal.calibrate` yourself before
    creating the ``Trainer`` does the same. No state.

    Paper: Xu et al., https://arxiv.org/abs/2411.13582

    Args:
        reduction: MLP reduction of each inserted layer.
        targets: ``None`` (recognised residual blocks), module names or a predicate.
        **layer_kwargs: options of each :class:`~torch_recal.ResponseCalibration`.

    Example:
        >>> from torch_recal.integrations.transformers import CalibrateCallback
        >>> CalibrateCallback(reduction=16).reduction  # Trainer(..., callbacks=[...])
        16
    """

    @property
    def reduction(self) -> int:
        """The reduction of the inserted layers."""
        return self._driver.reduction

    @override
    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._driver.apply(kwargs["model"], kwargs.get("optimizer"))

    @override
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not is_calibrated(kwargs["model"]):
            raise RuntimeError(
                "CalibrateCallback: the model was not calibrated when the Trainer was created; "
                "pass the callback in Trainer(callbacks=[...]) (add_callback() comes after "
                "the Trainer's set-up), or call calibrate(model) before creating the Trainer"
            )


class RifleCallback(RifleInit, _Stateful):
    """RIFLE: re-initialise the classifier head a few times during fine-tuning.

    Builds a :class:`~torch_recal.RifleScheduler` in ``on_train_begin`` over
    ``num_train_epochs`` (``unit="step"``: the run's ``max_steps``) and steps it after every
    epoch (every optimizer step); the head defaults to :func:`~torch_recal.find_classifier`
    of the model (``model.classifier`` for most Hugging Face classifiers).

    Paper: Li et al., https://arxiv.org/abs/2007.03349

    Args:
        num_resets, period, head, total_epochs, unit, init, reset_optimizer_state, seed,
            min_epochs_after_last: as in
            :class:`torch_recal.integrations.lightning.RifleCallback`.

    Attributes:
        scheduler: the :class:`~torch_recal.RifleScheduler` (``None`` before training).

    Example:
        >>> from torch_recal.integrations.transformers import RifleCallback
        >>> RifleCallback(num_resets=1, seed=0).state()["attributes"]  # saved in checkpoints
        {'torch_recal_state': {}}
    """

    @override
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        saved = self._saved(args, state)
        step = self._driver.unit == "step"
        length = state.max_steps if step else state.num_train_epochs
        self._driver.resumed = False
        self._driver.build(kwargs["model"], int(length) if length else None,
                           [kwargs["optimizer"]] if kwargs.get("optimizer") else [])  # fmt: skip
        if saved is not None:
            self._driver.load_state_dict(saved)
            self._driver.sync(state.global_step if step else completed_epochs(state.epoch))

    @override
    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._driver.unit == "step":
            self._driver.sync(state.global_step)

    @override
    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._driver.unit == "epoch":
            self._driver.sync(completed_epochs(state.epoch))


class RandomLayerCallback(_Stateful):
    """Fast retraining's random layer training: a new random set of trainable layers after
    every epoch.

    Builds a :class:`~torch_recal.RandomLayerTraining` in ``on_train_begin`` (after the
    ``Trainer`` created its optimizer, which holds only parameters that require grad then)
    and steps it in ``on_epoch_end``; in ``on_train_end`` every parameter gets back its
    ``requires_grad`` (``restore_at_end``). Under DDP set
    ``TrainingArguments(ddp_find_unused_parameters=True)``.

    Paper: Wu, Zhang, Yang, https://arxiv.org/abs/2008.07387

    Args:
        layers, min_trainable, seed, schedule, restore_at_end: as in
            :class:`torch_recal.integrations.lightning.RandomLayerCallback` (names are
            relative to the model).

    Attributes:
        layer_training: the :class:`~torch_recal.RandomLayerTraining` (``None`` before
            training).

    Example:
        >>> from torch_recal.integrations.transformers import RandomLayerCallback
        >>> RandomLayerCallback(["encoder.layer.10", "encoder.layer.11"], seed=0).layer_training
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

    @property
    def layer_training(self) -> RandomLayerTraining | None:
        """The per-epoch draw (built in ``on_train_begin``)."""
        return self._driver.piece  # type: ignore[no-any-return]

    @override
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        saved = self._saved(args, state)
        self._driver.build(kwargs["model"])
        if saved is not None:
            self._driver.load_state_dict(saved)
            self._driver.sync(completed_epochs(state.epoch))

    @override
    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._driver.sync(completed_epochs(state.epoch))

    @override
    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._driver.finish()


class DenseRefitCallback(_Stateful):
    """Closed-form refit of a dense layer over the train data, every N epochs or at the end.

    In ``on_epoch_end`` after the epochs ``every_n_epochs - 1, 2 * every_n_epochs - 1, ...``
    and, with ``at_end``, after the last one, runs :func:`~torch_recal.pinv_refit_dense` on
    ``layer`` with the model (``model(**inputs)``, eval mode, ``no_grad``) over the
    ``Trainer``'s train dataloader (or ``loader``). The default ``batch_fn`` splits a dict
    batch into its ``labels`` and the rest. The refit runs before the ``Trainer`` saves that
    epoch's checkpoint. A run that ends inside an epoch (``max_steps``) is refitted in
    ``on_train_end``. Under DDP the statistics are summed over ranks.

    Paper: Wu, Zhang, Yang, https://arxiv.org/abs/2008.07387

    Args:
        layer, every_n_epochs, at_end, loader, batch_fn, ridge, targets, num_classes,
            step_size, start, evaluate: as in
            :class:`torch_recal.integrations.lightning.DenseRefitCallback`.

    Example:
        >>> from torch_recal.integrations.transformers import DenseRefitCallback
        >>> DenseRefitCallback("classifier", every_n_epochs=1).num_refits
        0
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
            batch_fn=hf_batch if batch_fn is None else batch_fn,
            refit_kwargs={"ridge": ridge, "targets": targets, "num_classes": num_classes,
                          "step_size": step_size, "start": start, "evaluate": evaluate},
        )  # fmt: skip

    @property
    def num_refits(self) -> int:
        """Refits done so far."""
        return self._driver.num_refits

    @property
    def last_result(self) -> RefitResult | None:
        """The result of the last refit in this process."""
        return self._driver.last_result

    @override
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        saved = self._saved(args, state)
        self._driver.build(kwargs["model"])
        self._driver.resumed = False
        if saved is not None:
            self._driver.load_state_dict(saved)
            self._driver.catch_up(completed_epochs(state.epoch), state.global_step,
                                  _last_epoch(state), kwargs.get("train_dataloader"))  # fmt: skip

    @override
    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        done = completed_epochs(state.epoch)
        if done > 0 and abs(state.epoch - done) < 1e-6:  # a whole epoch, not a cut one
            self._driver.on_epoch_end(done - 1, state.global_step, _last_epoch(state),
                                      kwargs.get("train_dataloader"))  # fmt: skip

    @override
    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._driver.on_train_end(max(completed_epochs(state.epoch) - 1, 0), state.global_step,
                                  kwargs.get("train_dataloader"))  # fmt: skip


def _last_epoch(state: Any) -> int | None:
    epochs = int(state.num_train_epochs or 0)
    return epochs - 1 if epochs > 0 else None


class GGRCallback(_Stateful):
    """Generative gradient regularisation with the Hugging Face ``Trainer``: the loss, its
    input key, and its state in the ``Trainer``'s checkpoints.

    The ``Trainer`` computes the loss in ``compute_loss``, so the term is added there:
    :class:`GGRTrainer` does it for you; a ``Trainer`` subclass of your own adds
    ``callback.term(loss, inputs, scaler=self.accelerator.scaler)`` in its
    ``compute_loss`` (training steps only) and passes the callback in ``callbacks=``.

    Paper: Reza & Jung, IEEE Access 2025, https://doi.org/10.1109/ACCESS.2025.3534216

    Args:
        ggr: the :class:`~torch_recal.GenerativeGradientLoss` (its ``target`` is the
            model's first conv weight).
        input_key: the key of the batch's input images (``"pixel_values"``).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torch_recal import GenerativeGradientLoss
        >>> from torch_recal.integrations.transformers import GGRCallback
        >>> conv = nn.Conv2d(1, 4, 3)
        >>> callback = GGRCallback(GenerativeGradientLoss(conv.weight, torch.ones(4, 1, 3, 3)))
        >>> inputs = {"pixel_values": torch.randn(2, 1, 5, 5)}
        >>> loss = conv(inputs["pixel_values"]).square().mean()
        >>> term = callback.term(loss, inputs)
        >>> callback.ggr.num_steps
        1
    """

    def __init__(self, ggr: GenerativeGradientLoss, *, input_key: str = "pixel_values") -> None:
        self._driver = GGRDriver(ggr)
        check_instance(input_key, "input_key", str, who="GGRCallback", what="a str")
        self.input_key = input_key

    @property
    def ggr(self) -> GenerativeGradientLoss:
        """The loss."""
        return self._driver.ggr

    def input_of(self, inputs: Mapping[str, Any] | Tensor) -> Tensor:
        """The term's input: ``inputs[input_key]`` of a dict batch, or the tensor itself."""
        if not isinstance(inputs, Mapping):
            return inputs
        if self.input_key not in inputs:
            raise ValueError(
                f"GGRCallback: the batch has no `input_key`={self.input_key!r} (its keys: "
                f"{sorted(map(str, inputs))}); pass GGRCallback(ggr, input_key=...)"
            )
        return inputs[self.input_key]  # type: ignore[no-any-return]

    def term(self, loss: Tensor, inputs: Mapping[str, Any] | Tensor, scaler: Any = None) -> Tensor:
        """The term to add to ``loss`` (unscaled) for the batch ``inputs`` (a dict or tensor);
        ``scaler``: the ``Trainer``'s ``accelerator.scaler`` (``fp16=True``), or ``None``."""
        return self._driver.term(loss, self.input_of(inputs), scaler)

    def _state(self) -> dict[str, Any]:
        return self._driver.ggr.state_dict()

    def _load(self, state: Mapping[str, Any]) -> None:
        check_instance(state, "state_dict", Mapping, who="GGRCallback.load_state_dict",
                       what="a dict")  # fmt: skip
        self._driver.ggr.load_state_dict(dict(state))

    @override
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        saved = self._saved(args, state)
        if saved is not None:
            self._driver.ggr.load_state_dict(saved)


class CoherentRegCallback(CoherentInit, _Stateful):
    """Gradient-coherent strong L1/L2 regularisation with the Hugging Face ``Trainer``.

    In ``on_train_begin`` (the ``Trainer`` has created and prepared its optimizer then)
    builds a :class:`~torch_recal.CoherentStrongReg` over the model's ``named_parameters()``
    (or ``params(model)``) and attaches it to the step hooks of the torch optimizer inside
    accelerate's ``AcceleratedOptimizer``
    (:meth:`~torch_recal.CoherentStrongReg.attach`): it runs inside ``optimizer.step()``,
    after gradient clipping (``max_grad_norm``) and, under ``fp16=True``, on unscaled
    gradients, doing nothing on the steps the ``GradScaler`` skips. It is detached in
    ``on_train_end``. Its state goes into each checkpoint's ``trainer_state.json``; a resumed
    run makes the same gate decisions as an uninterrupted one. Frozen parameters are left
    out when it is built.

    Paper: Park et al., https://arxiv.org/abs/1811.08056

    Args:
        strength, params, **options: as in
            :class:`torch_recal.integrations.lightning.CoherentRegCallback` (``params``:
            ``None``, the model's ``named_parameters()``, or a function ``model -> pairs``;
            a budget without ``total_steps`` ends at the ``Trainer``'s ``max_steps``).

    Attributes:
        reg: the :class:`~torch_recal.CoherentStrongReg` (``None`` before training; kept
            after it, with its ``history``).

    Example:
        >>> from torch_recal.integrations.transformers import CoherentRegCallback
        >>> CoherentRegCallback(strength=1e-3, kind="l2").state()["attributes"]
        {'torch_recal_state': {}}
    """

    @override
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        saved = self._saved(args, state)
        prepared = kwargs.get("optimizer")
        inner = getattr(prepared, "optimizer", None)  # accelerate's AcceleratedOptimizer
        optimizer = inner if isinstance(inner, torch.optim.Optimizer) else prepared
        total = int(state.max_steps) if getattr(state, "max_steps", 0) else None
        self._driver.build(kwargs["model"], [optimizer] if optimizer is not None else [],
                           getattr(prepared, "scaler", None), saved, total)  # fmt: skip

    @override
    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._driver.detach()


class GGRTrainer(Trainer):  # type: ignore[misc]
    """A ``transformers.Trainer`` whose training loss is ``loss + ggr(loss, x)``.

    ``compute_loss`` adds the term of its :class:`GGRCallback` on training steps (not in
    evaluation), with the ``Trainer``'s ``GradScaler`` under ``fp16=True``; the callback is
    added to the ``Trainer`` so its state is checkpointed. Everything else is the
    ``Trainer``'s.

    Args:
        *args: the ``Trainer``'s arguments.
        ggr: a :class:`GGRCallback`, or a :class:`~torch_recal.GenerativeGradientLoss` (then
            wrapped with ``input_key="pixel_values"``).
        **kwargs: the ``Trainer``'s keyword arguments.
    """

    def __init__(self, *args: Any, ggr: GGRCallback | GenerativeGradientLoss, **kwargs: Any):
        if isinstance(ggr, GenerativeGradientLoss):
            ggr = GGRCallback(ggr)
        check_instance(ggr, "ggr", GGRCallback, who="GGRTrainer",
                       what="a GGRCallback or a GenerativeGradientLoss")  # fmt: skip
        self.ggr_callback = ggr
        kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), ggr]
        super().__init__(*args, **kwargs)

    @override
    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        x = self.ggr_callback.input_of(inputs)  # before the Trainer may pop keys
        loss, outputs = super().compute_loss(
            model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        if model.training and torch.is_grad_enabled():
            loss = loss + self.ggr_callback.term(loss, x, self.accelerator.scaler)
        return (loss, outputs) if return_outputs else loss

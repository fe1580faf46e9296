"""The trainer integrations' drivers (private): the pieces that are built once the
trainer's model and run length are known, and catching up after a resume.

Each ``*Driver`` holds one library piece and the rules that do not depend on the framework;
``lightning.py`` and ``transformers.py`` only map the framework's events onto them:

* ``build(...)`` creates the piece (after the optimizer exists, so that nothing frozen is
  left out of it) and loads a state that arrived before it (``load_state_dict`` called by the
  framework before the piece exists keeps it pending);
* ``CoherentDriver`` is step-driven by the optimizer itself: ``build(...)`` attaches the
  regulariser to the optimizer's step hooks (:meth:`CoherentStrongReg.attach`), so it needs
  no event of the trainer but the start and the end of training;
* ``sync(target)`` advances an epoch- or step-driven piece until its counter equals the
  trainer's (the number of completed epochs, or the global step). Called at every epoch (or
  step) end, and once at the start of a resumed run: a checkpoint saved after the last step
  of an epoch but before the epoch-end event (Hugging Face's ``save_strategy="steps"``, or
  Lightning's ``every_n_train_steps``) holds the piece one epoch behind the weights, and the
  uninterrupted run would have advanced it right after that save.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn
from typing_extensions import Unpack

from torch_recal._batches import BatchFn, check_batch_fn, check_loader
from torch_recal._checks import (
    check_choice,
    check_flag,
    check_instance,
    check_int,
    check_optional_int,
    check_real,
    check_state_keys,
)
from torch_recal.coherent import Attachment, CoherentStrongReg
from torch_recal.criteria import Budget
from torch_recal.generative import GenerativeGradientLoss
from torch_recal.heads import _tied_elsewhere, _unwrap, find_classifier
from torch_recal.integrations._common import (
    COHERENT_OPTIONS,
    CoherentOptions,
    HeadSpec,
    LayersSpec,
    ParamsSpec,
    check_head,
    head_scope,
    module_of,
)
from torch_recal.layer_sampling import RandomLayerTraining, _check_schedule
from torch_recal.refit import RefitResult, pinv_refit_dense
from torch_recal.rifle import RifleScheduler
from torch_recal.surgery import _LAYER_OPTIONS, calibrate

if TYPE_CHECKING:
    from torch_recal.surgery import LayerOptions

_log = logging.getLogger("torch_recal")


# --------------------------------------------------------------------------- lazily built pieces
class Driver:
    """A piece built when the trainer's model is known; state loaded before is kept pending."""

    who = "Driver"

    def __init__(self) -> None:
        self.piece: Any = None
        self._pending: dict[str, Any] | None = None
        self.resumed = False

    def state_dict(self) -> dict[str, Any]:
        if self.piece is not None:
            return dict(self.piece.state_dict())
        return dict(self._pending) if self._pending is not None else {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load now when the piece exists, else keep it for :meth:`attach` (checked there)."""
        who = f"{self.who}.load_state_dict"
        check_instance(state, "state_dict", Mapping, who=who, what="a dict")
        if not state:  # saved before the piece existed: nothing to restore
            return
        if self.piece is not None:
            self.piece.load_state_dict(dict(state))
        else:
            self._pending = dict(state)
        self.resumed = True

    def attach(self, piece: Any) -> Any:
        if self._pending is not None:
            piece.load_state_dict(self._pending)  # checks everything before it assigns
        self.piece, self._pending = piece, None
        return piece


class CalibrateDriver:
    """``calibrate(model, ...)`` before the optimizer is created (no state)."""

    who = "CalibrateCallback"

    def __init__(self, reduction: int, targets: Any, layer_kwargs: dict[str, Any]) -> None:
        self.reduction = check_int(reduction, "reduction", who=self.who, minimum=1)
        if targets is not None and (isinstance(targets, str) or not (
            callable(targets) or isinstance(targets, Iterable)
        )):  # fmt: skip
            raise TypeError(
                f"{self.who}: `targets` must be None, a list of module names or a predicate "
                f"(name, module) -> bool, got {type(targets).__name__}"
            )
        unknown = sorted(set(layer_kwargs) - set(_LAYER_OPTIONS))
        if unknown:
            raise TypeError(
                f"{self.who}: unexpected keyword argument `{unknown[0]}`; the layer options are "
                + ", ".join(_LAYER_OPTIONS)
            )
        self.targets = list(targets) if isinstance(targets, (list, tuple)) else targets
        self.layer_kwargs = layer_kwargs

    def apply(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        calibrate(model, reduction=self.reduction, targets=self.targets, optimizer=optimizer,
                  **self.layer_kwargs)  # fmt: skip


class RifleDriver(Driver):
    """:class:`RifleScheduler` over the trainer's run (``total_epochs`` from the trainer)."""

    who = "RifleCallback"

    def __init__(
        self,
        *,
        num_resets: int | None,
        period: int | None,
        head: HeadSpec,
        total_epochs: int | None,
        unit: Literal["epoch", "step"],
        init: Callable[[nn.Module], Any] | None,
        reset_optimizer_state: bool,
        seed: int | None,
        min_epochs_after_last: int | None,
    ) -> None:
        super().__init__()
        who = self.who
        if num_resets is not None and period is not None:
            raise ValueError(
                f"{who}: give at most one of `num_resets` and `period`, got num_resets="
                f"{num_resets!r}, period={period!r}"
            )
        self.num_resets = check_optional_int(num_resets, "num_resets", who=who, minimum=0)
        self.period = check_optional_int(period, "period", who=who, minimum=1)
        if self.num_resets is None and self.period is None:
            self.num_resets = 1  # the official experiments
        self.head = check_head(head, "head", who)
        self.total_epochs = check_optional_int(total_epochs, "total_epochs", who=who, minimum=1)
        self.unit = check_choice(unit, "unit", ("epoch", "step"), who=who)
        if init is not None and not callable(init):
            raise TypeError(f"{who}: `init` must be callable or None, got {type(init).__name__}")
        self.init = init
        self.reset_optimizer_state = check_flag(
            reset_optimizer_state, "reset_optimizer_state", who=who
        )
        self.seed = check_optional_int(seed, "seed", who=who, minimum=0)
        self.min_epochs_after_last = check_optional_int(
            min_epochs_after_last, "min_epochs_after_last", who=who, minimum=1
        )

    def build(
        self,
        model: nn.Module,
        run_length: int | None,
        optimizers: Sequence[torch.optim.Optimizer] = (),
    ) -> RifleScheduler:
        who = self.who
        model = _unwrap(model)
        total = self.total_epochs or run_length
        if total is None:
            raise ValueError(
                f"{who}: the trainer's run length in {self.unit}s is not known (no max_epochs / "
                f"max_steps); pass `total_epochs=`"
            )
        target: nn.Module | list[nn.Module]
        if self.head is None:
            target = head_scope(model, who)
            head_params = list(find_classifier(target).parameters())
        else:
            specs: list[Any] = list(self.head) if isinstance(self.head, list) else [self.head]
            target = [module_of(model, s, "head", who) for s in specs]
            for module in target:
                if tied := _tied_elsewhere(model, module):
                    mine, other = tied[0]
                    raise ValueError(
                        f"{who}: the head's parameter `{mine}` is also `{other}` of the model "
                        f"(tied weights); re-initialising the head would reset that module too"
                    )
            head_params = [p for m in target for p in m.parameters()]
        optimizer = None
        if self.reset_optimizer_state:
            ids = {id(p) for p in head_params}
            held = [o for o in optimizers
                    if any(id(p) in ids for g in o.param_groups for p in g["params"])]  # fmt: skip
            if not held:
                raise ValueError(
                    f"{who}: `reset_optimizer_state=True` but no optimizer of the trainer holds "
                    f"the head's parameters"
                )
            optimizer = held[0]
        rifle = RifleScheduler(
            target,
            total_epochs=total,
            num_resets=self.num_resets,
            period=self.period,
            unit=self.unit,  # type: ignore[arg-type]
            init=self.init,
            optimizer=optimizer,
            reset_optimizer_state=self.reset_optimizer_state,
            seed=self.seed,
            min_epochs_after_last=self.min_epochs_after_last,
        )
        return self.attach(rifle)  # type: ignore[no-any-return]

    def sync(self, target: int) -> None:
        rifle: RifleScheduler | None = self.piece
        if rifle is None:
            return
        while rifle.num_steps < min(target, rifle.total_epochs):
            rifle.step()


class RandomLayerDriver(Driver):
    """:class:`RandomLayerTraining` over layers named in the trainer's model."""

    who = "RandomLayerCallback"

    def __init__(
        self,
        layers: LayersSpec,
        *,
        min_trainable: int,
        seed: int | None,
        schedule: Sequence[float] | None,
        restore_at_end: bool,
    ) -> None:
        super().__init__()
        who = self.who
        if callable(layers) and not isinstance(layers, nn.Module):
            self.layers: LayersSpec = layers
        elif isinstance(layers, (list, tuple, nn.ModuleList, nn.Sequential)):
            wrong = sorted(
                {type(m).__name__ for m in layers if not isinstance(m, (str, nn.Module))}
            )
            if wrong:
                raise TypeError(
                    f"{who}: every item of `layers` must be a submodule name or a module, "
                    f"got {wrong}"
                )
            if len(layers) == 0:
                raise ValueError(f"{who}: `layers` must hold at least one layer")
            self.layers = list(layers)
        else:
            raise TypeError(
                f"{who}: `layers` must be a list of submodule names or modules, or a function "
                f"model -> modules, got {type(layers).__name__}"
            )
        self.min_trainable = check_int(min_trainable, "min_trainable", who=who, minimum=0)
        self.seed = check_optional_int(seed, "seed", who=who, minimum=0)
        self.schedule = _check_schedule(schedule, who)
        self.restore_at_end = check_flag(restore_at_end, "restore_at_end", who=who)

    def build(self, model: nn.Module) -> RandomLayerTraining:
        model = _unwrap(model)
        if callable(self.layers):
            modules = list(self.layers(model))
        else:
            modules = [module_of(model, s, "layers", self.who) for s in self.layers]
        rlt = RandomLayerTraining(
            modules, min_trainable=self.min_trainable, seed=self.seed, schedule=self.schedule
        )
        return self.attach(rlt)  # type: ignore[no-any-return]

    def sync(self, completed_epochs: int) -> None:
        rlt: RandomLayerTraining | None = self.piece
        if rlt is None:
            return
        while rlt.num_steps < completed_epochs:
            rlt.step()

    def finish(self) -> None:
        if self.piece is not None and self.restore_at_end:
            self.piece.restore()


_REFIT_KEYS = ("num_refits", "last_epoch", "last_step")


class RefitDriver:
    """``pinv_refit_dense`` of one dense layer every ``every_n_epochs`` and/or at the end."""

    who = "DenseRefitCallback"

    def __init__(
        self,
        layer: str | nn.Module | None,
        *,
        every_n_epochs: int | None,
        at_end: bool,
        loader: Iterable[Any] | None,
        batch_fn: BatchFn | None,
        refit_kwargs: dict[str, Any],
    ) -> None:
        who = self.who
        self.resumed = False
        if layer is not None and not isinstance(layer, (str, nn.Linear, nn.Sequential)):
            raise TypeError(
                f"{who}: `layer` must be None (the classifier), a submodule name, an nn.Linear "
                f"or an nn.Sequential of them, got {type(layer).__name__}"
            )
        self.layer = layer
        self.every_n_epochs = check_optional_int(every_n_epochs, "every_n_epochs", who=who,
                                                 minimum=1)  # fmt: skip
        self.at_end = check_flag(at_end, "at_end", who=who)
        if self.every_n_epochs is None and not self.at_end:
            raise ValueError(
                f"{who}: with `every_n_epochs`=None and `at_end`=False the layer is never "
                f"refitted; give one of them"
            )
        self.loader = None if loader is None else check_loader(loader, who=who)
        self.batch_fn = check_batch_fn(batch_fn, who=who)
        kwargs = dict(refit_kwargs)  # checked now, not in the middle of training
        kwargs["ridge"] = check_real(kwargs["ridge"], "ridge", who=who, minimum=0)
        kwargs["targets"] = check_choice(kwargs["targets"], "targets", ("onehot", "bipolar", "raw"),
                                         who=who)  # fmt: skip
        kwargs["num_classes"] = check_optional_int(kwargs["num_classes"], "num_classes", who=who,
                                                   minimum=1)  # fmt: skip
        kwargs["step_size"] = check_real(kwargs["step_size"], "step_size", who=who, minimum=0,
                                         maximum=1, open_low=True)  # fmt: skip
        kwargs["start"] = check_choice(kwargs["start"], "start", ("zero", "current"), who=who)
        kwargs["evaluate"] = check_flag(kwargs["evaluate"], "evaluate", who=who)
        self.refit_kwargs = kwargs
        self.num_refits = 0
        self.last_epoch = -1  # 0-based epoch after which the last refit ran (-1: none yet)
        self.last_step = -1  # global step of the last refit
        self.last_result: RefitResult | None = None
        self._model: nn.Module | None = None
        self._layer: nn.Module | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"num_refits": self.num_refits, "last_epoch": self.last_epoch,
                "last_step": self.last_step}  # fmt: skip

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        who = f"{self.who}.load_state_dict"
        check_instance(state, "state_dict", Mapping, who=who, what="a dict")
        if not state:
            return
        check_state_keys(state, _REFIT_KEYS, who=who)
        num_refits = check_int(state["num_refits"], "num_refits", who=who, minimum=0)
        last_epoch = check_int(state["last_epoch"], "last_epoch", who=who, minimum=-1)
        last_step = check_int(state["last_step"], "last_step", who=who, minimum=-1)
        if (num_refits == 0) != (last_step == -1):
            raise ValueError(
                f"{who}: `last_step` must be -1 exactly when `num_refits` is 0, got "
                f"num_refits={num_refits}, last_step={last_step}"
            )
        self.num_refits, self.last_epoch, self.last_step = num_refits, last_epoch, last_step
        self.resumed = True

    def build(self, model: nn.Module) -> None:
        model = _unwrap(model)
        if self.layer is None:
            layer = find_classifier(head_scope(model, self.who))
        else:
            layer = module_of(model, self.layer, "layer", self.who)
        if not isinstance(layer, (nn.Linear, nn.Sequential)):
            raise TypeError(
                f"{self.who}: the layer to refit must be an nn.Linear (or an nn.Sequential of "
                f"them), got {type(layer).__name__}; pass `layer=`"
            )
        self._model, self._layer = model, layer

    def due(self, epoch: int, last_epoch_of_run: int | None) -> bool:
        """Whether a refit follows 0-based ``epoch``."""
        if self.every_n_epochs is not None and (epoch + 1) % self.every_n_epochs == 0:
            return True
        return self.at_end and last_epoch_of_run is not None and epoch == last_epoch_of_run

    def refit(self, loader: Iterable[Any] | None, epoch: int, step: int) -> RefitResult:
        if self._model is None or self._layer is None:
            raise RuntimeError(f"{self.who}: refit before the trainer set the callback up")
        data = self.loader if self.loader is not None else loader
        if data is None:
            raise ValueError(f"{self.who}: the trainer has no train dataloader; pass `loader=`")
        result = pinv_refit_dense(self._layer, data, model=self._model,  # type: ignore[arg-type]
                                  batch_fn=self.batch_fn, **self.refit_kwargs)  # fmt: skip
        self.num_refits += 1
        self.last_epoch, self.last_step, self.last_result = epoch, step, result
        _log.info(
            "DenseRefitCallback: refitted %s after epoch %d (step %d): %d samples, mse %.4g, %s",
            type(self._layer).__name__, epoch, step, result.num_samples, result.mse, result.solver,
        )  # fmt: skip
        return result

    def on_epoch_end(self, epoch: int, step: int, last_epoch_of_run: int | None,
                     loader: Iterable[Any] | None) -> None:  # fmt: skip
        if self.due(epoch, last_epoch_of_run) and self.last_epoch != epoch:
            self.refit(loader, epoch, step)

    def catch_up(self, completed_epochs: int, step: int, last_epoch_of_run: int | None,
                 loader: Iterable[Any] | None) -> None:  # fmt: skip
        """At a resumed start: the refit of the last completed epoch, if the checkpoint
        was saved before it ran."""
        if self.resumed and completed_epochs > 0:
            self.on_epoch_end(completed_epochs - 1, step, last_epoch_of_run, loader)

    def on_train_end(self, epoch: int, step: int, loader: Iterable[Any] | None) -> None:
        if self.at_end and self.last_step != step:
            self.refit(loader, epoch, step)


class CoherentDriver(Driver):
    """A :class:`CoherentStrongReg` on the trainer's optimizer, run by its step hooks.

    The options are checked when the callback is created, by the regulariser's own checks
    (on a stand-in parameter, so the two cannot drift apart); the regulariser itself is
    built once the trainer's optimizer exists, over ``params(model)`` (default: the model's
    ``named_parameters()``), and attached to the optimizer's step hooks until training ends.
    """

    who = "CoherentRegCallback"

    def __init__(
        self, strength: float | None, params: ParamsSpec, options: Mapping[str, Any]
    ) -> None:
        super().__init__()
        who = self.who
        unknown = sorted(set(options) - set(COHERENT_OPTIONS))
        if unknown:
            raise TypeError(
                f"{who}: unexpected keyword argument `{unknown[0]}`; the options are "
                + ", ".join(COHERENT_OPTIONS)
            )
        if params is not None and (isinstance(params, nn.Module) or not callable(params)):
            raise TypeError(
                f"{who}: `params` must be None (the model's named_parameters()) or a function "
                f"model -> parameters or (name, parameter) pairs, got {type(params).__name__}"
            )
        probe = [("probe.weight", torch.zeros(1, 1, requires_grad=True))]
        try:
            CoherentStrongReg(probe, strength=strength, **options)
        except (TypeError, ValueError) as error:
            message = str(error).removeprefix("CoherentStrongReg: ")
            raise type(error)(f"{who}: {message}") from None
        self.strength = None if strength is None else float(strength)
        self.params = params
        self.options = dict(options)
        self.handle: Attachment | None = None

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load into the regulariser of the last run, if there is one (checked now), and keep
        the state for the next :meth:`build`: each run builds a new regulariser."""
        super().load_state_dict(state)
        if self.piece is not None and state:
            self._pending = dict(state)

    def build(
        self,
        model: nn.Module,
        optimizers: Sequence[torch.optim.Optimizer],
        scaler: Any = None,
        state: Mapping[str, Any] | None = None,
        total_steps: int | None = None,
    ) -> CoherentStrongReg:
        """Build the regulariser on the first of ``optimizers`` that holds its tensors, load
        ``state`` (or a state loaded before), then attach it; a bad state raises before
        anything is attached. ``total_steps`` (the trainer's number of optimizer steps) ends
        a budget that was given none."""
        self.detach()
        model = _unwrap(model)
        if not optimizers:
            raise RuntimeError(f"{self.who}: the trainer has no optimizer to attach to")
        params = model.named_parameters() if self.params is None else self.params(model)
        if not isinstance(scaler, torch.amp.GradScaler) or not scaler.is_enabled():
            scaler = None
        options = dict(self.options)
        budget = "target_sparsity" in options or isinstance(options.get("criterion"), Budget)
        if budget and total_steps and "total_steps" not in options:
            criterion = options.get("criterion")
            if isinstance(criterion, Budget):
                if criterion.total_steps is None:
                    options["criterion"] = dataclasses.replace(criterion, total_steps=total_steps)
            else:
                options["total_steps"] = int(total_steps)
        reg = CoherentStrongReg(params, strength=self.strength, optimizer=optimizers[0],
                                scaler=scaler, **options)  # fmt: skip
        holder = next((o for o in optimizers if _holds(o, reg.params)), optimizers[0])
        if holder is not optimizers[0]:  # the same selection, on the optimizer that holds it
            reg = CoherentStrongReg(zip(reg.names, reg.params, strict=True),
                                    strength=self.strength, optimizer=holder, scaler=scaler,
                                    **options)  # fmt: skip
        if state:
            self._pending = dict(state)
        self.piece = None
        self.attach(reg)
        self.handle = reg.attach()
        return reg

    def detach(self) -> None:
        """Take the regulariser off the optimizer (idempotent)."""
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def _holds(optimizer: torch.optim.Optimizer, tensors: Sequence[Tensor]) -> bool:
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    return all(id(t) in held for t in tensors)


class GGRDriver:
    """Holds a :class:`GenerativeGradientLoss`; the term is added in the training step."""

    who = "GGRCallback"

    def __init__(self, ggr: GenerativeGradientLoss) -> None:
        check_instance(ggr, "ggr", GenerativeGradientLoss, who=self.who,
                       what="a GenerativeGradientLoss")  # fmt: skip
        self.ggr = ggr

    def term(self, loss: Tensor, x: Tensor, scaler: Any = None) -> Tensor:
        if not isinstance(scaler, torch.amp.GradScaler) or not scaler.is_enabled():
            scaler = None
        return self.ggr(loss, x, scaler=scaler)


# --------------------------------------------------------------------------- shared constructors
class CalibrateInit:
    """The constructor of both frameworks' ``CalibrateCallback``."""

    def __init__(
        self,
        reduction: int = 4,
        *,
        targets: Iterable[str] | Callable[[str, nn.Module], bool] | None = None,
        **layer_kwargs: Unpack[LayerOptions],
    ) -> None:
        self._driver = CalibrateDriver(reduction, targets, dict(layer_kwargs))


class RifleInit:
    """The constructor and ``scheduler`` of both frameworks' ``RifleCallback``."""

    def __init__(
        self,
        *,
        num_resets: int | None = None,
        period: int | None = None,
        head: HeadSpec = None,
        total_epochs: int | None = None,
        unit: Literal["epoch", "step"] = "epoch",
        init: Callable[[nn.Module], Any] | None = None,
        reset_optimizer_state: bool = False,
        seed: int | None = None,
        min_epochs_after_last: int | None = None,
    ) -> None:
        self._driver = RifleDriver(
            num_resets=num_resets, period=period, head=head, total_epochs=total_epochs,
            unit=unit, init=init, reset_optimizer_state=reset_optimizer_state, seed=seed,
            min_epochs_after_last=min_epochs_after_last,
        )  # fmt: skip

    @property
    def scheduler(self) -> RifleScheduler | None:
        """The scheduler (``None`` until training starts and builds it)."""
        return self._driver.piece  # type: ignore[no-any-return]


class CoherentInit:
    """The constructor and ``reg`` of both frameworks' ``CoherentRegCallback``."""

    def __init__(
        self,
        *,
        strength: float | None = None,
        params: ParamsSpec = None,
        **options: Unpack[CoherentOptions],
    ) -> None:
        self._driver = CoherentDriver(strength, params, options)

    @property
    def reg(self) -> CoherentStrongReg | None:
        """The regulariser (``None`` until training starts and builds it)."""
        return self._driver.piece  # type: ignore[no-any-return]

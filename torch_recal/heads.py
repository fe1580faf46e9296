"""Finding a network's classifier head: :func:`find_classifier`, and weight-tying checks.

Used by :class:`~torch_recal.RifleScheduler` (the layer RIFLE re-initialises); useful on its
own wherever "the last layer" of a timm, torchvision or similar model is needed (e.g. the
layer to give :func:`~torch_recal.pinv_refit_dense`). ``torch_recal.rifle.find_classifier``
and ``torch_recal.find_classifier`` are the same function.
"""

from __future__ import annotations

from torch import nn

from torch_recal._checks import check_instance

__all__ = ["find_classifier"]

_HEAD_NAMES = ("fc", "classifier", "head", "heads")  # heads: torchvision ViT


def _unwrap(model: nn.Module) -> nn.Module:
    """Strip DDP / DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(inner := getattr(model, "_orig_mod", None), nn.Module):
            model = inner
        else:
            return model


def _has_own_parameters(module: nn.Module) -> bool:
    return next(module.parameters(recurse=False), None) is not None


def _final_layer(module: nn.Module, where: str) -> nn.Module:
    """``module`` itself if it holds parameters, else the last ``nn.Linear`` inside it."""
    if _has_own_parameters(module):
        return module
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if linears:
        return linears[-1]
    layers = [m for m in module.modules() if _has_own_parameters(m)]
    if layers:  # e.g. a 1x1-conv classifier
        return layers[-1]
    raise ValueError(
        f"find_classifier: {where} ({type(module).__name__}) has no parameters (a model built "
        f"with num_classes=0?); pass the head module itself, e.g. "
        f"RifleScheduler(model.my_head, ...)"
    )


def find_classifier(model: nn.Module) -> nn.Module:
    """Find the final classifier layer of a model, the layer RIFLE re-initialises.

    Looked up in this order: timm's ``model.get_classifier()``; otherwise the one attribute
    among ``fc``, ``classifier``, ``head`` and ``heads`` (torchvision's ViT) that holds a
    module. A head that is a container (``nn.Sequential``, timm's ``ClassifierHead``) gives
    its last ``nn.Linear`` (or, with no Linear inside, its last layer with parameters, e.g. a
    1x1 conv). DDP / DataParallel and ``torch.compile`` wrappers are looked through.

    Paper: Li et al., https://arxiv.org/abs/2007.03349

    Args:
        model: the network.

    Returns:
        The classifier layer (a module of ``model``, not a copy).

    Raises:
        ValueError: no head found, more than one candidate attribute, or a head without
            parameters. The message says how to pass the head explicitly.

    Example:
        >>> from torch import nn
        >>> from torch_recal import find_classifier
        >>> from torch_recal.models import resnet20
        >>> model = resnet20(num_classes=5)
        >>> find_classifier(model) is model.fc
        True
        >>> net = nn.Module()
        >>> net.body = nn.Linear(8, 8)
        >>> net.classifier = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> find_classifier(net) is net.classifier[2]
        True
    """
    check_instance(model, "model", nn.Module, who="find_classifier", what="an nn.Module")
    model = _unwrap(model)
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):
        head = get_classifier()
        if isinstance(head, nn.Module):
            return _final_layer(head, "`model`.get_classifier()")
        raise ValueError(
            f"find_classifier: `model`.get_classifier() ({type(model).__name__}) returned "
            f"{type(head).__name__}, not one module (e.g. a distilled model with two heads); "
            f"pass the head(s) explicitly: RifleScheduler(list_of_head_modules, ...)"
        )
    found = [name for name in _HEAD_NAMES if isinstance(getattr(model, name, None), nn.Module)]
    if len(found) > 1:
        raise ValueError(
            f"find_classifier: `model` ({type(model).__name__}) has several candidate heads "
            f"{found} (ambiguous); pass the head module itself, e.g. "
            f"RifleScheduler(model.{found[-1]}, ...)"
        )
    if not found:
        raise ValueError(
            f"find_classifier: `model` ({type(model).__name__}) has no get_classifier(), fc, "
            f"classifier, head or heads; pass the head module itself, e.g. "
            f"RifleScheduler(model.my_head, ...), or a list of modules for a multi-layer head"
        )
    return _final_layer(getattr(model, found[0]), f"`model`.{found[0]}")


def _tied_elsewhere(model: nn.Module, head: nn.Module) -> list[tuple[str, str]]:
    """``(head parameter, other name)`` for each head parameter that a module outside the
    head also holds (weight tying, e.g. an output layer sharing the embedding's weight)."""
    inside = {id(m) for m in head.modules()}
    own = {id(p): name for name, p in head.named_parameters(remove_duplicate=False)}
    tied = []
    for prefix, module in model.named_modules(remove_duplicate=False):
        if id(module) in inside:  # the head itself, also under an alias
            continue
        for name, p in module._parameters.items():
            if p is not None and id(p) in own:
                tied.append((own[id(p)], f"{prefix}.{name}" if prefix else name))
    return tied

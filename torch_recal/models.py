"""Small reference ResNets: CIFAR-style ResNet-20/32/56 (He et al. 2016, section 4.2).

Three stages of ``n`` basic blocks with 16/32/64 channels; where the width or stride
changes, the shortcut is a 1x1 convolution with batch norm (the projection shortcuts used
by the ResCNet paper's CIFAR baselines). Each block has two empty slots applied to the
residual branch after its last norm: ``se`` (squeeze-and-excitation, for the SE-ResNet
baseline: reduction 4 and PyTorch's default initialisation, as the ResCNet authors' baseline)
and ``calibration`` (filled by :func:`torch_recal.calibrate`, or at construction with
``calibrated=True``). A calibrated block hands its calibration the shortcut, which returns
the block's tail ``relu(shortcut + U + w U)`` as one fused kernel.

Paper: Xu et al., https://arxiv.org/abs/2411.13582 (ResCNet-32/56 are these ResNets,
calibrated with ``reduction=4``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from einops import rearrange, reduce
from torch import Tensor, nn
from typing_extensions import TypedDict, Unpack, override

from torch_recal._checks import check_flag, check_instance, check_int, check_tensor
from torch_recal.calibration import ResponseCalibration

__all__ = ["BasicBlock", "CifarResNet", "SqueezeExcite", "resnet20", "resnet32", "resnet56"]

SE_REDUCTION = 4  # the ResCNet authors' SE-ResNet baseline (Hu et al. use 16 on ImageNet)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (Hu et al., https://arxiv.org/abs/1709.01507), for baselines.

    ``x * sigmoid(fc2(relu(fc1(mean_hw(x)))))`` with hidden width
    ``max(1, channels // reduction)``. The defaults are the ResCNet authors' SE-ResNet
    baseline (https://arxiv.org/abs/2411.13582): reduction 4 and PyTorch's default
    initialisation of the two Linear layers.

    Args:
        channels: number of channels ``C`` of the ``(N, C, H, W)`` input.
        reduction: ``C // reduction`` hidden units (at least 1).

    Example:
        >>> import torch
        >>> se = SqueezeExcite(16)
        >>> se.fc1.out_features
        4
        >>> se(torch.randn(2, 16, 8, 8)).shape
        torch.Size([2, 16, 8, 8])
    """

    def __init__(self, channels: int, reduction: int = SE_REDUCTION) -> None:
        who = "SqueezeExcite"
        channels = check_int(channels, "channels", who=who, minimum=1)
        reduction = check_int(reduction, "reduction", who=who, minimum=1)
        super().__init__()
        self.channels, self.reduction = channels, reduction
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def reset_parameters(self) -> None:
        """PyTorch's default Linear initialisation (as the authors' baseline)."""
        self.fc1.reset_parameters()
        self.fc2.reset_parameters()

    @override
    def forward(self, x: Tensor) -> Tensor:
        check_tensor(x, "x", who="SqueezeExcite", ndim=4, floating=True)
        squeezed = reduce(x, "n c h w -> n c", "mean")
        scale = torch.sigmoid(self.fc2(torch.relu(self.fc1(squeezed))))
        return x * rearrange(scale, "n c -> n c 1 1")

    @override
    def extra_repr(self) -> str:
        return f"{self.channels}, reduction={self.reduction}"


class BasicBlock(nn.Module):
    """3x3-3x3 residual block with a projection shortcut when the shape changes.

    Two slots act on the residual branch after its last norm, before the shortcut add:
    ``se`` (a :class:`SqueezeExcite`, with ``se=True``) and ``calibration``. A
    :class:`~torch_recal.ResponseCalibration` in the ``calibration`` slot is called with the
    shortcut, ``self.calibration(out, shortcut)``, and returns the block's output
    ``relu(shortcut + U + w U)`` as one fused kernel; any other module is called on the
    branch, ``relu(self.calibration(out) + shortcut)``. Both go through
    ``nn.Module.__call__``, so forward hooks on the slot fire.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        stride: stride of the first convolution (and of the projection shortcut).
        se: add squeeze-and-excitation (SE-ResNet).
        calibration: a module for the ``calibration`` slot (or ``None``).
        se_reduction: the SE module's reduction (4: the ResCNet authors' baseline).

    Example:
        >>> import torch
        >>> BasicBlock(16, 32, stride=2)(torch.randn(2, 16, 8, 8)).shape
        torch.Size([2, 32, 4, 4])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        *,
        se: bool = False,
        calibration: nn.Module | None = None,
        se_reduction: int = SE_REDUCTION,
    ) -> None:
        who = "BasicBlock"
        in_channels = check_int(in_channels, "in_channels", who=who, minimum=1)
        out_channels = check_int(out_channels, "out_channels", who=who, minimum=1)
        stride = check_int(stride, "stride", who=who, minimum=1)
        se = check_flag(se, "se", who=who)
        se_reduction = check_int(se_reduction, "se_reduction", who=who, minimum=1)
        if calibration is not None:
            check_instance(
                calibration, "calibration", nn.Module, who=who, what="an nn.Module or None"
            )
            if isinstance(calibration, ResponseCalibration) and (
                calibration.channels != out_channels or calibration.channel_dim != 1
            ):
                raise ValueError(
                    f"{who}: `calibration` must calibrate {out_channels} channels in dim 1, got "
                    f"{calibration.channels} channels in dim {calibration.channel_dim}"
                )
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.se = SqueezeExcite(out_channels, se_reduction) if se else None
        self.calibration = calibration
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    @override
    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.se is not None:
            out = self.se(out)
        if isinstance(self.calibration, ResponseCalibration):
            block_out: Tensor = self.calibration(out, shortcut)  # fused relu(shortcut + U + wU)
            return block_out
        if self.calibration is not None:
            out = self.calibration(out)
        return torch.relu(out + shortcut)


class ResNetOptions(TypedDict, total=False):
    """Keyword arguments of :func:`resnet20`, :func:`resnet32` and :func:`resnet56`."""

    num_classes: int
    in_chans: int
    widths: tuple[int, int, int]
    se: bool
    calibrated: bool
    reduction: int
    se_reduction: int


class CifarResNet(nn.Module):
    """CIFAR-style ResNet of depth ``6n + 2`` (20, 32, 56, ...).

    Initialised as the ResCNet authors' CIFAR code: Kaiming-normal convolutions, unit/zero
    norms, N(0, 0.01) weights and zero biases for the classifier and the calibrations; the
    squeeze-and-excitation modules of ``se=True`` keep PyTorch's default initialisation (the
    authors' SE-ResNet baseline).

    Args:
        depth: ``6n + 2``.
        num_classes: classifier outputs.
        in_chans: input channels (3 for CIFAR, 1 for (Fashion-)MNIST).
        widths: channels of the three stages.
        se: add squeeze-and-excitation to every block (SE-ResNet).
        calibrated: add a :class:`ResponseCalibration` to every block (ResCNet).
        reduction: the calibration's MLP reduction.
        se_reduction: the SE modules' reduction (4: the ResCNet authors' SE-ResNet baseline).

    Example:
        >>> import torch
        >>> from torch_recal.models import CifarResNet
        >>> CifarResNet(20, num_classes=10)(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        depth: int,
        num_classes: int = 10,
        in_chans: int = 3,
        widths: tuple[int, int, int] = (16, 32, 64),
        *,
        se: bool = False,
        calibrated: bool = False,
        reduction: int = 4,
        se_reduction: int = SE_REDUCTION,
    ) -> None:
        who = "CifarResNet"
        depth = check_int(depth, "depth", who=who, minimum=8)
        if (depth - 2) % 6 != 0:
            raise ValueError(f"{who}: `depth` must be 6n + 2 (20, 32, 56, ...), got {depth}")
        num_classes = check_int(num_classes, "num_classes", who=who, minimum=1)
        in_chans = check_int(in_chans, "in_chans", who=who, minimum=1)
        widths = _check_widths(widths, who=who)
        se = check_flag(se, "se", who=who)
        calibrated = check_flag(calibrated, "calibrated", who=who)
        reduction = check_int(reduction, "reduction", who=who, minimum=1)
        se_reduction = check_int(se_reduction, "se_reduction", who=who, minimum=1)
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages = []
        in_ch = widths[0]
        for i, width in enumerate(widths):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                calib = ResponseCalibration(width, reduction) if calibrated else None
                blocks.append(
                    BasicBlock(
                        in_ch, width, stride, se=se, calibration=calib, se_reduction=se_reduction
                    )
                )
                in_ch = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(in_ch, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-normal convs, unit/zero norms, N(0, 0.01) classifier and calibrations
        (official CIFAR code); SE modules get PyTorch's default init (authors' baseline)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, (ResponseCalibration, SqueezeExcite)):
                m.reset_parameters()
        nn.init.normal_(self.fc.weight, 0.0, 0.01)
        nn.init.zeros_(self.fc.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        """Pooled features, shape ``(N, widths[-1])`` (the classifier's input)."""
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return reduce(x, "n c h w -> n c", "mean")

    @override
    def forward(self, x: Tensor) -> Tensor:
        logits: Tensor = self.fc(self.forward_features(x))
        return logits

    def get_classifier(self) -> nn.Module:
        """The classifier head (timm-style)."""
        return self.fc


def _check_widths(widths: Any, *, who: str) -> tuple[int, int, int]:
    if not isinstance(widths, Sequence) or isinstance(widths, str):
        raise TypeError(
            f"{who}: `widths` must be a sequence of 3 ints, got {type(widths).__name__}"
        )
    if len(widths) != 3:
        raise ValueError(f"{who}: `widths` must have 3 entries (one per stage), got {len(widths)}")
    a, b, c = (check_int(w, "widths", who=who, minimum=1) for w in widths)
    return a, b, c


def resnet20(**kwargs: Unpack[ResNetOptions]) -> CifarResNet:
    """CIFAR ResNet-20 (see :class:`CifarResNet` for the keyword arguments).

    Example:
        >>> from torch_recal.models import resnet20
        >>> sum(p.numel() for p in resnet20().parameters()) > 0
        True
    """
    return CifarResNet(20, **kwargs)


def resnet32(**kwargs: Unpack[ResNetOptions]) -> CifarResNet:
    """CIFAR ResNet-32; ``resnet32(calibrated=True)`` is the paper's ResCNet-32.

    Example:
        >>> from torch_recal.models import resnet32
        >>> model = resnet32(calibrated=True)
    """
    return CifarResNet(32, **kwargs)


def resnet56(**kwargs: Unpack[ResNetOptions]) -> CifarResNet:
    """CIFAR ResNet-56; ``resnet56(calibrated=True)`` is the paper's ResCNet-56.

    Example:
        >>> from torch_recal.models import resnet56
        >>> model = resnet56(calibrated=True)
    """
    return CifarResNet(56, **kwargs)

"""Small reference ResNets: CIFAR-style ResNet-20/32/56 (He et al. 2016, section 4.2).

Three stages of ``n`` basic blocks with 16/32/64 channels; where the width or stride
changes, the shortcut is a 1x1 convolution with batch norm (the projection shortcuts used
by the ResCNet paper's CIFAR baselines). Each block has two empty slots applied to the
residual branch after its last norm: ``se`` (squeeze-and-excitation, for the SE-ResNet
baseline) and ``calibration`` (filled by :func:`torch_recal.calibrate`, or at construction
with ``calibrated=True``). A calibrated block runs its tail ``relu(shortcut + U + w U)`` as
one fused kernel.

Paper: Xu et al., https://arxiv.org/abs/2411.13582 (ResCNet-32/56 are these ResNets,
calibrated with ``reduction=4``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from torch_recal.calibration import ResponseCalibration

__all__ = ["BasicBlock", "CifarResNet", "SqueezeExcite", "resnet20", "resnet32", "resnet56"]


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (Hu et al., https://arxiv.org/abs/1709.01507), for baselines.

    Example:
        >>> import torch
        >>> SqueezeExcite(16)(torch.randn(2, 16, 8, 8)).shape
        torch.Size([2, 16, 8, 8])
    """

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: Tensor) -> Tensor:
        scale = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean(dim=(2, 3))))))
        return x * scale[:, :, None, None]


class BasicBlock(nn.Module):
    """3x3-3x3 residual block with a projection shortcut when the shape changes.

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
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.se = SqueezeExcite(out_channels) if se else None
        self.calibration = calibration
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.se is not None:
            out = self.se(out)
        if isinstance(self.calibration, ResponseCalibration):
            return self.calibration.forward_residual(out, shortcut)
        if self.calibration is not None:
            out = self.calibration(out)
        return torch.relu(out + shortcut)


class CifarResNet(nn.Module):
    """CIFAR-style ResNet of depth ``6n + 2`` (20, 32, 56, ...).

    Args:
        depth: ``6n + 2``.
        num_classes: classifier outputs.
        in_chans: input channels (3 for CIFAR, 1 for (Fashion-)MNIST).
        widths: channels of the three stages.
        se: add squeeze-and-excitation to every block (SE-ResNet).
        calibrated: add a :class:`ResponseCalibration` to every block (ResCNet).
        reduction: the calibration's MLP reduction.

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
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"CifarResNet: `depth` must be 6n + 2 (20, 32, 56, ...), got {depth}")
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
                blocks.append(BasicBlock(in_ch, width, stride, se=se, calibration=calib))
                in_ch = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(in_ch, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-normal convs, unit/zero norms, N(0, 0.01) linears (official CIFAR code)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        """Pooled features, shape ``(N, widths[-1])`` (the classifier's input)."""
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return x.mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        """The classifier head (timm-style)."""
        return self.fc


def resnet20(**kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-20 (see :class:`CifarResNet` for the keyword arguments).

    Example:
        >>> from torch_recal.models import resnet20
        >>> sum(p.numel() for p in resnet20().parameters()) > 0
        True
    """
    return CifarResNet(20, **kwargs)


def resnet32(**kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-32; ``resnet32(calibrated=True)`` is the paper's ResCNet-32.

    Example:
        >>> from torch_recal.models import resnet32
        >>> model = resnet32(calibrated=True)
    """
    return CifarResNet(32, **kwargs)


def resnet56(**kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-56; ``resnet56(calibrated=True)`` is the paper's ResCNet-56.

    Example:
        >>> from torch_recal.models import resnet56
        >>> model = resnet56(calibrated=True)
    """
    return CifarResNet(56, **kwargs)

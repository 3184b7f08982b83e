"""ResNet backbones with torchvision's parameter layout, and the sine position encoding.

The layout (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer1.0.downsample.0``
...) is torchvision's, so published ImageNet and Deformable DETR backbone
weights load unchanged. Pretrained weights go with frozen BatchNorm; training
from scratch (the tiny preset) with ordinary BatchNorm.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.blocks import sine_encoding

__all__ = [
    "Backbone",
    "FrozenBatchNorm2d",
    "Joiner",
    "PositionEmbeddingSine",
    "ResNet",
    "resize_mask",
    "resnet",
]


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters (buffers, not parameters)."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # torchvision checkpoints carry num_batches_tracked, which has no meaning here.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale[None, :, None, None] + shift[None, :, None, None]


def _norm(kind: str):
    if kind == "frozen":
        return FrozenBatchNorm2d
    if kind == "batch":
        return nn.BatchNorm2d
    raise ValueError(f"norm must be 'frozen' or 'batch', got {kind!r}")


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int, norm: type[nn.Module]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = norm(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = norm(planes)
        self.downsample = _downsample(inplanes, planes * self.expansion, stride, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck: the stride sits in the 3x3 convolution."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, norm: type[nn.Module]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = norm(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = norm(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = norm(planes * self.expansion)
        self.downsample = _downsample(inplanes, planes * self.expansion, stride, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(self.bn3(self.conv3(out)) + identity)


def _downsample(inplanes: int, outplanes: int, stride: int, norm: type[nn.Module]) -> nn.Module:
    if stride == 1 and inplanes == outplanes:
        return None
    return nn.Sequential(nn.Conv2d(inplanes, outplanes, 1, stride, bias=False), norm(outplanes))


class ResNet(nn.Module):
    """ResNet trunk returning the last ``num_outputs`` of layer1..layer4 (C2..C5, strides
    4, 8, 16, 32): C3..C5 by default (detection); all four for a segmenter's pixel decoder.

    Args:
        block: ``"basic"`` (ResNet-18/34) or ``"bottleneck"`` (ResNet-50).
        depths: blocks per stage.
        widths: channels of each stage (before the bottleneck expansion).
        norm: ``"frozen"`` for pretrained weights, ``"batch"`` to train from scratch.
    """

    def __init__(
        self,
        block: str,
        depths: Sequence[int],
        widths: Sequence[int] = (64, 128, 256, 512),
        norm: str = "frozen",
        stem_width: int | None = None,
    ) -> None:
        super().__init__()
        block_cls = {"basic": BasicBlock, "bottleneck": Bottleneck}[block]
        norm_cls = _norm(norm)
        stem = stem_width or widths[0]
        self.conv1 = nn.Conv2d(3, stem, 7, 2, 3, bias=False)
        self.bn1 = norm_cls(stem)
        inplanes = stem
        for i, (depth, width) in enumerate(zip(depths, widths, strict=True)):
            blocks = []
            for j in range(depth):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(block_cls(inplanes, width, stride, norm_cls))
                inplanes = width * block_cls.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        #: channels and strides of C2..C5
        self.num_channels = [w * block_cls.expansion for w in widths]
        self.strides = [4, 8, 16, 32]
        #: how many of C2..C5 forward returns (the last ones)
        self.num_outputs = 3
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        return [c2, c3, c4, self.layer4(c4)][4 - self.num_outputs :]


def resnet(name: str = "resnet50", norm: str = "frozen") -> ResNet:
    """``resnet18``, ``resnet34`` or ``resnet50`` in torchvision's layout."""
    specs = {
        "resnet18": ("basic", (2, 2, 2, 2)),
        "resnet34": ("basic", (3, 4, 6, 3)),
        "resnet50": ("bottleneck", (3, 4, 6, 3)),
    }
    if name not in specs:
        raise ValueError(f"backbone must be one of {sorted(specs)}, got {name!r}")
    block, depths = specs[name]
    return ResNet(block, depths, norm=norm)


def resize_mask(mask: torch.Tensor, size) -> torch.Tensor:
    """Nearest-neighbour resize of a (N, H, W) padding mask to ``size`` (h, w).

    ``F.interpolate(mode="nearest")`` in eager mode, as the reference does.
    While exporting to ONNX the same source pixels are gathered explicitly
    (floor(i * H/h) in float32, PyTorch's rule): the exporter's Resize picks
    other pixels for some sizes, which moved the valid border of a level.
    """
    if not torch.onnx.is_in_onnx_export():
        return F.interpolate(mask[None].float(), size=size)[0].to(torch.bool)
    H, W = mask.shape[-2:]
    h, w = size
    rows = (torch.arange(h, device=mask.device, dtype=torch.float32) * (H / h)).floor().long()
    cols = (torch.arange(w, device=mask.device, dtype=torch.float32) * (W / w)).floor().long()
    return mask[:, rows.clamp(max=H - 1)][:, :, cols.clamp(max=W - 1)]


class Backbone(nn.Module):
    """Holds the trunk as ``body`` (the reference's ``backbone.0.body`` prefix)."""

    def __init__(self, body: nn.Module, num_channels: Sequence[int], strides: Sequence[int]):
        super().__init__()
        self.body = body
        self.num_channels = list(num_channels)
        self.strides = list(strides)

    def forward(self, images: torch.Tensor, mask: torch.Tensor):
        """images (N, 3, H, W), mask (N, H, W) True on padding -> [(feature, mask)] per level."""
        out = []
        for feature in self.body(images):
            m = resize_mask(mask, feature.shape[-2:])
            out.append((feature, m))
        return out


class PositionEmbeddingSine(nn.Module):
    """Sine/cosine encoding of normalised pixel positions: (N, H, W) padding mask ->
    (N, 2*num_pos_feats, H, W), y features first, then x.

    ``offset``: subtracted from the 1-based positions before normalising: 0.5 is
    Deformable DETR's variant, 0 DETR's and Mask2Former's.
    """

    def __init__(
        self,
        num_pos_feats: int = 128,
        temperature: float = 10000,
        normalize: bool = True,
        scale: float = 2 * math.pi,
        offset: float = 0.5,
    ) -> None:
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale
        self.offset = offset

    def forward(self, mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        not_mask = (~mask).to(dtype)
        y_embed = not_mask.cumsum(1)
        x_embed = not_mask.cumsum(2)
        if self.normalize:
            eps = 1e-6
            y_embed = (y_embed - self.offset) / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = (x_embed - self.offset) / (x_embed[:, :, -1:] + eps) * self.scale
        pos_x = sine_encoding(x_embed, self.num_pos_feats, self.temperature)
        pos_y = sine_encoding(y_embed, self.num_pos_feats, self.temperature)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


class Joiner(nn.Sequential):
    """backbone.0 = the trunk, backbone.1 = the position encoding (the reference's layout)."""

    def __init__(self, backbone: Backbone, position_embedding: PositionEmbeddingSine):
        super().__init__(backbone, position_embedding)
        self.num_channels = backbone.num_channels
        self.strides = backbone.strides

    def forward(self, images: torch.Tensor, mask: torch.Tensor):
        """-> list of (feature, mask, pos) per backbone level."""
        return [(f, m, self[1](m, f.dtype)) for f, m in self[0](images, mask)]

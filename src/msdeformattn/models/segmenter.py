"""Semantic segmentation: a ResNet, Mask2Former's pixel decoder and a per-pixel classifier.

``DeformableSegmenter`` classifies every pixel of the decoder's stride-4 mask features with
a 1x1 convolution and is trained with cross-entropy; ``decoder="fpn"`` is its baseline, the
same model without deformable attention (a plain FPN from C5 down to stride 4).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from ..util.errors import UsageError
from .backbone import ResNet
from .config import DeformableDETRConfig, check_choices, check_positive_ints
from .deformable_detr import build_trunk
from .pixel_decoder import MSDeformAttnPixelDecoder

__all__ = ["DeformableSegmenter", "SegmenterConfig"]

#: The trunk's fields, named and validated as in :class:`DeformableDETRConfig`.
_TRUNK_FIELDS = (
    "backbone",
    "backbone_norm",
    "backbone_block",
    "backbone_widths",
    "backbone_depths",
    "backbone_stem",
)
#: ResNet stages the pixel decoder reads: C2..C5, strides 4 to 32.
_STAGES = 4


@dataclass(frozen=True)
class SegmenterConfig:
    """Model hyper-parameters; the defaults are Mask2Former's (ResNet-50, d_model 256, six
    encoder layers) with ADE20K's 150 classes."""

    num_classes: int = 150
    backbone: str = "resnet50"
    #: "frozen" BatchNorm for pretrained backbones, "batch" to train from scratch.
    backbone_norm: str = "frozen"
    #: A custom trunk (block type, widths and blocks per stage, stem width); overrides ``backbone``.
    backbone_block: str = "basic"
    backbone_widths: tuple[int, ...] | None = None
    backbone_depths: tuple[int, ...] | None = None
    backbone_stem: int | None = None
    #: "deformable": Mask2Former's pixel decoder (``enc_layers`` deformable layers over
    #: C3..C5, then the FPN to stride 4); "fpn": the baseline without them, a plain FPN
    #: over C5..C2 (``nheads``, ``n_points``, ``enc_layers``, ``dim_feedforward`` unused).
    decoder: str = "deformable"
    d_model: int = 256
    mask_dim: int = 256
    nheads: int = 8
    n_points: int = 4
    enc_layers: int = 6
    dim_feedforward: int = 1024
    dropout: float = 0.0
    #: Target value of pixels the loss skips (unlabelled, padding).
    ignore_index: int = 255
    backend: str | None = None

    def __post_init__(self) -> None:
        _trunk_config(self)  # the detector's checks of the trunk fields
        check_choices(self, {"decoder": ("deformable", "fpn")})
        check_positive_ints(
            self,
            (
                "num_classes",
                "d_model",
                "mask_dim",
                "nheads",
                "n_points",
                "enc_layers",
                "dim_feedforward",
            ),
            hints={"enc_layers": " (decoder='fpn' is the model without them)"},
        )
        if self.d_model % 32 != 0:
            raise UsageError(
                f"d_model must be a multiple of 32 (GroupNorm's groups), got {self.d_model}"
            )
        if self.d_model % self.nheads != 0:
            raise UsageError(
                f"d_model must be divisible by nheads, got d_model={self.d_model}, "
                f"nheads={self.nheads}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise UsageError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.ignore_index, int) or 0 <= self.ignore_index < self.num_classes:
            raise UsageError(
                f"ignore_index must be an integer outside the classes [0, {self.num_classes}), "
                f"got {self.ignore_index!r}"
            )
        for name in ("backbone_widths", "backbone_depths"):
            value = getattr(self, name)
            if value is not None and (
                len(value) != _STAGES or any(not isinstance(v, int) or v < 1 for v in value)
            ):
                raise UsageError(
                    f"{name} must be {_STAGES} positive integers (C2..C5), got {value!r}"
                )

    @classmethod
    def tiny(cls, num_classes: int, **overrides) -> SegmenterConfig:
        """A model that trains on a laptop CPU: a basic-block trunk of widths 32-256 with one
        block per stage and trainable BatchNorm, d_model 64, two encoder layers."""
        base = cls(
            num_classes=num_classes,
            backbone_norm="batch",
            backbone_widths=(32, 64, 128, 256),
            backbone_depths=(1, 1, 1, 1),
            d_model=64,
            mask_dim=64,
            nheads=4,
            enc_layers=2,
            dim_feedforward=256,
        )
        return replace(base, **overrides)


def _trunk_config(config: SegmenterConfig) -> DeformableDETRConfig:
    """A detector config holding ``config``'s trunk fields, for the detector's trunk builder."""
    return DeformableDETRConfig(**{name: getattr(config, name) for name in _TRUNK_FIELDS})


def _build_trunk(config: SegmenterConfig) -> ResNet:
    """The ResNet of ``config``, returning all four maps C2..C5."""
    body = build_trunk(config)
    body.num_outputs = _STAGES
    return body


class DeformableSegmenter(nn.Module):
    """The segmenter: ResNet (C2..C5) -> :class:`MSDeformAttnPixelDecoder` -> a 1x1
    convolution from the mask features to class logits, at stride 4.

    ``model(images, mask=None)`` gives the logits, :meth:`predict` the label map at the
    input size and :meth:`loss` the cross-entropy against a label map; ``model.config``
    keeps the config.

    Example:
        >>> model = DeformableSegmenter(SegmenterConfig.tiny(num_classes=3)).eval()
        >>> model(torch.randn(2, 3, 64, 96)).shape
        torch.Size([2, 3, 16, 24])
        >>> model.predict(torch.randn(2, 3, 64, 96)).shape
        torch.Size([2, 64, 96])
    """

    def __init__(self, config: SegmenterConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = _build_trunk(config)
        fpn = config.decoder == "fpn"
        self.pixel_decoder = MSDeformAttnPixelDecoder(
            self.backbone.num_channels,
            d_model=config.d_model,
            mask_dim=config.mask_dim,
            n_heads=config.nheads,
            n_points=config.n_points,
            num_encoder_layers=0 if fpn else config.enc_layers,
            d_ffn=config.dim_feedforward,
            dropout=config.dropout,
            # Without encoder layers only the finest encoder level reaches the FPN: with
            # three, C4 and C5 would feed nothing. With one (C5), every map takes an FPN step.
            n_levels=1 if fpn else 3,
            backend=config.backend,
        )
        if fpn:
            # Read by encoder layers only: frozen, so optimisers and DDP see no unused parameter.
            self.pixel_decoder.transformer.level_embed.requires_grad_(False)
        self.classifier = nn.Conv2d(config.mask_dim, config.num_classes, 1)
        # As the decoder's own 1x1 mask projection before it.
        nn.init.kaiming_uniform_(self.classifier.weight, a=1)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits at stride 4.

        Args:
            images (Tensor[N, 3, H, W]): any H and W.
            mask (Tensor[N, H, W], bool, optional): True on padding, valid region at the top
                left (None: no padding).

        Returns:
            Tensor[N, num_classes, ceil(H / 4), ceil(W / 4)]: logits on the trunk's C2 grid;
            those at padded pixels are unspecified.

        The pixel decoder ignores padding exactly; the trunk's convolutions do not, so the
        padding's content reaches the logits near the valid region's border (as in the
        detector).
        """
        self._check(images, mask)
        features = self.backbone(images)
        return self.classifier(self.pixel_decoder(features, mask).mask_features)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Per-pixel labels at the input size, without gradients and in the current mode
        (call ``eval()`` first).

        images (N, 3, H, W), mask (N, H, W) as :meth:`forward` ->
        (N, H, W) int64: the argmax of the logits upsampled bilinearly to (H, W);
        ``config.ignore_index`` at padded pixels.
        """
        logits = self(images, mask)
        labels = _upsample(logits, images.shape[-2:]).argmax(1)
        if mask is not None:
            labels = labels.masked_fill(mask, self.config.ignore_index)
        return labels

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of ``logits`` upsampled bilinearly to the target's size.

        Args:
            logits (Tensor[N, num_classes, h, w]): :meth:`forward`'s output.
            target (Tensor[N, H, W], int64): class indices; ``config.ignore_index`` at pixels
                to skip (unlabelled, and padding).

        Returns:
            Tensor[]: the mean over the pixels not skipped; 0 (with a gradient graph) when
            every pixel is skipped.
        """
        K = self.config.num_classes
        if logits.dim() != 4 or logits.shape[1] != K:
            raise ValueError(f"logits must have shape (N, {K}, h, w), got {tuple(logits.shape)}")
        if target.dtype != torch.int64 or target.dim() != 3 or target.shape[0] != logits.shape[0]:
            raise ValueError(
                f"target must be an int64 tensor (N, H, W) with N = {logits.shape[0]}, "
                f"got {target.dtype} {tuple(target.shape)}"
            )
        ignore = self.config.ignore_index
        total = F.cross_entropy(
            _upsample(logits, target.shape[-2:]), target, ignore_index=ignore, reduction="sum"
        )
        # The mean over counted pixels, without cross_entropy's 0/0 when there are none.
        return total / (target != ignore).sum().clamp(min=1)

    def _check(self, images: torch.Tensor, mask: torch.Tensor | None) -> None:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape (N, 3, H, W), got {tuple(images.shape)}")
        want = (images.shape[0], *images.shape[2:])
        if mask is not None and (mask.shape != want or mask.dtype != torch.bool):
            raise ValueError(
                f"mask must be a bool tensor of shape {want} (True on padding), "
                f"got {mask.dtype} {tuple(mask.shape)}"
            )


def _upsample(logits: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)

"""Semantic segmentation: a ResNet, Mask2Former's pixel decoder and one of two heads.

``DeformableSegmenter`` with ``head="per_pixel"`` classifies every pixel of the decoder's
stride-4 mask features with a 1x1 convolution and is trained with cross-entropy; with
``head="mask2former"`` Mask2Former's masked-attention query decoder predicts a class and a
mask per query, trained with the set loss of :mod:`.mask_losses`.
``decoder="fpn"`` is the baseline of either, the same model without deformable attention
(a plain FPN from C5 down to stride 4).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from ..util.errors import UsageError
from .backbone import ResNet
from .config import LAPTOP_TRUNK, DeformableDETRConfig, check_choices, check_positive_ints
from .deformable_detr import build_trunk
from .mask2former_head import MaskedAttentionDecoder, semantic_scores
from .mask_losses import MaskSetLoss
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
    #: "per_pixel": a 1x1 classifier of the mask features, cross-entropy; "mask2former":
    #: Mask2Former's masked-attention query decoder and its set loss. Checkpoints written
    #: before this field load as "per_pixel".
    head: str = "per_pixel"
    #: The mask2former head's queries, layers (layer i reads level i % 3, coarsest first)
    #: and feed-forward width: Mask2Former's (its DEC_LAYERS of 10 counts the prediction
    #: before the first layer). Unused by the per-pixel head.
    num_queries: int = 100
    dec_layers: int = 9
    dec_dim_feedforward: int = 2048

    def __post_init__(self) -> None:
        _trunk_config(self)  # the detector's checks of the trunk fields
        check_choices(
            self, {"decoder": ("deformable", "fpn"), "head": ("per_pixel", "mask2former")}
        )
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
                "num_queries",
                "dec_layers",
                "dec_dim_feedforward",
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
        block per stage and trainable BatchNorm, d_model 64, two encoder layers; for the
        mask2former head 16 queries and 3 decoder layers (one round over the levels)."""
        base = cls(
            num_classes=num_classes,
            **LAPTOP_TRUNK,
            d_model=64,
            mask_dim=64,
            nheads=4,
            enc_layers=2,
            dim_feedforward=256,
            num_queries=16,
            dec_layers=3,
            dec_dim_feedforward=256,
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
    """The segmenter: ResNet (C2..C5) -> :class:`MSDeformAttnPixelDecoder` -> the head:
    a 1x1 convolution from the mask features to class logits at stride 4 (``per_pixel``),
    or :class:`MaskedAttentionDecoder` (``mask2former``).

    ``model(images, mask=None)`` gives the head's outputs, :meth:`semantic_logits` the class
    scores at the input size, :meth:`predict` the label map at the input size and
    :meth:`loss` the head's loss against a label map; ``model.config`` keeps the config.

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
        if config.head == "per_pixel":
            self.classifier = nn.Conv2d(config.mask_dim, config.num_classes, 1)
            # As the decoder's own 1x1 mask projection before it.
            nn.init.kaiming_uniform_(self.classifier.weight, a=1)
            nn.init.zeros_(self.classifier.bias)
        else:
            # Mask2Former's name for its query decoder (sem_seg_head.predictor).
            self.predictor = MaskedAttentionDecoder(
                config.num_classes,
                d_model=config.d_model,
                mask_dim=config.mask_dim,
                num_queries=config.num_queries,
                nheads=config.nheads,
                dim_feedforward=config.dec_dim_feedforward,
                num_layers=config.dec_layers,
                num_levels=self.pixel_decoder.n_levels,
                dropout=config.dropout,
            )
            self.criterion = MaskSetLoss(config.num_classes, config.ignore_index)

    def forward(
        self, images: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor | dict:
        """The head's outputs.

        Args:
            images (Tensor[N, 3, H, W]): any H and W.
            mask (Tensor[N, H, W], bool, optional): True on padding, valid region at the top
                left (None: no padding).

        Returns:
            per_pixel: Tensor[N, num_classes, ceil(H / 4), ceil(W / 4)], logits on the
            trunk's C2 grid. mask2former: the dict of :meth:`MaskedAttentionDecoder.forward`
            (``pred_logits`` (N, Q, num_classes + 1), ``pred_masks`` (N, Q, h, w) on the C2
            grid, ``aux_outputs``). Either is what :meth:`loss` takes; class scores at the
            input size, whatever the head, come from :meth:`semantic_logits`. Values at
            padded pixels are unspecified.

        The pixel decoder and the query decoder ignore padding exactly; the trunk's
        convolutions do not, so the padding's content reaches the outputs near the valid
        region's border (as in the detector).
        """
        self._check(images, mask)
        decoded = self.pixel_decoder(self.backbone(images), mask)
        if self.config.head == "per_pixel":
            return self.classifier(decoded.mask_features)
        return self.predictor(decoded.mask_features, decoded.multi_scale_features, mask)

    @torch.no_grad()
    def semantic_logits(
        self,
        images: torch.Tensor,
        mask: torch.Tensor | None = None,
        size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Class scores at the input size (or ``size``), without gradients, in the current mode.

        images (N, 3, H, W), mask (N, H, W) as :meth:`forward` -> (N, num_classes, H, W):
        per_pixel, the logits upsampled bilinearly; mask2former, Mask2Former's semantic
        inference (:func:`semantic_scores`) with the mask logits upsampled bilinearly
        first. ``size``: another output size, e.g. an image's own before it was resized
        for the model (one interpolation, not two). Values at padded pixels are unspecified.
        """
        outputs = self(images, mask)
        size = tuple(images.shape[-2:]) if size is None else size
        if self.config.head == "per_pixel":
            return _upsample(outputs, size)
        return semantic_scores(outputs["pred_logits"], outputs["pred_masks"], size)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Per-pixel labels at the input size, without gradients and in the current mode
        (call ``eval()`` first).

        images (N, 3, H, W), mask (N, H, W) as :meth:`forward` ->
        (N, H, W) int64: the argmax of :meth:`semantic_logits`; ``config.ignore_index`` at
        padded pixels.
        """
        labels = self.semantic_logits(images, mask).argmax(1)
        if mask is not None:
            labels = labels.masked_fill(mask, self.config.ignore_index)
        return labels

    def loss(self, outputs: torch.Tensor | dict, target: torch.Tensor) -> torch.Tensor:
        """The head's loss: per_pixel, the cross-entropy of the logits upsampled bilinearly
        to the target's size; mask2former, Mask2Former's set loss
        (:class:`~msdeformattn.models.mask_losses.MaskSetLoss`).

        Args:
            outputs: :meth:`forward`'s output: per_pixel logits
                (Tensor[N, num_classes, h, w]) or mask2former's dict.
            target (Tensor[N, H, W], int64): class indices; ``config.ignore_index`` at pixels
                to skip (unlabelled, and padding).

        Returns:
            Tensor[]: per_pixel, the mean over the pixels not skipped, 0 (with a gradient
            graph) when every pixel is skipped; mask2former, the weighted sum of its terms
            over the final and auxiliary outputs.
        """
        if self.config.head == "mask2former":
            if not isinstance(outputs, dict):
                raise ValueError(
                    "outputs must be the mask2former head's dict (the model's output), "
                    f"got {type(outputs).__name__}"
                )
            return self.criterion(outputs, target)
        logits = outputs
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

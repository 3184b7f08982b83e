"""Deformable DETR: backbone -> input projections -> deformable transformer -> heads.

Module names follow the reference implementation (``backbone.0.body``,
``input_proj.N.0``, ``transformer``, ``class_embed.N``, ``bbox_embed.N.layers.M``,
``query_embed``), so its checkpoints load with ``load_state_dict``.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.dense import DenseTransformer
from ..nn.transformer import DeformableTransformer, inverse_sigmoid
from ..util.box_ops import box_cxcywh_to_xyxy
from .backbone import Backbone, Joiner, PositionEmbeddingSine, ResNet, resize_mask, resnet
from .config import DeformableDETRConfig
from .convert import CLASS_HEADS, LoadReport, load_reference_checkpoint, read_pretrained

__all__ = [
    "MLP",
    "DeformableDETR",
    "DeformableDETRConfig",
    "box_cxcywh_to_xyxy",
    "build_backbone",
    "build_model",
    "build_transformer",
    "build_trunk",
    "pad_to_stride",
    "post_process",
]


class MLP(nn.Module):
    """Linear layers with ReLU between them (``layers.N`` as in the reference)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        outs = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, outs, strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class DeformableDETR(nn.Module):
    """The detector. ``model(images, mask=None)`` returns a dict with

    - ``pred_logits`` (N, Q, num_classes): class logits (sigmoid, no background class);
    - ``pred_boxes`` (N, Q, 4): normalised (cx, cy, w, h);
    - ``aux_outputs``: the same for every earlier decoder layer;
    - ``enc_outputs`` (two-stage): the encoder's proposals.

    images (N, 3, H, W); mask (N, H, W), True on padding.
    """

    def __init__(
        self,
        config: DeformableDETRConfig,
        *,
        backbone: Joiner | None = None,
        transformer: DeformableTransformer | DenseTransformer | None = None,
    ) -> None:
        """The detector of ``config``, freshly initialised (``model.config`` keeps it).

        backbone, transformer: modules to use instead of the ones ``config`` describes
        (e.g. another trunk: any module returning the feature maps, wrapped in
        :class:`Backbone` and :class:`Joiner`); the rest still follows ``config``.
        """
        super().__init__()
        self.config = config
        backbone = backbone if backbone is not None else build_backbone(config)
        transformer = transformer if transformer is not None else build_transformer(config)
        num_classes, num_queries = config.num_classes, config.num_queries
        num_feature_levels, aux_loss = config.num_feature_levels, config.aux_loss
        with_box_refine, two_stage = config.with_box_refine, config.two_stage
        hidden = transformer.d_model
        self.num_queries = num_queries
        self.num_feature_levels = num_feature_levels
        self.aux_loss = aux_loss
        self.with_box_refine = with_box_refine
        self.two_stage = two_stage
        self.transformer = transformer
        self.backbone = backbone
        class_embed = nn.Linear(hidden, num_classes)
        bbox_embed = MLP(hidden, hidden, 4, 3)
        if not two_stage:
            self.query_embed = nn.Embedding(num_queries, hidden * 2)
        proj = []
        for c in backbone.num_channels:
            proj.append(nn.Sequential(nn.Conv2d(c, hidden, 1), nn.GroupNorm(32, hidden)))
        in_ch = backbone.num_channels[-1]
        for _ in range(num_feature_levels - len(backbone.num_channels)):
            proj.append(nn.Sequential(nn.Conv2d(in_ch, hidden, 3, 2, 1), nn.GroupNorm(32, hidden)))
            in_ch = hidden
        self.input_proj = nn.ModuleList(proj[:num_feature_levels])

        # The reference initialisation: a 0.01 prior per class, boxes start at their reference.
        nn.init.constant_(class_embed.bias, -math.log((1 - 0.01) / 0.01))
        nn.init.zeros_(bbox_embed.layers[-1].weight)
        nn.init.zeros_(bbox_embed.layers[-1].bias)
        for p in self.input_proj:
            nn.init.xavier_uniform_(p[0].weight, gain=1)
            nn.init.zeros_(p[0].bias)

        num_pred = transformer.decoder.num_layers + (1 if two_stage else 0)
        if with_box_refine:
            self.class_embed = nn.ModuleList(copy.deepcopy(class_embed) for _ in range(num_pred))
            self.bbox_embed = nn.ModuleList(copy.deepcopy(bbox_embed) for _ in range(num_pred))
            nn.init.constant_(self.bbox_embed[0].layers[-1].bias.data[2:], -2.0)
            transformer.decoder.bbox_embed = self.bbox_embed
        else:
            nn.init.constant_(bbox_embed.layers[-1].bias.data[2:], -2.0)
            # One head shared by every decoder layer, listed once per layer as in the reference.
            self.class_embed = nn.ModuleList([class_embed] * num_pred)
            self.bbox_embed = nn.ModuleList([bbox_embed] * num_pred)
        if two_stage:
            transformer.decoder.class_embed = self.class_embed
            for box_embed in self.bbox_embed:
                nn.init.constant_(box_embed.layers[-1].bias.data[2:], 0.0)

    @classmethod
    def from_pretrained(
        cls,
        source: str | Path | Mapping[str, Any] | nn.Module,
        num_classes: int | None = None,
        *,
        config: Any = None,
        output_loading_info: bool = False,
        **config_overrides: Any,
    ) -> DeformableDETR | tuple[DeformableDETR, LoadReport]:
        """The detector with published weights, in eval mode (and a :class:`LoadReport` when
        ``output_loading_info``), as transformers' ``from_pretrained`` does.

        ``source``: this package's checkpoint file, the reference implementation's ``.pth``
        (config read from the shapes and its saved ``args``), a transformers
        ``DeformableDetrForObjectDetection``, its state dict (with ``config=``), a
        ``save_pretrained`` folder (SenseTime's published ones included), or a loaded dict.
        ``num_classes`` other than the source's re-initialises every class head (as
        :func:`build_model` does) and loads everything else; the report lists those keys.
        ``config`` (ours or transformers') replaces the source's; ``config_overrides`` set
        fields of it, e.g. ``nheads=4`` where the shapes leave it open.

        Raises ``FileNotFoundError`` for a missing path, ``ValueError`` for a file that is
        no such checkpoint and for a shape (other than a re-initialised head) that does not
        fit. Keys that did not match are reported, and warned about without the report.

        >>> model = DeformableDETR.from_pretrained("r50_deformable_detr-checkpoint.pth")
        >>> model, report = DeformableDETR.from_pretrained(folder, 3, output_loading_info=True)
        """
        read = read_pretrained(source, config, **config_overrides)
        model_config, reinitialize = read.config, ()
        if num_classes is not None and num_classes != model_config.num_classes:
            model_config, reinitialize = replace(model_config, num_classes=num_classes), CLASS_HEADS
        model = build_model(model_config)
        report = load_reference_checkpoint(model, read.state, reinitialize=reinitialize)
        report.unexpected_keys += read.unknown_keys
        model.eval()
        if output_loading_info:
            return model, report
        if not report.exact:
            warnings.warn(f"weights did not load exactly:\n{report}", stacklevel=2)
        return model

    @classmethod
    def from_transformers(
        cls,
        source: str | Path | Mapping[str, Any] | nn.Module,
        config: Any = None,
        *,
        num_classes: int | None = None,
        output_loading_info: bool = False,
    ) -> DeformableDETR | tuple[DeformableDETR, LoadReport]:
        """The detector of a transformers ``DeformableDetrForObjectDetection``: the model,
        its state dict (with ``config=``, ours or transformers') or a ``save_pretrained``
        folder. :meth:`from_pretrained` with these arguments."""
        return cls.from_pretrained(
            source, num_classes, config=config, output_loading_info=output_loading_info
        )

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
        """images (N, 3, H, W), any H and W; mask (N, H, W), True on padding (None: none).

        As in the reference, the input is not padded to the backbone's stride (which
        would change the numbers at other sizes); the exported detector
        (:mod:`msdeformattn.deploy.export`) pads with :func:`pad_to_stride` in its graph.
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape (N, 3, H, W), got {tuple(images.shape)}")
        if mask is None:
            mask = torch.zeros(
                images.shape[0], *images.shape[2:], dtype=torch.bool, device=images.device
            )
        elif mask.shape != (images.shape[0], *images.shape[2:]) or mask.dtype != torch.bool:
            raise ValueError(
                f"mask must be a bool tensor of shape {(images.shape[0], *images.shape[2:])} "
                f"(True on padding), got {mask.dtype} {tuple(mask.shape)}"
            )
        features = self.backbone(images, mask)
        srcs, masks, pos = [], [], []
        for lvl, (feature, m, p) in enumerate(features):
            srcs.append(self.input_proj[lvl](feature))
            masks.append(m)
            pos.append(p)
        for lvl in range(len(features), self.num_feature_levels):
            src = self.input_proj[lvl](features[-1][0] if lvl == len(features) else srcs[-1])
            m = resize_mask(mask, src.shape[-2:])
            srcs.append(src)
            masks.append(m)
            pos.append(self.backbone[1](m, src.dtype))
        query_embeds = None if self.two_stage else self.query_embed.weight
        hs, init_ref, inter_refs, enc_class, enc_coord_unact = self.transformer(
            srcs, masks, pos, query_embeds
        )
        classes, coords = [], []
        for lvl in range(hs.shape[0]):
            reference = inverse_sigmoid(init_ref if lvl == 0 else inter_refs[lvl - 1])
            delta = self.bbox_embed[lvl](hs[lvl])
            if reference.shape[-1] == 4:
                delta = delta + reference
            else:
                delta = torch.cat([delta[..., :2] + reference, delta[..., 2:]], -1)
            classes.append(self.class_embed[lvl](hs[lvl]))
            coords.append(delta.sigmoid())
        out = {"pred_logits": classes[-1], "pred_boxes": coords[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [
                {"pred_logits": c, "pred_boxes": b}
                for c, b in zip(classes[:-1], coords[:-1], strict=True)
            ]
        if self.two_stage:
            out["enc_outputs"] = {"pred_logits": enc_class, "pred_boxes": enc_coord_unact.sigmoid()}
        return out


def pad_to_stride(
    images: torch.Tensor, mask: torch.Tensor, stride: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad images (N, C, H, W) with zeros and mask (N, H, W) with True on the right and
    bottom to the next multiple of ``stride``.

    Always pads (by zero rows where H already is a multiple), and computes the amount
    from the sizes, so a traced graph holds no branch on them.
    """
    H, W = images.shape[-2:]
    # Only non-negative operands: ONNX's integer Div truncates, Python's // floors.
    pad = (0, (W + stride - 1) // stride * stride - W, 0, (H + stride - 1) // stride * stride - H)
    return F.pad(images, pad), F.pad(mask, pad, value=True)


def build_model(config: DeformableDETRConfig) -> DeformableDETR:
    """The detector of a config, freshly initialised: ``DeformableDETR(config)``."""
    return DeformableDETR(config)


def build_trunk(config: Any) -> ResNet:
    """The ResNet a config's trunk fields describe (``backbone``, ``backbone_norm``,
    ``backbone_block``, ``backbone_widths``, ``backbone_depths``, ``backbone_stem``: the
    detector's and the segmenter's configs share them)."""
    if config.backbone_widths is not None:
        return ResNet(
            config.backbone_block,
            config.backbone_depths or (1,) * len(config.backbone_widths),
            config.backbone_widths,
            norm=config.backbone_norm,
            stem_width=config.backbone_stem,
        )
    return resnet(config.backbone, norm=config.backbone_norm)


def build_backbone(config: DeformableDETRConfig) -> Joiner:
    """The trunk (its last maps, C3..C5 by default) and position encoding ``config``
    describes."""
    body = build_trunk(config)
    most = min(3, config.num_feature_levels)
    n_backbone = most if config.num_backbone_levels is None else config.num_backbone_levels
    if not 1 <= n_backbone <= most:
        raise ValueError(
            f"num_backbone_levels must be 1 to min(3, num_feature_levels) = {most}, "
            f"got {config.num_backbone_levels}"
        )
    channels = body.num_channels[-n_backbone:]
    strides = body.strides[-n_backbone:]
    body.num_outputs = n_backbone
    return Joiner(Backbone(body, channels, strides), PositionEmbeddingSine(config.d_model // 2))


def build_transformer(config: DeformableDETRConfig) -> DeformableTransformer | DenseTransformer:
    """The encoder-decoder ``config`` describes (deformable, or the dense baseline)."""
    shared = {
        "d_model": config.d_model,
        "n_heads": config.nheads,
        "num_encoder_layers": config.enc_layers,
        "num_decoder_layers": config.dec_layers,
        "d_ffn": config.dim_feedforward,
        "dropout": config.dropout,
        "return_intermediate_dec": True,
        "n_levels": config.num_feature_levels,
    }
    if config.attention == "dense":
        return DenseTransformer(**shared)
    return DeformableTransformer(
        **shared,
        dec_n_points=config.dec_n_points,
        enc_n_points=config.enc_n_points,
        two_stage=config.two_stage,
        two_stage_num_proposals=config.num_queries,
        backend=config.backend,
    )


@torch.no_grad()
def post_process(outputs: dict, target_sizes: torch.Tensor, top_k: int = 100) -> list[dict]:
    """Top-k (score, label, box in pixels xyxy) per image; target_sizes (N, 2) as (H, W)."""
    logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
    N, Q, K = logits.shape
    prob = logits.sigmoid().view(N, -1)
    scores, idx = prob.topk(min(top_k, Q * K), dim=1)
    labels = idx % K
    boxes = box_cxcywh_to_xyxy(boxes).gather(1, (idx // K)[..., None].expand(-1, -1, 4))
    h, w = target_sizes.unbind(1)
    boxes = boxes * torch.stack([w, h, w, h], 1)[:, None, :].to(boxes.dtype)
    return [
        {"scores": s, "labels": lab, "boxes": b}
        for s, lab, b in zip(scores, labels, boxes, strict=True)
    ]

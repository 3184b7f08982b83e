"""Pieces the deformable and the dense transformers share: activations, the
post-norm feed-forward step, and flattening feature maps into one sequence."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.levels import level_start_index

__all__ = [
    "FlatLevels",
    "activation_fn",
    "clones",
    "feed_forward",
    "flatten_levels",
    "sine_encoding",
    "valid_ratio",
    "with_pos",
]

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"relu": F.relu, "gelu": F.gelu}


def activation_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The feed-forward activation called ``name`` ("relu" or "gelu")."""
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"activation must be one of {sorted(_ACTIVATIONS)}, got {name!r}"
        ) from None


def clones(module: nn.Module, n: int) -> list[nn.Module]:
    """``n`` independent deep copies of ``module`` (a layer stack's layers)."""
    return [copy.deepcopy(module) for _ in range(n)]


def sine_encoding(x: torch.Tensor, num_feats: int, temperature: float = 10000) -> torch.Tensor:
    """Transformer sine/cosine features of each number: x (...) -> (..., num_feats),
    sin and cos interleaved at wavelengths ``temperature ** (2k / num_feats)``."""
    dim_t = torch.arange(num_feats, dtype=x.dtype, device=x.device)
    dim_t = temperature ** (2 * (dim_t // 2) / num_feats)
    pos = x[..., None] / dim_t
    return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), -1).flatten(-2)


def with_pos(x: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
    return x if pos is None else x + pos


def feed_forward(
    x: torch.Tensor,
    linear1: nn.Linear,
    activation: Callable[[torch.Tensor], torch.Tensor],
    inner_dropout: nn.Dropout,
    linear2: nn.Linear,
    out_dropout: nn.Dropout,
    norm: nn.LayerNorm,
) -> torch.Tensor:
    """``norm(x + drop(linear2(drop(act(linear1(x))))))``, x (..., C) -> (..., C).

    A function over the layer's own modules rather than a submodule: the layers keep
    the reference's parameter names (``linear1``, ``norm2``, ...) its checkpoints use.
    """
    return norm(x + out_dropout(linear2(inner_dropout(activation(linear1(x))))))


class FlatLevels(NamedTuple):
    """L feature maps as one sequence of S = sum(H_l * W_l) rows."""

    src: torch.Tensor  # (N, S, C)
    mask: torch.Tensor  # (N, S), True on padding
    pos: torch.Tensor  # (N, S, C): position encoding plus the level's embedding
    shapes: list[tuple[int, int]]  # (H_l, W_l) as Python (or, in export, symbolic) ints
    spatial_shapes: torch.Tensor  # (L, 2) int64
    level_start_index: torch.Tensor  # (L,) int64
    valid_ratios: torch.Tensor  # (N, L, 2): unpadded fraction of each level, (width, height)


def valid_ratio(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N, H, W) padding mask -> (N, 2) unpadded fraction as (width, height)."""
    _, H, W = mask.shape
    valid_H = (~mask[:, :, 0]).sum(1)
    valid_W = (~mask[:, 0, :]).sum(1)
    return torch.stack([valid_W.to(dtype) / W, valid_H.to(dtype) / H], -1)


def flatten_levels(
    srcs: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor],
    pos_embeds: Sequence[torch.Tensor],
    level_embed: torch.Tensor,
) -> FlatLevels:
    """srcs, pos_embeds: L maps (N, C, H_l, W_l); masks: L (N, H_l, W_l) True on padding;
    level_embed (L, C). Returns the :class:`FlatLevels` both transformers start from."""
    src_flat, mask_flat, pos_flat, shapes = [], [], [], []
    for lvl, (src, mask, pos) in enumerate(zip(srcs, masks, pos_embeds, strict=True)):
        H, W = src.shape[-2:]
        shapes.append((H, W))
        src_flat.append(src.flatten(2).transpose(1, 2))
        mask_flat.append(mask.flatten(1))
        pos_flat.append(pos.flatten(2).transpose(1, 2) + level_embed[lvl].view(1, 1, -1))
    src = torch.cat(src_flat, 1)
    device = src.device
    # Counted with ops rather than built from Python ints, so that an exported
    # graph computes the level sizes from its input (as_tensor would bake the
    # example's sizes into ONNX as a constant).
    spatial_shapes = torch.stack(
        [
            torch.stack([torch.ones(d, dtype=torch.long, device=device).sum() for d in hw])
            for hw in shapes
        ]
    )
    # In the features' dtype: float32 ratios would cap a float64 model's precision.
    ratios = torch.stack([valid_ratio(m, src.dtype) for m in masks], 1)
    return FlatLevels(
        src,
        torch.cat(mask_flat, 1),
        torch.cat(pos_flat, 1),
        shapes,
        spatial_shapes,
        level_start_index(spatial_shapes),
        ratios,
    )

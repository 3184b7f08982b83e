"""Swap our operator into Hugging Face ``transformers`` models, in place.

transformers' Deformable DETR, RT-DETR, Grounding DINO, LW-DETR and others hold
a ``MultiScaleDeformableAttention`` module whose forward is the grid_sample
formulation on the CPU. It has the operator's contract, so it is replaced by
a module that calls :func:`msdeformattn.ms_deform_attn`: same outputs to
float32 rounding, the fused kernel's speed and memory.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops import ms_deform_attn

__all__ = ["FusedMultiScaleDeformableAttention", "swap_into_transformers"]

_TARGET = "MultiScaleDeformableAttention"


class FusedMultiScaleDeformableAttention(nn.Module):
    """Drop-in for transformers' ``MultiScaleDeformableAttention`` (same forward signature)."""

    def __init__(self, backend: str | None = None) -> None:
        super().__init__()
        self.backend = backend

    def forward(
        self,
        value: torch.Tensor,
        value_spatial_shapes: torch.Tensor,
        value_spatial_shapes_list: list[tuple[int, int]],
        level_start_index: torch.Tensor,
        sampling_locations: torch.Tensor,
        attention_weights: torch.Tensor,
        im2col_step: int | None = None,
    ) -> torch.Tensor:
        """value (N, S, M, D), locations (N, Lq, M, L, P, 2), weights (N, Lq, M, L, P).

        Returns (N, Lq, M*D); ``value_spatial_shapes_list`` and ``im2col_step`` are unused.
        """
        return ms_deform_attn(
            value,
            value_spatial_shapes,
            level_start_index,
            sampling_locations,
            attention_weights,
            backend=self.backend,
        )


def swap_into_transformers(model: nn.Module, backend: str | None = None) -> list[str]:
    """Replace each transformers ``MultiScaleDeformableAttention`` in ``model``; return their names.

    Raises ``ValueError`` when the model holds none (e.g. Mask2Former, whose
    pixel decoder calls a plain function instead of a module).
    """
    replaced = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            cls = type(child)
            if cls.__name__ == _TARGET and cls.__module__.startswith("transformers."):
                setattr(parent, child_name, FusedMultiScaleDeformableAttention(backend))
                replaced.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    if not replaced:
        raise ValueError(
            f"{type(model).__name__} holds no transformers {_TARGET} module to replace "
            "(supported: models built on it, e.g. Deformable DETR, RT-DETR, Grounding DINO)"
        )
    return replaced

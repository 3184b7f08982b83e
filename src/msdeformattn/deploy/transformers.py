"""Swap our operator into Hugging Face ``transformers`` models, in place.

transformers' Deformable DETR, RT-DETR, Grounding DINO, LW-DETR and others hold
a ``MultiScaleDeformableAttention`` module whose forward is the grid_sample
formulation on the CPU. It has the operator's contract, so it is replaced by
a module that calls :func:`msdeformattn.ms_deform_attn`: same outputs to
float32 rounding, the fused kernel's speed and memory.

Mask2Former's and OneFormer's pixel decoders call a module-level function
``multi_scale_deformable_attention`` instead; that function is replaced in its
transformers module (so for every model of that family in the process).
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from ..ops import level_start_index, ms_deform_attn

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


def _fused_function(backend: str | None):
    def multi_scale_deformable_attention(
        value, value_spatial_shapes, sampling_locations, attention_weights
    ):
        """transformers' functional form: level shapes as a list (or tensor), no start index."""
        shapes = torch.as_tensor(value_spatial_shapes, dtype=torch.long, device=value.device)
        return ms_deform_attn(
            value,
            shapes,
            level_start_index(shapes),
            sampling_locations,
            attention_weights,
            backend=backend,
        )

    multi_scale_deformable_attention.msdeformattn = True
    return multi_scale_deformable_attention


def _patch_function(module: nn.Module, backend: str | None) -> str | None:
    """Replace the functional form used by ``module``'s class, if it uses one."""
    namespace = sys.modules[type(module).__module__]
    current = getattr(namespace, "multi_scale_deformable_attention", None)
    if current is None or not type(module).__name__.endswith("MultiscaleDeformableAttention"):
        return None
    if not getattr(current, "msdeformattn", False):
        namespace.multi_scale_deformable_attention = _fused_function(backend)
    return f"{namespace.__name__}.multi_scale_deformable_attention"


def swap_into_transformers(model: nn.Module, backend: str | None = None) -> list[str]:
    """Replace each transformers ``MultiScaleDeformableAttention`` in ``model``; return their names.

    Raises ``ValueError`` when the model holds none (e.g. Mask2Former, whose
    pixel decoder calls a plain function instead of a module).
    """
    replaced = []
    for parent_name, parent in list(model.named_modules()):
        if not type(parent).__module__.startswith("transformers."):
            continue
        patched = _patch_function(parent, backend)
        if patched is not None and patched not in replaced:
            replaced.append(patched)
        for child_name, child in list(parent.named_children()):
            cls = type(child)
            if cls.__name__ == _TARGET and cls.__module__.startswith("transformers."):
                setattr(parent, child_name, FusedMultiScaleDeformableAttention(backend))
                replaced.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    if not replaced:
        raise ValueError(
            f"{type(model).__name__} holds no transformers {_TARGET} module or function to "
            "replace (supported: Deformable DETR, RT-DETR, Grounding DINO, Mask2Former, ...)"
        )
    return replaced

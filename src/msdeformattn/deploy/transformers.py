"""Swap our operator into Hugging Face ``transformers`` models, in place.

transformers runs multi-scale deformable attention in four forms; each is
replaced by a call to :func:`msdeformattn.ms_deform_attn` with the same
outputs to float32 rounding and the fused kernel's speed and memory:

- a ``MultiScaleDeformableAttention`` module holding the grid_sample
  formulation (Deformable DETR, RT-DETR, RF-DETR, LW-DETR, Grounding DINO,
  MM Grounding DINO, OmDet-Turbo, PP-DocLayout V2/V3/V4): the module is
  replaced by :class:`FusedMultiScaleDeformableAttention`;
- a ``ms_deformable_attn_core`` attribute of the attention layer with
  per-level point counts and optional discrete sampling (D-FINE, DEIMv2):
  the attribute is replaced on each layer;
- a module-level function, ``multi_scale_deformable_attention`` (Mask2Former,
  OneFormer pixel decoders) or ``multi_scale_deformable_attention_v2`` with
  per-level point counts and optional discrete sampling (RT-DETRv2): the
  function is replaced in its transformers module, so for every model of that
  family in the process.

Every form is found from the attention layers themselves (transformers classes
named ``*MultiscaleDeformableAttention``); a layer in none of these forms is
refused with an error naming its family rather than left silently slow.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import nn

from ..ops import level_start_index, ms_deform_attn

__all__ = ["COVERED_FAMILIES", "FusedMultiScaleDeformableAttention", "swap_into_transformers"]

COVERED_FAMILIES = (
    "Deformable DETR",
    "RT-DETR",
    "RT-DETRv2",
    "D-FINE",
    "DEIMv2",
    "RF-DETR",
    "LW-DETR",
    "Grounding DINO",
    "MM Grounding DINO",
    "OmDet-Turbo",
    "PP-DocLayout V2/V3/V4",
    "Mask2Former",
    "OneFormer",
)
"""The transformers (5.24) model families whose deformable attention is swapped."""

_HOLDER = "MultiScaleDeformableAttention"  # the kernel-holder module
_LAYER_SUFFIX = "MultiscaleDeformableAttention"  # the layers owning the projections
_CORE_ATTRIBUTE = "ms_deformable_attn_core"  # D-FINE's and DEIMv2's core function
# transformers' sampling methods of the per-level form -> ours.
_SAMPLING = {"default": "bilinear", "discrete": "discrete"}


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


def _shapes(value: torch.Tensor, value_spatial_shapes) -> tuple[torch.Tensor, torch.Tensor]:
    """Level shapes given as a list (or tensor) -> (spatial_shapes, level_start_index)."""
    shapes = torch.as_tensor(value_spatial_shapes, dtype=torch.long, device=value.device)
    return shapes, level_start_index(shapes)


def _fused_function(backend: str | None) -> Callable[..., torch.Tensor]:
    def multi_scale_deformable_attention(
        value, value_spatial_shapes, sampling_locations, attention_weights
    ):
        """Mask2Former's and OneFormer's form: the shapes as a list, no start index."""
        return ms_deform_attn(
            value,
            *_shapes(value, value_spatial_shapes),
            sampling_locations,
            attention_weights,
            backend=backend,
        )

    return _mark(multi_scale_deformable_attention, backend)


def _fused_function_v2(backend: str | None) -> Callable[..., torch.Tensor]:
    def multi_scale_deformable_attention_v2(
        value,
        value_spatial_shapes,
        sampling_locations,
        attention_weights,
        num_points_list,
        method="default",
    ):
        """RT-DETRv2's, D-FINE's and DEIMv2's form.

        Locations (N, Lq, M, sum(P_l), 2) and weights (N, Lq, M, sum(P_l)), P_l
        from ``num_points_list``; ``method`` "default" (bilinear) or "discrete".
        """
        if method not in _SAMPLING:
            raise ValueError(f"method must be one of {tuple(_SAMPLING)}, got {method!r}")
        return ms_deform_attn(
            value,
            *_shapes(value, value_spatial_shapes),
            sampling_locations,
            attention_weights,
            backend=backend,
            points_per_level=[int(p) for p in num_points_list],
            sampling=_SAMPLING[method],
        )

    return _mark(multi_scale_deformable_attention_v2, backend)


def _mark(function: Callable[..., torch.Tensor], backend: str | None):
    function.msdeformattn_backend = backend
    return function


def _is_ours(function, backend: str | None) -> bool:
    """Whether ``function`` is our replacement, already on ``backend``."""
    return hasattr(function, "msdeformattn_backend") and function.msdeformattn_backend == backend


# transformers' module-level functions -> the builder of our replacement.
_FUNCTIONS = {
    "multi_scale_deformable_attention": _fused_function,
    "multi_scale_deformable_attention_v2": _fused_function_v2,
}


def _described(module: nn.Module) -> str:
    """``RTDetrV2ForObjectDetection (transformers family 'rt_detr_v2')``, from the class
    and its module ``transformers.models.rt_detr_v2.modeling_rt_detr_v2``."""
    parts = type(module).__module__.split(".")
    if parts[:2] != ["transformers", "models"] or len(parts) < 3:
        return type(module).__name__
    return f"{type(module).__name__} (transformers family {parts[2]!r})"


def _swap_layer(name: str, layer: nn.Module, backend: str | None) -> list[str]:
    """Swap the one attention layer ``layer``; return where our operator now runs."""
    holders = [
        (child_name, child)
        for child_name, child in layer.named_children()
        if type(child).__name__ == _HOLDER or isinstance(child, FusedMultiScaleDeformableAttention)
    ]
    if holders:
        for child_name, child in holders:
            if isinstance(child, FusedMultiScaleDeformableAttention):
                child.backend = backend
            else:
                setattr(layer, child_name, FusedMultiScaleDeformableAttention(backend))
        return [f"{name}.{child_name}" if name else child_name for child_name, _ in holders]
    if hasattr(layer, _CORE_ATTRIBUTE):
        if not _is_ours(getattr(layer, _CORE_ATTRIBUTE), backend):
            setattr(layer, _CORE_ATTRIBUTE, _fused_function_v2(backend))
        return [f"{name}.{_CORE_ATTRIBUTE}" if name else _CORE_ATTRIBUTE]
    namespace = sys.modules.get(type(layer).__module__)
    for function_name, build in _FUNCTIONS.items():
        current = getattr(namespace, function_name, None)
        if current is not None:
            if not _is_ours(current, backend):
                setattr(namespace, function_name, build(backend))
            return [f"{namespace.__name__}.{function_name}"]
    raise ValueError(
        f"{_described(layer)} at {name!r} runs deformable attention in a form "
        f"swap_into_transformers does not know (no {_HOLDER} child, no "
        f"{_CORE_ATTRIBUTE} attribute, no module-level "
        f"{' or '.join(_FUNCTIONS)}); covered: {', '.join(COVERED_FAMILIES)}"
    )


def swap_into_transformers(model: nn.Module, backend: str | None = None) -> list[str]:
    """Run ``model``'s multi-scale deformable attention on our operator; return where.

    Every transformers attention layer ``*MultiscaleDeformableAttention`` in
    ``model`` is swapped (see the module docstring for the forms and
    :data:`COVERED_FAMILIES`). The names returned are those of the replaced
    modules and attributes (``model.decoder.layers.0.encoder_attn.attn``) and,
    for a module-level function, its qualified name, each once.

    Swapping again is harmless: nothing is replaced twice, the same names are
    returned, and ``backend`` becomes the backend of every swapped site.

    Raises ``ValueError`` naming the family when ``model`` runs no multi-scale
    deformable attention, or runs it in a form not known here.
    """
    swapped: list[str] = []
    for name, module in list(model.named_modules()):
        cls = type(module)
        if cls.__module__.startswith("transformers.") and cls.__name__.endswith(_LAYER_SUFFIX):
            swapped += [s for s in _swap_layer(name, module, backend) if s not in swapped]
    if not swapped:
        raise ValueError(
            f"{_described(model)} holds no "
            f"transformers {_HOLDER} module or function to replace; covered: "
            f"{', '.join(COVERED_FAMILIES)}"
        )
    return swapped

"""The operator's other forms, expressed through its equal-count bilinear form.

RT-DETRv2, D-FINE and DEIM sample a different number of points per level
(``points_per_level``, samples of level 0 first) and optionally read the one
nearest pixel instead of interpolating (``sampling="discrete"``). Both become
the equal-count call every backend runs, with standard ops only, so every
backend, ``torch.compile``, ``torch.export`` and ONNX serve them unchanged:

- per-level counts: each level is padded to the largest count with samples at
  NaN (which read nothing) and zero weight, and the gradient of the padding
  is dropped;
- discrete: each location moves to the centre of the pixel it reads,
  ``floor(loc * (W, H) + 0.5)`` clamped to the map per axis (x to W-1, y to
  H-1), detached, so only ``value`` and the weights get gradients. A bilinear
  sample at a pixel centre is that pixel, to the rounding of ``loc * W - 0.5``
  in the compute dtype (exact in float64, within float32 rounding otherwise).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["SAMPLING", "check_points_per_level", "snap_to_pixels", "to_equal_points"]

SAMPLING = ("bilinear", "discrete")


def check_points_per_level(
    points_per_level: Sequence[int],
    spatial_shapes: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> list[int]:
    """The counts as a list of ints, after checking them against the inputs' shapes."""
    for name, t in (
        ("spatial_shapes", spatial_shapes),
        ("sampling_locations", sampling_locations),
        ("attention_weights", attention_weights),
    ):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if isinstance(points_per_level, torch.Tensor) or not all(
        isinstance(p, int) and not isinstance(p, bool) for p in points_per_level
    ):
        raise TypeError(
            f"points_per_level must be a sequence of Python ints, got {points_per_level!r}"
        )
    points = list(points_per_level)
    L = spatial_shapes.shape[0] if spatial_shapes.dim() == 2 else None
    if len(points) != L or min(points, default=0) < 1:
        raise ValueError(
            f"points_per_level must hold one count >= 1 per level ({L} levels), got {points}"
        )
    K = sum(points)
    loc, attn = sampling_locations, attention_weights
    if loc.dim() != 5 or loc.shape[3] != K or loc.shape[4] != 2:
        raise ValueError(
            f"sampling_locations must have shape (N, Lq, M, {K}, 2) for points_per_level="
            f"{points} (sum {K}), got {tuple(loc.shape)}"
        )
    if tuple(attn.shape) != tuple(loc.shape[:4]):
        raise ValueError(
            f"attention_weights must have shape {tuple(loc.shape[:4])} (N, Lq, M, {K}), "
            f"got {tuple(attn.shape)}"
        )
    return points


def to_equal_points(
    sampling_locations: torch.Tensor, attention_weights: torch.Tensor, points: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, Lq, M, sum(P_l), 2) and (N, Lq, M, sum(P_l)) -> (N, Lq, M, L, P, 2) and
    (N, Lq, M, L, P) with P = max(P_l), padding read nothing and get no gradient."""
    L, P = len(points), max(points)
    if min(points) == P:  # equal counts: a view, nothing padded
        return sampling_locations.unflatten(3, (L, P)), attention_weights.unflatten(3, (L, P))
    device = sampling_locations.device
    starts = [sum(points[:level]) for level in range(L)]
    # Padding repeats a real sample of its level (any index in range works: it is masked).
    index = torch.tensor(
        [starts[lv] + min(p, points[lv] - 1) for lv in range(L) for p in range(P)], device=device
    )
    real = torch.tensor([p < points[lv] for lv in range(L) for p in range(P)], device=device)
    loc = sampling_locations.index_select(3, index)
    attn = attention_weights.index_select(3, index)
    loc = torch.where(real[:, None], loc, torch.full_like(loc, float("nan")))
    attn = torch.where(real, attn, torch.zeros_like(attn))
    return loc.unflatten(3, (L, P)), attn.unflatten(3, (L, P))


def snap_to_pixels(sampling_locations: torch.Tensor, spatial_shapes: torch.Tensor) -> torch.Tensor:
    """(N, Lq, M, L, P, 2) -> the centres of the pixels discrete sampling reads, detached;
    NaN where a location is not finite (it reads nothing)."""
    loc = sampling_locations.detach()
    wh = spatial_shapes.flip(-1).to(loc.dtype).view(1, 1, 1, -1, 1, 2)  # (W, H) per level
    pixel = torch.floor(loc * wh + 0.5)
    pixel = torch.minimum(pixel.clamp(min=0), wh - 1)
    centres = (pixel + 0.5) / wh
    finite = torch.isfinite(loc).all(-1, keepdim=True)
    return torch.where(finite, centres, torch.full_like(centres, float("nan")))

"""The level table every caller of the operator builds from the level sizes."""

from __future__ import annotations

import torch

__all__ = ["level_start_index"]


def level_start_index(spatial_shapes: torch.Tensor) -> torch.Tensor:
    """(L, 2) int64 level sizes (H_l, W_l) -> (L,) int64 first row of each level in S:
    ``0, H_0*W_0, H_0*W_0 + H_1*W_1, ...`` (traceable: no Python ints read)."""
    areas = spatial_shapes.prod(1)
    return torch.cat((areas.new_zeros(1), areas.cumsum(0)[:-1]))

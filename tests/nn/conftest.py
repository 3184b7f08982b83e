"""Helpers of the layer tests, shared with the export tests."""

from __future__ import annotations

import torch

from ..conftest import level_table

LEVELS = ((6, 9), (3, 5), (2, 2), (1, 1))


def layer_inputs(N=2, Lq=7, C=32, levels=LEVELS, ref_dim=2, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    shapes, starts, S = level_table(levels)
    L = shapes.shape[0]
    query = torch.randn(N, Lq, C, generator=g, dtype=dtype)
    ref = torch.rand(N, Lq, L, ref_dim, generator=g, dtype=dtype)
    if ref_dim == 4:
        ref[..., 2:] = ref[..., 2:] * 0.5 + 0.05
    flat = torch.randn(N, S, C, generator=g, dtype=dtype)
    return query, ref, flat, shapes, starts


def randomized(layer, seed=0):
    """Non-trivial weights everywhere (the initialisation zeroes some)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return layer

"""A formulation of the operator made of standard ops only, for export.

Used by :func:`msdeformattn.ms_deform_attn` while ``torch.onnx.export`` runs,
so an exported model needs nothing of this package: the bilinear samples are
gathered from ``value`` with indices computed from ``spatial_shapes`` and
``level_start_index`` *as tensors* (Floor, Gather, Where, Mul, ReduceSum in
ONNX). Reading those tensors into Python numbers (``tolist``) would make the
captured graph depend on one set of image sizes.

It materialises the samples, like the grid_sample reference: for export, not
for speed.
"""

from __future__ import annotations

import torch

from .reference import compute_dtype

__all__ = ["traceable_forward"]


def traceable_forward(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Same contract as :func:`msdeformattn.ms_deform_attn`; shapes (N, Lq, M*D) out."""
    N, _, M, D = value.shape
    Lq, L, P = sampling_locations.shape[1], sampling_locations.shape[3], sampling_locations.shape[4]
    dtype = compute_dtype(value, sampling_locations, attention_weights)
    # Per-level tables, broadcast against (N, Lq, M, L, P).
    H = spatial_shapes[:, 0].view(1, 1, 1, L, 1)
    W = spatial_shapes[:, 1].view(1, 1, 1, L, 1)
    start = level_start_index.view(1, 1, 1, L, 1)
    loc = sampling_locations.to(dtype)
    x = loc[..., 0] * W.to(dtype) - 0.5
    y = loc[..., 1] * H.to(dtype) - 0.5
    # False for NaN and +-inf too: such samples read nothing.
    inside = (x >= -1) & (x <= W.to(dtype)) & (y >= -1) & (y <= H.to(dtype))
    x = torch.where(inside, x, torch.full_like(x, -2.0))
    y = torch.where(inside, y, torch.full_like(y, -2.0))
    a = torch.where(inside, attention_weights.to(dtype), torch.zeros_like(x))
    x0 = torch.floor(x)
    y0 = torch.floor(y)
    fx = x - x0
    fy = y - y0
    ix = x0.to(torch.int64)
    iy = y0.to(torch.int64)
    # (N, M, S, D): one gather per (batch, head) along S.
    v = value.to(dtype).permute(0, 2, 1, 3)
    out = None
    for cy in (0, 1):
        for cx in (0, 1):
            xx = ix + cx
            yy = iy + cy
            valid = (xx >= 0) & (xx < W) & (yy >= 0) & (yy < H)
            w = a * (fx if cx else 1 - fx) * (fy if cy else 1 - fy)
            w = torch.where(valid, w, torch.zeros_like(w))
            idx = torch.where(valid, start + yy * W + xx, torch.zeros_like(xx))
            idx = idx.permute(0, 2, 1, 3, 4).reshape(N, M, Lq * L * P, 1).expand(-1, -1, -1, D)
            sampled = torch.gather(v, 2, idx)  # (N, M, Lq*L*P, D)
            w = w.permute(0, 2, 1, 3, 4).reshape(N, M, Lq * L * P, 1)
            term = (sampled * w).view(N, M, Lq, L * P, D).sum(3)
            out = term if out is None else out + term
    return out.permute(0, 2, 1, 3).reshape(N, Lq, M * D).to(value.dtype)

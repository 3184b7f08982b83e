"""``MSDeformAttn``: the multi-scale deformable attention layer of Deformable DETR.

Parameter names, shapes, initialisation and forward signature are those of
the reference implementation, so its checkpoints load unchanged and replacing
its import with ours changes nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ..ops import ms_deform_attn

__all__ = ["MSDeformAttn"]


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention (Deformable DETR, section 4.1).

    Args:
        d_model: channels of queries and values; divisible by ``n_heads``.
        n_levels: feature levels L.
        n_heads: attention heads M.
        n_points: sampling points P per head and level, or one count per level
            (RT-DETRv2's ``num_points_list``, e.g. ``[3, 6, 3]``): one softmax over
            all of a head's points, box offsets scaled by 1/P_l of their level.
        sampling: ``"bilinear"``, or ``"discrete"`` (RT-DETRv2): each point reads
            its nearest pixel (see :func:`msdeformattn.ms_deform_attn`).
        backend: operator backend (``None``: the fastest that supports the
            call, see :func:`msdeformattn.resolve`).

    Example:
        >>> attn = MSDeformAttn(d_model=256, n_levels=2)
        >>> shapes = torch.tensor([[8, 8], [4, 4]])
        >>> starts = torch.tensor([0, 64])
        >>> out = attn(torch.randn(2, 10, 256), torch.rand(2, 10, 2, 2),
        ...            torch.randn(2, 80, 256), shapes, starts)
        >>> out.shape
        torch.Size([2, 10, 256])
    """

    def __init__(
        self,
        d_model: int = 256,
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int | Sequence[int] = 4,
        *,
        sampling: str = "bilinear",
        backend: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(
                f"d_model must be divisible by n_heads, got d_model={d_model}, n_heads={n_heads}"
            )
        for name, v in (("n_levels", n_levels), ("n_heads", n_heads)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        per_level = n_points if isinstance(n_points, Sequence) else [n_points] * n_levels
        if len(per_level) != n_levels or min(per_level) < 1:
            raise ValueError(
                f"n_points must be >= 1, or one count >= 1 per level ({n_levels}), got {n_points}"
            )
        if sampling not in ("bilinear", "discrete"):
            raise ValueError(f"sampling must be 'bilinear' or 'discrete', got {sampling!r}")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points if isinstance(n_points, int) else list(n_points)
        #: points of each level; equal counts take the operator's (N, Lq, M, L, P) form
        self.points_per_level = list(per_level)
        self.sampling = sampling
        self.backend = backend
        #: set True to keep the last call's (sampling_locations, attention_weights)
        #: in ``last_sampling`` (for visualisation)
        self.record_sampling = False
        self.last_sampling: tuple[torch.Tensor, torch.Tensor] | None = None
        kw = dict(device=device, dtype=dtype)
        samples = n_heads * sum(per_level)
        self.sampling_offsets = nn.Linear(d_model, samples * 2, **kw)
        self.attention_weights = nn.Linear(d_model, samples, **kw)
        self.value_proj = nn.Linear(d_model, d_model, **kw)
        self.output_proj = nn.Linear(d_model, d_model, **kw)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The reference initialisation: points on rays, one per head, at distances 1..P."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.n_heads, dtype=torch.float64) * (2.0 * math.pi / self.n_heads)
        rays = torch.stack([angles.cos(), angles.sin()], -1)
        rays = rays / rays.abs().max(-1, keepdim=True).values  # larger component is 1
        # Distances 1..P_l on every level: (K,) for the K = sum(P_l) points of a head.
        distance = torch.cat(
            [torch.arange(1, p + 1, dtype=torch.float64) for p in self.points_per_level]
        )
        bias = rays[:, None, :] * distance[None, :, None]  # (M, K, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(bias.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def extra_repr(self) -> str:
        parts = [f"d_model={self.d_model}"]
        for name, default in (("n_levels", 4), ("n_heads", 8), ("n_points", 4)):
            if getattr(self, name) != default:
                parts.append(f"{name}={getattr(self, name)}")
        if self.sampling != "bilinear":
            parts.append(f"sampling={self.sampling!r}")
        if self.backend is not None:
            parts.append(f"backend={self.backend!r}")
        return ", ".join(parts)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        input_flatten: torch.Tensor,
        input_spatial_shapes: torch.Tensor,
        input_level_start_index: torch.Tensor,
        input_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend from each query to P points per head and level around its reference point.

        Args:
            query (Tensor[N, Lq, C]): query features.
            reference_points (Tensor[N, Lq, L, 2] or Tensor[N, Lq, L, 4]): (x, y)
                in [0, 1] per level, or boxes (cx, cy, w, h); offsets are in
                pixels of each level for points and relative to the box for boxes.
            input_flatten (Tensor[N, S, C]): the L feature maps, flattened and concatenated.
            input_spatial_shapes (Tensor[L, 2], int64): (H, W) of each level.
            input_level_start_index (Tensor[L], int64): first row of each level in S.
            input_padding_mask (Tensor[N, S], bool, optional): True where a pixel is padding.

        Returns:
            Tensor[N, Lq, C]
        """
        N, Lq, M, L = self._check(
            query, reference_points, input_flatten, input_spatial_shapes, input_padding_mask
        )
        S = input_flatten.shape[1]
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(N, S, M, self.d_model // M)
        points = self.points_per_level
        K = sum(points)
        offsets = self.sampling_offsets(query).view(N, Lq, M, K, 2)
        weights = self.attention_weights(query).view(N, Lq, M, K).softmax(-1)
        equal = isinstance(self.n_points, int)
        if equal:
            # The reference's (N, Lq, M, L, P) layout: the operator's equal-count form.
            P = self.n_points
            offsets, weights = offsets.view(N, Lq, M, L, P, 2), weights.view(N, Lq, M, L, P)
            ref = reference_points[:, :, None, :, None, :]
            wh = input_spatial_shapes.flip(-1).to(ref.dtype)[None, None, None, :, None, :]
            scale = 1.0 / P
        else:
            # One entry per point: its level's reference point, map size and 1/P_l.
            level = torch.tensor(
                [lv for lv, p in enumerate(points) for _ in range(p)], device=query.device
            )
            ref = reference_points[:, :, None].index_select(3, level)
            wh = input_spatial_shapes.flip(-1).to(ref.dtype).index_select(0, level)[None, None]
            scale = torch.tensor(
                [1.0 / p for p in points for _ in range(p)], dtype=ref.dtype, device=ref.device
            )[:, None]
        if reference_points.shape[-1] == 2:
            # offsets are in pixels of each level: divide by (W, H)
            locations = ref + offsets / wh
        else:
            locations = ref[..., :2] + offsets * scale * ref[..., 2:] * 0.5
        if self.record_sampling:
            self.last_sampling = (locations.detach(), weights.detach())
        out = ms_deform_attn(
            value,
            input_spatial_shapes,
            input_level_start_index,
            locations,
            weights,
            backend=self.backend,
            points_per_level=None if equal else points,
            sampling=self.sampling,
        )
        return self.output_proj(out)

    def _check(self, query, reference_points, input_flatten, shapes, padding_mask):
        M, L, C = self.n_heads, self.n_levels, self.d_model
        if query.dim() != 3 or query.shape[-1] != C:
            raise ValueError(f"query must have shape (N, Lq, {C}), got {tuple(query.shape)}")
        N, Lq, _ = query.shape
        if input_flatten.dim() != 3 or input_flatten.shape[0] != N or input_flatten.shape[-1] != C:
            raise ValueError(
                f"input_flatten must have shape ({N}, S, {C}), got {tuple(input_flatten.shape)}"
            )
        if (
            tuple(reference_points.shape[:3]) != (N, Lq, L)
            or reference_points.dim() != 4
            or (reference_points.shape[-1] not in (2, 4))
        ):
            raise ValueError(
                f"reference_points must have shape ({N}, {Lq}, {L}, 2) or ({N}, {Lq}, {L}, 4), "
                f"got {tuple(reference_points.shape)}"
            )
        if shapes.dim() != 2 or shapes.shape[0] != L:
            raise ValueError(
                f"input_spatial_shapes must have shape ({L}, 2) for n_levels={L}, "
                f"got {tuple(shapes.shape)}"
            )
        want = tuple(input_flatten.shape[:2])
        if padding_mask is not None and (
            padding_mask.dtype != torch.bool or tuple(padding_mask.shape) != want
        ):
            raise ValueError(
                f"input_padding_mask must be a bool tensor of shape {want} (True = padding), "
                f"got {padding_mask.dtype} {tuple(padding_mask.shape)}"
            )
        return N, Lq, M, L

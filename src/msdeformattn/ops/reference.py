"""The ground truth: multi-scale deformable attention with ``grid_sample``.

This is the formulation of the reference implementation's PyTorch path
(``ms_deform_attn_core_pytorch``), with one difference the contract asks for:
a sample whose location is NaN or infinite contributes nothing and gets zero
gradient, where ``grid_sample`` alone would return NaN.

It runs on any device and floating dtype. Its memory is the price of its
simplicity: every sampled value, N*M*D*Lq*L*P of them, is materialised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import Backend, register

__all__ = [
    "ReferenceBackend",
    "compute_dtype",
    "kernel_dtype",
    "reference_backward",
    "reference_forward",
]

# grid_sampler_2d_backward's integer codes for mode="bilinear", padding_mode="zeros".
_BILINEAR = 0
_ZEROS = 0
# Any location this far outside the map reads no pixel: x*W - 0.5 < -1 for all W >= 1.
_OUTSIDE = -2.0


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype the arithmetic runs in: the inputs' promoted dtype."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def kernel_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """What the fused kernels compute in: float64 if the promoted dtype is, else float32."""
    return torch.float64 if compute_dtype(*tensors) == torch.float64 else torch.float32


def _grid(
    sampling_locations: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """grid_sample's grid (2*loc - 1) with non-finite samples moved outside every map.

    Locations are also clamped to [-2, 3]: beyond [-1, 2] nothing is read and
    the gradient is zero either way, and 2*loc - 1 can no longer overflow.
    """
    finite = torch.isfinite(sampling_locations).all(dim=-1, keepdim=True)
    loc = torch.where(finite, sampling_locations, _OUTSIDE).clamp(_OUTSIDE, 3.0).to(dtype)
    return 2 * loc - 1, finite


def _levels(spatial_shapes: torch.Tensor, level_start_index: torch.Tensor):
    shapes = spatial_shapes.tolist()
    starts = level_start_index.tolist()
    return [(l, h, w, starts[l]) for l, (h, w) in enumerate(shapes)]


def _level_value(value: torch.Tensor, start: int, h: int, w: int, dtype: torch.dtype):
    # (N, H*W, M, D) -> (N*M, D, H, W): grid_sample's layout, one image per (batch, head).
    N, _, M, D = value.shape
    v = value[:, start : start + h * w].to(dtype)
    return v.permute(0, 2, 3, 1).reshape(N * M, D, h, w)


def _per_head(t: torch.Tensor, l: int) -> torch.Tensor:
    # (N, Lq, M, L, P, ...) level l -> (N*M, Lq, P, ...)
    t = t[:, :, :, l].transpose(1, 2)
    return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])


def reference_forward(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Forward of the operator with ``grid_sample``; differentiable by autograd.

    Shapes as in :func:`msdeformattn.ms_deform_attn`; returns ``(N, Lq, M*D)``
    in ``value``'s dtype, computed in the inputs' promoted dtype.
    """
    N, _, M, D = value.shape
    Lq = sampling_locations.shape[1]
    dtype = compute_dtype(value, sampling_locations, attention_weights)
    grid, _ = _grid(sampling_locations, dtype)
    out = value.new_zeros((N * M, D, Lq), dtype=dtype)
    for l, h, w, start in _levels(spatial_shapes, level_start_index):
        sampled = F.grid_sample(
            _level_value(value, start, h, w, dtype),
            _per_head(grid, l),
            mode="bilinear",
            padding_mode="zeros",
            align_corners=False,
        )  # (N*M, D, Lq, P)
        weights = _per_head(attention_weights, l).to(dtype).unsqueeze(1)  # (N*M, 1, Lq, P)
        out = out + (sampled * weights).sum(-1)
    return out.view(N, M * D, Lq).transpose(1, 2).contiguous().to(value.dtype)


def reference_backward(
    grad_output: torch.Tensor,
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`reference_forward` by ``grid_sampler_2d_backward``.

    Written out rather than left to autograd so that it can run inside a
    registered operator's backward, where autograd does not record.
    Returns ``(grad_value, grad_sampling_locations, grad_attention_weights)``,
    each in its input's dtype.
    """
    N, S, M, D = value.shape
    Lq, L, P = sampling_locations.shape[1], sampling_locations.shape[3], sampling_locations.shape[4]
    dtype = compute_dtype(value, sampling_locations, attention_weights)
    grid, finite = _grid(sampling_locations, dtype)
    # (N, Lq, M*D) -> (N*M, D, Lq, 1), broadcast over the P points of a level.
    go = grad_output.to(dtype).reshape(N, Lq, M, D).permute(0, 2, 3, 1).reshape(N * M, D, Lq, 1)
    grad_value = value.new_zeros((N, S, M, D), dtype=dtype)
    grad_loc = value.new_zeros((N, Lq, M, L, P, 2), dtype=dtype)
    grad_attn = value.new_zeros((N, Lq, M, L, P), dtype=dtype)
    for l, h, w, start in _levels(spatial_shapes, level_start_index):
        v_l = _level_value(value, start, h, w, dtype)
        g_l = _per_head(grid, l)
        a_l = _per_head(attention_weights, l).to(dtype).unsqueeze(1)
        sampled = F.grid_sample(
            v_l, g_l, mode="bilinear", padding_mode="zeros", align_corners=False
        )
        g_in, g_grid = torch.ops.aten.grid_sampler_2d_backward(
            go * a_l, v_l, g_l, _BILINEAR, _ZEROS, False, [True, True]
        )
        grad_value[:, start : start + h * w] = g_in.view(N, M, D, h * w).permute(0, 3, 1, 2)
        # d grid / d loc = 2
        grad_loc[:, :, :, l] = (2 * g_grid).view(N, M, Lq, P, 2).transpose(1, 2)
        grad_attn[:, :, :, l] = (sampled * go).sum(1).view(N, M, Lq, P).transpose(1, 2)
    grad_loc = torch.where(finite, grad_loc, 0)
    return (
        grad_value.to(value.dtype),
        grad_loc.to(sampling_locations.dtype),
        grad_attn.to(attention_weights.dtype),
    )


class ReferenceBackend(Backend):
    """Plain PyTorch: any device, any floating dtype; the lowest priority."""

    NAME = "reference"
    PRIORITY = 0
    SUPPORTED_DEVICES = None
    # Follows grid_sample, which PyTorch itself refuses under deterministic mode where it isn't.
    IS_DETERMINISTIC = True

    def forward(self, *inputs):
        return reference_forward(*inputs)

    def backward(self, grad_output, *inputs):
        return reference_backward(grad_output, *inputs)


register(ReferenceBackend())

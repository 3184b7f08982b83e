"""The registered operator ``msdeformattn::ms_deform_attn`` and the public function.

Every backend runs behind one ``torch.library`` operator, so ``torch.compile``
sees one opaque node with a fake implementation (no graph break),
``torch.library.opcheck`` can test the registration, and autograd goes
through an explicit backward operator that saves only the inputs. The one
exception is the public function on the ``triton`` backend: it calls that
backend's own ``triton_op``s, which torch.compile traces into.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import cpu, reference, triton  # noqa: F401  (registers the backends)
from .forms import SAMPLING, check_points_per_level, snap_to_pixels, to_equal_points
from .registry import get_backend, resolve
from .traceable import traceable_forward
from .validate import check_inputs

__all__ = ["ms_deform_attn"]


@torch.library.custom_op("msdeformattn::ms_deform_attn", mutates_args=())
def _ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    backend: str,
) -> torch.Tensor:
    return get_backend(backend).forward(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )


@_ms_deform_attn.register_fake
def _fake_forward(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, backend
):
    N, _, M, D = value.shape
    Lq = sampling_locations.shape[1]
    torch._check(sampling_locations.shape[0] == N and attention_weights.shape[0] == N)
    torch._check(sampling_locations.shape[2] == M and sampling_locations.shape[-1] == 2)
    torch._check(spatial_shapes.shape[0] == sampling_locations.shape[3])
    return value.new_empty((N, Lq, M * D))


@torch.library.custom_op("msdeformattn::ms_deform_attn_backward", mutates_args=())
def _ms_deform_attn_backward(
    grad_output: torch.Tensor,
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return get_backend(backend).backward(
        grad_output,
        value,
        spatial_shapes,
        level_start_index,
        sampling_locations,
        attention_weights,
    )


@_ms_deform_attn_backward.register_fake
def _(
    grad_output,
    value,
    spatial_shapes,
    level_start_index,
    sampling_locations,
    attention_weights,
    backend,
):
    torch._check(grad_output.shape[0] == value.shape[0])
    return (
        torch.empty_like(value),
        torch.empty_like(sampling_locations),
        torch.empty_like(attention_weights),
    )


def _setup_context(ctx, inputs, output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, backend = (
        inputs
    )
    ctx.save_for_backward(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
    ctx.backend = backend


def _backward(ctx, grad_output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = (
        ctx.saved_tensors
    )
    grad_value, grad_loc, grad_attn = _ms_deform_attn_backward(
        grad_output,
        value,
        spatial_shapes,
        level_start_index,
        sampling_locations,
        attention_weights,
        ctx.backend,
    )
    return grad_value, None, None, grad_loc, grad_attn, None


_ms_deform_attn.register_autograd(_backward, setup_context=_setup_context)


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    backend: str | None = None,
    check_values: bool = True,
    *,
    points_per_level: Sequence[int] | None = None,
    sampling: str = "bilinear",
) -> torch.Tensor:
    """Multi-scale deformable attention (Deformable DETR, eq. 3) without the projections.

    Args:
        value (Tensor[N, S, M, D]): the L feature maps of each head, flattened
            and concatenated; ``S = sum(H_l * W_l)``.
        spatial_shapes (Tensor[L, 2], int64): ``(H_l, W_l)`` of each level.
        level_start_index (Tensor[L], int64): first row of each level in S.
        sampling_locations (Tensor[N, Lq, M, L, P, 2]): ``(x, y)`` in
            normalised coordinates, 0 the left/top edge and 1 the right/bottom
            edge of the map. A NaN or infinite location contributes nothing
            and gets zero gradient.
        attention_weights (Tensor[N, Lq, M, L, P]): weight of each sample.
        backend: ``None`` for the fastest backend that supports the call
            (see :func:`resolve`), or a name from :func:`available_backends`.
        check_values: read ``spatial_shapes`` and ``level_start_index`` to
            check that they tile S. Costs a host sync on a GPU; pass ``False``
            in hot loops once the inputs are known good. Kernels stay in
            bounds either way.
        points_per_level: RT-DETRv2's per-level point counts ``[P_0, ..., P_{L-1}]``;
            sampling_locations are then (N, Lq, M, sum(P_l), 2) and
            attention_weights (N, Lq, M, sum(P_l)), level 0's samples first.
        sampling: ``"bilinear"``, or ``"discrete"`` (RT-DETRv2): each sample reads
            the pixel ``floor(loc * (W, H) + 0.5)``, clamped to the map per axis, and
            only ``value`` and the weights get gradients. See :mod:`.forms`.

    Returns:
        Tensor[N, Lq, M*D] in ``value``'s dtype, channel ``m*D + d`` for head m.
        The arithmetic runs in the inputs' promoted dtype (at least float32 on
        the fused backends), so float16 value with float32 locations, as
        autocast produces, is fine.

    Example:
        >>> shapes = torch.tensor([[8, 8], [4, 4]])
        >>> starts = torch.tensor([0, 64])
        >>> value = torch.randn(2, 80, 8, 32)
        >>> loc = torch.rand(2, 100, 8, 2, 4, 2)
        >>> attn = torch.rand(2, 100, 8, 2, 4).softmax(-1)
        >>> ms_deform_attn(value, shapes, starts, loc, attn).shape
        torch.Size([2, 100, 256])
    """
    if sampling not in SAMPLING:
        raise ValueError(f"sampling must be one of {SAMPLING}, got {sampling!r}")
    if points_per_level is not None:
        points = check_points_per_level(
            points_per_level, spatial_shapes, sampling_locations, attention_weights
        )
        sampling_locations, attention_weights = to_equal_points(
            sampling_locations, attention_weights, points
        )
    exporting = torch.onnx.is_in_onnx_export()
    check_inputs(
        value,
        spatial_shapes,
        level_start_index,
        sampling_locations,
        attention_weights,
        # While tracing (compile, export) the values are unknown.
        check_values=check_values and not torch.compiler.is_compiling() and not exporting,
    )
    if sampling == "discrete":
        sampling_locations = snap_to_pixels(sampling_locations, spatial_shapes)
    if exporting:
        # ONNX has no kernel of ours: standard ops, level tables kept as tensors.
        return traceable_forward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
    name = resolve(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, backend
    ).backend
    if name == "triton":
        # The kernel operators themselves, not the opaque operator around them:
        # torch.compile then traces into the launches (see .triton).
        return triton.apply(
            value,
            spatial_shapes.long(),
            level_start_index.long(),
            sampling_locations,
            attention_weights,
        )
    return _ms_deform_attn(
        value,
        spatial_shapes.long(),
        level_start_index.long(),
        sampling_locations,
        attention_weights,
        name,
    )

"""Boundary checks for the operator's inputs.

Every public entry point calls :func:`check_inputs` before any kernel runs, so
a wrong call fails with a message that names the argument, what it got and
what was expected, instead of an obscure error (or a wild read) deep in a
kernel.
"""

from __future__ import annotations

import torch

__all__ = ["check_inputs", "check_level_values"]


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def _expect_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _expect_float(name: str, t: torch.Tensor) -> None:
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def _expect_int(name: str, t: torch.Tensor) -> None:
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (int64), got dtype {t.dtype}")


def check_inputs(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    check_values: bool = True,
) -> None:
    """Check ranks, sizes, dtypes and devices; optionally the level table's values.

    Raises ``TypeError`` for a wrong type or dtype and ``ValueError`` for a
    wrong shape, device or level table. ``check_values=False`` skips reading
    ``spatial_shapes`` and ``level_start_index`` (a host sync on a GPU); the
    kernels stay in bounds either way.
    """
    for name, t in (
        ("value", value),
        ("spatial_shapes", spatial_shapes),
        ("level_start_index", level_start_index),
        ("sampling_locations", sampling_locations),
        ("attention_weights", attention_weights),
    ):
        _expect_tensor(name, t)
    _expect_float("value", value)
    _expect_float("sampling_locations", sampling_locations)
    _expect_float("attention_weights", attention_weights)
    _expect_int("spatial_shapes", spatial_shapes)
    _expect_int("level_start_index", level_start_index)

    if value.dim() != 4:
        raise ValueError(f"value must have shape (N, S, M, D) (4 dims), got {_shape(value)}")
    N, S, M, _ = value.shape
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
        raise ValueError(
            f"spatial_shapes must have shape (L, 2) holding (H, W) per level, "
            f"got {_shape(spatial_shapes)}"
        )
    L = spatial_shapes.shape[0]
    if L == 0:
        raise ValueError("spatial_shapes must describe at least one level, got shape (0, 2)")
    if tuple(level_start_index.shape) != (L,):
        raise ValueError(
            f"level_start_index must have shape (L,) = ({L},) to match spatial_shapes, "
            f"got {_shape(level_start_index)}"
        )
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(
            "sampling_locations must have shape (N, Lq, M, L, P, 2), "
            f"got {_shape(sampling_locations)}"
        )
    n, Lq, m, l, P, _ = sampling_locations.shape
    if (n, m, l) != (N, M, L):
        raise ValueError(
            f"sampling_locations must have shape (N, Lq, M, L, P, 2) = "
            f"({N}, Lq, {M}, {L}, P, 2) to match value (N, S, M, D) = {_shape(value)} and "
            f"spatial_shapes (L, 2) = {_shape(spatial_shapes)}, got {_shape(sampling_locations)}"
        )
    expected = (N, Lq, M, L, P)
    if tuple(attention_weights.shape) != expected:
        raise ValueError(
            f"attention_weights must have shape (N, Lq, M, L, P) = {expected} to match "
            f"sampling_locations {_shape(sampling_locations)}, got {_shape(attention_weights)}"
        )
    devices = {
        "value": value.device,
        "spatial_shapes": spatial_shapes.device,
        "level_start_index": level_start_index.device,
        "sampling_locations": sampling_locations.device,
        "attention_weights": attention_weights.device,
    }
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{k} on {v}" for k, v in devices.items())
        raise ValueError(f"all inputs must be on one device, got {listed}")
    if check_values and value.device.type != "meta":  # meta tensors hold no values
        check_level_values(spatial_shapes, level_start_index, S)


def check_level_values(
    spatial_shapes: torch.Tensor, level_start_index: torch.Tensor, S: int
) -> None:
    """Check that the level table tiles ``S`` rows exactly: starts 0, H0*W0, ..."""
    shapes = spatial_shapes.tolist()
    starts = level_start_index.tolist()
    for l, (h, w) in enumerate(shapes):
        if h < 1 or w < 1:
            raise ValueError(f"spatial_shapes[{l}] must be (H, W) with H, W >= 1, got ({h}, {w})")
    expected_starts = [0]
    for h, w in shapes[:-1]:
        expected_starts.append(expected_starts[-1] + h * w)
    if starts != expected_starts:
        raise ValueError(
            f"level_start_index must be the running sum of H*W over spatial_shapes, "
            f"expected {expected_starts}, got {starts}"
        )
    total = sum(h * w for h, w in shapes)
    if total != S:
        raise ValueError(
            f"value has S = {S} rows but spatial_shapes covers sum(H*W) = {total}; "
            f"value must have shape (N, sum(H*W), M, D)"
        )

"""The check every contender passes before it is timed: its output against the formula's.

The check is for layout and formula errors (x and y swapped, a transposed output),
not for the precision of a low-precision run, which the half-precision tests cover.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..ops import ms_deform_attn
from .timing import Inputs, sync

#: How far a contender's output may be from the float64 formula, relative to
#: the output's largest magnitude: summation order only.
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-9}


def agreement_check(inputs: Inputs) -> tuple[Inputs, torch.Tensor]:
    """Inputs for :func:`disagreement` and the formula's output on them.

    float32 copies of the inputs (float64 for a float64 run), and our reference
    backend run on them in float64: (N, Lq, M*D).
    """
    wide = torch.float64 if inputs[0].dtype == torch.float64 else torch.float32
    check = tuple(t.to(wide) if t.is_floating_point() else t for t in inputs)
    exact = tuple(t.double() if t.is_floating_point() else t for t in check)
    with torch.no_grad():
        return check, ms_deform_attn(*exact, backend="reference")


def disagreement(fn: Callable, check: Inputs, expected: torch.Tensor) -> str | None:
    """Why ``fn``'s output on ``check`` is not ``expected`` (None if it is), or its error."""
    try:
        with torch.no_grad():
            out = fn(*check)
        # A CUDA kernel's fault surfaces at the next synchronisation: here, not later.
        sync(out.device.type)
    except Exception as e:  # a peer's own refusal: report it, time the rest
        return f"raised {type(e).__name__}: {e}"
    if out.shape != expected.shape:
        return f"output shape {tuple(out.shape)}, expected {tuple(expected.shape)}"
    tol = TOLERANCE[check[0].dtype]
    err = (out.double() - expected).abs().max().item() if out.numel() else 0.0
    scale = max(expected.abs().max().item(), 1.0) if expected.numel() else 1.0
    if not err <= tol * scale:  # also catches NaN
        return f"max abs difference {err:.3g} from the formula (allowed {tol * scale:.3g})"
    return None

"""The export formulation (standard ops only) against the reference."""

from __future__ import annotations

import pytest
import torch

import msdeformattn
from msdeformattn.ops.traceable import traceable_forward

from ..conftest import TOL, grads, make_inputs


def reference(*inputs):
    return msdeformattn.ms_deform_attn(*inputs, backend="reference")


@pytest.mark.parametrize(
    "shape",
    [
        dict(N=2, Lq=6, M=3, D=5, levels=((4, 6), (2, 3), (1, 1)), P=3),
        dict(N=1, Lq=4, M=1, D=2, levels=((1, 7),), P=1),
    ],
)
def test_matches_reference_forward_and_gradients(shape):
    inputs = make_inputs(**shape, dtype=torch.float64)
    for g, e in zip(grads(traceable_forward, inputs), grads(reference, inputs), strict=True):
        torch.testing.assert_close(g, e, **TOL[torch.float64])


def test_non_finite_and_far_locations():
    value, shapes, starts, loc, attn = make_inputs(dtype=torch.float32)
    loc[0, 0, 0, 0, 0, 0] = float("nan")
    loc[1, 1, 1, 1, 1] = torch.tensor([float("inf"), 3e38])
    out = traceable_forward(value, shapes, starts, loc, attn)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(
        out, reference(value, shapes, starts, loc, attn), **TOL[torch.float32]
    )

"""The reference against an independent scalar loop over the contract's formula."""

from __future__ import annotations

import pytest
import torch

from msdeformattn.ops.reference import reference_backward, reference_forward

from ..conftest import grads, make_inputs, naive


@pytest.mark.parametrize(
    "levels", [((4, 6), (2, 3), (1, 1)), ((1, 5),), ((3, 1), (1, 1))], ids=["3lv", "1xW", "Hx1"]
)
def test_reference_matches_naive_loop(levels):
    inputs = make_inputs(N=2, Lq=4, M=2, D=3, levels=levels, P=3)
    torch.testing.assert_close(reference_forward(*inputs), naive(*inputs), atol=1e-12, rtol=1e-12)


def test_reference_on_exact_edges_matches_naive_loop():
    inputs = list(make_inputs(N=1, Lq=6, M=1, D=2, levels=((3, 4),), P=4))
    W, H = 4, 3
    edges = torch.tensor([0.0, 1.0, -0.5 / W, 1 + 0.5 / W, 0.5 / W, 1.5 / W], dtype=torch.float64)
    loc = inputs[3]
    g = torch.Generator().manual_seed(3)
    loc[..., 0] = edges[torch.randint(0, 6, loc.shape[:-1], generator=g)]
    loc[..., 1] = edges[torch.randint(0, 6, loc.shape[:-1], generator=g)] * W / H
    torch.testing.assert_close(reference_forward(*inputs), naive(*inputs), atol=1e-12, rtol=1e-12)


def test_explicit_backward_matches_autograd():
    """The written-out backward equals autograd through the forward's grid_sample."""
    inputs = make_inputs(N=2, Lq=5, M=3, D=4, P=2)
    out, *expected = grads(reference_forward, inputs)
    got = reference_backward(
        torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64),
        *inputs,
    )
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-12, rtol=1e-12)


def test_non_finite_locations_read_nothing_with_zero_gradient():
    inputs = list(make_inputs(N=1, Lq=3, M=2, D=2, P=2))
    loc = inputs[3]
    loc[0, 0, 0, 0, 0, 0] = float("nan")
    loc[0, 1, 1, 1, 1, 1] = float("inf")
    loc[0, 2, 0, 2, 0, 0] = -float("inf")
    out = reference_forward(*inputs)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, naive(*inputs), atol=1e-12, rtol=1e-12)
    gv, gl, ga = reference_backward(torch.ones_like(out), *inputs)
    for g in (gv, gl, ga):
        assert torch.isfinite(g).all()
    assert gl[0, 0, 0, 0, 0].abs().sum() == 0
    assert gl[0, 1, 1, 1, 1].abs().sum() == 0
    assert ga[0, 0, 0, 0, 0] == 0

"""Every backend against the reference: gradcheck in float64, a float32 sweep, the edges."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ..conftest import TOL, grads, make_inputs
from .conftest import BACKENDS, FLOAT64, FUSED, INTERPRETED, non_contiguous, run, split


def assert_matches_reference(backend, inputs, dtype=torch.float32, check_loc=True):
    got = grads(run(backend), inputs)
    expected = grads(run("reference"), inputs)
    names = ("output", "grad_value", "grad_sampling_locations", "grad_attention_weights")
    for name, g, e in zip(names, got, expected, strict=True):
        if name == "grad_sampling_locations" and not check_loc:
            continue
        # Rounding grows with the size of the sums (location gradients scale with W, H and
        # D and cancel): the absolute tolerance is relative to the tensor's largest entry.
        tol = dict(TOL[dtype])
        tol["atol"] *= max(1.0, float(e.abs().max())) if e.numel() else 1.0
        torch.testing.assert_close(g, e, **tol, msg=lambda m, n=name: f"{n}: {m}")


def test_backends_under_test():
    assert {"cpu", "reference"} <= set(BACKENDS)
    assert "triton" in BACKENDS or not importlib.util.find_spec("triton")


@pytest.mark.parametrize("backend", FLOAT64)
@pytest.mark.parametrize(
    "shape",
    [
        dict(N=2, Lq=3, M=2, D=3, levels=((4, 6), (2, 3), (1, 1)), P=2),
        dict(N=1, Lq=2, M=3, D=5, levels=((1, 7),), P=1),
        dict(N=3, Lq=1, M=1, D=2, levels=((5, 2), (3, 3)), P=3),
        # The CPU kernel works on 8 float64 channels at a time: one vector and a tail.
        dict(N=1, Lq=2, M=2, D=11, levels=((3, 4), (1, 1)), P=2),
    ],
    ids=["3lv", "1xW-1lv-1pt", "batch3", "vector+tail"],
)
def test_gradcheck_float64(backend, shape):
    # Random points never sit exactly on a pixel position, where bilinear
    # sampling has kinks and finite differences are meaningless.
    value, shapes, starts, loc, attn = make_inputs(**shape, requires_grad=True)
    op = run(backend)
    assert torch.autograd.gradcheck(
        lambda v, l, a: op(v, shapes, starts, l, a),
        (value, loc, attn),
        atol=1e-7,
        rtol=1e-5,
        # The interpreter takes ~0.1 s a call, too slow for one call per input
        # element; fast mode compares random projections of the Jacobian instead.
        fast_mode=backend in INTERPRETED,
    )


@st.composite
def cases(draw):
    L = draw(st.integers(1, 4))
    levels = tuple(
        draw(st.sampled_from([(1, 1), (1, draw(st.integers(2, 9))), (draw(st.integers(2, 9)), 1)]))
        if draw(st.booleans())
        else (draw(st.integers(1, 12)), draw(st.integers(1, 12)))
        for _ in range(L)
    )
    return dict(
        N=draw(st.integers(1, 3)),
        Lq=draw(st.integers(1, 24)),
        M=draw(st.integers(1, 4)),
        D=draw(st.integers(1, 40)),
        levels=levels,
        P=draw(st.integers(1, 4)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


# Triton's interpreter runs kernels in numpy, ~100x slower than compiled: fewer examples.
COMPILED = [b for b in FUSED if b not in INTERPRETED]


@pytest.mark.parametrize("backend", COMPILED)
@settings(max_examples=60, deadline=None)
@given(case=cases())
def test_float32_sweep_matches_reference(backend, case):
    assert_matches_reference(backend, make_inputs(**case, dtype=torch.float32))


@pytest.mark.parametrize("backend", INTERPRETED)
@settings(max_examples=12, deadline=None)
@given(case=cases())
def test_float32_sweep_matches_reference_interpreted(backend, case):
    assert_matches_reference(backend, make_inputs(**case, dtype=torch.float32))


@pytest.mark.parametrize("backend", FUSED)
def test_exact_edges_match_reference(backend):
    """Points on map edges, one pixel outside, and on pixel centres, as grid_sample does them."""
    value, shapes, starts, loc, attn = make_inputs(
        N=2, Lq=16, M=2, D=17, levels=((3, 4), (1, 1), (2, 5)), P=4, dtype=torch.float32
    )
    g = torch.Generator().manual_seed(3)
    for l, (H, W) in enumerate(shapes.tolist()):
        for c, size in ((0, W), (1, H)):
            edges = torch.tensor([0.0, 1.0, -0.5 / size, 1 + 0.5 / size, 0.5 / size, -2.0, 3.0])
            pick = torch.randint(0, len(edges), loc[:, :, :, l, :, c].shape, generator=g)
            loc[:, :, :, l, :, c] = edges[pick]
    # grad_loc is not defined at the kinks these points sit on; the rest must agree.
    assert_matches_reference(backend, (value, shapes, starts, loc, attn), check_loc=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_locations_contribute_nothing(backend):
    # D = 17: the fused kernels' vector and scalar channel paths both run.
    value, shapes, starts, loc, attn = make_inputs(N=2, Lq=4, M=2, D=17, P=2, dtype=torch.float32)
    loc[0, 0, 0, 0, 0, 0] = float("nan")
    loc[1, 1, 1, 1, 1, 1] = float("inf")
    loc[1, 2, 0, 2, 0] = -float("inf")
    loc[0, 3, 1] = float("nan")
    keep = torch.isfinite(loc).all(-1)
    out, gv, gl, ga = grads(run(backend), (value, shapes, starts, loc, attn))
    for t in (out, gv, gl, ga):
        assert torch.isfinite(t).all()
    assert (gl[~keep] == 0).all() and (ga[~keep] == 0).all()
    # The same as giving those samples zero weight.
    out_zeroed = run(backend)(
        value, shapes, starts, torch.where(keep[..., None], loc, 0.5), attn * keep
    )
    torch.testing.assert_close(out, out_zeroed, **TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_locations_stay_in_bounds(backend):
    value, shapes, starts, loc, attn = make_inputs(N=1, Lq=3, M=1, D=17, P=2, dtype=torch.float32)
    loc[0, 0, 0, 0, 0] = torch.tensor([1e30, -1e30])
    loc[0, 1, 0, 1, 1] = torch.tensor([-3e38, 3e38])
    loc[0, 2, 0, 2, 0] = torch.tensor([2.0**40, 0.5])
    assert_matches_reference(backend, (value, shapes, starts, loc, attn))


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize(
    "kw",
    [
        pytest.param(
            dict(N=1, Lq=100_000, M=1, D=1, levels=((3, 5),), P=1), marks=pytest.mark.slow
        ),
        dict(N=64, Lq=3, M=2, D=2, levels=((3, 5), (1, 2)), P=1),
    ],
    ids=["Lq=1e5", "N=64"],
)
def test_many_queries_and_a_large_batch(backend, kw):
    # The launch grids: a GPU caps grid dimensions, and every query and image
    # must land in exactly one program. (The interpreter takes ~30 s for 1e5.)
    assert_matches_reference(backend, make_inputs(dtype=torch.float32, **kw))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    inputs = make_inputs(N=2, Lq=5, M=3, D=4, P=2, dtype=torch.float32)
    nc = non_contiguous(inputs)
    assert not any(t.is_contiguous() for t in (nc[0], nc[3], nc[4]))
    for e, g in zip(
        grads(run(backend), inputs),
        grads(run(backend), nc),
        strict=True,
    ):
        torch.testing.assert_close(g, e, **TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("empty", ["N", "Lq", "D", "M", "P"])
def test_empty_dimensions(backend, empty):
    kw = dict(N=2, Lq=3, M=2, D=3, P=2, dtype=torch.float32)
    kw[empty] = 0
    inputs = make_inputs(**kw)
    out, gv, gl, ga = grads(run(backend), inputs)
    assert out.shape == (kw["N"], kw["Lq"], kw["M"] * kw["D"])
    # With D = 0 there are samples but nothing to sample: zero gradients, in
    # full (the fused backends allocate these without zeroing).
    for g, t in zip((gv, gl, ga), (inputs[0], inputs[3], inputs[4]), strict=True):
        assert g.shape == t.shape and (g == 0).all()


@pytest.mark.slow
@pytest.mark.parametrize("backend", FUSED)
def test_indices_beyond_32_bits(backend):
    """value with N*S*M*D > 2**31 elements: the last pixel is read from the right place.

    On the CPU, torch.empty of 8.6 GB maps fresh zero pages; only the pages
    written or read here become resident, so the test needs a few MB of real
    memory. A GPU gets 8.6 GB of zeroed device memory.
    """
    H = W = 2900
    D = 256
    assert H * W * D > 2**31
    device = split(backend)[1]
    value = (
        torch.empty(1, H * W, 1, D)
        if device == "cpu"
        else torch.zeros(1, H * W, 1, D, device=device)
    )
    value[0, 0, 0] = -1.0
    value[0, -1, 0] = torch.arange(D, dtype=torch.float32)
    shapes = torch.tensor([[H, W]])
    starts = torch.tensor([0])
    loc = torch.tensor([[0.5 / W, 0.5 / H], [(W - 0.5) / W, (H - 0.5) / H]]).view(1, 2, 1, 1, 1, 2)
    attn = torch.full((1, 2, 1, 1, 1), 0.5)
    out = run(backend)(value, shapes, starts, loc, attn)
    torch.testing.assert_close(out[0, 0], torch.full((D,), -0.5))
    torch.testing.assert_close(out[0, 1], 0.5 * torch.arange(D, dtype=torch.float32))


# grid_sample's CUDA backward uses atomics and PyTorch refuses it in deterministic mode.
DETERMINISTIC = [b for b in BACKENDS if b != "reference@cuda"]


@pytest.mark.parametrize("backend", DETERMINISTIC)
def test_backward_is_bitwise_deterministic(backend):
    """Run twice under torch.use_deterministic_algorithms: the same bits."""
    inputs = make_inputs(N=2, Lq=40, M=2, D=16, P=4, dtype=torch.float32, low=0, high=1)
    torch.use_deterministic_algorithms(True)
    try:
        first = grads(run(backend), inputs)
        second = grads(run(backend), inputs)
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_within_twice_the_reference_error(backend, dtype):
    """Low precision by rule: error vs float64 at most twice the reference's in that dtype."""
    inputs64 = make_inputs(N=2, Lq=30, M=2, D=16, P=4, low=0, high=1)
    exact = grads(run("reference"), inputs64)
    low = tuple(t.to(dtype) if t.is_floating_point() else t for t in inputs64)
    ref_low = grads(run("reference"), low, exact[0].new_ones(exact[0].shape).to(dtype))
    got = grads(run(backend), low, exact[0].new_ones(exact[0].shape).to(dtype))
    exact = grads(run("reference"), inputs64, exact[0].new_ones(exact[0].shape))
    for g, r, e in zip(got, ref_low, exact, strict=True):
        assert g.dtype == dtype
        err = (g.double() - e).abs().max()
        ref_err = (r.double() - e).abs().max()
        assert err <= 2 * ref_err + 1e-6, (err, ref_err)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("wide", [torch.float32, torch.float64])
def test_mixed_precision_value_half_locations_float(backend, half, wide):
    """What autocast produces (value in low precision, locations and weights in
    float32), and the same with float64 locations: the arithmetic is in the wider
    dtype, the output and grad_value in value's."""
    value, shapes, starts, loc, attn = make_inputs(N=1, Lq=8, M=2, D=8, P=2, dtype=wide)
    out, gv, gl, ga = grads(run(backend), (value.to(half), shapes, starts, loc, attn))
    assert out.dtype == gv.dtype == half
    assert gl.dtype == ga.dtype == wide
    expected = run("reference")(value.to(half).double(), shapes, starts, loc, attn)
    # Within one rounding to the half dtype of the exact result.
    eps = torch.finfo(half).eps
    torch.testing.assert_close(out.double(), expected.double(), atol=eps, rtol=eps)

"""Per-level point counts and discrete sampling, on every backend, against a scalar loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import msdeformattn

from ..conftest import TOL, make_inputs, naive_samples
from .conftest import BACKENDS, FLOAT64, split

POINTS = [1, 3, 2]
LEVELS = ((4, 6), (2, 3), (1, 1))


def per_level_inputs(points=POINTS, levels=LEVELS, dtype=torch.float64, seed=0, N=2, Lq=4):
    """Inputs of the per-level form: (value, shapes, starts, loc (N,Lq,M,K,2), attn (N,Lq,M,K))."""
    value, shapes, starts, loc, attn = make_inputs(
        N=N, Lq=Lq, M=2, D=3, levels=levels, P=max(points), dtype=dtype, seed=seed
    )
    keep = [p for lv, n in enumerate(points) for p in range(lv * max(points), lv * max(points) + n)]
    loc = loc.flatten(3, 4)[:, :, :, keep].contiguous()
    attn = attn.flatten(3, 4)[:, :, :, keep].contiguous()
    return value, shapes, starts, loc, attn


def sample_levels(points):
    return [lv for lv, n in enumerate(points) for _ in range(n)]


def call(target, inputs, **kw):
    backend, device = split(target)
    inputs = [t.to(device) for t in inputs]
    return msdeformattn.ms_deform_attn(*inputs, backend=backend, **kw).cpu()


@pytest.mark.parametrize("sampling", ["bilinear", "discrete"])
@pytest.mark.parametrize("target", BACKENDS)
def test_per_level_points_match_the_scalar_loop(target, sampling):
    inputs = per_level_inputs(dtype=torch.float32)
    got = call(target, inputs, points_per_level=POINTS, sampling=sampling)
    expected = naive_samples(*inputs, sample_levels(POINTS), discrete=sampling == "discrete")
    torch.testing.assert_close(got.double(), expected, **TOL[torch.float32])


@pytest.mark.parametrize("target", FLOAT64)
def test_per_level_points_gradcheck(target):
    backend, device = split(target)
    value, shapes, starts, loc, attn = (t.to(device) for t in per_level_inputs(N=1, Lq=2))
    for t in (value, loc, attn):
        t.requires_grad_()

    def fn(value, loc, attn):
        return msdeformattn.ms_deform_attn(
            value, shapes, starts, loc, attn, backend=backend, points_per_level=POINTS
        )

    # The interpreter is slow: fast mode there, as in test_backends.
    assert torch.autograd.gradcheck(fn, (value, loc, attn), fast_mode=backend == "triton")


def test_equal_counts_are_the_equal_count_call():
    value, shapes, starts, loc, attn = make_inputs(P=3)
    expected = msdeformattn.ms_deform_attn(value, shapes, starts, loc, attn)
    got = msdeformattn.ms_deform_attn(
        value, shapes, starts, loc.flatten(3, 4), attn.flatten(3, 4), points_per_level=[3, 3, 3]
    )
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_discrete_reads_the_right_pixel_on_non_square_levels():
    # One 2x5 level (H=2, W=5): x = 0.95 reads column 4; RT-DETRv2 clamps x to H-1 = 1.
    value = torch.arange(10, dtype=torch.float64).view(1, 10, 1, 1)
    shapes, starts = torch.tensor([[2, 5]]), torch.tensor([0])
    loc = torch.tensor([0.95, 0.9, 0.05, 0.1, 1.7, -0.4, 0.5, 0.5], dtype=torch.float64)
    loc = loc.view(1, 4, 1, 1, 1, 2)
    attn = torch.ones(1, 4, 1, 1, 1, dtype=torch.float64)
    out = msdeformattn.ms_deform_attn(value, shapes, starts, loc, attn, sampling="discrete")
    # (x, y) -> pixel: (0.95, 0.9) -> (4, 1); (0.05, 0.1) -> (0, 0);
    # (1.7, -0.4) -> clamped (4, 0); (0.5, 0.5) -> floor(3.0), floor(1.5) = (3, 1).
    assert out.flatten().tolist() == [9.0, 0.0, 4.0, 8.0]


@pytest.mark.parametrize("target", FLOAT64)
def test_discrete_gradients_reach_value_and_weights_only(target):
    backend, device = split(target)
    value, shapes, starts, loc, attn = (t.to(device) for t in make_inputs(N=1, Lq=3))
    loc.requires_grad_()
    out = msdeformattn.ms_deform_attn(
        value, shapes, starts, loc, attn.requires_grad_(), backend=backend, sampling="discrete"
    )
    grad_loc, _ = torch.autograd.grad(out.sum(), (loc, attn), allow_unused=True)
    assert grad_loc is None or (grad_loc == 0).all()

    def fn(value, attn):
        return msdeformattn.ms_deform_attn(
            value, shapes, starts, loc.detach(), attn, backend=backend, sampling="discrete"
        )

    inputs = (value.requires_grad_(), attn.detach().requires_grad_())
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=backend == "triton")


def test_non_finite_locations_read_nothing_in_both_forms():
    value, shapes, starts, loc, attn = per_level_inputs()
    loc[0, 0, 0, 0] = float("nan")
    loc[0, 0, 0, 1, 0] = float("inf")
    for sampling in ("bilinear", "discrete"):
        got = msdeformattn.ms_deform_attn(
            value, shapes, starts, loc, attn, points_per_level=POINTS, sampling=sampling
        )
        expected = naive_samples(
            value, shapes, starts, loc, attn, sample_levels(POINTS), sampling == "discrete"
        )
        torch.testing.assert_close(got, expected, **TOL[torch.float64])


@pytest.mark.parametrize(
    ("kw", "error", "match"),
    [
        ({"points_per_level": [1, 3]}, ValueError, r"one count >= 1 per level \(3 levels\)"),
        ({"points_per_level": [1, 3, 0]}, ValueError, "one count >= 1 per level"),
        (
            {"points_per_level": [1, 3, 3]},
            ValueError,
            r"sampling_locations must have shape "
            r"\(N, Lq, M, 7, 2\)",
        ),
        ({"points_per_level": (1.0, 3, 2)}, TypeError, "sequence of Python ints"),
        ({"sampling": "nearest"}, ValueError, "sampling must be one of"),
    ],
)
def test_bad_arguments_are_named(kw, error, match):
    inputs = per_level_inputs()
    kw = {"points_per_level": POINTS, **kw}
    with pytest.raises(error, match=match):
        msdeformattn.ms_deform_attn(*inputs, **kw)


def test_compiles_without_graph_break_and_exports_to_onnx(tmp_path):
    value, shapes, starts, loc, attn = per_level_inputs(dtype=torch.float32)

    def fn(value, loc, attn):
        return msdeformattn.ms_deform_attn(
            value, shapes, starts, loc, attn, points_per_level=POINTS, sampling="discrete"
        )

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(value, loc, attn), fn(value, loc, attn))

    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")

    class Module(torch.nn.Module):
        def forward(self, value, loc, attn):
            return fn(value, loc, attn)

    path = tmp_path / "forms.onnx"
    torch.onnx.export(Module().eval(), (value, loc, attn), str(path), input_names=["v", "l", "a"])
    got = ort.InferenceSession(str(path)).run(
        None, {"v": value.numpy(), "l": loc.numpy(), "a": attn.numpy()}
    )[0]
    np.testing.assert_allclose(got, fn(value, loc, attn).numpy(), atol=1e-5, rtol=1e-4)


@st.composite
def uneven(draw):
    L = draw(st.integers(1, 4))
    levels = tuple((draw(st.integers(1, 7)), draw(st.integers(1, 7))) for _ in range(L))
    points = [draw(st.integers(1, 5)) for _ in range(L)]
    return dict(levels=levels, points=points, seed=draw(st.integers(0, 2**31 - 1)),
                sampling=draw(st.sampled_from(["bilinear", "discrete"])))  # fmt: skip


@pytest.mark.parametrize("target", BACKENDS)
@settings(max_examples=15, deadline=None)
@given(case=uneven())
def test_uneven_point_lists_sweep(target, case):
    points = case["points"]
    inputs = per_level_inputs(points, case["levels"], torch.float32, case["seed"], N=1, Lq=3)
    got = call(target, inputs, points_per_level=points, sampling=case["sampling"])
    expected = naive_samples(*inputs, sample_levels(points), case["sampling"] == "discrete")
    torch.testing.assert_close(got.double(), expected, **TOL[torch.float32])

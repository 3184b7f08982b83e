"""Triton backend specifics, run under Triton's interpreter on CPU tensors."""

from __future__ import annotations

import pytest
import torch

import msdeformattn

from ..conftest import TOL, grads, make_inputs

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(
    "triton" not in msdeformattn.available_backends(), reason="triton is not installed"
)


# Compiled kernels on a GPU; otherwise the interpreter on CPU tensors.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
interpreter_only = pytest.mark.skipif(
    DEVICE == "cuda", reason="the interpreter path is off when a GPU is present"
)


def run_triton(*inputs):
    inputs = [t.to(DEVICE) for t in inputs]
    return msdeformattn.ms_deform_attn(*inputs, backend="triton").cpu()


def run_ref(*inputs):
    return msdeformattn.ms_deform_attn(*inputs, backend="reference")


@pytest.fixture
def deterministic():
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("D", [1, 24, 48, 33])
def test_head_sizes_that_are_not_powers_of_two(D):
    inputs = make_inputs(N=2, Lq=7, M=2, D=D, P=2, dtype=torch.float32)
    for g, e in zip(grads(run_triton, inputs), grads(run_ref, inputs), strict=True):
        torch.testing.assert_close(g, e, **TOL[torch.float32])


def test_deterministic_path_is_bitwise_reproducible_and_correct(deterministic):
    # Many samples per pixel, so rows collect contributions from many queries.
    inputs = make_inputs(
        N=2, Lq=60, M=2, D=8, levels=((3, 4), (2, 2)), P=4, dtype=torch.float32, low=0, high=1
    )
    first = grads(run_triton, inputs)
    second = grads(run_triton, inputs)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    for g, e in zip(first, grads(run_ref, inputs), strict=True):
        torch.testing.assert_close(g, e, **TOL[torch.float32])


def test_deterministic_path_with_points_outside_and_non_finite(deterministic):
    value, shapes, starts, loc, attn = make_inputs(N=1, Lq=9, M=2, D=5, P=3, dtype=torch.float32)
    loc[0, 0, 0, 0, 0, 0] = float("nan")
    loc[0, 1, 1, 1, 1] = float("inf")
    inputs = (value, shapes, starts, loc, attn)
    for g, e in zip(grads(run_triton, inputs), grads(run_ref, inputs), strict=True):
        torch.testing.assert_close(g, e, **TOL[torch.float32])


def test_float64_gradcheck_on_the_deterministic_path(deterministic):
    # test_backends gradchecks the atomic path; this covers the row-sorted one.
    value, shapes, starts, loc, attn = make_inputs(
        N=2, Lq=5, M=2, D=3, levels=((3, 4), (1, 1)), P=2, requires_grad=True
    )
    assert torch.autograd.gradcheck(
        lambda v, l, a: run_triton(v, shapes, starts, l, a),
        (value, loc, attn),
        atol=1e-7,
        rtol=1e-5,
        fast_mode=DEVICE == "cpu",  # see test_backends.test_gradcheck_float64
    )


def test_one_float64_input_makes_the_arithmetic_float64():
    value, shapes, starts, loc, attn = make_inputs(N=1, Lq=6, M=2, D=4, P=2, dtype=torch.float64)
    # Rounding value to float32 loses nothing; float32 arithmetic would.
    value32 = value.float()
    got = run_triton(value32, shapes, starts, loc, attn)
    expected = run_ref(value32.double(), shapes, starts, loc, attn)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected.float(), rtol=0, atol=0)


@interpreter_only
def test_interpreter_is_never_picked_automatically():
    res = msdeformattn.resolve(*make_inputs(dtype=torch.float32))
    assert res.backend == "cpu"
    assert "explicitly" in res.rejected["triton"][0]


@interpreter_only
def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(msdeformattn.BackendNotSupportedError, match="TRITON_INTERPRET=1"):
        run_triton(*make_inputs(dtype=torch.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("D", [1, 8, 24, 32, 33, 64, 256])
def test_launch_config_bounds_the_work_of_a_thread(D, dtype):
    from msdeformattn.ops._triton_kernels import launch_config

    cfg = launch_config(Lq=20000, D=D, dtype=dtype)
    threads = 32 * cfg.num_warps
    assert cfg.block_d >= D and cfg.block_q <= threads
    # ``make gpu-compile`` measured these bounds free of spills up to D=256.
    assert cfg.block_q * cfg.block_d * dtype.itemsize <= 32 * threads


def test_decoder_grid_fills_an_h100():
    """N=2, Lq=300, M=8, D=32: at least one program for each of the 132 SMs."""
    from msdeformattn.ops._triton_kernels import launch_config

    for dtype in (torch.float32, torch.float64):
        cfg = launch_config(Lq=300, D=32, dtype=dtype)
        assert -(-300 // cfg.block_q) * 8 * 2 >= 132


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensors_on_the_second_gpu_while_the_first_is_current():
    inputs = make_inputs(N=2, Lq=9, M=2, D=8, P=2, dtype=torch.float32)

    def on_second(*inputs):
        with torch.cuda.device(0):
            out = msdeformattn.ms_deform_attn(*[t.to("cuda:1") for t in inputs], backend="triton")
        assert out.device == torch.device("cuda:1")
        return out.cpu()

    for g, e in zip(grads(on_second, inputs), grads(run_ref, inputs), strict=True):
        torch.testing.assert_close(g, e, **TOL[torch.float32])

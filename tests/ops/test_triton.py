"""Triton backend specifics, run under Triton's interpreter on CPU tensors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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


# --- the kernel operators (torch.library.triton_op on a GPU) ------------------------------

SCHEMAS = {
    "triton_forward": "msdeformattn::triton_forward(Tensor value, Tensor shapes, Tensor starts, "
    "Tensor loc, Tensor attn) -> Tensor",
    **{
        f"triton_backward_{kind}": f"msdeformattn::triton_backward_{kind}(Tensor grad_output, "
        "Tensor value, Tensor shapes, Tensor starts, Tensor loc, Tensor attn) "
        "-> (Tensor, Tensor, Tensor)"
        for kind in ("atomic", "deterministic")
    },
}


def kernel_op(name):
    from msdeformattn.ops import _triton_kernels  # noqa: F401  (registers the operators)

    return getattr(torch.ops.msdeformattn, name).default


def op_inputs(name, dtype=torch.float32):
    value, shapes, starts, loc, attn = make_inputs(N=2, Lq=7, M=2, D=8, P=2, dtype=dtype)
    args = [value, shapes, starts, loc, attn]
    if name != "triton_forward":
        g = torch.Generator().manual_seed(1)
        args.insert(0, torch.randn(2, 7, 16, generator=g, dtype=torch.float64).to(dtype))
    return [t.to(DEVICE) for t in args]


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_kernel_ops_are_registered_with_their_schemas(name):
    assert str(kernel_op(name)._schema) == SCHEMAS[name]


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_kernel_ops_called_directly_give_the_reference_results(name):
    args = op_inputs(name)
    got = kernel_op(name)(*args)
    if name == "triton_forward":
        got, expected = [got], [run_ref(*[t.cpu() for t in args])]
    else:
        gout, *inputs = [t.cpu() for t in args]
        expected = grads(run_ref, inputs, gout)[1:]
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g.cpu(), e, **TOL[torch.float32])


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_kernel_ops_pass_opcheck(name):
    # Compiled kernels: the triton_ops, traced by test_aot_dispatch_*; interpreted
    # kernels: the same operators opaque, with an allocation-only fake.
    torch.library.opcheck(kernel_op(name), op_inputs(name))


def test_kernel_ops_in_one_full_graph_give_the_eager_results():
    """torch.compile(fullgraph=True) over the forward and the atomic backward: no graph break.

    On a GPU AOTAutograd traces into the kernels (see the next test); under the
    interpreter the operators are opaque nodes run as they are.
    """
    fwd, bwd = kernel_op("triton_forward"), kernel_op("triton_backward_atomic")

    def both(gout, value, shapes, starts, loc, attn):
        out = fwd(value, shapes, starts, loc, attn)
        return (out * 2, *bwd(gout, value, shapes, starts, loc, attn))

    args = op_inputs("triton_backward_atomic")
    torch._dynamo.reset()
    got = torch.compile(both, fullgraph=True, backend="aot_eager")(*args)
    for g, e in zip(got, both(*args), strict=True):
        torch.testing.assert_close(g, e, **TOL[torch.float32])


def _recording_backend(graphs: list):
    """An aot_eager backend that keeps the forward and backward graphs it is given."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def record(gm, _):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    return aot_autograd(fw_compiler=record, bw_compiler=record)


def _reference_loss(*inputs):
    return msdeformattn.ms_deform_attn(*inputs, backend="reference").square().sum()


def _targets(gm) -> set[str]:
    return {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}


@pytest.mark.parametrize("mode", ["atomic", "deterministic"])
def test_public_function_compiles_to_the_kernel_operators(mode, request):
    """torch.compile of ``ms_deform_attn(backend="triton")``: no opaque public operator.

    The forward graph holds the forward kernel operator and the backward graph
    the backward that the determinism flag selects; under the interpreter they
    are opaque kernel operators, on a GPU Triton's kernel wrapper.
    """
    if mode == "deterministic":
        request.getfixturevalue("deterministic")
    inputs = [t.to(DEVICE) for t in make_inputs(N=2, Lq=7, M=2, D=8, P=2)]

    def loss(value, shapes, starts, loc, attn):
        out = msdeformattn.ms_deform_attn(value, shapes, starts, loc, attn, backend="triton")
        return out.square().sum()

    graphs: list = []
    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend=_recording_backend(graphs))
    got = [t.cpu() for t in grads(compiled, inputs)]
    for g, e in zip(got, grads(_reference_loss, [t.cpu() for t in inputs]), strict=True):
        torch.testing.assert_close(g, e, **TOL[torch.float32])
    fw, bw = (_targets(gm) for gm in graphs)
    assert not any("ms_deform_attn" in t for t in fw | bw), (fw, bw)
    kernel = "triton_kernel_wrapper" if DEVICE == "cuda" else "msdeformattn.triton_forward"
    assert any(kernel in t for t in fw), fw
    backward_op = f"msdeformattn.triton_backward_{mode}"
    if DEVICE == "cuda" and mode == "atomic":
        backward_op = "triton_kernel_wrapper"
    assert any(backward_op in t for t in bw), bw


# Run with the real compiler (TRITON_INTERPRET=0) and a stand-in sm_90 driver:
# AOTAutograd decomposes the triton_ops into Triton's kernel-wrapper operator,
# whose mutation analysis compiles each kernel to TTIR. Nothing is launched.
_TRACE = """
import json, sys
import torch
from torch._functorch.aot_autograd import aot_export_module
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
from triton.runtime.driver import driver
from tests.conftest import make_inputs
from tests.ops._triton_compile import _stand_in_driver
from msdeformattn.ops import _triton_kernels  # noqa: F401

driver.set_active(_stand_in_driver(90))
value, shapes, starts, loc, attn = make_inputs(N=2, Lq=5, M=2, D=8, P=2, dtype=torch.float32)
cases = {
    "triton_forward": (value, shapes, starts, loc, attn),
    "triton_backward_atomic": (torch.randn(2, 5, 16), value, shapes, starts, loc, attn),
}
report = {}
for name, args in cases.items():
    op = getattr(torch.ops.msdeformattn, name).default

    class Mod(torch.nn.Module):
        def forward(self, *args):
            out = op(*args)
            return out if isinstance(out, tuple) else (out,)

    gm, _ = aot_export_module(Mod(), args, trace_joint=False, dynamic_shapes=True)
    report[name] = [
        [kernel_side_table.get_kernel(n.kwargs["kernel_idx"]).fn.__name__,
         n.kwargs["tensors_to_clone"]]
        for n in gm.graph.nodes
        if "triton_kernel_wrapper" in str(n.target)
    ]
    report[name + " ops"] = sorted({str(n.target) for n in gm.graph.nodes if n.op == "call_function"})

# The public function's route (ms_deform_attn picks it for backend="triton"):
# the forward triton_op with its autograd rule, traced forward and backward on
# fake tensors. ms_deform_attn itself refuses CPU tensors without the interpreter.
from functorch.compile import aot_function, make_boxed_func
from torch._subclasses.fake_tensor import FakeTensorMode
from msdeformattn.ops import triton as triton_backend

for mode in ("atomic", "deterministic"):
    torch.use_deterministic_algorithms(mode == "deterministic")
    graphs = []

    def record(gm, _):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    route = aot_function(
        lambda *a: triton_backend.apply(*a).square().sum(), fw_compiler=record, bw_compiler=record
    )
    with FakeTensorMode() as fake:
        args = [fake.from_tensor(t) for t in (value, shapes, starts, loc, attn)]
        for i in (0, 3, 4):
            args[i].requires_grad_(True)
        route(*args).backward()
    report["apply " + mode] = [
        sorted(
            kernel_side_table.get_kernel(n.kwargs["kernel_idx"]).fn.__name__
            if "triton_kernel_wrapper" in str(n.target) else str(n.target)
            for n in gm.graph.nodes
            if n.op == "call_function" and (
                "triton_kernel_wrapper" in str(n.target) or "msdeformattn" in str(n.target)
            )
        )
        for gm in graphs
    ]
json.dump(report, sys.stdout)
"""


@pytest.mark.slow
def test_forward_and_atomic_backward_trace_into_their_kernels():
    """The traced route without a GPU: each triton_op becomes its allocations and one launch.

    ``tensors_to_clone`` is what Triton's analysis finds written: the outputs,
    and for the backward also loc and attn (its scatter addresses are computed
    from values loaded from them, so the analysis cannot rule a write out).
    """
    root = Path(__file__).resolve().parents[2]
    path = os.pathsep.join(
        p for p in (str(root), str(root / "src"), os.environ.get("PYTHONPATH")) if p
    )
    proc = subprocess.run(
        [sys.executable, "-c", _TRACE],
        cwd=root,
        env={**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": path},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout)
    assert report["triton_forward"] == [["forward_kernel", ["out_ptr"]]]
    [[kernel, cloned]] = report["triton_backward_atomic"]
    assert kernel == "backward_kernel"
    assert (
        {"gvalue_ptr", "gloc_ptr", "gattn_ptr"}
        <= set(cloned)
        <= {"gvalue_ptr", "gloc_ptr", "gattn_ptr", "loc_ptr", "attn_ptr"}
    )
    for name in ("triton_forward", "triton_backward_atomic"):
        # Decomposed: the operator itself is gone from the graph.
        assert not any("msdeformattn" in op for op in report[name + " ops"]), report
    # The differentiable route: forward and atomic backward each one launch of
    # their kernel; the deterministic backward stays its opaque operator.
    assert report["apply atomic"] == [["forward_kernel"], ["backward_kernel"]], report
    assert report["apply deterministic"] == [
        ["forward_kernel"],
        ["msdeformattn.triton_backward_deterministic.default"],
    ], report


@pytest.mark.skipif(DEVICE != "cuda", reason="Inductor compiles Triton kernels for a GPU only")
def test_inductor_schedules_the_kernels_themselves():
    from torch._inductor.utils import run_and_get_code

    fwd = kernel_op("triton_forward")

    def scaled(value, shapes, starts, loc, attn):
        return fwd(value * 2, shapes, starts, loc, attn) + 1

    args = op_inputs("triton_forward")
    torch._dynamo.reset()
    got, codes = run_and_get_code(torch.compile(scaled, fullgraph=True), *args)
    torch.testing.assert_close(got, scaled(*args), **TOL[torch.float32])
    # The user kernel is in Inductor's own code, not behind a call of the operator.
    assert any("forward_kernel" in code for code in codes)
    assert not any("torch.ops.msdeformattn" in code for code in codes)


@pytest.mark.skipif(DEVICE != "cuda", reason="Inductor compiles Triton kernels for a GPU only")
def test_inductor_compiles_the_public_function_into_its_kernels():
    from torch._inductor.utils import run_and_get_code

    inputs = make_inputs(N=2, Lq=7, M=2, D=8, P=2)

    def loss(value, shapes, starts, loc, attn):
        out = msdeformattn.ms_deform_attn(value, shapes, starts, loc, attn, backend="triton")
        return out.square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True)
    cuda_inputs = [t.to(DEVICE) for t in inputs]

    def step():
        return [g.cpu() for g in grads(compiled, cuda_inputs)]

    got, codes = run_and_get_code(step)
    for g, e in zip(got, grads(_reference_loss, inputs), strict=True):
        torch.testing.assert_close(g, e, **TOL[torch.float32])
    assert any("forward_kernel" in code for code in codes)
    assert any("backward_kernel" in code for code in codes)
    assert not any("torch.ops.msdeformattn" in code for code in codes)

"""CPU backend specifics: both grad_value strategies, threads, the on-disk cache."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numba
import numpy as np
import pytest
import torch

import msdeformattn
from msdeformattn.ops import cpu

from ..conftest import TOL, grads, make_inputs


def run_cpu(*inputs):
    return msdeformattn.ms_deform_attn(*inputs, backend="cpu")


def run_ref(*inputs):
    return msdeformattn.ms_deform_attn(*inputs, backend="reference")


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("plan", ["by_head", "by_thread"])
@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_both_backward_plans_match_reference(monkeypatch, threads, plan, n_threads):
    threads(n_threads)
    monkeypatch.setattr(cpu, "_backward_plan", lambda *args: plan)
    inputs = make_inputs(
        N=2, Lq=37, M=3, D=19, levels=((5, 7), (3, 4), (1, 2)), P=3, dtype=torch.float32
    )
    for g, e in zip(grads(run_cpu, inputs), grads(run_ref, inputs), strict=True):
        torch.testing.assert_close(g, e, **TOL[torch.float32])


@pytest.mark.parametrize(
    "dtype, D",
    # The kernels take 64 bytes of channels at a time (16 float32 or 8
    # float64) and finish the rest with scalar loops: below, at and across it.
    [(torch.float32, D) for D in (1, 15, 16, 17, 32, 40, 48, 130)]
    + [(torch.float64, D) for D in (7, 8, 9, 16)],
)
@pytest.mark.parametrize("plan", ["by_head", "by_thread"])
def test_channel_counts_around_the_vector_width(monkeypatch, threads, plan, dtype, D):
    threads(2)
    monkeypatch.setattr(cpu, "_backward_plan", lambda *args: plan)
    inputs = make_inputs(N=2, Lq=9, M=2, D=D, levels=((3, 5), (2, 2), (1, 1)), P=3, dtype=dtype)
    torch.testing.assert_close(run_cpu(*inputs), run_ref(*inputs), **TOL[dtype])
    for g, e in zip(grads(run_cpu, inputs), grads(run_ref, inputs), strict=True):
        torch.testing.assert_close(g, e, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_points_a_few_ulps_from_pixel_centres(dtype):
    """The backward works out each sample's pixel twice (rows, then the
    location and weight gradients); both must agree where floor() is closest
    to flipping. grad_attn is continuous there, so the reference is an oracle."""
    levels = ((5, 7), (3, 2), (1, 1))
    value, shapes, starts, loc, attn = make_inputs(
        N=1, Lq=40, M=2, D=17, levels=levels, P=3, dtype=dtype
    )
    g = torch.Generator().manual_seed(5)
    for l, (H, W) in enumerate(levels):
        for c, size in ((0, W), (1, H)):
            shape = loc[:, :, :, l, :, c].shape
            # loc * size - 0.5 is an integer at a pixel centre: floor() flips there.
            x = ((torch.randint(0, size, shape, generator=g) + 0.5) / size).to(dtype)
            towards = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 2.0).to(dtype)
            for _ in range(3):  # 0 to 3 ulps either side
                step = torch.rand(shape, generator=g) < 0.6
                x = torch.where(step, torch.nextafter(x, towards), x)
            loc[:, :, :, l, :, c] = x
    inputs = (value, shapes, starts, loc, attn)
    torch.testing.assert_close(run_cpu(*inputs), run_ref(*inputs), **TOL[dtype])
    cpu_grads = grads(run_cpu, inputs)
    ref_grads = grads(run_ref, inputs)
    # grad_attn (last) and grad_value; grad_loc has a kink exactly there.
    for i in (1, 3):
        torch.testing.assert_close(cpu_grads[i], ref_grads[i], **TOL[dtype])


def test_plan_choice():
    # Encoder-like: many samples per pixel -> per-thread buffers.
    assert cpu._backward_plan(N=1, M=8, S=20000, Lq=20000, LP=16, threads=2) == "by_thread"
    # Decoder-like: few samples per pixel and enough (batch, head) tasks -> by head.
    assert cpu._backward_plan(N=2, M=8, S=20000, Lq=300, LP=16, threads=2) == "by_head"
    assert cpu._backward_plan(N=1, M=1, S=20000, Lq=300, LP=16, threads=4) == "by_thread"
    assert cpu._backward_plan(N=1, M=1, S=20000, Lq=300, LP=16, threads=1) == "by_head"


def test_by_head_is_independent_of_thread_count(monkeypatch, threads):
    monkeypatch.setattr(cpu, "_backward_plan", lambda *args: "by_head")
    inputs = make_inputs(N=2, Lq=50, M=4, D=16, P=4, dtype=torch.float32)
    threads(1)
    one = grads(run_cpu, inputs)
    threads(2)
    two = grads(run_cpu, inputs)
    for a, b in zip(one, two, strict=True):
        assert torch.equal(a, b)


def test_threads_follow_torch(threads):
    inputs = make_inputs(dtype=torch.float32)
    for n in (1, 2):
        threads(n)
        run_cpu(*inputs)
        assert numba.get_num_threads() == min(n, numba.config.NUMBA_NUM_THREADS)


def test_float64_is_computed_in_float64():
    inputs = make_inputs(N=1, Lq=4, M=2, D=3)
    out = run_cpu(*inputs)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, run_ref(*inputs), **TOL[torch.float64])


def test_inconsistent_level_table_is_refused_even_unchecked():
    """check_values=False skips the public check; the CPU backend still refuses to read out of bounds."""
    value, shapes, starts, loc, attn = make_inputs(dtype=torch.float32)
    bad = shapes.clone()
    bad[0, 0] += 5
    with pytest.raises(ValueError, match=r"spatial_shapes|level_start_index"):
        msdeformattn.ms_deform_attn(
            value, bad, starts, loc, attn, backend="cpu", check_values=False
        )


def test_second_process_loads_kernels_from_the_disk_cache():
    run_cpu(*make_inputs(dtype=torch.float32))  # compiles (or loads) and saves
    script = (
        "import torch, msdeformattn\n"
        "from msdeformattn.ops import _cpu_kernels as k\n"
        "from tests.conftest import make_inputs\n"
        "msdeformattn.ms_deform_attn(*make_inputs(dtype=torch.float32), backend='cpu')\n"
        "print(sum(k.forward.stats.cache_hits.values()), sum(k.forward.stats.cache_misses.values()))\n"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=root
    )
    hits, misses = map(int, out.stdout.split())
    assert hits >= 1 and misses == 0


def test_kernels_import_nothing_from_the_package():
    # numba's disk cache is keyed on the contents of _cpu_kernels.py only; a
    # helper compiled in from another module of ours could change without
    # invalidating the cached machine code.
    import ast
    from pathlib import Path

    from msdeformattn.ops import _cpu_kernels

    tree = ast.parse(Path(_cpu_kernels.__file__).read_text())
    ours = [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.ImportFrom)
        and (n.level > 0 or (n.module or "").startswith("msdeformattn"))
    ] + [
        a.name
        for n in ast.walk(tree)
        if isinstance(n, ast.Import)
        for a in n.names
        if a.name.startswith("msdeformattn")
    ]
    assert ours == []


@pytest.mark.parametrize("populate", ["os", "refused"])
def test_large_fresh_buffers_are_zeroed(monkeypatch, populate):
    if populate == "refused":
        # An advice the kernel does not know: EINVAL, as on Linux < 5.14.
        monkeypatch.setattr(cpu, "_MADV_POPULATE_WRITE", 12345)
    shape = (3, cpu._FRESH_MAPPING_BYTES // 4)
    z = cpu._buffer(shape, torch.float32)
    assert z.shape == shape and z.dtype == torch.float32
    assert not z.any()
    z += 1  # writable
    assert z.sum().item() == z.numel()


@pytest.mark.parametrize("D", [19, 0])
@pytest.mark.parametrize("plan", ["by_head", "by_thread"])
def test_kernels_write_every_element_of_uninitialised_buffers(monkeypatch, plan, D):
    # The output, grad_loc and grad_attn are allocated without zeroing: fill
    # them with NaN to show that the kernels overwrite every element.
    real = cpu._buffer

    def poisoned(shape, dtype, zero=True):
        t = real(shape, dtype, zero)
        return t if zero else t.fill_(float("nan"))

    monkeypatch.setattr(cpu, "_buffer", poisoned)
    monkeypatch.setattr(cpu, "_backward_plan", lambda *args: plan)
    inputs = make_inputs(N=2, Lq=7, M=3, D=D, P=2, dtype=torch.float32)
    torch.testing.assert_close(run_cpu(*inputs), run_ref(*inputs), **TOL[torch.float32])
    for g, e in zip(grads(run_cpu, inputs), grads(run_ref, inputs), strict=True):
        torch.testing.assert_close(g, e, **TOL[torch.float32])


@pytest.mark.skipif(sys.platform != "linux", reason="mprotect guard pages via libc")
def test_kernels_stay_inside_their_arrays():
    """Every kernel array flush against an inaccessible page, random shapes and
    NaN/inf/huge/edge locations: any read or write past an end is a SIGSEGV."""
    script = Path(__file__).with_name("_guarded_kernels.py")
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, str(script), "300", "0"], capture_output=True, text=True, cwd=root
    )
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    assert out.stdout.split() == ["ok", "300"]


def test_query_order_is_a_stable_tile_order_per_image():
    from msdeformattn.ops import _cpu_kernels as k

    nan = float("nan")
    # First sample (x, y) of each query; 2 images x 5 queries, 2 x 2 tiles.
    first = [
        [(0.9, 0.9), (0.1, 0.1), (0.6, 0.2), (0.2, 0.7), (0.3, 0.3)],
        [(nan, 0.9), (0.7, 0.8), (2.0, -1.0), (0.1, 0.1), (0.4, 0.6)],
    ]
    loc = np.zeros((10, 6), np.float32)
    loc[:, :2] = np.array(first, np.float32).reshape(10, 2)
    order = k.query_order(loc, 2, 1).tolist()
    # Z-order: top-left, top-right, bottom-left, bottom-right; stable within
    # a tile; NaN counts as 0 and far outside as the nearest tile.
    assert order[:5] == [1, 4, 2, 3, 0] and order[5:] == [8, 7, 5, 9, 6]
    assert k.query_order(loc, 2, 0).tolist() == list(range(10))
    # No samples at all (P = 0): the identity, reading nothing.
    assert k.query_order(np.zeros((3, 0), np.float32), 1, 2).tolist() == [0, 1, 2]

"""Run the CPU kernels on arrays that end (or start) at an inaccessible page.

Executed in a subprocess by ``test_cpu.py``: an out-of-bounds access kills
the process with SIGSEGV, where in ordinary memory it would pass unnoticed
(a clamped corner reads with weight zero, so a wrong row changes no number).
Outputs and the location/weight gradients start as NaN, so a finite result
also shows that every element was written.

    python tests/ops/_guarded_kernels.py CASES SEED
"""

from __future__ import annotations

import ctypes
import mmap
import sys

import numpy as np

from msdeformattn.ops import _cpu_kernels as K

PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_mappings = []  # kept alive: the arrays point into them


def guarded(shape, dtype, at_end: bool, fill) -> np.ndarray:
    """A C-contiguous array flush against a PROT_NONE page (after it, or before it)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    body = -(-nbytes // PAGE) * PAGE
    m = mmap.mmap(-1, body + 2 * PAGE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(m))
    for page in (base, base + PAGE + body):
        if _libc.mprotect(page, PAGE, 0) != 0:
            raise OSError(ctypes.get_errno(), "mprotect failed")
    offset = PAGE + body - nbytes if at_end else PAGE
    a = np.frombuffer(m, dtype, count=nbytes // dtype.itemsize, offset=offset).reshape(shape)
    a[...] = fill
    _mappings.append(m)
    return a


SPECIAL = np.array([0.0, 1.0, -1e-7, 1 + 1e-7, np.nan, np.inf, -np.inf, 1e30, -3e38, -0.5, 1.5])


def run_case(rng: np.random.Generator) -> None:
    dtype = rng.choice([np.float32, np.float64])
    N, M, P, L, Lq = (int(rng.integers(1, hi)) for hi in (3, 4, 4, 4, 10))
    D = int(rng.choice([1, 2, 7, 8, 9, 15, 16, 17, 31, 33, 48]))
    levels = [(int(rng.choice([1, 2, 5])), int(rng.choice([1, 3, 6]))) for _ in range(L)]
    areas = [h * w for h, w in levels]
    S = sum(areas)
    shapes = np.array(levels, np.int64)
    starts = np.cumsum([0, *areas[:-1]]).astype(np.int64)
    at_end = bool(rng.integers(2))

    def like(x):
        return guarded(x.shape, dtype, at_end, x.astype(dtype))

    loc = rng.uniform(-0.7, 1.7, (N * Lq, M * L * P * 2))
    special = rng.random(loc.shape) < 0.4
    loc[special] = rng.choice(SPECIAL, int(special.sum()))
    value = like(rng.standard_normal((N * S * M, D)))
    loc = like(loc)
    attn = like(rng.random((N * Lq, M * L * P)))
    gout = like(rng.standard_normal((N * Lq, M * D)))
    order = K.query_order(loc, N, int(rng.integers(0, 4)))
    assert sorted(order) == list(range(N * Lq))
    tables = (*K.level_tables(shapes, starts, M, P, dtype), order)
    threads = int(rng.integers(1, 3))

    out = guarded((N * Lq, M * D), dtype, at_end, np.nan)
    K.forward(value, loc, attn, out, *tables, N, M, threads, dtype(0))
    assert np.isfinite(out).all(), "forward left elements unwritten"
    for plan in ("by_head", "by_thread"):
        gvalue = guarded(value.shape, dtype, at_end, 0.0)
        gloc = guarded(loc.shape, dtype, at_end, np.nan)
        gattn = guarded(attn.shape, dtype, at_end, np.nan)
        if plan == "by_head":
            K.backward_by_head(value, loc, attn, gout, gvalue, gloc, gattn, *tables, N, M)
        else:
            partial = guarded((1, *value.shape), dtype, at_end, 0.0)
            K.backward_by_thread(
                value, loc, attn, gout, gvalue, partial, gloc, gattn, *tables, N, M, 2
            )
        for g in (gvalue, gloc, gattn):
            assert np.isfinite(g).all(), f"{plan} left elements unwritten"


if __name__ == "__main__":
    cases, seed = int(sys.argv[1]), int(sys.argv[2])
    rng = np.random.default_rng(seed)
    for _ in range(cases):
        run_case(rng)
    print("ok", cases)

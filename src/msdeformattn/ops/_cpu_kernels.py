"""numba kernels of the CPU backend (imported on first use, compiled once, cached on disk).

Layouts, all C-contiguous; sample slot ``s = (m*L + l)*P + p`` within a query:

    value   (N*S*M, D)       row (n*S + pix)*M + m is pixel pix of head m
    loc     (N*Lq, M*L*P*2)  x, y of slot s at columns 2s, 2s+1
    attn    (N*Lq, M*L*P)
    out     (N*Lq, M*D)      head-major channels

The caller guarantees the level table matches S (checked in Python), and every
corner row is clamped into its level, so no input makes a kernel leave
``value``.

Why the kernels look the way they do (measured on the 2-core target):
- the index arithmetic of a query's samples runs first, branch-free over
  arrays of slots, so LLVM vectorises it; it then costs ~10% of the forward;
- a corner outside its map is clamped to a pixel inside with weight zero, so
  one D loop handles all four corners of a sample without branches;
- ``value[r, d]`` on a 2-D array, never a flat array with a computed index
  (that made LLVM emit gathers);
- the next head's corner rows are prefetched while the current head runs;
- no ``numba.get_num_threads()`` or closures inside kernels: either disables
  the on-disk cache. The thread count comes in as an argument;
- large zeroed buffers are allocated by the caller (torch), not in numba;
- ``fastmath`` without ``nnan``/``ninf``: the NaN checks on locations must stay.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

_FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}
# Rows of the float buffer filled by _corners: masked bilinear weights, the
# attention weight, and 0/1 flags of the corners inside the map (for grad_loc).
_WX0, _WX1, _WY0, _WY1, _A, _VX0, _VX1, _VY0, _VY1 = range(9)
_NW = 9


@intrinsic
def _prefetch(typingctx, arr, row):
    """Hint the CPU to fetch ``arr[row, 0]``'s cache line; never faults, reads nothing."""

    def codegen(context, builder, sig, args):
        aryty = sig.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        zero = context.get_constant(types.intp, 0)
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1], zero])
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0i8")
        # read, highest locality, data cache
        builder.call(fn, [builder.bitcast(ptr, i8p), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return types.void(arr, types.intp), codegen


@njit(cache=True)
def level_tables(shapes, starts, M, P, dtype):
    """Per-slot constants: W, H as float and int, and the row offset of (level, head)."""
    L = shapes.shape[0]
    MLP = M * L * P
    whf = np.empty((2, MLP), dtype)
    whi = np.empty((2, MLP), np.int64)
    offset = np.empty(MLP, np.int64)
    for s in range(MLP):
        m = s // (L * P)
        l = (s // P) % L
        whi[0, s] = shapes[l, 1]
        whi[1, s] = shapes[l, 0]
        whf[0, s] = shapes[l, 1]
        whf[1, s] = shapes[l, 0]
        offset[s] = starts[l] * M + m
    return whf, whi, offset


@njit(cache=True, fastmath=_FASTMATH, inline="always")
def _corners(loc, attn, i, lo, hi, base, M, whf, whi, offset, rows, wts, fold):
    """Corner rows and weights of slots lo..hi of query row i.

    rows[c, s]: the four corner rows (y0x0, y0x1, y1x0, y1x1), clamped inside
    the level. With fold (the forward), wts[c, s] is the corner's bilinear
    weight times the attention weight, zero for a corner outside the map.
    Without (the backward), wts holds the parts: wx0, wx1, wy0, wy1 (masked),
    the attention weight, and the inside flags vx0, vx1, vy0, vy1.
    """
    for s in range(lo, hi):
        Wf = whf[0, s]
        Hf = whf[1, s]
        W = whi[0, s]
        H = whi[1, s]
        x = loc[i, 2 * s] * Wf - 0.5
        y = loc[i, 2 * s + 1] * Hf - 0.5
        # False for NaN and +-inf as well: such a sample reads nothing.
        inside = (x >= -1.0) & (x <= Wf) & (y >= -1.0) & (y <= Hf)
        # -2 puts both corners outside, so every weight and flag is zero.
        x = x if inside else -2.0
        y = y if inside else -2.0
        x0 = np.floor(x)
        y0 = np.floor(y)
        fx = x - x0
        fy = y - y0
        ix = np.int64(x0)
        iy = np.int64(y0)
        vx0 = 1.0 if ix >= 0 and ix < W else 0.0
        vx1 = 1.0 if ix + 1 >= 0 and ix + 1 < W else 0.0
        vy0 = 1.0 if iy >= 0 and iy < H else 0.0
        vy1 = 1.0 if iy + 1 >= 0 and iy + 1 < H else 0.0
        wx0 = (1.0 - fx) * vx0
        wx1 = fx * vx1
        wy0 = (1.0 - fy) * vy0
        wy1 = fy * vy1
        a = attn[i, s] if inside else 0.0
        if fold:
            wts[0, s] = a * wy0 * wx0
            wts[1, s] = a * wy0 * wx1
            wts[2, s] = a * wy1 * wx0
            wts[3, s] = a * wy1 * wx1
        else:
            wts[_WX0, s] = wx0
            wts[_WX1, s] = wx1
            wts[_WY0, s] = wy0
            wts[_WY1, s] = wy1
            wts[_A, s] = a
            wts[_VX0, s] = vx0
            wts[_VX1, s] = vx1
            wts[_VY0, s] = vy0
            wts[_VY1, s] = vy1
        cx0 = min(max(ix, 0), W - 1)
        cx1 = min(max(ix + 1, 0), W - 1)
        cy0 = min(max(iy, 0), H - 1)
        cy1 = min(max(iy + 1, 0), H - 1)
        b = base + offset[s]
        rows[0, s] = b + (cy0 * W + cx0) * M
        rows[1, s] = b + (cy0 * W + cx1) * M
        rows[2, s] = b + (cy1 * W + cx0) * M
        rows[3, s] = b + (cy1 * W + cx1) * M


@njit(cache=True, inline="always")
def _prefetch_slots(value, rows, lo, hi):
    for s in range(lo, hi):
        _prefetch(value, rows[0, s])
        _prefetch(value, rows[2, s])


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def forward(value, loc, attn, out, whf, whi, offset, N, M, nthreads):
    """out[i, m*D + d] = sum over the slots of head m of a * bilinear(value)[d]."""
    D = value.shape[1]
    MLP = attn.shape[1]
    LP = MLP // M
    S = value.shape[0] // (N * M)
    NQ = out.shape[0]
    Lq = NQ // N
    chunk = (NQ + nthreads - 1) // nthreads
    for t in prange(nthreads):
        rows = np.empty((4, MLP), np.int64)
        wts = np.empty((4, MLP), value.dtype)
        acc = np.empty(D, value.dtype)
        for i in range(t * chunk, min(NQ, (t + 1) * chunk)):
            base = (i // Lq) * S * M
            _corners(loc, attn, i, 0, MLP, base, M, whf, whi, offset, rows, wts, True)
            _prefetch_slots(value, rows, 0, LP)
            for m in range(M):
                if m + 1 < M:
                    _prefetch_slots(value, rows, (m + 1) * LP, (m + 2) * LP)
                acc[:] = 0
                for s in range(m * LP, (m + 1) * LP):
                    w00 = wts[0, s]
                    w01 = wts[1, s]
                    w10 = wts[2, s]
                    w11 = wts[3, s]
                    r00 = rows[0, s]
                    r01 = rows[1, s]
                    r10 = rows[2, s]
                    r11 = rows[3, s]
                    for d in range(D):
                        acc[d] += (
                            w00 * value[r00, d]
                            + w01 * value[r01, d]
                            + w10 * value[r10, d]
                            + w11 * value[r11, d]
                        )
                for d in range(D):
                    out[i, m * D + d] = acc[d]


@njit(cache=True, fastmath=_FASTMATH, inline="always")
def _slots_backward(value, gout, gvalue, gloc, gattn, i, m, lo, hi, whf, rows, wts, go, zero):
    """All three gradients of slots lo..hi (head m) of query row i; grad_value accumulates."""
    D = value.shape[1]
    for d in range(D):
        go[d] = gout[i, m * D + d]
    for s in range(lo, hi):
        a = wts[_A, s]
        wx0 = wts[_WX0, s]
        wx1 = wts[_WX1, s]
        wy0 = wts[_WY0, s]
        wy1 = wts[_WY1, s]
        r00 = rows[0, s]
        r01 = rows[1, s]
        r10 = rows[2, s]
        r11 = rows[3, s]
        d00 = zero
        d01 = zero
        d10 = zero
        d11 = zero
        for d in range(D):
            g = go[d]
            d00 += g * value[r00, d]
            d01 += g * value[r01, d]
            d10 += g * value[r10, d]
            d11 += g * value[r11, d]
        aw00 = a * wy0 * wx0
        aw01 = a * wy0 * wx1
        aw10 = a * wy1 * wx0
        aw11 = a * wy1 * wx1
        # A separate loop: the rows of clamped corners coincide, and stores
        # that may alias would keep the dot products above from vectorising.
        for d in range(D):
            g = go[d]
            gvalue[r00, d] += aw00 * g
            gvalue[r01, d] += aw01 * g
            gvalue[r10, d] += aw10 * g
            gvalue[r11, d] += aw11 * g
        # Masked weights and flags drop the dot products of clamped corners.
        gattn[i, s] = wy0 * (wx0 * d00 + wx1 * d01) + wy1 * (wx0 * d10 + wx1 * d11)
        vx0 = wts[_VX0, s]
        vx1 = wts[_VX1, s]
        vy0 = wts[_VY0, s]
        vy1 = wts[_VY1, s]
        # x = loc_x * W - 0.5, so d/d loc_x = W * d/dx; d wx1/dx = +1, d wx0/dx = -1.
        gloc[i, 2 * s] = (
            a * whf[0, s] * (wy0 * (vx1 * d01 - vx0 * d00) + wy1 * (vx1 * d11 - vx0 * d10))
        )
        gloc[i, 2 * s + 1] = (
            a * whf[1, s] * (wx0 * (vy1 * d10 - vy0 * d00) + wx1 * (vy1 * d11 - vy0 * d01))
        )


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def backward_by_head(value, loc, attn, gout, gvalue, gloc, gattn, whf, whi, offset, N, M, zero):
    """Backward with one task per (batch, head): each owns its slice of grad_value.

    No buffer and no reduction; every grad_value row accumulates its queries
    in order, so the result is the same whatever the thread count. Best when
    N*M is large against the thread count.
    """
    D = value.shape[1]
    MLP = attn.shape[1]
    LP = MLP // M
    S = value.shape[0] // (N * M)
    Lq = gout.shape[0] // N
    for task in prange(N * M):
        n = task // M
        m = task - n * M
        rows = np.empty((4, MLP), np.int64)
        wts = np.empty((_NW, MLP), value.dtype)
        go = np.empty(D, value.dtype)
        lo = m * LP
        hi = lo + LP
        for q in range(Lq):
            i = n * Lq + q
            _corners(loc, attn, i, lo, hi, n * S * M, M, whf, whi, offset, rows, wts, False)
            _slots_backward(
                value, gout, gvalue, gloc, gattn, i, m, lo, hi, whf, rows, wts, go, zero
            )


@njit(cache=True, fastmath=_FASTMATH)
def _backward_queries(
    value, loc, attn, gout, target, gloc, gattn, whf, whi, offset, qlo, qhi, N, M, zero
):
    D = value.shape[1]
    MLP = attn.shape[1]
    LP = MLP // M
    S = value.shape[0] // (N * M)
    Lq = gout.shape[0] // N
    rows = np.empty((4, MLP), np.int64)
    wts = np.empty((_NW, MLP), value.dtype)
    go = np.empty(D, value.dtype)
    for i in range(qlo, qhi):
        _corners(loc, attn, i, 0, MLP, (i // Lq) * S * M, M, whf, whi, offset, rows, wts, False)
        _prefetch_slots(value, rows, 0, LP)
        for m in range(M):
            if m + 1 < M:
                _prefetch_slots(value, rows, (m + 1) * LP, (m + 2) * LP)
            _slots_backward(
                value,
                gout,
                target,
                gloc,
                gattn,
                i,
                m,
                m * LP,
                (m + 1) * LP,
                whf,
                rows,
                wts,
                go,
                zero,
            )


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def backward_by_thread(
    value, loc, attn, gout, gvalue, partial, gloc, gattn, whf, whi, offset, N, M, nthreads, zero
):
    """Backward with one contiguous range of queries per thread.

    Thread 0 accumulates grad_value into gvalue, thread t > 0 into its own
    zeroed buffer partial[t - 1]; the buffers are then added in thread order,
    so the result is bitwise deterministic for a given thread count. Best when
    N*M is small against the thread count (one image, many threads).
    """
    NQ = gout.shape[0]
    chunk = (NQ + nthreads - 1) // nthreads
    for t in prange(nthreads):
        lo = t * chunk
        hi = min(NQ, lo + chunk)
        if t == 0:
            _backward_queries(
                value, loc, attn, gout, gvalue, gloc, gattn, whf, whi, offset, lo, hi, N, M, zero
            )
        else:
            _backward_queries(
                value,
                loc,
                attn,
                gout,
                partial[t - 1],
                gloc,
                gattn,
                whf,
                whi,
                offset,
                lo,
                hi,
                N,
                M,
                zero,
            )
    D = value.shape[1]
    for r in prange(value.shape[0]):
        for t in range(nthreads - 1):
            for d in range(D):
                gvalue[r, d] += partial[t, r, d]

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
- the loops over the channels are written in LLVM IR (below): numba's own
  cost ~100 instructions of checks per sample, ~1.5x of the forward;
- queries run tile by tile over the image (query_order), so the rows a tile
  reads and adds to stay in the cache; prefetching by hand then only costs,
  except in the decoder backward, whose rows are scattered;
- no ``numba.get_num_threads()`` or closures inside kernels: either disables
  the on-disk cache. The thread count comes in as an argument;
- large buffers are allocated by the caller (torch), not in numba;
- ``fastmath`` without ``nnan``/``ninf``: the NaN checks on locations must stay;
- everything compiled into the kernels is defined in this file: numba's disk
  cache is keyed on this file alone (its contents in numba 0.68, its mtime and
  size before);
- no ``contract`` or ``reassoc`` in ``fastmath``: the backward computes each
  sample's geometry twice (see _location_and_weight_grads) and both must round
  alike, vectorised or not, or floor() could pick another pixel. The channel
  loops fuse their multiply-adds explicitly (llvm.fmuladd).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import intrinsic

_FASTMATH = {"nsz", "arcp", "afn"}


# --- Hand-written LLVM for the innermost loops -------------------------------
#
# numba compiles ``for d in range(D)`` over a row into a vector loop, but with
# D known only at run time LLVM wraps every entry into it in overlap checks
# between the rows read and the buffer written, a vector/remainder split and
# register reloads: about a hundred instructions around a dozen of real work,
# once per sample. These intrinsics emit the loops directly: explicit 64-byte
# vectors over D (16 float32 or 8 float64 channels; LLVM splits them on
# narrower machines), the sample loop inside, accumulators in registers.
# Measured on the 2-core target (encoder forward, N=1): 20 ms -> 14 ms.
# They cover the first D - D % (VECTOR_BYTES // itemsize) channels; the
# kernels finish the rest with plain loops. Every row they read comes from the
# clamped ``rows`` table. They live in this file because numba's disk cache
# is keyed on the file that defines the kernels only: code compiled in from
# another module would not invalidate it when it changes.

_I32 = ir.IntType(32)
# Bytes per vector: 16 float32 or 8 float64 channels.
VECTOR_BYTES = 64
_CACHE_LINE = 64


def _require(name, rows, floats, ndims):
    """C-contiguous arrays: rows 2-D int64, floats of one float dtype and the given ndims.

    Typing only; the shapes are the callers' contract: value, out and gvalue
    (R, D)-like with rows < R, wts like rows, go at least D long.
    """
    for a in (rows, *floats):
        if not isinstance(a, types.Array) or a.layout != "C":
            raise TypingError(f"{name}: C-contiguous arrays required, got {a}")
    if rows.dtype != types.int64 or rows.ndim != 2:
        raise TypingError(f"{name}: rows must be 2-D int64, got {rows}")
    if len({a.dtype for a in floats}) != 1 or floats[0].dtype not in types.real_domain:
        raise TypingError(f"{name}: float arrays of one dtype required, got {floats}")
    if tuple(a.ndim for a in floats) != ndims:
        raise TypingError(f"{name}: arrays of {ndims} dimensions required, got {floats}")


class _Emitter:
    """Vector helpers for one codegen call, in the element type of ``dtype``."""

    def __init__(self, context, builder, dtype):
        self.b = builder
        self.size = dtype.bitwidth // 8
        self.width = VECTOR_BYTES // self.size
        self.vec = ir.VectorType(context.get_value_type(dtype), self.width)
        self.intp = context.get_value_type(types.intp)
        bits = dtype.bitwidth
        self._fma = cgutils.get_or_insert_function(
            builder.module,
            ir.FunctionType(self.vec, [self.vec] * 3),
            f"llvm.fmuladd.v{self.width}f{bits}",
        )

    def zero(self):
        return ir.Constant(self.vec, None)

    def splat(self, x):
        undef = ir.Constant(self.vec, ir.Undefined)
        one = self.b.insert_element(undef, x, _I32(0))
        mask = ir.Constant(ir.VectorType(_I32, self.width), [0] * self.width)
        return self.b.shuffle_vector(one, undef, mask)

    def fma(self, a, b, c):
        """a * b + c, fused where the machine can."""
        return self.b.call(self._fma, [a, b, c])

    def ptr(self, data, index):
        return self.b.bitcast(self.b.gep(data, [index]), self.vec.as_pointer())

    def load(self, data, index):
        return self.b.load(self.ptr(data, index), align=self.size)

    def store(self, x, data, index):
        self.b.store(x, self.ptr(data, index), align=self.size)

    def hsum(self, x):
        """Sum of the lanes, halving the vector each step."""
        n = self.width
        while n > 1:
            n //= 2
            lo = ir.Constant(ir.VectorType(_I32, n), list(range(n)))
            hi = ir.Constant(ir.VectorType(_I32, n), list(range(n, 2 * n)))
            undef = ir.Constant(x.type, ir.Undefined)
            x = self.b.fadd(
                self.b.shuffle_vector(x, undef, lo), self.b.shuffle_vector(x, undef, hi)
            )
        return self.b.extract_element(x, _I32(0))


def _arrays(context, builder, sig, args):
    return [
        context.make_array(t)(context, builder, a) if isinstance(t, types.Array) else a
        for t, a in zip(sig.args, args, strict=True)
    ]


def _cols(builder, ary):
    return cgutils.unpack_tuple(builder, ary.shape, 2)[1]


@intrinsic
def _head_sum(typingctx, value, rows, wts, lo, hi, out, i, col):
    """out[i, col + c] = sum over s in [lo, hi), k < 4 of wts[k, s] * value[rows[k, s], c].

    For the vector part of the channels, two vectors per pass over the
    samples (D = 32 float32 in one pass) and one accumulator per corner and
    vector: eight independent FMA chains, each sample's rows and weights
    loaded once.
    """
    _require("head_sum", rows, (value, wts, out), (2, 2, 2))
    sig = types.void(value, rows, wts, types.intp, types.intp, out, types.intp, types.intp)

    def codegen(context, builder, sig, args):
        va, ra, wa, lo, hi, oa, i, col = _arrays(context, builder, sig, args)
        e = _Emitter(context, builder, sig.args[0].dtype)
        intp = e.intp
        D = _cols(builder, va)
        MLP = _cols(builder, ra)
        obase = builder.add(builder.mul(i, _cols(builder, oa)), col)
        accs = [[cgutils.alloca_once(builder, e.vec) for _ in range(4)] for _ in range(2)]

        def block(off, nvec):
            """Channels off .. off + nvec * width, over all the samples."""
            for acc in accs[0][:] + accs[1][:]:
                builder.store(e.zero(), acc)
            with cgutils.for_range_slice(builder, lo, hi, intp(1)) as (s, _):
                for k in range(4):
                    idx = builder.add(builder.mul(intp(k), MLP), s)
                    r = builder.load(builder.gep(ra.data, [idx]))
                    w = e.splat(builder.load(builder.gep(wa.data, [idx])))
                    at = builder.add(builder.mul(r, D), off)
                    for j in range(nvec):
                        v = e.load(va.data, builder.add(at, intp(j * e.width)))
                        builder.store(e.fma(w, v, builder.load(accs[j][k])), accs[j][k])
            for j in range(nvec):
                a = [builder.load(acc) for acc in accs[j]]
                total = builder.fadd(builder.fadd(a[0], a[1]), builder.fadd(a[2], a[3]))
                e.store(total, oa.data, builder.add(obase, builder.add(off, intp(j * e.width))))

        nvec = builder.sdiv(D, intp(e.width))
        with cgutils.for_range(builder, builder.sdiv(nvec, intp(2))) as pair:
            block(builder.mul(pair.index, intp(2 * e.width)), 2)
        odd = builder.icmp_signed("!=", builder.srem(nvec, intp(2)), intp(0))
        with builder.if_then(odd):
            block(builder.mul(builder.sub(nvec, intp(1)), intp(e.width)), 1)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _head_backward(typingctx, value, gvalue, go, rows, wts, dots, lo, hi):
    """For s in [lo, hi) and corners k < 4, over the vector part of the channels:

    dots[k, s] = sum_c go[c] * value[rows[k, s], c]
    gvalue[rows[k, s], c] += wts[k, s] * go[c]

    The corners are updated one after another, so coinciding rows (clamped
    corners) accumulate correctly.
    """
    _require("head_backward", rows, (value, gvalue, go, wts, dots), (2, 2, 1, 2, 2))
    sig = types.void(value, gvalue, go, rows, wts, dots, types.intp, types.intp)

    def codegen(context, builder, sig, args):
        va, ga, goa, ra, wa, da, lo, hi = _arrays(context, builder, sig, args)
        e = _Emitter(context, builder, sig.args[0].dtype)
        intp = e.intp
        D = _cols(builder, va)
        MLP = _cols(builder, ra)
        nchunk = builder.sdiv(D, intp(e.width))
        accs = [cgutils.alloca_once(builder, e.vec) for _ in range(4)]
        with cgutils.for_range_slice(builder, lo, hi, intp(1)) as (s, _):
            idx = [builder.add(builder.mul(intp(k), MLP), s) for k in range(4)]
            base = [builder.mul(builder.load(builder.gep(ra.data, [j])), D) for j in idx]
            w = [e.splat(builder.load(builder.gep(wa.data, [j]))) for j in idx]
            for acc in accs:
                builder.store(e.zero(), acc)
            with cgutils.for_range(builder, nchunk) as chunk:
                off = builder.mul(chunk.index, intp(e.width))
                g = e.load(goa.data, off)
                for k, acc in enumerate(accs):
                    v = e.load(va.data, builder.add(base[k], off))
                    builder.store(e.fma(g, v, builder.load(acc)), acc)
                for k in range(4):
                    at = builder.add(base[k], off)
                    e.store(e.fma(w[k], g, e.load(ga.data, at)), ga.data, at)
            for k, acc in enumerate(accs):
                builder.store(e.hsum(builder.load(acc)), builder.gep(da.data, [idx[k]]))
        return context.get_dummy_value()

    return sig, codegen


def _prefetcher(write):
    def _prefetch(typingctx, arr, row, col):
        """Hint the CPU to fetch the cache line of ``arr[row, col]``; never faults."""

        def codegen(context, builder, sig, args):
            aryty = sig.args[0]
            ary = context.make_array(aryty)(context, builder, args[0])
            ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1], args[2]])
            i8p = ir.IntType(8).as_pointer()
            fnty = ir.FunctionType(ir.VoidType(), [i8p, _I32, _I32, _I32])
            fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0i8")
            # read or write, highest locality, data cache
            args = [builder.bitcast(ptr, i8p), _I32(int(write)), _I32(3), _I32(1)]
            builder.call(fn, args)
            return context.get_dummy_value()

        return types.void(arr, types.intp, types.intp), codegen

    return intrinsic(_prefetch)


_prefetch = _prefetcher(write=False)
_prefetch_for_write = _prefetcher(write=True)


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


@njit(cache=True)
def query_order(loc, N, bits):
    """The query rows, image by image, in Z-order of 2**bits x 2**bits tiles.

    A query's tile is where its first sample lies (NaN or outside: the
    nearest tile); within a tile the original order is kept (a counting
    sort, stable, O(N*Lq + 4**bits)). Queries near each other in the image
    sample rows near each other, so working through them tile by tile keeps
    the rows they read and add to in the cache.
    """
    NQ = loc.shape[0]
    if loc.shape[1] < 2:  # no samples (M, L or P is 0): nothing to sort by
        return np.arange(NQ)
    Lq = NQ // N
    side = 1 << bits
    cells = side * side
    keys = np.empty(NQ, np.int64)
    starts = np.zeros(N * cells + 1, np.int64)
    for i in range(NQ):
        x = loc[i, 0] * side
        y = loc[i, 1] * side
        # Comparisons are False for NaN: such a query goes to tile 0.
        tx = 0 if not x >= 0 else (side - 1 if x >= side - 1 else int(x))
        ty = 0 if not y >= 0 else (side - 1 if y >= side - 1 else int(y))
        z = 0
        for b in range(bits):
            z |= ((tx >> b) & 1) << (2 * b) | ((ty >> b) & 1) << (2 * b + 1)
        keys[i] = (i // Lq) * cells + z
        starts[keys[i] + 1] += 1
    for c in range(N * cells):
        starts[c + 1] += starts[c]
    order = np.empty(NQ, np.int64)
    for i in range(NQ):
        order[starts[keys[i]]] = i
        starts[keys[i]] += 1
    return order


@njit(cache=True, fastmath=_FASTMATH, inline="always")
def _geometry(loc, attn, i, s, whf, whi):
    """Bilinear geometry of slot s of query row i.

    Returns the top-left corner (ix, iy), the masked bilinear weights
    wx0, wx1, wy0, wy1 (zero for a corner outside the map), 0/1 flags of the
    corners inside the map, and the attention weight (zero for a sample
    outside). Branch-free, so loops over slots vectorise.
    """
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
    a = attn[i, s] if inside else 0.0
    return ix, iy, (1.0 - fx) * vx0, fx * vx1, (1.0 - fy) * vy0, fy * vy1, vx0, vx1, vy0, vy1, a


@njit(cache=True, fastmath=_FASTMATH, inline="always")
def _corners(loc, attn, i, lo, hi, base, M, whf, whi, offset, rows, wts):
    """Corner rows and weights of slots lo..hi of query row i.

    rows[k, s]: the four corner rows (y0x0, y0x1, y1x0, y1x1), clamped inside
    the level; wts[k, s]: the corner's bilinear weight times the attention
    weight, zero for a corner outside the map.
    """
    for s in range(lo, hi):
        ix, iy, wx0, wx1, wy0, wy1, _, _, _, _, a = _geometry(loc, attn, i, s, whf, whi)
        wts[0, s] = a * wy0 * wx0
        wts[1, s] = a * wy0 * wx1
        wts[2, s] = a * wy1 * wx0
        wts[3, s] = a * wy1 * wx1
        W = whi[0, s]
        H = whi[1, s]
        cx0 = min(max(ix, 0), W - 1)
        cx1 = min(max(ix + 1, 0), W - 1)
        cy0 = min(max(iy, 0), H - 1)
        cy1 = min(max(iy + 1, 0), H - 1)
        b = base + offset[s]
        rows[0, s] = b + (cy0 * W + cx0) * M
        rows[1, s] = b + (cy0 * W + cx1) * M
        rows[2, s] = b + (cy1 * W + cx0) * M
        rows[3, s] = b + (cy1 * W + cx1) * M


@njit(cache=True, fastmath=_FASTMATH, inline="always")
def _location_and_weight_grads(loc, attn, i, lo, hi, whf, whi, dots, gloc, gattn):
    """grad_loc and grad_attn of slots lo..hi of query row i from the dot products.

    dots[k, s] is grad_out . value row of corner k. The geometry is computed
    again rather than kept from _corners: storing nine more rows per slot
    there stopped that loop from vectorising and cost 5x more than this.
    """
    for s in range(lo, hi):
        _, _, wx0, wx1, wy0, wy1, vx0, vx1, vy0, vy1, a = _geometry(loc, attn, i, s, whf, whi)
        d00 = dots[0, s]
        d01 = dots[1, s]
        d10 = dots[2, s]
        d11 = dots[3, s]
        # Masked weights and flags drop the dot products of clamped corners.
        gattn[i, s] = wy0 * (wx0 * d00 + wx1 * d01) + wy1 * (wx0 * d10 + wx1 * d11)
        # x = loc_x * W - 0.5, so d/d loc_x = W * d/dx; d wx1/dx = +1, d wx0/dx = -1.
        gloc[i, 2 * s] = (
            a * whf[0, s] * (wy0 * (vx1 * d01 - vx0 * d00) + wy1 * (vx1 * d11 - vx0 * d10))
        )
        gloc[i, 2 * s + 1] = (
            a * whf[1, s] * (wx0 * (vy1 * d10 - vy0 * d00) + wx1 * (vy1 * d11 - vy0 * d01))
        )


@njit(cache=True, inline="always")
def _prefetch_slots(value, gvalue, rows, lo, hi):
    """The corner rows of slots lo..hi in value (to read) and gvalue (to write).

    One prefetch per 64 bytes from each row's start: every line of rows
    aligned to 64 bytes, as rows of D = 16k float32 are.
    """
    step = _CACHE_LINE // value.itemsize
    for s in range(lo, hi):
        for k in range(4):
            for c in range(0, value.shape[1], step):
                _prefetch(value, rows[k, s], c)
                _prefetch_for_write(gvalue, rows[k, s], c)


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def forward(value, loc, attn, out, whf, whi, offset, order, N, M, nthreads, zero):
    """out[i, m*D + d] = sum over the slots of head m of a * bilinear(value)[d]."""
    D = value.shape[1]
    MLP = attn.shape[1]
    LP = MLP // M
    S = value.shape[0] // (N * M)
    NQ = out.shape[0]
    Lq = NQ // N
    chunk = (NQ + nthreads - 1) // nthreads
    D0 = D - D % (VECTOR_BYTES // value.itemsize)
    for t in prange(nthreads):
        rows = np.empty((4, MLP), np.int64)
        wts = np.empty((4, MLP), value.dtype)
        for j in range(t * chunk, min(NQ, (t + 1) * chunk)):
            i = order[j]
            base = (i // Lq) * S * M
            _corners(loc, attn, i, 0, MLP, base, M, whf, whi, offset, rows, wts)
            for m in range(M):
                _head_sum(value, rows, wts, m * LP, (m + 1) * LP, out, i, m * D)
                # The channels past the last whole vector.
                for d in range(D0, D):
                    acc = zero
                    for s in range(m * LP, (m + 1) * LP):
                        acc += (
                            wts[0, s] * value[rows[0, s], d]
                            + wts[1, s] * value[rows[1, s], d]
                            + wts[2, s] * value[rows[2, s], d]
                            + wts[3, s] * value[rows[3, s], d]
                        )
                    out[i, m * D + d] = acc


@njit(cache=True, fastmath=_FASTMATH, inline="always")
def _head_grads(value, gout, gvalue, i, m, lo, hi, rows, wts, go, dots):
    """dots[k, s] = grad_out . value row of corner k for slots lo..hi (head m) of
    query row i, the one product every gradient needs; grad_value accumulates."""
    D = value.shape[1]
    for d in range(D):
        go[d] = gout[i, m * D + d]
    _head_backward(value, gvalue, go, rows, wts, dots, lo, hi)
    for d in range(D - D % (VECTOR_BYTES // value.itemsize), D):
        g = go[d]
        for s in range(lo, hi):
            for k in range(4):
                r = rows[k, s]
                dots[k, s] += g * value[r, d]
                gvalue[r, d] += wts[k, s] * g


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def backward_by_head(value, loc, attn, gout, gvalue, gloc, gattn, whf, whi, offset, order, N, M):
    """Backward with one task per (batch, head): each owns its slice of grad_value.

    No buffer and no reduction; every grad_value row accumulates its queries
    in ``order``, so the result is the same whatever the thread count. Best
    when N*M is large against the thread count.
    """
    D = value.shape[1]
    MLP = attn.shape[1]
    LP = MLP // M
    S = value.shape[0] // (N * M)
    Lq = gout.shape[0] // N
    for task in prange(N * M):
        n = task // M
        m = task - n * M
        # Two sets of corner tables: the next query's rows are computed and
        # prefetched while the current query runs (decoder rows are scattered
        # over all of value and grad_value, and miss every cache).
        rows = np.empty((2, 4, MLP), np.int64)
        wts = np.empty((2, 4, MLP), value.dtype)
        go = np.empty(D, value.dtype)
        dots = np.empty((4, MLP), value.dtype)
        lo = m * LP
        hi = lo + LP
        base = n * S * M
        first = n * Lq
        if Lq > 0:
            i = order[first]
            _corners(loc, attn, i, lo, hi, base, M, whf, whi, offset, rows[0], wts[0])
        for q in range(Lq):
            i = order[first + q]
            cur = q % 2
            if q + 1 < Lq:
                nxt = 1 - cur
                j = order[first + q + 1]
                _corners(loc, attn, j, lo, hi, base, M, whf, whi, offset, rows[nxt], wts[nxt])
                _prefetch_slots(value, gvalue, rows[nxt], lo, hi)
            _head_grads(value, gout, gvalue, i, m, lo, hi, rows[cur], wts[cur], go, dots)
            _location_and_weight_grads(loc, attn, i, lo, hi, whf, whi, dots, gloc, gattn)


@njit(cache=True, fastmath=_FASTMATH)
def _backward_queries(
    value, loc, attn, gout, target, gloc, gattn, whf, whi, offset, order, qlo, qhi, N, M
):
    D = value.shape[1]
    MLP = attn.shape[1]
    LP = MLP // M
    S = value.shape[0] // (N * M)
    Lq = gout.shape[0] // N
    rows = np.empty((4, MLP), np.int64)
    wts = np.empty((4, MLP), value.dtype)
    go = np.empty(D, value.dtype)
    dots = np.empty((4, MLP), value.dtype)
    for j in range(qlo, qhi):
        i = order[j]
        _corners(loc, attn, i, 0, MLP, (i // Lq) * S * M, M, whf, whi, offset, rows, wts)
        for m in range(M):
            _head_grads(value, gout, target, i, m, m * LP, (m + 1) * LP, rows, wts, go, dots)
        _location_and_weight_grads(loc, attn, i, 0, MLP, whf, whi, dots, gloc, gattn)


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def backward_by_thread(
    value, loc, attn, gout, gvalue, partial, gloc, gattn, whf, whi, offset, order, N, M, nthreads
):
    """Backward with one contiguous range of queries per thread.

    Queries in ``order``; thread 0 accumulates grad_value into gvalue, thread t > 0 into its own
    zeroed buffer partial[t - 1]; the buffers are then added in thread order,
    so the result is bitwise deterministic for a given thread count. Best when
    N*M is small against the thread count (one image, many threads).
    """
    NQ = gout.shape[0]
    chunk = (NQ + nthreads - 1) // nthreads
    for t in prange(nthreads):
        lo = t * chunk
        hi = min(NQ, lo + chunk)
        target = gvalue if t == 0 else partial[t - 1]
        _backward_queries(
            value, loc, attn, gout, target, gloc, gattn, whf, whi, offset, order, lo, hi, N, M
        )
    D = value.shape[1]
    for r in prange(value.shape[0]):
        for t in range(nthreads - 1):
            for d in range(D):
                gvalue[r, d] += partial[t, r, d]

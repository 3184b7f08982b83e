"""Triton kernels of the ``triton`` backend (imported on first use).

One program handles BLOCK_Q queries of one (batch, head); the D channels of a
head are the vector lane, so every corner read is BLOCK_Q contiguous rows of D
values. Nothing of size N*Lq*M*L*P*D is written: the forward keeps its sum
in registers, the backward recomputes the samples. Arithmetic in ACC: float64
when an input is float64, float32 otherwise (half inputs included).

Index arithmetic is done in int64, so N*S*M*D > 2^31 is safe. Every gather
and scatter is masked to the level it belongs to and to ``value``, so no
input, a wrong level table included, makes a kernel leave its tensors.
Under ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors (tests).

The launchers are operators of their own (registered on import):
``msdeformattn::triton_forward`` and ``msdeformattn::triton_backward_atomic``
are ``torch.library.triton_op``s, so torch.compile traces into their
allocations and launches; ``msdeformattn::triton_backward_deterministic`` has
data-dependent sizes and stays opaque. They hold no dispatch: the backend
calls them on contiguous inputs. The forward operator is differentiable: its
backward is the atomic operator, or the deterministic one under
``torch.use_deterministic_algorithms``.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from .reference import kernel_dtype
from .registry import cast_grads


@triton.jit
def _sample(loc_ptr, attn_ptr, j_loc, j_attn, mask_q, H, W, ACC: tl.constexpr):
    """Fractional pixel position, corner weights and attention weight of BLOCK_Q samples.

    A sample outside the map, NaN or infinite, is moved to -2 so that all its
    corners fall outside and carry zero weight (and zero gradient).
    """
    lx = tl.load(loc_ptr + j_loc, mask=mask_q, other=0.0).to(ACC)
    ly = tl.load(loc_ptr + j_loc + 1, mask=mask_q, other=0.0).to(ACC)
    a = tl.load(attn_ptr + j_attn, mask=mask_q, other=0.0).to(ACC)
    Wf = W.to(ACC)
    Hf = H.to(ACC)
    x = lx * Wf - 0.5
    y = ly * Hf - 0.5
    # False for NaN and +-inf as well.
    inside = (x >= -1.0) & (x <= Wf) & (y >= -1.0) & (y <= Hf) & mask_q
    x = tl.where(inside, x, -2.0)
    y = tl.where(inside, y, -2.0)
    a = tl.where(inside, a, 0.0)
    x0 = tl.floor(x)
    y0 = tl.floor(y)
    return x - x0, y - y0, x0.to(tl.int64), y0.to(tl.int64), a


@triton.jit
def _corner(ix, iy, H, W, start, S, row_base):
    """Row of value (batch and head folded in) of corner (ix, iy) and whether it is inside."""
    valid = (ix >= 0) & (ix < W) & (iy >= 0) & (iy < H)
    pix = start + iy * W + ix
    # A level table that does not fit S never reads outside value.
    valid = valid & (pix >= 0) & (pix < S)
    return row_base + tl.where(valid, pix, 0), valid


@triton.jit
def _tile(Lq, M, D, L, P, BLOCK_Q, BLOCK_D):
    """This program's head m, batch n and queries; j indexes loc/attn, out_offs out/grad_out.

    Grid (query blocks, M, N); loc (N, Lq, M, L, P, 2), attn (N, Lq, M, L, P)
    and out (N, Lq, M*D) contiguous. Indices in int64.
    """
    m = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    j = ((n * Lq + q) * M + m) * (L * P)
    out_offs = ((n * Lq + q) * (M * D) + m * D)[:, None] + d[None, :]
    return m, n, d, q < Lq, d < D, j, out_offs


@triton.jit(do_not_specialize=["Lq", "S", "M", "L", "P"])
def forward_kernel(
    value_ptr,
    shapes_ptr,
    starts_ptr,
    loc_ptr,
    attn_ptr,
    out_ptr,
    Lq,
    S,
    M,
    L,
    P,
    D: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
):
    m, n, d, mask_q, mask_d, j, out_offs = _tile(Lq, M, D, L, P, BLOCK_Q, BLOCK_D)
    acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=ACC)
    for l in range(L):
        H = tl.load(shapes_ptr + 2 * l)
        W = tl.load(shapes_ptr + 2 * l + 1)
        start = tl.load(starts_ptr + l)
        for p in range(P):
            s = l * P + p
            fx, fy, ix, iy, a = _sample(loc_ptr, attn_ptr, 2 * (j + s), j + s, mask_q, H, W, ACC)
            for c in tl.static_range(4):
                cx = c % 2
                cy = c // 2
                row, valid = _corner(ix + cx, iy + cy, H, W, start, S, n * S)
                w = a * (fx if cx == 1 else 1.0 - fx) * (fy if cy == 1 else 1.0 - fy)
                ptr = value_ptr + ((row * M + m) * D)[:, None] + d[None, :]
                v = tl.load(ptr, mask=valid[:, None] & mask_d[None, :], other=0.0)
                acc += w[:, None] * v.to(ACC)
    out = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + out_offs, out, mask=mask_q[:, None] & mask_d[None, :])


@triton.jit(do_not_specialize=["Lq", "S", "M", "L", "P"])
def backward_kernel(
    value_ptr,
    shapes_ptr,
    starts_ptr,
    loc_ptr,
    attn_ptr,
    gout_ptr,
    gvalue_ptr,
    gloc_ptr,
    gattn_ptr,
    Lq,
    S,
    M,
    L,
    P,
    D: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
    ATOMIC_GRAD_VALUE: tl.constexpr,
):
    """grad_loc and grad_attn (every sample written once) and, with atomics, grad_value."""
    m, n, d, mask_q, mask_d, j, out_offs = _tile(Lq, M, D, L, P, BLOCK_Q, BLOCK_D)
    mask_qd = mask_q[:, None] & mask_d[None, :]
    go = tl.load(gout_ptr + out_offs, mask=mask_qd, other=0.0).to(ACC)
    for l in range(L):
        H = tl.load(shapes_ptr + 2 * l)
        W = tl.load(shapes_ptr + 2 * l + 1)
        start = tl.load(starts_ptr + l)
        for p in range(P):
            s = l * P + p
            fx, fy, ix, iy, a = _sample(loc_ptr, attn_ptr, 2 * (j + s), j + s, mask_q, H, W, ACC)
            g_attn = tl.zeros((BLOCK_Q,), dtype=ACC)
            g_x = tl.zeros((BLOCK_Q,), dtype=ACC)
            g_y = tl.zeros((BLOCK_Q,), dtype=ACC)
            for c in tl.static_range(4):
                cx = c % 2
                cy = c // 2
                row, valid = _corner(ix + cx, iy + cy, H, W, start, S, n * S)
                wx = fx if cx == 1 else 1.0 - fx
                wy = fy if cy == 1 else 1.0 - fy
                offs = ((row * M + m) * D)[:, None] + d[None, :]
                mask = valid[:, None] & mask_d[None, :]
                v = tl.load(value_ptr + offs, mask=mask, other=0.0).to(ACC)
                dot = tl.sum(go * v, axis=1)
                dot = tl.where(valid, dot, 0.0)
                g_attn += wx * wy * dot
                # d wx/dx is +1 for the right corner, -1 for the left; likewise y.
                g_x += (1.0 if cx == 1 else -1.0) * wy * dot
                g_y += (1.0 if cy == 1 else -1.0) * wx * dot
                if ATOMIC_GRAD_VALUE:
                    contrib = (a * wx * wy)[:, None] * go
                    tl.atomic_add(gvalue_ptr + offs, contrib, mask=mask, sem="relaxed")
            tl.store(gattn_ptr + j + s, g_attn, mask=mask_q)
            # x = loc_x * W - 0.5: d/d loc_x = W d/dx.
            tl.store(gloc_ptr + 2 * (j + s), a * W.to(ACC) * g_x, mask=mask_q)
            tl.store(gloc_ptr + 2 * (j + s) + 1, a * H.to(ACC) * g_y, mask=mask_q)


@triton.jit(do_not_specialize=["M"])
def grad_value_gather_kernel(
    gout_ptr,
    entry_ptr,
    weight_ptr,
    seg_start_ptr,
    seg_row_ptr,
    gvalue_ptr,
    M,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Deterministic grad_value: one program per touched value row, its samples in a fixed order.

    entry (sorted by row, stable) holds for each (sample, corner) the query
    row n*Lq + q of grad_output; weight the attention times bilinear weight.
    """
    seg = tl.program_id(0)
    d = tl.arange(0, BLOCK_D)
    mask_d = d < D
    lo = tl.load(seg_start_ptr + seg)
    hi = tl.load(seg_start_ptr + seg + 1)
    row = tl.load(seg_row_ptr + seg)  # (n*S + pix)*M + m
    m = row % M
    acc = tl.zeros((BLOCK_D,), dtype=weight_ptr.dtype.element_ty)
    for e in range(lo, hi):
        nq = tl.load(entry_ptr + e)
        w = tl.load(weight_ptr + e)
        go = tl.load(gout_ptr + nq * (M * D) + m * D + d, mask=mask_d, other=0.0)
        acc += w * go.to(acc.dtype)
    tl.store(gvalue_ptr + row * D + d, acc, mask=mask_d)


class LaunchConfig(NamedTuple):
    block_q: int
    block_d: int
    num_warps: int


# Work values (ACC) a thread holds per tile: 8 float32 or 4 float64 keeps the
# forward and both backwards under 128 registers with nothing spilled, and at
# D=32 makes the decoder's grid (N=2, Lq=300, M=8) 160 programs, more than the
# 132 SMs of an H100. Measured with ``make gpu-compile`` (docs/benchmarks.md).
_TILE_BYTES_PER_THREAD = 32
_MAX_WARPS = 4


def launch_config(Lq: int, D: int, dtype: torch.dtype = torch.float32) -> LaunchConfig:
    """BLOCK_Q queries of D channels (padded to a power of two) per program, and its warps.

    ``dtype`` is the work dtype (float32 or float64).
    """
    block_d = triton.next_power_of_2(max(D, 1))
    per_thread = _TILE_BYTES_PER_THREAD // dtype.itemsize
    if D % 8:
        # Rows not 16-byte aligned are read a value at a time, each with its own address.
        per_thread //= 2
    # At most one query per thread: each costs registers of its own (indices, weights).
    block_q = min(
        per_thread * 32 * _MAX_WARPS // block_d,
        32 * _MAX_WARPS,
        triton.next_power_of_2(max(Lq, 1)),
    )
    block_q = max(block_q, 1)
    warps = max(block_q * block_d // (per_thread * 32), block_q // 32)
    return LaunchConfig(block_q, block_d, max(1, min(_MAX_WARPS, warps)))


def gather_warps(block_d: int, dtype: torch.dtype) -> int:
    """Warps for one row of BLOCK_D values: one 16-byte vector per thread, at least one warp."""
    return max(1, min(8, block_d // (32 * (16 // dtype.itemsize))))


_TL = {torch.float32: tl.float32, torch.float64: tl.float64}


def _on(device: torch.device):
    """Launch on ``device``'s GPU, not the current one (a no-op for CPU tensors)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _kernel_op(name: str, fake):
    """Register ``fn`` as the operator ``name``: a ``triton_op`` when the kernels are compiled.

    A ``triton_op`` lets torch.compile trace into ``fn`` (its allocations and
    ``wrap_triton`` launches) and Inductor schedule the kernels with the rest of
    the graph; ``fn`` is also its fake implementation. Under
    ``TRITON_INTERPRET=1`` the kernels are interpreted functions that nothing can
    trace (on fake tensors ``fn`` would run them), so the operator is opaque
    instead, with ``fake`` (allocation only) as its fake implementation.
    """

    def register(fn):
        if isinstance(forward_kernel, JITFunction):
            return torch.library.triton_op(name, fn, mutates_args=())
        op = torch.library.custom_op(name, fn, mutates_args=())
        op.register_fake(fake)
        return op

    return register


def wrap_triton(kernel):
    """``torch.library.wrap_triton(kernel)``; an interpreted kernel as it is.

    torch before 2.12 refuses interpreted kernels, which are launched directly
    either way. The name is the one torch looks for in a ``triton_op``'s source
    to key its compile caches on the kernels' code.
    """
    return torch.library.wrap_triton(kernel) if isinstance(kernel, JITFunction) else kernel


def _forward_buffer(value, loc, attn) -> torch.Tensor:
    N, _, M, D = value.shape
    # A float64 sum is stored as float64 and rounded by torch: Triton's
    # interpreter gets a direct float64 -> bfloat16 conversion wrong.
    dtype = torch.float64 if kernel_dtype(value, loc, attn) == torch.float64 else value.dtype
    return value.new_empty((N, loc.shape[1], M * D), dtype=dtype)


def _fake_forward(value, shapes, starts, loc, attn):
    return _forward_buffer(value, loc, attn).to(value.dtype)


@_kernel_op("msdeformattn::triton_forward", fake=_fake_forward)
def forward(
    value: torch.Tensor,
    shapes: torch.Tensor,
    starts: torch.Tensor,
    loc: torch.Tensor,
    attn: torch.Tensor,
) -> torch.Tensor:
    """The forward on contiguous inputs: (N, Lq, M*D) in value's dtype."""
    N, S, M, D = value.shape
    Lq, L, P = loc.shape[1], loc.shape[3], loc.shape[4]
    out = _forward_buffer(value, loc, attn)
    if out.numel():
        dtype = kernel_dtype(value, loc, attn)
        cfg = launch_config(Lq, D, dtype)
        grid = (triton.cdiv(Lq, cfg.block_q), M, N)
        with _on(value.device):
            wrap_triton(forward_kernel)[grid](
                value, shapes, starts, loc, attn, out, Lq, S, M, L, P, D,
                cfg.block_q, cfg.block_d, _TL[dtype], num_warps=cfg.num_warps,
            )  # fmt: skip
    return out.to(value.dtype)


def _fake_backward(grad_output, value, shapes, starts, loc, attn):
    dtype = kernel_dtype(grad_output, value, loc, attn)
    return (
        value.new_empty(value.shape, dtype=dtype),
        loc.new_empty(loc.shape, dtype=dtype),
        attn.new_empty(attn.shape, dtype=dtype),
    )


def _grads(launch, grad_output, value, shapes, starts, loc, attn, atomic: bool):
    """Allocate the gradients and run ``launch`` (backward_kernel, wrapped or not) into them."""
    N, S, M, D = value.shape
    Lq, L, P = loc.shape[1], loc.shape[3], loc.shape[4]
    dev = value.device
    dtype = kernel_dtype(grad_output, value, loc, attn)
    gvalue = torch.zeros((N, S, M, D), dtype=dtype, device=dev)
    if grad_output.numel() == 0:
        return gvalue, torch.zeros_like(loc, dtype=dtype), torch.zeros_like(attn, dtype=dtype)
    # The kernel writes every sample's location and weight gradient.
    gloc = torch.empty(loc.shape, dtype=dtype, device=dev)
    gattn = torch.empty(attn.shape, dtype=dtype, device=dev)
    cfg = launch_config(Lq, D, dtype)
    grid = (triton.cdiv(Lq, cfg.block_q), M, N)
    with _on(dev):
        launch[grid](
            value, shapes, starts, loc, attn, grad_output, gvalue, gloc, gattn,
            Lq, S, M, L, P, D, cfg.block_q, cfg.block_d, _TL[dtype], atomic,
            num_warps=cfg.num_warps,
        )  # fmt: skip
    return gvalue, gloc, gattn


@_kernel_op("msdeformattn::triton_backward_atomic", fake=_fake_backward)
def _backward_atomic(
    grad_output: torch.Tensor,
    value: torch.Tensor,
    shapes: torch.Tensor,
    starts: torch.Tensor,
    loc: torch.Tensor,
    attn: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _grads(wrap_triton(backward_kernel), grad_output, value, shapes, starts, loc, attn, True)


@torch.library.custom_op("msdeformattn::triton_backward_deterministic", mutates_args=())
def _backward_deterministic(
    grad_output: torch.Tensor,
    value: torch.Tensor,
    shapes: torch.Tensor,
    starts: torch.Tensor,
    loc: torch.Tensor,
    attn: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Opaque to tracing: its sizes depend on the data (boolean indexing,
    ``unique_consecutive``, a grid of ``rows.numel()`` programs)."""
    grads = _grads(backward_kernel, grad_output, value, shapes, starts, loc, attn, False)
    gvalue = grads[0]
    if grad_output.numel():
        with _on(value.device):
            # Images touch disjoint rows of grad_value: one at a time bounds the sort's memory.
            for n in range(value.shape[0]):
                b = slice(n, n + 1)
                _grad_value_deterministic(
                    grad_output[b], value[b], shapes, starts, loc[b], attn[b], gvalue[b]
                )
    return grads


_backward_deterministic.register_fake(_fake_backward)


def backward(grad_output, value, shapes, starts, loc, attn, deterministic: bool):
    """(grad_value, grad_loc, grad_attn) in the work dtype; the caller casts them.

    Contiguous inputs. The atomic backward is a ``triton_op``; the deterministic
    one stays an opaque operator.
    """
    op = _backward_deterministic if deterministic else _backward_atomic
    return op(grad_output, value, shapes, starts, loc, attn)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_output):
    value, shapes, starts, loc, attn = ctx.saved_tensors
    grads = backward(
        grad_output.contiguous(),
        value,
        shapes,
        starts,
        loc,
        attn,
        # Read while the backward is traced: Dynamo guards on the flag.
        deterministic=torch.are_deterministic_algorithms_enabled(),
    )
    grad_value, grad_loc, grad_attn = cast_grads(grads, value, loc, attn)
    return grad_value, None, None, grad_loc, grad_attn


# On import, not on first call: torch.compile cannot trace a registration.
forward.register_autograd(_backward, setup_context=_setup_context)


def _grad_value_deterministic(grad_output, value, shapes, starts, loc, attn, gvalue) -> None:
    """grad_value without atomics: sort every (sample, corner) by the value row it adds to.

    Costs O(Lq*M*L*P) memory per image for the sort (a few tens of bytes per
    sample and corner: key, order, entry and weight), never anything times D.
    """
    N, S, M, D = value.shape
    Lq, L, P = loc.shape[1], loc.shape[3], loc.shape[4]
    H = shapes[:, 0].view(1, 1, 1, L, 1)
    W = shapes[:, 1].view(1, 1, 1, L, 1)
    dtype = gvalue.dtype
    lx = loc[..., 0].to(dtype)
    ly = loc[..., 1].to(dtype)
    x = lx * W - 0.5
    y = ly * H - 0.5
    inside = (x >= -1) & (x <= W) & (y >= -1) & (y <= H)
    x = torch.where(inside, x, -2.0)
    y = torch.where(inside, y, -2.0)
    x0 = x.floor()
    y0 = y.floor()
    fx, fy = x - x0, y - y0
    ix, iy = x0.long(), y0.long()
    a = torch.where(inside, attn.to(dtype), 0.0)
    n = torch.arange(N, device=value.device).view(N, 1, 1, 1, 1)
    m = torch.arange(M, device=value.device).view(1, 1, M, 1, 1)
    nq = (n * Lq + torch.arange(Lq, device=value.device).view(1, Lq, 1, 1, 1)).expand(
        N, Lq, M, L, P
    )
    start = starts.view(1, 1, 1, L, 1)
    keys, entries, weights = [], [], []
    for cy in (0, 1):
        for cx in (0, 1):
            xx, yy = ix + cx, iy + cy
            pix = start + yy * W + xx
            valid = (xx >= 0) & (xx < W) & (yy >= 0) & (yy < H) & (pix >= 0) & (pix < S)
            w = a * (fx if cx else 1 - fx) * (fy if cy else 1 - fy)
            key = torch.where(valid, (n * S + pix) * M + m, -1)
            keys.append(key.reshape(-1))
            entries.append(nq.reshape(-1))
            weights.append(w.reshape(-1))
    key = torch.cat(keys)
    keep = key >= 0
    key, entry, weight = key[keep], torch.cat(entries)[keep], torch.cat(weights)[keep]
    key, order = torch.sort(key, stable=True)
    entry = entry[order].contiguous()
    weight = weight[order].contiguous()
    rows, counts = torch.unique_consecutive(key, return_counts=True)
    if rows.numel() == 0:
        return
    seg_start = torch.zeros(rows.numel() + 1, dtype=torch.int64, device=value.device)
    seg_start[1:] = counts.cumsum(0)
    block_d = triton.next_power_of_2(max(D, 1))
    grad_value_gather_kernel[(rows.numel(),)](
        grad_output, entry, weight, seg_start, rows, gvalue, M, D, block_d,
        num_warps=gather_warps(block_d, gvalue.dtype),
    )  # fmt: skip

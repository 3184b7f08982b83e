"""The ``cpu`` backend: fused numba kernels, forward and backward.

No sampled-value intermediate: beyond inputs, outputs and gradients the
forward allocates nothing proportional to the work, and the backward at most
one grad_value-sized buffer per extra thread (when it splits by query, see
:func:`_backward_plan`). No atomics: gradients are bitwise deterministic for a
given thread count. float16/bfloat16 inputs are computed in float32.

The kernels compile on first use (about 10 s) and are cached on disk by numba,
so later processes load them in well under a second.
"""

from __future__ import annotations

import contextlib
import math
import mmap

import numpy as np
import torch

from .reference import kernel_dtype
from .registry import Backend, cast_grads, register
from .validate import check_level_values

__all__ = ["CpuBackend"]


def _kernels():
    # Imported here so that importing the package never pays numba's import
    # (or fails on a machine without it).
    from . import _cpu_kernels

    return _cpu_kernels


def _threads() -> int:
    """Follow PyTorch's intra-op thread count, so numba and torch never oversubscribe."""
    import numba

    n = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(n)
    return n


# glibc serves blocks up to its mmap threshold from the heap, and raises the
# threshold (up to 32 MiB on 64-bit) to the size of mmap-ed blocks freed:
# below it, an output or gradient of the same size as the last call's reuses
# memory already faulted in. Above it, every block is a fresh mapping.
_FRESH_MAPPING_BYTES = 32 << 20
# Linux's value (5.14 on); not every Python names it in its mmap module.
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)


def _buffer(shape: tuple[int, ...], dtype: torch.dtype, zero: bool = True) -> torch.Tensor:
    """A CPU tensor for a kernel to fill: zeroed, or (zero=False) to be overwritten whole.

    Blocks glibc would map afresh (over 32 MiB) come from an anonymous
    mapping on transparent huge pages that the OS faults in at once
    (MADV_POPULATE_WRITE); such a mapping reads as zeros either way. On 4 KiB
    pages the first touches of a 41 MB gradient cost ~10-20 ms, more than the
    kernel; populated huge pages ~2 ms. Smaller blocks are left to PyTorch's
    allocator: measured here, reusing heap memory beat fresh huge pages by
    ~6 ms in the encoder backward. The mapping is unmapped when the tensor is
    freed; where populate is refused, zeros are written instead.
    """
    numel = 1
    for s in shape:
        numel *= s
    nbytes = numel * dtype.itemsize
    if nbytes <= _FRESH_MAPPING_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.zeros(shape, dtype=dtype) if zero else torch.empty(shape, dtype=dtype)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    out = torch.frombuffer(buf, dtype=dtype).view(shape)
    # Refused by kernels built without transparent huge pages: 4 KiB pages then.
    with contextlib.suppress(OSError):
        buf.madvise(mmap.MADV_HUGEPAGE)
    try:
        buf.madvise(_MADV_POPULATE_WRITE)
    except OSError:
        out.zero_()
    return out


def _prepare(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Contiguous arrays in the work dtype, in the 2-D layouts the kernels index."""
    N, S, M, D = value.shape
    Lq, L, P = sampling_locations.shape[1], sampling_locations.shape[3], sampling_locations.shape[4]
    # The kernels trust the level table to address rows inside value; on the
    # CPU reading it costs nothing, so it is always checked here.
    check_level_values(spatial_shapes, level_start_index, S)
    dtype = kernel_dtype(value, sampling_locations, attention_weights)

    def arr(t: torch.Tensor, *shape: int) -> np.ndarray:
        return t.detach().to(dtype).contiguous().view(*shape).numpy()

    k = _kernels()
    v = arr(value, N * S * M, D)
    loc = arr(sampling_locations, N * Lq, M * L * P * 2)
    whf, whi, offset = k.level_tables(
        spatial_shapes.detach().to(torch.int64).numpy(),
        level_start_index.detach().to(torch.int64).numpy(),
        M,
        P,
        np.float32 if dtype == torch.float32 else np.float64,
    )
    order = k.query_order(loc, max(N, 1), _tile_bits(v.nbytes // max(N, 1)))
    return dtype, v, loc, arr(attention_weights, N * Lq, M * L * P), (whf, whi, offset, order)


def _tile_bits(image_value_bytes: int) -> int:
    """Tiles per side (as a power of two) for the kernels' query order.

    Aim for tiles whose value rows take ~256 KiB, a quarter of this machine's
    L2, so that a tile's rows and grad_value rows stay cached while its
    queries run: 2**3 x 2**3 tiles for a COCO-size encoder (20 MB per image).
    Measured there against the plain order: forward 13.9 -> 11.2 ms, backward
    kernel 44.7 -> 37.1 ms; 2**2 and 2**4 were within 10% of 2**3.
    """
    tiles = image_value_bytes / (256 << 10)
    return int(min(8, max(0, round(math.log2(max(tiles, 1.0)) / 2))))


def _backward_plan(N: int, M: int, S: int, Lq: int, LP: int, threads: int) -> str:
    """Pick how grad_value is accumulated without atomics.

    "by_head": one task per (batch, head), each owning its slice of
    grad_value; no buffer, and the same bits whatever the thread count.
    "by_thread": queries split in one range per thread, each thread with its
    own grad_value buffer (threads - 1 extra copies), summed in thread order.
    The buffers pay off when every pixel gets many samples (the encoder:
    Lq*L*P >> S) or when there are too few (batch, head) tasks to go round.
    """
    if threads == 1:
        return "by_head"
    if Lq * LP >= S or 2 * threads > N * M:
        return "by_thread"
    return "by_head"


class CpuBackend(Backend):
    NAME = "cpu"
    PRIORITY = 10
    SUPPORTED_DEVICES = frozenset({"cpu"})
    IS_DETERMINISTIC = True
    REQUIRES = ("numba",)

    def forward(
        self, value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    ):
        N, _, M, D = value.shape
        Lq = sampling_locations.shape[1]
        dtype, v, loc, attn, tables = _prepare(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
        # Every element is written by the kernel.
        out = _buffer((N * Lq, M * D), dtype, zero=False)
        if out.numel():
            zero = np.zeros((), dtype=v.dtype)[()]
            _kernels().forward(v, loc, attn, out.numpy(), *tables, N, M, _threads(), zero)
        return out.view(N, Lq, M * D).to(value.dtype)

    def backward(
        self,
        grad_output,
        value,
        spatial_shapes,
        level_start_index,
        sampling_locations,
        attention_weights,
    ):
        N, S, M, D = value.shape
        Lq = sampling_locations.shape[1]
        dtype, v, loc, attn, tables = _prepare(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
        gout = grad_output.detach().to(dtype).contiguous().view(N * Lq, M * D).numpy()
        gvalue = _buffer(v.shape, dtype)
        # Every element of these two is written by the kernels, which run
        # whenever there is a sample (D = 0 included: zero gradients).
        gloc = _buffer(loc.shape, dtype, zero=False)
        gattn = _buffer(attn.shape, dtype, zero=False)
        if attn.size:
            k = _kernels()
            threads = _threads()
            if _backward_plan(N, M, S, Lq, attn.shape[1] // M, threads) == "by_head":
                k.backward_by_head(
                    v,
                    loc,
                    attn,
                    gout,
                    gvalue.numpy(),
                    gloc.numpy(),
                    gattn.numpy(),
                    *tables,
                    N,
                    M,
                )
            else:
                partial = _buffer((threads - 1, *v.shape), dtype)
                k.backward_by_thread(
                    v,
                    loc,
                    attn,
                    gout,
                    gvalue.numpy(),
                    partial.numpy(),
                    gloc.numpy(),
                    gattn.numpy(),
                    *tables,
                    N,
                    M,
                    threads,
                )
        return cast_grads((gvalue, gloc, gattn), value, sampling_locations, attention_weights)


register(CpuBackend())

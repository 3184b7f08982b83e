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

import mmap

import numpy as np
import torch

from .reference import compute_dtype
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


# Above this size, fresh buffers come from huge pages (see _zeros).
_HUGE_PAGE_BYTES = 4 << 20
# Linux's value (5.14 on); not every Python names it in its mmap module.
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)


def _zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zeroed CPU tensor; large ones on transparent huge pages, faulted in by the kernel.

    Outputs and gradients are fresh memory on every call, and for the tens of
    MB of an encoder the page faults of first touch cost more than the kernel
    itself (glibc maps blocks over 32 MB anew each time). An anonymous mapping
    advised MADV_HUGEPAGE reads as zeros; MADV_POPULATE_WRITE (Linux 5.14)
    then has the OS fault it all in at once. Measured here, 20 MB: populate
    ~1 ms; writing zeros from PyTorch 10-23 ms; first touches by the kernel
    ~23 ms. Where populate is refused, zeros are written as before. The
    mapping is unmapped when the tensor is freed.
    """
    numel = 1
    for s in shape:
        numel *= s
    nbytes = numel * dtype.itemsize
    if nbytes < _HUGE_PAGE_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.zeros(shape, dtype=dtype)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf.madvise(mmap.MADV_HUGEPAGE)
    out = torch.frombuffer(buf, dtype=dtype).view(shape)
    try:
        buf.madvise(_MADV_POPULATE_WRITE)
    except OSError:
        out.zero_()
    return out


def _work_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = compute_dtype(*tensors)
    return torch.float64 if dtype == torch.float64 else torch.float32


def _prepare(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Contiguous arrays in the work dtype, in the 2-D layouts the kernels index."""
    N, S, M, D = value.shape
    Lq, L, P = sampling_locations.shape[1], sampling_locations.shape[3], sampling_locations.shape[4]
    # The kernels trust the level table to address rows inside value; on the
    # CPU reading it costs nothing, so it is always checked here.
    check_level_values(spatial_shapes, level_start_index, S)
    dtype = _work_dtype(value, sampling_locations, attention_weights)

    def arr(t: torch.Tensor, *shape: int) -> np.ndarray:
        return t.detach().to(dtype).contiguous().view(*shape).numpy()

    tables = _kernels().level_tables(
        spatial_shapes.detach().to(torch.int64).numpy(),
        level_start_index.detach().to(torch.int64).numpy(),
        M,
        P,
        np.float32 if dtype == torch.float32 else np.float64,
    )
    return (
        dtype,
        arr(value, N * S * M, D),
        arr(sampling_locations, N * Lq, M * L * P * 2),
        arr(attention_weights, N * Lq, M * L * P),
        tables,
    )


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
        out = _zeros((N * Lq, M * D), dtype)
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
        gvalue = _zeros(v.shape, dtype)
        gloc = _zeros(loc.shape, dtype)
        gattn = _zeros(attn.shape, dtype)
        if gout.size:
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
                partial = _zeros((threads - 1, *v.shape), dtype)
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

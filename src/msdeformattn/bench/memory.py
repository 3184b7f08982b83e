"""Peak memory: on the CPU the growth of the peak RSS, on CUDA ``max_memory_allocated``.

Each measurement runs in a fresh process (``python -m msdeformattn.bench`` with a hidden
probe flag), so the peaks of earlier runs in this one don't count.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

import torch

from .cases import CASES, make_inputs
from .peers import contenders
from .timing import forward_backward, sync, with_grad


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_rss_growth(fn: Callable[[], object]) -> int:
    """Bytes by which this process's peak RSS exceeds its RSS before ``fn()`` (Linux)."""
    # clear_refs "5" resets the peak (VmHWM) to the current RSS.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_bytes("VmRSS")
    fn()
    return _status_bytes("VmHWM") - base


def probe_in_fresh_process(args: list[str]) -> int:
    """Run ``python -m msdeformattn.bench *args`` and return the bytes it prints last."""
    cmd = [sys.executable, "-m", "msdeformattn.bench", *args]
    if torch.are_deterministic_algorithms_enabled():
        cmd.append("--deterministic")
    # A fixed mmap threshold makes glibc return every large block to the
    # system when freed, so RSS follows the live allocations.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return int(out.strip().splitlines()[-1])


def peak_memory_probe(case_name: str, contender: str, dtype: str, device: str) -> int:
    """Peak extra bytes of one forward+backward, after one warm-up on a small case."""
    fn = contenders(device)[contender]
    dt = getattr(torch, dtype)
    small = with_grad(make_inputs(CASES["small"], dt, device))
    # Loads the kernels, so their code is not counted.
    forward_backward(fn, small, torch.ones_like(fn(*small)))
    inputs = with_grad(make_inputs(CASES[case_name], dt, device))
    with torch.no_grad():
        grad = torch.ones_like(fn(*inputs))
    return peak_growth(lambda: forward_backward(fn, inputs, grad), device)


def peak_growth(fn: Callable[[], object], device: str) -> int:
    """Peak extra bytes of ``fn()``: ``max_memory_allocated`` on CUDA, the RSS on the CPU."""
    if device != "cuda":
        return peak_rss_growth(fn)
    sync(device)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated() - base


def peak_memory(case_name: str, contender: str, dtype: str, device: str) -> int:
    """:func:`peak_memory_probe` in a fresh process, so earlier peaks don't count."""
    return probe_in_fresh_process(["--memory-probe", case_name, contender, dtype, device])

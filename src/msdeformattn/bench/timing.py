"""Timing: medians of ``torch.utils.benchmark``, on every thread torch uses."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils import benchmark

Inputs = tuple[torch.Tensor, ...]


def sync(device: str) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device == "cuda":
        torch.cuda.synchronize()


def median_time(fn: Callable[[], object], min_run_time: float) -> float:
    """Median seconds of one ``fn()``, from blocks of runs lasting ``min_run_time`` in all."""
    # Timer runs on one thread unless told otherwise.
    timer = benchmark.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def with_grad(inputs: Inputs) -> Inputs:
    """Copies of the operator's inputs with value, locations and weights requiring grad."""
    value, shapes, starts, loc, attn = inputs
    return (
        value.clone().requires_grad_(),
        shapes,
        starts,
        loc.clone().requires_grad_(),
        attn.clone().requires_grad_(),
    )


def forward(fn: Callable, inputs: Inputs) -> None:
    with torch.no_grad():
        fn(*inputs)


def forward_backward(fn: Callable, inputs: Inputs, grad: torch.Tensor) -> None:
    """One forward, then the gradients of value, locations and weights (:func:`with_grad`'s)."""
    # autograd.grad, not backward(): accumulating into .grad would time an extra add.
    value, _, _, loc, attn = inputs
    torch.autograd.grad(fn(*inputs), (value, loc, attn), grad)


def time_case(fn: Callable, inputs: Inputs, min_run_time: float) -> tuple[float, float]:
    """Median seconds of ``fn``'s forward (no grad) and of its forward+backward."""
    inputs = with_grad(inputs)
    grad = torch.randn_like(fn(*inputs))
    for _ in range(2):  # warm-up: compilation, caches, allocator
        forward_backward(fn, inputs, grad)
    return (
        median_time(lambda: forward(fn, inputs), min_run_time),
        median_time(lambda: forward_backward(fn, inputs, grad), min_run_time),
    )


def copy_bandwidth(device: str) -> float:
    """Measured device copy bandwidth in bytes/s (read + write of a 1 GiB tensor)."""
    src = torch.empty(2**28, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() * src.element_size() / median_time(lambda: dst.copy_(src), 0.5)

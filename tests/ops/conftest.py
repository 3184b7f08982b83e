"""Backends under test and the edge inputs that several operator tests share."""

from __future__ import annotations

import torch

import msdeformattn
from msdeformattn.ops import get_backend

from ..conftest import DEVICES, make_inputs


def split(target: str) -> tuple[str, str]:
    """A test target "backend" (CPU tensors) or "backend@device"."""
    backend, _, device = target.partition("@")
    return backend, device or "cpu"


def supports(target: str, dtype: torch.dtype) -> bool:
    backend, device = split(target)
    x = torch.zeros(1, dtype=dtype, device=device)
    return get_backend(backend).supports(x, x, x)


# Every backend on every device it can run on here (triton on CPU: its interpreter).
BACKENDS = [
    b if device == "cpu" else f"{b}@{device}"
    for device in DEVICES
    for b in msdeformattn.available_backends()
    if supports(f"{b}@{device}", torch.float32)
]
FUSED = [b for b in BACKENDS if split(b)[0] != "reference"]
FLOAT64 = [b for b in BACKENDS if supports(b, torch.float64)]
INTERPRETED = [b for b in FUSED if b == "triton"]  # "triton@cuda" is compiled


def run(target):
    """The operator on a target's device and backend, taking and returning CPU tensors."""
    backend, device = split(target)

    def fn(*inputs):
        inputs = [t.to(device) for t in inputs]
        return msdeformattn.ms_deform_attn(*inputs, backend=backend).cpu()

    return fn


def non_contiguous(inputs):
    """The same values with value, locations and weights in non-contiguous layouts."""
    value, shapes, starts, loc, attn = inputs
    return (
        value.transpose(0, 1).contiguous().transpose(0, 1),
        shapes,
        starts,
        loc.permute(1, 0, 2, 3, 4, 5).contiguous().permute(1, 0, 2, 3, 4, 5),
        torch.empty(*attn.shape, 2, dtype=attn.dtype)[..., 0].copy_(attn),
    )


def edge_inputs(case: str, dtype: torch.dtype = torch.float32):
    """Inputs at the edges the behaviour tests cover, by name (see EDGE_CASES)."""
    if case == "odd-D-1px":
        return make_inputs(D=3, M=3, levels=((1, 1), (2, 5), (1, 1)), dtype=dtype)
    if case == "non-contiguous":
        return non_contiguous(make_inputs(N=2, Lq=5, M=3, D=4, P=2, dtype=dtype))
    if case.startswith("empty-"):
        return make_inputs(**{case.removeprefix("empty-"): 0, "dtype": dtype})
    raise ValueError(case)


EDGE_CASES = ["odd-D-1px", "non-contiguous", "empty-N", "empty-Lq", "empty-D"]

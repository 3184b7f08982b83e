"""Shared test helpers: random operator inputs, the tolerances (one place per dtype) and
``naive``, the scalar-loop oracle of the operator's formula."""

from __future__ import annotations

import math
import os

import pytest
import torch

# Without a GPU the Triton kernels run under Triton's interpreter on CPU
# tensors. Set before any kernel module is imported: Triton reads it when a
# kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Devices every backend test runs on; CI has only the CPU.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# Float32 comparisons between backends: different summation orders only.
TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-9),
    torch.float32: dict(atol=2e-5, rtol=1e-4),
}


def level_table(levels):
    shapes = torch.tensor(levels, dtype=torch.int64).view(-1, 2)
    areas = shapes.prod(1)
    starts = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    return shapes, starts, int(areas.sum())


def make_inputs(
    N=2,
    Lq=5,
    M=2,
    D=3,
    levels=((4, 6), (2, 3), (1, 1)),
    P=2,
    dtype=torch.float64,
    low=-0.3,
    high=1.3,
    seed=0,
    requires_grad=False,
):
    """Random (value, spatial_shapes, level_start_index, sampling_locations, attention_weights).

    Locations are uniform in [low, high], so some fall outside the maps.
    """
    g = torch.Generator().manual_seed(seed)
    shapes, starts, S = level_table(levels)
    L = shapes.shape[0]
    value = torch.randn(N, S, M, D, generator=g, dtype=torch.float64).to(dtype)
    loc = low + (high - low) * torch.rand(N, Lq, M, L, P, 2, generator=g, dtype=torch.float64)
    attn = torch.rand(N, Lq, M, L, P, generator=g, dtype=torch.float64)
    out = [value, shapes, starts, loc.to(dtype), attn.to(dtype)]
    if requires_grad:
        for i in (0, 3, 4):
            out[i].requires_grad_()
    return tuple(out)


def grads(fn, inputs, grad_output=None):
    """(output, grad_value, grad_loc, grad_attn) of fn on inputs, with fresh leaves.

    detach() keeps each input's strides, so non-contiguous inputs stay so.
    """
    value, shapes, starts, loc, attn = (
        t.detach().requires_grad_() if t.is_floating_point() else t for t in inputs
    )
    out = fn(value, shapes, starts, loc, attn)
    if grad_output is None:
        g = torch.Generator().manual_seed(1)
        grad_output = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    gv, gl, ga = torch.autograd.grad(out, (value, loc, attn), grad_output)
    return out.detach(), gv, gl, ga


def naive(value, shapes, starts, loc, attn):
    """out[n, q, m*D + d] = sum_l sum_p A * bilinear(x*W - 0.5, y*H - 0.5), zero outside."""
    N, _, M, D = value.shape
    _, Lq, _, L, P, _ = loc.shape
    out = torch.zeros(N, Lq, M * D, dtype=torch.float64)
    for n in range(N):
        for q in range(Lq):
            for m in range(M):
                for l in range(L):
                    H, W = (int(s) for s in shapes[l])
                    start = int(starts[l])
                    for p in range(P):
                        lx, ly = (float(c) for c in loc[n, q, m, l, p])
                        if not (math.isfinite(lx) and math.isfinite(ly)):
                            continue
                        x, y = lx * W - 0.5, ly * H - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        for yy in (y0, y0 + 1):
                            for xx in (x0, x0 + 1):
                                if 0 <= xx < W and 0 <= yy < H:
                                    w = (1 - abs(x - xx)) * (1 - abs(y - yy))
                                    row = value[n, start + yy * W + xx, m].double()
                                    out[n, q, m * D : (m + 1) * D] += attn[n, q, m, l, p] * w * row
    return out


def naive_samples(value, shapes, starts, loc, attn, levels, discrete=False):
    """The per-sample form: loc (N, Lq, M, K, 2) and attn (N, Lq, M, K), sample k on level
    ``levels[k]``; ``discrete`` reads the pixel floor(loc * (W, H) + 0.5), clamped per axis."""
    N, _, M, D = value.shape
    Lq, K = loc.shape[1], loc.shape[3]
    out = torch.zeros(N, Lq, M * D, dtype=torch.float64)
    for n in range(N):
        for q in range(Lq):
            for m in range(M):
                for k in range(K):
                    H, W = (int(s) for s in shapes[levels[k]])
                    start = int(starts[levels[k]])
                    lx, ly = (float(c) for c in loc[n, q, m, k])
                    if not (math.isfinite(lx) and math.isfinite(ly)):
                        continue
                    a = float(attn[n, q, m, k])
                    if discrete:
                        xx = min(max(math.floor(lx * W + 0.5), 0), W - 1)
                        yy = min(max(math.floor(ly * H + 0.5), 0), H - 1)
                        corners = [(xx, yy, 1.0)]
                    else:
                        x, y = lx * W - 0.5, ly * H - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        corners = [
                            (xx, yy, (1 - abs(x - xx)) * (1 - abs(y - yy)))
                            for yy in (y0, y0 + 1)
                            for xx in (x0, x0 + 1)
                        ]
                    for xx, yy, w in corners:
                        if 0 <= xx < W and 0 <= yy < H:
                            row = value[n, start + yy * W + xx, m].double()
                            out[n, q, m * D : (m + 1) * D] += a * w * row
    return out


def user_error(argv: list[str], capsys) -> str:
    """Run the command line on ``argv``, which must fail as a user's mistake does: exit
    status 2 and one line on stderr, no traceback. Returns that line."""
    from msdeformattn.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]

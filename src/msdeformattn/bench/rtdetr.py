"""The operator's RT-DETRv2 forms (per-level point counts, discrete sampling) against the
same formulation in plain PyTorch, as RT-DETRv2's decoder computes it.

Cases: the RT-DETRv2-S decoder (300 queries, a 640x640 image's levels at strides
8/16/32, M=8, D=32) with points [4, 4, 4] (its default), D-FINE's uneven [3, 6, 3],
and [4, 4, 4] with discrete sampling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops import level_start_index, ms_deform_attn
from .timing import median_time

#: (name, points per level, sampling)
CASES = (
    ("rtdetrv2-s [4,4,4]", [4, 4, 4], "bilinear"),
    ("d-fine [3,6,3]", [3, 6, 3], "bilinear"),
    ("rtdetrv2-s discrete", [4, 4, 4], "discrete"),
)
LEVELS = ((80, 80), (40, 40), (20, 20))


def plain_pytorch(value, shapes, points, loc, attn, sampling):
    """RT-DETRv2's ``deformable_attention_core_func_v2`` logic, restated: per level,
    grid_sample (bilinear) or a gather of the nearest pixel (discrete), then the weights.

    value (N, S, M, D), loc (N, Lq, M, K, 2), attn (N, Lq, M, K) -> (N, Lq, M*D).
    """
    N, _, M, D = value.shape
    Lq, K = loc.shape[1], loc.shape[3]
    sizes = [h * w for h, w in shapes.tolist()]
    values = value.permute(0, 2, 3, 1).flatten(0, 1).split(sizes, dim=-1)  # (N*M, D, S_l)
    locs = loc.permute(0, 2, 1, 3, 4).flatten(0, 1).split(points, dim=-2)  # (N*M, Lq, P_l, 2)
    sampled = []
    for v, lc, (h, w) in zip(values, locs, shapes.tolist(), strict=True):
        if sampling == "bilinear":
            grid = 2 * lc - 1
            sampled.append(
                F.grid_sample(
                    v.view(N * M, D, h, w), grid, "bilinear", "zeros", align_corners=False
                )
            )
        else:
            xy = (lc * torch.tensor([w, h], dtype=lc.dtype) + 0.5).floor().long()
            x = xy[..., 0].clamp(0, w - 1)
            y = xy[..., 1].clamp(0, h - 1)
            index = (y * w + x).flatten(1)  # (N*M, Lq*P_l)
            picked = v.gather(2, index[:, None].expand(-1, D, -1))
            sampled.append(picked.view(N * M, D, Lq, -1))
    weights = attn.permute(0, 2, 1, 3).reshape(N * M, 1, Lq, K)
    out = (torch.cat(sampled, -1) * weights).sum(-1)
    return out.view(N, M * D, Lq).transpose(1, 2)


def inputs(points, N=1, Lq=300, M=8, D=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(LEVELS)
    starts = level_start_index(shapes)
    S = int(shapes.prod(1).sum())
    K = sum(points)
    value = torch.randn(N, S, M, D, generator=g)
    loc = torch.rand(N, Lq, 1, 1, 2, generator=g) + 0.02 * torch.randn(N, Lq, M, K, 2, generator=g)
    attn = torch.randn(N, Lq, M, K, generator=g).softmax(-1)
    return value, shapes, starts, loc, attn


def _time_case(points: list[int], sampling: str, min_run_time: float) -> dict:
    """{contender: (forward s, forward+backward s)} of one case, outputs checked first."""
    value, shapes, starts, loc, attn = inputs(points)

    def ours(v, lc, a):
        return ms_deform_attn(v, shapes, starts, lc, a, points_per_level=points, sampling=sampling)

    def plain(v, lc, a):
        return plain_pytorch(v, shapes, points, lc, a, sampling)

    with torch.no_grad():
        torch.testing.assert_close(ours(value, loc, attn), plain(value, loc, attn),
                                   atol=1e-4, rtol=1e-4)  # fmt: skip
    grad = torch.randn(1, 300, 256)
    times = {}
    for label, fn in (("msdeformattn", ours), ("plain PyTorch", plain)):
        v, lc, a = (t.clone().requires_grad_() for t in (value, loc, attn))
        # Discrete sampling has no location gradient.
        wanted = (v, a) if sampling == "discrete" else (v, lc, a)

        def step(fn=fn, v=v, lc=lc, a=a, wanted=wanted):
            torch.autograd.grad(fn(v, lc, a), wanted, grad)

        def infer(fn=fn):
            with torch.no_grad():
                fn(value, loc, attn)

        step()
        times[label] = (median_time(infer, min_run_time), median_time(step, min_run_time))
    return times


def benchmark(min_run_time: float) -> str:
    """The table: forward and forward+backward, ours against plain PyTorch, per case."""
    rows = [(name, _time_case(points, sampling, min_run_time)) for name, points, sampling in CASES]
    lines = [
        "| case | contender | forward ms | x plain | fwd+bwd ms | x plain |",
        "|---|---|---|---|---|---|",
    ]
    for name, times in rows:
        base_f, base_b = times["plain PyTorch"]
        for label, (f, b) in times.items():
            lines.append(
                f"| {name} | {label} | {f * 1e3:.2f} | {base_f / f:.1f}x "
                f"| {b * 1e3:.2f} | {base_b / b:.1f}x |"
            )
    return "\n".join(lines)

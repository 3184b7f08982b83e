"""The cases: operator inputs shaped like a trained detector's.

Encoder queries sample around their own pixel, decoder queries around random points,
offsets of a few pixels, attention weights a softmax over each head's L*P points.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..nn import DeformableTransformerEncoder
from ..ops import level_start_index

#: The four levels of an 800x1200 image (strides 8 to 64), as (H, W).
COCO_LEVELS = ((100, 150), (50, 75), (25, 38), (13, 19))


@dataclass(frozen=True)
class Case:
    """Sizes of one case: batch N, levels (H, W), queries Lq, heads M, head dim D, points P."""

    name: str
    N: int
    levels: tuple[tuple[int, int], ...]
    #: None: one query per pixel of every level (the encoder).
    Lq: int | None
    M: int = 8
    D: int = 32
    P: int = 4


CASES = {
    c.name: c
    for c in (
        Case("encoder-N1", 1, COCO_LEVELS, None),
        Case("encoder-N2", 2, COCO_LEVELS, None),
        Case("encoder-N8", 8, COCO_LEVELS, None),
        Case("decoder-N2", 2, COCO_LEVELS, 300),
        Case("decoder-N8", 8, COCO_LEVELS, 300),
        Case("small", 2, ((16, 16), (8, 8), (4, 4), (2, 2)), 100),
    )
}
#: What a run without --cases times, by device type.
DEFAULT_CASES = {
    "cpu": ("encoder-N1", "encoder-N2", "decoder-N2", "small"),
    "cuda": ("encoder-N2", "encoder-N8", "decoder-N2", "decoder-N8"),
}


def make_inputs(
    case: Case, dtype: torch.dtype, device: str | torch.device, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    """The operator's five inputs for ``case``, the same for the same ``seed``.

    Returns value (N, S, M, D), spatial_shapes (L, 2) int64, level_start_index (L,)
    int64, sampling_locations (N, Lq, M, L, P, 2) and attention_weights (N, Lq, M, L, P);
    S is the number of pixels of all levels, and Lq = S for an encoder case.
    """
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(case.levels, dtype=torch.int64)
    starts = level_start_index(shapes)
    S = int(shapes.prod(1).sum())
    L = len(case.levels)
    if case.Lq is None:
        # The encoder's own reference points: each pixel's centre (level 0's copy of them).
        ones = torch.ones(case.N, L, 2)
        ref = DeformableTransformerEncoder.get_reference_points(case.levels, ones, "cpu")[:, :, 0]
    else:
        ref = torch.rand(case.N, case.Lq, 2, generator=g)
    Lq = ref.shape[1]
    wh = shapes.flip(-1).to(torch.float32)  # (L, 2) as (W, H)
    offsets = 2.0 * torch.randn(case.N, Lq, case.M, L, case.P, 2, generator=g)
    loc = ref[:, :, None, None, None, :] + offsets / wh[None, None, None, :, None, :]
    logits = torch.randn(case.N, Lq, case.M, L * case.P, generator=g)
    attn = logits.softmax(-1).view(case.N, Lq, case.M, L, case.P)
    value = torch.randn(case.N, S, case.M, case.D, generator=g)
    return tuple(
        t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        for t in (value, shapes, starts, loc, attn)
    )

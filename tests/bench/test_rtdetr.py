"""The RT-DETRv2 forms' benchmark: its plain-PyTorch baseline computes the forms right."""

from __future__ import annotations

import pytest
import torch

from msdeformattn.bench.rtdetr import CASES, benchmark, plain_pytorch

from ..conftest import make_inputs, naive_samples


@pytest.mark.parametrize("sampling", ["bilinear", "discrete"])
def test_plain_pytorch_baseline_matches_the_scalar_loop(sampling):
    points = [1, 3, 2]
    value, shapes, starts, loc, attn = make_inputs(N=2, Lq=3, M=2, D=3, P=3)
    keep = [lv * 3 + p for lv, n in enumerate(points) for p in range(n)]
    loc, attn = loc.flatten(3, 4)[:, :, :, keep], attn.flatten(3, 4)[:, :, :, keep]
    levels = [lv for lv, n in enumerate(points) for _ in range(n)]
    got = plain_pytorch(value, shapes, points, loc, attn, sampling)
    expected = naive_samples(value, shapes, starts, loc, attn, levels, sampling == "discrete")
    torch.testing.assert_close(got, expected)


def test_benchmark_prints_every_case_for_both_contenders():
    table = benchmark(min_run_time=0.01)
    for name, _, _ in CASES:
        assert f"| {name} | msdeformattn |" in table and f"| {name} | plain PyTorch |" in table

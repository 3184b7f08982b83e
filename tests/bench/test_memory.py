"""Peak memory against allocations of a known size."""

from __future__ import annotations

import torch

from msdeformattn.bench import operator_bench
from msdeformattn.bench.cases import CASES, make_inputs
from msdeformattn.bench.memory import peak_memory, peak_rss_growth

MiB = 2**20


def test_peak_rss_growth_sees_a_freed_allocation():
    def allocate():
        # 64 MiB written (untouched pages would not count), freed before fn returns.
        torch.ones(64 * MiB // 4)

    # Within a few pages' worth: RSS moves by pages, and the base may shed some.
    assert abs(peak_rss_growth(allocate) - 64 * MiB) < 4 * MiB
    assert peak_rss_growth(lambda: None) < 4 * MiB


def test_probe_sees_the_grid_sample_intermediates():
    # grid_sample's formulation keeps every sampled value for the backward:
    # N*M*D*Lq*L*P float32 for the small case (3.1 MiB). Our CPU kernel keeps none,
    # only what it returns: the output and three gradients (1.2 MiB).
    sampled = 2 * 8 * 32 * 100 * 4 * 4 * 4
    results = operator_bench.result_bytes(make_inputs(CASES["small"], torch.float32, "cpu"))
    assert peak_memory("small", "peer:grid_sample", "float32", "cpu") >= sampled
    assert peak_memory("small", "msdeformattn:cpu", "float32", "cpu") < sampled + results

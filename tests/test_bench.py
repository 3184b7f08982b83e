"""The benchmark runs end to end on a small case (speed itself is never asserted)."""

from __future__ import annotations

import torch

from msdeformattn import bench


def test_bench_prints_a_row_per_contender(capsys):
    bench.main(["--cases", "small", "--no-memory", "--min-run-time", "0.01"])
    out = capsys.readouterr().out
    for name in ("msdeformattn:cpu", "msdeformattn:reference", "peer:grid_sample"):
        assert f"| small | {name} |" in out
    assert "1.0x" in out  # the grid_sample row is its own baseline


def test_peer_formulation_matches_our_reference():
    inputs = bench.make_inputs(bench.CASES["small"], torch.float64, "cpu")
    torch.testing.assert_close(
        bench.grid_sample_formulation(*inputs),
        bench.contenders("cpu")["msdeformattn:reference"](*inputs),
    )


def test_encoder_inputs_sample_near_each_query():
    value, _, _, loc, attn = bench.make_inputs(bench.CASES["encoder-N1"], torch.float32, "cpu")
    assert loc.shape == (1, value.shape[1], 8, 4, 4, 2)
    torch.testing.assert_close(attn.sum((-1, -2)), torch.ones(1, value.shape[1], 8))
    # Most samples lie inside the maps, as in a trained encoder.
    inside = ((loc >= 0) & (loc <= 1)).all(-1).float().mean()
    assert inside > 0.9


def test_memory_probe_sees_the_grid_sample_intermediates():
    peak = bench.peak_memory("small", "peer:grid_sample", "float32", "cpu")
    sampled = 2 * 8 * 32 * 100 * 16 * 4  # N*M*D*Lq*L*P float32 sampled values
    assert peak >= sampled

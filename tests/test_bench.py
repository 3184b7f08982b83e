"""The benchmark runs end to end on a small case (speed itself is never asserted)."""

from __future__ import annotations

import pytest
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


def test_a_contender_that_disagrees_is_left_out(monkeypatch, capsys):
    real = bench.contenders

    def with_broken(device):
        fns = real(device)
        fns["peer:transposed"] = lambda v, s, st, loc, a: fns["peer:grid_sample"](
            v, s, st, loc.flip(-1), a
        )
        return fns

    monkeypatch.setattr(bench, "contenders", with_broken)
    bench.main(["--cases", "small", "--no-memory", "--min-run-time", "0.01"])
    out, err = capsys.readouterr()
    assert "peer:transposed" not in out
    assert "small: peer:transposed left out: max abs difference" in err
    assert "| small | peer:grid_sample |" in out


def test_disagreement_names_shape_errors_and_nan():
    inputs = bench.make_inputs(bench.CASES["small"], torch.bfloat16, "cpu")
    check, expected = bench.agreement_check(inputs)
    assert check[0].dtype == torch.float32 and expected.dtype == torch.float64
    ours = bench.contenders("cpu")["msdeformattn:cpu"]
    assert bench.disagreement(ours, check, expected) is None
    assert bench.disagreement(bench.grid_sample_formulation, check, expected) is None
    out = ours(*check)
    assert "output shape" in bench.disagreement(lambda *a: out[:1], check, expected)
    assert "nan" in bench.disagreement(lambda *a: out * float("nan"), check, expected)

    def refuses(*a):
        raise RuntimeError("no half precision")

    assert bench.disagreement(refuses, check, expected) == "raised RuntimeError: no half precision"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_runs_keep_the_baseline(capsys, dtype):
    bench.main(["--cases", "small", "--no-memory", "--min-run-time", "0.01", "--dtype", dtype])
    out, err = capsys.readouterr()
    assert "left out" not in err
    assert "| small | peer:grid_sample |" in out


def test_gpu_table_adds_achieved_bandwidth():
    # The columns a CUDA run prints, checked on CPU rows (no GPU in CI).
    rows = bench.run(["small"], "float32", "cpu", 0.01, memory=False)
    table = bench.format_table(rows, bandwidth=True).splitlines()
    assert table[0].endswith("| fwd GB/s | fwd+bwd GB/s |")
    moved = bench._moved_bytes(bench.make_inputs(bench.CASES["small"], torch.float32, "cpu"), True)
    ours = next(r for r in rows if r["contender"] == "msdeformattn:cpu")
    assert ours["fwd_bwd_gbps"] == pytest.approx(moved / ours["fwd_bwd_s"] / 1e9)
    assert all(len(line.split("|")) == len(table[0].split("|")) for line in table)


def test_gpu_default_cases_exist():
    assert set(bench.DEFAULT_CASES["cuda"]) <= set(bench.CASES)
    assert {"encoder-N2", "encoder-N8"} <= set(bench.DEFAULT_CASES["cuda"])

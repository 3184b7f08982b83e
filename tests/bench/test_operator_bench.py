"""The operator benchmark's rows: who is in them, their speed-ups and their traffic."""

from __future__ import annotations

import pytest
import torch

from msdeformattn.bench import operator_bench
from msdeformattn.bench.cases import CASES, make_inputs
from msdeformattn.bench.peers import grid_sample_formulation

# The small case counted by hand: N=2, S=256+64+16+4=340, Lq=100, M=8, D=32, L=P=4, float32.
VALUE = 2 * 340 * 8 * 32 * 4
LOC = 2 * 100 * 8 * 4 * 4 * 2 * 4
ATTN = 2 * 100 * 8 * 4 * 4 * 4
OUT = 2 * 100 * 8 * 32 * 4


def test_byte_counts_of_the_small_case():
    inputs = make_inputs(CASES["small"], torch.float32, "cpu")
    assert operator_bench.moved_bytes(inputs, backward=False) == VALUE + LOC + ATTN + OUT
    # Forward+backward adds the output's gradient, read, and the three gradients, written.
    assert operator_bench.moved_bytes(inputs, backward=True) == 2 * (VALUE + LOC + ATTN + OUT)
    assert operator_bench.result_bytes(inputs) == OUT + VALUE + LOC + ATTN


def test_speed_ups_are_over_the_grid_sample_row(monkeypatch):
    # Timings fixed per contender (test_timing checks the timing itself).
    seconds = {
        "msdeformattn:fast": (0.5, 0.5),
        "peer:grid_sample": (1.0, 2.0),
        "peer:slow": (2.0, 8.0),
    }
    monkeypatch.setattr(
        operator_bench, "contenders", lambda device: dict.fromkeys(seconds, grid_sample_formulation)
    )
    names = iter(seconds)
    monkeypatch.setattr(operator_bench, "time_case", lambda fn, inputs, t: seconds[next(names)])
    rows = {r["contender"]: r for r in operator_bench.run(["small"], "float32", "cpu", 0.01, False)}
    assert {k: (r["speedup_fwd"], r["speedup_fwd_bwd"]) for k, r in rows.items()} == {
        "msdeformattn:fast": (2.0, 4.0),
        "peer:grid_sample": (1.0, 1.0),
        "peer:slow": (0.5, 0.25),
    }
    slow = rows["peer:slow"]
    assert slow["fwd_gbps"] == pytest.approx((VALUE + LOC + ATTN + OUT) / 2.0 / 1e9)
    assert slow["fwd_bwd_gbps"] == pytest.approx(2 * (VALUE + LOC + ATTN + OUT) / 8.0 / 1e9)
    assert slow["peak_bytes"] is None and slow["workspace_bytes"] is None


def test_a_contender_that_disagrees_is_left_out_and_named(monkeypatch, capsys):
    def transposed(v, s, st, loc, a):
        return grid_sample_formulation(v, s, st, loc.flip(-1), a)

    monkeypatch.setattr(
        operator_bench,
        "contenders",
        lambda device: {"peer:transposed": transposed, "peer:grid_sample": grid_sample_formulation},
    )
    rows = operator_bench.run(["small"], "float32", "cpu", 0.01, False)
    assert "peer:transposed" not in {r["contender"] for r in rows}
    assert "small: peer:transposed left out: max abs difference" in capsys.readouterr().err


def test_without_the_baseline_there_are_no_speed_ups(monkeypatch):
    monkeypatch.setattr(operator_bench, "time_case", lambda fn, inputs, t: (1.0, 2.0))
    monkeypatch.setattr(
        operator_bench,
        "contenders",
        lambda device: {"peer:grid_sample": lambda *a: grid_sample_formulation(*a)[:1]},
    )
    assert operator_bench.run(["small"], "float32", "cpu", 0.01, False) == []

    monkeypatch.setattr(
        operator_bench, "contenders", lambda device: {"peer:alone": grid_sample_formulation}
    )
    (row,) = operator_bench.run(["small"], "float32", "cpu", 0.01, False)
    assert "speedup_fwd" not in row and "speedup_fwd_bwd" not in row


def test_workspace_is_the_peak_less_the_results(monkeypatch):
    monkeypatch.setattr(operator_bench, "time_case", lambda fn, inputs, t: (1.0, 2.0))
    monkeypatch.setattr(operator_bench, "peak_memory", lambda *a: 10 * 2**20)
    monkeypatch.setattr(
        operator_bench, "contenders", lambda device: {"peer:grid_sample": grid_sample_formulation}
    )
    (row,) = operator_bench.run(["small"], "float32", "cpu", 0.01, True)
    assert row["peak_bytes"] == 10 * 2**20
    assert row["workspace_bytes"] == 10 * 2**20 - (OUT + VALUE + LOC + ATTN)

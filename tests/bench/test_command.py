"""The command line: ``python -m msdeformattn.bench`` and ``msdeformattn.bench.main``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from msdeformattn import bench
from msdeformattn.bench import operator_bench
from msdeformattn.bench.peers import grid_sample_formulation

QUICK = ["--cases", "small", "--no-memory", "--min-run-time", "0.01"]


def test_prints_the_header_and_a_row_per_contender(capsys, tmp_path):
    bench.main([*QUICK, "--json", str(tmp_path / "rows.json")])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("device=cpu dtype=float32 torch=")
    assert out[1].startswith("| case | contender | forward ms |")
    assert not out[1].endswith("GB/s |")  # bandwidth is for CUDA runs
    for name in ("msdeformattn:cpu", "msdeformattn:reference", "peer:grid_sample"):
        assert any(line.startswith(f"| small | {name} |") for line in out)
    saved = json.loads((tmp_path / "rows.json").read_text())
    assert saved["header"] == out[0]
    # The JSON rows are the table's, in its order.
    assert [f"| small | {r['contender']} |" for r in saved["rows"]] == [
        "|".join(line.split("|")[:3]) + "|" for line in out[3:]
    ]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_runs_keep_the_baseline(capsys, dtype):
    bench.main([*QUICK, "--dtype", dtype])
    out, err = capsys.readouterr()
    assert f"dtype={dtype}" in out
    assert "left out" not in err
    assert "| small | peer:grid_sample |" in out


def test_deterministic_is_restored_after_the_run(capsys, monkeypatch):
    monkeypatch.setattr(
        operator_bench, "contenders", lambda device: {"peer:grid_sample": grid_sample_formulation}
    )
    bench.main([*QUICK, "--deterministic"])
    assert capsys.readouterr().out.splitlines()[0].endswith(" deterministic")
    assert not torch.are_deterministic_algorithms_enabled()


def test_runs_as_a_module():
    help_text = subprocess.run(
        [sys.executable, "-m", "msdeformattn.bench", "--help"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert help_text.startswith("usage: python -m msdeformattn.bench")
    assert "Benchmark: every available backend beside the peers" in help_text
    for flag in ("--cases", "--dtype", "--device", "--min-run-time", "--no-memory", "--json"):
        assert flag in help_text
    for flag in ("--deterministic", "--detector", "--onnx", "--image-size", "--encoder"):
        assert flag in help_text
    assert "--train-step" in help_text and "--memory-probe" not in help_text

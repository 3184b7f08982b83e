"""The Triton kernels compile for sm_80, sm_90 and sm_100 with no GPU, and spill no registers.

``gpu_compile`` in every test name (``pytest -k gpu_compile`` selects them,
``-k 'not gpu_compile'`` leaves them out). The compiles run in their own process
(``tests/ops/_triton_compile.py``): the rest of the suite defines the kernels
under ``TRITON_INTERPRET=1``, which never compiles them. Here a representative
subset (the float32 and bfloat16 decoder, float32 at D=256, the float32 decoder
on every target); ``make gpu-compile`` compiles everything.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compiled(request, tmp_path_factory):
    """The helper's report of the subset, compiled once for the module (cached across runs)."""
    out = tmp_path_factory.mktemp("gpu_compile") / "report.json"
    # pytest's cache when it is on (-p no:cacheprovider turns it off): compile from scratch.
    cache_plugin = getattr(request.config, "cache", None)
    cache = (
        cache_plugin.mkdir("triton-compile")
        if cache_plugin is not None
        else tmp_path_factory.mktemp("triton-compile")
    )
    path = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": path}
    args = ["--jobs", "2", "--cache", str(cache), "--json", str(out)]
    proc = subprocess.run(
        [sys.executable, "-m", "tests.ops._triton_compile", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    report = json.loads(out.read_text()) if out.exists() else None
    return proc, report


def test_gpu_compile_every_specialisation_compiles_without_spills(compiled):
    proc, report = compiled
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert report, proc.stderr[-4000:]
    for row in report:
        assert "error" not in row, row
        assert row["float64"] or row["spill_stores"] == 0, row


def test_gpu_compile_covers_every_kernel_and_target(compiled):
    _, report = compiled
    assert report
    seen = {(row["kernel"], row["arch"]) for row in report}
    kernels = {"forward_kernel", "backward_kernel", "grad_value_gather_kernel"}
    assert seen == {(k, arch) for k in kernels for arch in (80, 90, 100)}
    # Both backwards: grad_value by atomics and by the sorted gather.
    atomic = {
        row["params"]["ATOMIC_GRAD_VALUE"] for row in report if row["kernel"] == "backward_kernel"
    }
    assert atomic == {"True", "False"}


def test_gpu_compile_registers_at_d32(compiled):
    """At most 128 registers at float32 and bfloat16, D=32: four or more warps per scheduler."""
    _, report = compiled
    assert report
    rows = [r for r in report if r["params"].get("BLOCK_D") == "32" and not r["float64"]]
    assert rows
    for row in rows:
        assert row["regs"] <= 128, row

"""The contenders compute the operator: against the scalar loop, and against each other."""

from __future__ import annotations

import torch

from msdeformattn.bench.cases import CASES, make_inputs
from msdeformattn.bench.peers import contenders, grid_sample_formulation

from ..conftest import make_inputs as random_inputs
from ..conftest import naive


def test_grid_sample_formulation_matches_the_scalar_loop():
    # Odd sizes and locations outside the maps: the padding and the x/y order both count.
    inputs = random_inputs(N=2, Lq=5, M=2, D=3, levels=((4, 6), (2, 3), (1, 1)), P=2)
    torch.testing.assert_close(grid_sample_formulation(*inputs), naive(*inputs))


def test_every_contender_matches_the_grid_sample_formulation():
    inputs = make_inputs(CASES["small"], torch.float64, "cpu")
    expected = grid_sample_formulation(*inputs)
    fns = contenders("cpu")
    assert {"msdeformattn:cpu", "msdeformattn:reference", "peer:grid_sample"} <= set(fns)
    for name, fn in fns.items():
        torch.testing.assert_close(fn(*inputs).double(), expected, msg=name)


def test_ours_come_first_and_the_interpreter_is_left_out():
    names = list(contenders("cpu"))
    ours = [n for n in names if n.startswith("msdeformattn:")]
    assert names[: len(ours)] == ours
    # Triton's interpreter on the CPU is a test tool that backend=None never picks.
    assert "msdeformattn:triton" not in names

"""The agreement check leaves out a contender with a layout or formula error, and only one."""

from __future__ import annotations

import pytest
import torch

from msdeformattn.bench.agreement import TOLERANCE, agreement_check, disagreement
from msdeformattn.bench.cases import CASES, make_inputs
from msdeformattn.bench.peers import contenders, grid_sample_formulation


@pytest.fixture(scope="module")
def small():
    """The check's inputs and expected output for the small case, in bfloat16."""
    return agreement_check(make_inputs(CASES["small"], torch.bfloat16, "cpu"))


def test_check_runs_wide_and_the_formula_in_float64(small):
    check, expected = small
    assert check[0].dtype == torch.float32 and expected.dtype == torch.float64
    assert expected.shape == (2, 100, 8 * 32)


def test_correct_contenders_agree(small):
    check, expected = small
    assert disagreement(contenders("cpu")["msdeformattn:cpu"], check, expected) is None
    assert disagreement(grid_sample_formulation, check, expected) is None


@pytest.mark.parametrize(
    "wrong",
    [
        # x and y swapped: the classic layout error.
        lambda v, s, st, loc, a: grid_sample_formulation(v, s, st, loc.flip(-1), a),
        # heads and channels transposed in the output.
        lambda v, s, st, loc, a: (
            grid_sample_formulation(v, s, st, loc, a)
            .unflatten(-1, (8, 32))
            .transpose(-1, -2)
            .flatten(-2)
        ),
        # the levels' weights shifted by one level.
        lambda v, s, st, loc, a: grid_sample_formulation(v, s, st, loc, a.roll(1, dims=3)),
    ],
    ids=["xy-swapped", "output-transposed", "levels-shifted"],
)
def test_wrong_peers_are_caught(small, wrong):
    check, expected = small
    assert disagreement(wrong, check, expected).startswith("max abs difference")


def test_the_tolerance_is_summation_order_not_more(small):
    check, expected = small
    scale = max(expected.abs().max().item(), 1.0)
    right = grid_sample_formulation(*check)

    def off_by(eps):
        return lambda *a: right + eps * scale

    assert disagreement(off_by(0.5 * TOLERANCE[torch.float32]), check, expected) is None
    assert "allowed" in disagreement(off_by(2 * TOLERANCE[torch.float32]), check, expected)


def test_shape_errors_nan_and_refusals_are_named(small):
    check, expected = small
    out = grid_sample_formulation(*check)
    assert "output shape (1, 100, 256)" in disagreement(lambda *a: out[:1], check, expected)
    assert "nan" in disagreement(lambda *a: out * float("nan"), check, expected)

    def refuses(*a):
        raise RuntimeError("no half precision")

    assert disagreement(refuses, check, expected) == "raised RuntimeError: no half precision"

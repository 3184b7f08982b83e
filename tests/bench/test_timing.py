"""Timings against an independent clock: contenders that sleep a known time."""

from __future__ import annotations

import time

import pytest
import torch

from msdeformattn.bench.cases import CASES, make_inputs
from msdeformattn.bench.timing import median_time, time_case

FORWARD_S, BACKWARD_S = 0.1, 0.2
#: What a busy shared machine may add to a sleep (the median is not the minimum);
#: less than either sleep, so an extra forward or a missing backward still fails.
SLACK_S = 0.055


class _Sleeps(torch.autograd.Function):
    """Identity on the weights whose forward and backward each sleep a known time."""

    @staticmethod
    def forward(ctx, attn):
        time.sleep(FORWARD_S)
        return attn.clone()

    @staticmethod
    def backward(ctx, grad):
        time.sleep(BACKWARD_S)
        return grad


def sleepy(value, spatial_shapes, level_start_index, loc, attn):
    return _Sleeps.apply(attn) + 0 * value.sum() + 0 * loc.sum()


@pytest.fixture(scope="module")
def inputs():
    return make_inputs(CASES["small"], torch.float32, "cpu")


def test_median_time_measures_the_call():
    t = median_time(lambda: time.sleep(FORWARD_S), min_run_time=0.1)
    assert FORWARD_S <= t < FORWARD_S + SLACK_S


def test_time_case_times_the_forward_and_the_backward(inputs):
    t_f, t_fb = time_case(sleepy, inputs, min_run_time=0.1)
    assert FORWARD_S <= t_f < FORWARD_S + SLACK_S
    assert FORWARD_S + BACKWARD_S <= t_fb < FORWARD_S + BACKWARD_S + SLACK_S


def test_time_case_leaves_the_inputs_alone(inputs):
    before = [t.clone() for t in inputs]
    time_case(sleepy, inputs, min_run_time=0.01)
    assert all(t.grad is None and not t.requires_grad for t in inputs)
    assert all(torch.equal(a, b) for a, b in zip(before, inputs, strict=True))

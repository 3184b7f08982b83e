"""Wrong inputs fail before any kernel, with messages that name the argument."""

from __future__ import annotations

import pytest
import torch

import msdeformattn

from ..conftest import make_inputs


def call(value, shapes, starts, loc, attn, **kw):
    return msdeformattn.ms_deform_attn(value, shapes, starts, loc, attn, **kw)


def good():
    return list(make_inputs(dtype=torch.float32))


@pytest.mark.parametrize(
    ("index", "bad", "error", "match"),
    [
        (0, lambda t: t.numpy(), TypeError, r"value must be a torch.Tensor, got ndarray"),
        (0, lambda t: t[0], ValueError, r"value must have shape \(N, S, M, D\).*got \(31, 2, 3\)"),
        (
            0,
            lambda t: t.int(),
            TypeError,
            r"value must be a floating-point tensor, got dtype torch.int32",
        ),
        (
            0,
            lambda t: t[:, :30],
            ValueError,
            r"value has S = 30 rows but spatial_shapes covers sum\(H\*W\) = 31",
        ),
        (
            0,
            lambda t: t[:1],
            ValueError,
            r"sampling_locations must have shape .* = \(1, Lq, 2, 3, P, 2\)",
        ),
        (1, lambda t: t.float(), TypeError, r"spatial_shapes must be an integer tensor"),
        (
            1,
            lambda t: t[:, :1],
            ValueError,
            r"spatial_shapes must have shape \(L, 2\).*got \(3, 1\)",
        ),
        (
            1,
            lambda t: t[:2],
            ValueError,
            r"level_start_index must have shape \(L,\) = \(2,\).*got \(3\)",
        ),
        (1, lambda t: t[:0], ValueError, r"at least one level"),
        (
            1,
            lambda t: t.flip(0),
            ValueError,
            r"level_start_index must be the running sum.*expected \[0, 1, 7\]",
        ),
        (
            1,
            lambda t: torch.tensor([[4, 6], [2, 3], [0, 1]]),
            ValueError,
            r"spatial_shapes\[2\] must be \(H, W\) with H, W >= 1, got \(0, 1\)",
        ),
        (
            2,
            lambda t: t + 1,
            ValueError,
            r"level_start_index must be the running sum.*got \[1, 25, 31\]",
        ),
        (
            3,
            lambda t: t[..., :1],
            ValueError,
            r"sampling_locations must have shape \(N, Lq, M, L, P, 2\), got \(2, 5, 2, 3, 2, 1\)",
        ),
        (
            3,
            lambda t: t[:, :, :, :2],
            ValueError,
            r"sampling_locations must have shape .*\(2, Lq, 2, 3, P, 2\)",
        ),
        (3, lambda t: t.int(), TypeError, r"sampling_locations must be a floating-point tensor"),
        (
            4,
            lambda t: t[..., :1],
            ValueError,
            r"attention_weights must have shape \(N, Lq, M, L, P\) = \(2, 5, 2, 3, 2\).*got \(2, 5, 2, 3, 1\)",
        ),
        (4, lambda t: t.long(), TypeError, r"attention_weights must be a floating-point tensor"),
        (
            4,
            lambda t: t.to("meta"),
            ValueError,
            r"all inputs must be on one device.*attention_weights on meta",
        ),
    ],
)
def test_bad_input_is_named(index, bad, error, match):
    inputs = good()
    inputs[index] = bad(inputs[index])
    with pytest.raises(error, match=match):
        call(*inputs)


def test_check_values_false_skips_only_the_level_table_check():
    value, shapes, starts, loc, attn = good()
    wrong = starts.clone()
    wrong[-1] -= 1  # the last level overlaps the one before, still inside value
    with pytest.raises(ValueError, match="running sum"):
        call(value, shapes, wrong, loc, attn, backend="reference")
    # Skipped: the reference reads the table as given, so its output moves with it.
    out = call(value, shapes, wrong, loc, attn, backend="reference", check_values=False)
    expected = call(value, shapes, starts, loc, attn, backend="reference")
    assert out.shape == expected.shape == (2, 5, 6)
    assert not torch.allclose(out, expected)
    with pytest.raises(ValueError, match=r"value must have shape"):
        call(value[0], shapes, starts, loc, attn, check_values=False)


def test_int32_level_tables_are_accepted():
    value, shapes, starts, loc, attn = good()
    expected = call(value, shapes, starts, loc, attn)
    torch.testing.assert_close(call(value, shapes.int(), starts.int(), loc, attn), expected)

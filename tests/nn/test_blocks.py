"""Shared transformer pieces: activations, the feed-forward step, flattened levels."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from msdeformattn.nn.blocks import (
    activation_fn,
    feed_forward,
    flatten_levels,
    sine_encoding,
    valid_ratio,
)


def test_valid_ratio_is_width_then_height():
    mask = torch.zeros(1, 4, 10, dtype=torch.bool)
    mask[:, 3:, :] = True
    mask[:, :, 6:] = True
    torch.testing.assert_close(valid_ratio(mask), torch.tensor([[0.6, 0.75]]))


def test_activation_names():
    assert activation_fn("gelu") is torch.nn.functional.gelu
    # GLU halves the width, which the feed-forward block cannot take.
    with pytest.raises(ValueError, match="activation must be one of \\['gelu', 'relu'\\]"):
        activation_fn("glu")


def test_feed_forward_is_post_norm_residual():
    torch.manual_seed(0)
    lin1, lin2, norm = nn.Linear(6, 10), nn.Linear(10, 6), nn.LayerNorm(6)
    x = torch.randn(2, 3, 6)
    got = feed_forward(x, lin1, torch.relu, nn.Identity(), lin2, nn.Identity(), norm)
    expected = torch.layer_norm(x + lin2(torch.relu(lin1(x))), (6,), norm.weight, norm.bias)
    torch.testing.assert_close(got, expected)


def test_flatten_levels_orders_rows_level_by_level():
    N, C = 2, 3
    sizes = [(4, 5), (2, 3), (1, 1)]
    srcs = [torch.randn(N, C, h, w) for h, w in sizes]
    masks = [torch.zeros(N, h, w, dtype=torch.bool) for h, w in sizes]
    masks[0][1, :, 3:] = True  # the second image is padded on the right
    pos = [torch.randn(N, C, h, w) for h, w in sizes]
    level_embed = torch.randn(len(sizes), C)
    flat = flatten_levels(srcs, masks, pos, level_embed)
    assert flat.shapes == sizes
    assert flat.spatial_shapes.tolist() == [list(s) for s in sizes]
    assert flat.level_start_index.tolist() == [0, 20, 26]
    # Level 1's pixel (y=1, x=2) is row 20 + 1*3 + 2.
    torch.testing.assert_close(flat.src[:, 25], srcs[1][:, :, 1, 2])
    torch.testing.assert_close(flat.pos[:, 25], pos[1][:, :, 1, 2] + level_embed[1])
    assert flat.mask[1, :20].view(4, 5)[:, 3:].all() and not flat.mask[0].any()
    torch.testing.assert_close(flat.valid_ratios[1, 0], torch.tensor([0.6, 1.0]))


def test_sine_encoding_interleaves_sin_and_cos_at_growing_wavelengths():
    x = torch.tensor([[0.3, 2.0]])
    enc = sine_encoding(x, 4, temperature=100)
    assert enc.shape == (1, 2, 4)
    for i, v in enumerate(x[0].tolist()):
        expected = [math.sin(v), math.cos(v), math.sin(v / 10), math.cos(v / 10)]
        torch.testing.assert_close(enc[0, i], torch.tensor(expected))

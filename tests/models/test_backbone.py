"""The ResNet trunk: which maps it returns, at which strides and widths."""

from __future__ import annotations

import pytest
import torch

from msdeformattn.models.backbone import ResNet


@pytest.mark.parametrize("num_outputs", [1, 3, 4])
def test_resnet_returns_the_last_maps_at_their_strides(num_outputs):
    body = ResNet("basic", (1, 1, 1, 1), (8, 16, 32, 64), norm="batch")
    body.num_outputs = num_outputs
    maps = body(torch.randn(1, 3, 64, 96))
    strides, channels = body.strides[-num_outputs:], body.num_channels[-num_outputs:]
    assert [m.shape[1] for m in maps] == channels
    assert [(64 // s, 96 // s) for s in strides] == [tuple(m.shape[-2:]) for m in maps]
    assert body.strides == [4, 8, 16, 32] and body.num_channels == [8, 16, 32, 64]

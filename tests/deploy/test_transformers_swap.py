"""Swapping our operator into transformers models: outputs unchanged."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from msdeformattn.deploy import FusedMultiScaleDeformableAttention, swap_into_transformers

from ..models.test_convert import hf_model, padded_batch

pytest.importorskip("transformers")


@pytest.mark.parametrize(
    "variant", [{}, {"with_box_refine": True, "two_stage": True}], ids=["plain", "refine+two-stage"]
)
def test_deformable_detr_outputs_unchanged(variant):
    model = hf_model(**variant)
    images, valid = padded_batch()
    with torch.no_grad():
        before = model(pixel_values=images, pixel_mask=valid)
    names = swap_into_transformers(model)
    # One per encoder layer and one per decoder layer.
    assert len(names) == 4
    assert all(
        isinstance(model.get_submodule(n), FusedMultiScaleDeformableAttention) for n in names
    )
    with torch.no_grad():
        after = model(pixel_values=images, pixel_mask=valid)
    torch.testing.assert_close(after.logits, before.logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(after.pred_boxes, before.pred_boxes, atol=1e-5, rtol=1e-4)


def test_nothing_to_replace_is_an_error():
    with pytest.raises(ValueError, match="holds no transformers MultiScaleDeformableAttention"):
        swap_into_transformers(nn.Sequential(nn.Linear(2, 2)))


def test_rt_detr_outputs_unchanged():
    from transformers import RTDetrConfig, RTDetrForObjectDetection, RTDetrResNetConfig

    backbone = RTDetrResNetConfig(
        embedding_size=16,
        hidden_sizes=[16, 32, 64, 128],
        depths=[1, 1, 1, 1],
        layer_type="basic",
        out_features=["stage2", "stage3", "stage4"],
    )
    config = RTDetrConfig(
        backbone_config=backbone,
        backbone=None,
        use_pretrained_backbone=False,
        encoder_in_channels=[32, 64, 128],
        decoder_in_channels=[64, 64, 64],
        d_model=64,
        encoder_hidden_dim=64,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        decoder_layers=2,
        num_queries=20,
        num_labels=5,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        eval_size=None,
    )
    torch.manual_seed(0)
    model = RTDetrForObjectDetection(config).eval()
    images = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(pixel_values=images)
    names = swap_into_transformers(model)
    assert names == [
        "model.decoder.layers.0.encoder_attn.attn",
        "model.decoder.layers.1.encoder_attn.attn",
    ]
    with torch.no_grad():
        after = model(pixel_values=images)
    torch.testing.assert_close(after.logits, before.logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(after.pred_boxes, before.pred_boxes, atol=1e-5, rtol=1e-4)

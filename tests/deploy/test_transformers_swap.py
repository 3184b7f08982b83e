"""Swapping our operator into transformers models: outputs unchanged."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from msdeformattn.deploy import FusedMultiScaleDeformableAttention, swap_into_transformers

from ..models.conftest import hf_model, padded_batch, tiny_resnet
from .conftest import assert_outputs_close, outputs, profiled_outputs

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


def test_swapping_twice_is_harmless_and_our_op_runs():
    model = hf_model()
    images, valid = padded_batch()
    inputs = {"pixel_values": images, "pixel_mask": valid}
    before = outputs(model, inputs, ("logits", "pred_boxes"))
    names = swap_into_transformers(model)
    fused = [model.get_submodule(n) for n in names]
    # The second call replaces nothing, reports the same sites, and sets their backend.
    assert swap_into_transformers(model, backend="reference") == names
    assert [model.get_submodule(n) for n in names] == fused
    assert all(m.backend == "reference" for m in fused)
    assert swap_into_transformers(model) == names
    after, ops = profiled_outputs(model, inputs, ("logits", "pred_boxes"))
    assert "msdeformattn::ms_deform_attn" in ops and "aten::grid_sample" not in ops
    assert_outputs_close(after, before)


def test_nothing_to_replace_is_an_error():
    with pytest.raises(
        ValueError, match=r"^Sequential holds no transformers MultiScaleDeformableAttention"
    ):
        swap_into_transformers(nn.Sequential(nn.Linear(2, 2)))


def test_rt_detr_outputs_unchanged():
    from transformers import RTDetrConfig, RTDetrForObjectDetection, RTDetrResNetConfig

    backbone = tiny_resnet(config_cls=RTDetrResNetConfig)
    config = RTDetrConfig(
        backbone_config=backbone,
        backbone=None,
        use_pretrained_backbone=False,
        encoder_in_channels=[32, 64, 64],
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


def test_grounding_dino_outputs_unchanged():
    from transformers import (
        BertConfig,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
    )

    backbone = tiny_resnet()
    text = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    config = GroundingDinoConfig(
        backbone_config=backbone,
        backbone=None,
        use_pretrained_backbone=False,
        use_timm_backbone=False,
        text_config=text,
        d_model=32,
        encoder_layers=1,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        num_queries=10,
        num_feature_levels=4,
        max_text_len=16,
    )
    torch.manual_seed(0)
    model = GroundingDinoForObjectDetection(config).eval()
    g = torch.Generator().manual_seed(1)
    images = torch.randn(1, 3, 96, 96, generator=g)
    ids = torch.randint(1, 100, (1, 8), generator=g)
    with torch.no_grad():
        before = model(pixel_values=images, input_ids=ids)
    assert len(swap_into_transformers(model)) == 3  # 1 encoder + 2 decoder layers
    with torch.no_grad():
        after = model(pixel_values=images, input_ids=ids)
    # Logits of padded text positions are -inf in both.
    torch.testing.assert_close(after.logits, before.logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(after.pred_boxes, before.pred_boxes, atol=1e-5, rtol=1e-4)


def test_mask2former_pixel_decoder_outputs_unchanged(restore_transformers_functions):
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation
    from transformers.models.mask2former import modeling_mask2former

    backbone = tiny_resnet(stages=("stage1", "stage2", "stage3", "stage4"))
    config = Mask2FormerConfig(
        backbone_config=backbone,
        backbone=None,
        use_pretrained_backbone=False,
        use_timm_backbone=False,
        feature_size=32,
        mask_feature_size=32,
        hidden_dim=32,
        encoder_layers=1,
        decoder_layers=2,
        num_attention_heads=2,
        encoder_feedforward_dim=64,
        dim_feedforward=64,
        num_queries=5,
        num_labels=3,
    )
    torch.manual_seed(0)
    model = Mask2FormerForUniversalSegmentation(config).eval()
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(pixel_values=images)
    names = swap_into_transformers(model)
    assert names == [
        "transformers.models.mask2former.modeling_mask2former.multi_scale_deformable_attention"
    ]
    patched = modeling_mask2former.multi_scale_deformable_attention
    assert swap_into_transformers(model) == names  # a second swap replaces nothing
    assert modeling_mask2former.multi_scale_deformable_attention is patched
    with torch.no_grad():
        after = model(pixel_values=images)
    torch.testing.assert_close(
        after.masks_queries_logits, before.masks_queries_logits, atol=1e-4, rtol=1e-4
    )
    torch.testing.assert_close(
        after.class_queries_logits, before.class_queries_logits, atol=1e-4, rtol=1e-4
    )

"""Small transformers models and batches, shared by the conversion, pretrained, swap and
command-line tests."""

from __future__ import annotations

import torch


def tiny_resnet(layer_type="basic", stages=("stage2", "stage3", "stage4"), config_cls=None):
    """A small transformers ResNet backbone config (shared by the transformers tests)."""
    from transformers import ResNetConfig

    if layer_type == "basic":
        sizes, depths = [16, 32, 64, 64], [1, 2, 1, 1]
    else:
        sizes, depths = [64, 128, 128, 256], [1, 1, 1, 1]
    return (config_cls or ResNetConfig)(
        embedding_size=16,
        hidden_sizes=sizes,
        depths=depths,
        layer_type=layer_type,
        out_features=list(stages),
    )


def randomize(model):
    """Random everything (the initialisation zeroes several heads), BN statistics included."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.is_floating_point():
                if "running_var" in name:
                    t.copy_(0.5 + torch.rand(t.shape, generator=g))
                else:
                    t.copy_(torch.randn(t.shape, generator=g) * 0.2)
    return model


def hf_model(layer_type="basic", random_weights=True, **kw):
    """A small transformers Deformable DETR with random weights.

    kw: DeformableDetrConfig fields; ``backbone_config=None`` is transformers' default
    ResNet-50 config (C5 alone).
    """
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection

    fields = {
        "backbone_config": tiny_resnet(layer_type),
        "d_model": 64,
        "encoder_layers": 2,
        "decoder_layers": 2,
        "encoder_attention_heads": 4,
        "decoder_attention_heads": 4,
        "encoder_ffn_dim": 96,
        "decoder_ffn_dim": 96,
        "num_queries": 12,
        "num_labels": 5,
        "num_feature_levels": 4,
        "encoder_n_points": 2,
        "decoder_n_points": 3,
        "two_stage_num_proposals": 12,
    }
    cfg = DeformableDetrConfig(
        use_timm_backbone=False, backbone=None, use_pretrained_backbone=False, **{**fields, **kw}
    )
    torch.manual_seed(0)
    model = DeformableDetrForObjectDetection(cfg).eval()
    return randomize(model) if random_weights else model


def padded_batch(height=96, width=128):
    """Two images of unequal sizes, padded to one canvas (HF mask: 1 = valid)."""
    g = torch.Generator().manual_seed(2)
    h, w = height * 5 // 6, width * 25 // 32
    images = torch.zeros(2, 3, height, width)
    valid = torch.zeros(2, height, width, dtype=torch.long)
    images[0] = torch.randn(3, height, width, generator=g)
    valid[0] = 1
    images[1, :, :h, :w] = torch.randn(3, h, w, generator=g)
    valid[1, :h, :w] = 1
    return images, valid

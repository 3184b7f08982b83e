"""The detector: outputs, masks, variants, post-processing, a training step."""

from __future__ import annotations

import pytest
import torch

from msdeformattn.models import (
    DeformableDETRConfig,
    FrozenBatchNorm2d,
    box_cxcywh_to_xyxy,
    build_model,
    post_process,
    resnet,
)


@pytest.mark.parametrize(
    "variant",
    [{}, {"with_box_refine": True}, {"with_box_refine": True, "two_stage": True}],
    ids=["plain", "refine", "refine+two-stage"],
)
def test_tiny_detector_outputs(variant):
    torch.manual_seed(0)
    model = build_model(DeformableDETRConfig.tiny(num_classes=5, **variant)).eval()
    images = torch.randn(2, 3, 64, 96)
    mask = torch.zeros(2, 64, 96, dtype=torch.bool)
    mask[1, 40:, :] = True
    out = model(images, mask)
    assert out["pred_logits"].shape == (2, 30, 5)
    assert out["pred_boxes"].shape == (2, 30, 4)
    # Batching changes nothing: the first image alone gives its own outputs.
    alone = model(images[:1], mask[:1])
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(alone[key], out[key][:1], atol=1e-5, rtol=1e-4)
    assert len(out["aux_outputs"]) == 1
    assert ("enc_outputs" in out) == bool(variant.get("two_stage"))


def test_a_training_step_reaches_every_trainable_parameter():
    torch.manual_seed(0)
    model = build_model(DeformableDETRConfig.tiny(with_box_refine=True)).train()
    out = model(torch.randn(2, 3, 64, 64))
    loss = out["pred_logits"].sigmoid().mean() + out["pred_boxes"].mean()
    loss = loss + sum(a["pred_boxes"].mean() + a["pred_logits"].mean() for a in out["aux_outputs"])
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert no_grad == [], no_grad


def test_mask_and_image_validation():
    model = build_model(DeformableDETRConfig.tiny())
    with pytest.raises(ValueError, match=r"images must have shape \(N, 3, H, W\)"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"mask must be a bool tensor of shape \(1, 32, 32\)"):
        model(torch.randn(1, 3, 32, 32), torch.zeros(1, 32, 32))


def test_full_size_model_has_the_papers_parameter_count():
    model = build_model(DeformableDETRConfig())
    n = sum(p.numel() for p in model.parameters())
    assert 39.5e6 < n < 40.5e6  # Deformable DETR (ResNet-50): 40M
    assert isinstance(model.backbone[0].body.bn1, FrozenBatchNorm2d)


def test_resnet_layouts_match_torchvision_names():
    keys = set(resnet("resnet50").state_dict())
    assert {
        "conv1.weight",
        "bn1.running_var",
        "layer1.0.downsample.0.weight",
        "layer4.2.conv3.weight",
        "layer4.2.bn3.bias",
    } <= keys
    keys18 = set(resnet("resnet18").state_dict())
    assert "layer2.0.downsample.1.weight" in keys18 and "layer1.1.conv2.weight" in keys18


def test_frozen_batchnorm_ignores_num_batches_tracked():
    bn = FrozenBatchNorm2d(4)
    state = {
        "weight": torch.ones(4),
        "bias": torch.zeros(4),
        "running_mean": torch.zeros(4),
        "running_var": torch.ones(4),
        "num_batches_tracked": torch.tensor(3),
    }
    assert bn.load_state_dict(state).unexpected_keys == []


def test_post_process_scales_boxes_to_pixels():
    logits = torch.full((1, 3, 2), -10.0)
    logits[0, 1, 1] = 10.0
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.25, 0.5, 0.5, 1.0], [0.1, 0.1, 0.1, 0.1]]])
    res = post_process(
        {"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[100, 200]]), top_k=2
    )[0]
    assert res["labels"][0] == 1
    torch.testing.assert_close(res["boxes"][0], torch.tensor([0.0, 0.0, 100.0, 100.0]))
    torch.testing.assert_close(
        box_cxcywh_to_xyxy(boxes[0, :1]), torch.tensor([[0.4, 0.4, 0.6, 0.6]])
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_precision_training_step_within_the_low_precision_rule(dtype):
    """Autocast forward and a GradScaler step: finite, and our error at most twice the
    reference backend's under the same autocast (both against float32)."""
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    boxes = {}
    for backend in ("cpu", "reference"):
        torch.manual_seed(0)
        model = build_model(DeformableDETRConfig.tiny(with_box_refine=True, backend=backend))
        model.eval()
        with torch.no_grad():
            exact = model(images)["pred_boxes"]
            with torch.autocast("cpu", dtype=dtype):
                low = model(images)["pred_boxes"].float()
        assert torch.isfinite(low).all()
        boxes[backend] = (low - exact).abs().max()
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        scaler = torch.amp.GradScaler("cpu", enabled=dtype == torch.float16)
        with torch.autocast("cpu", dtype=dtype):
            out = model(images)
            loss = out["pred_logits"].float().sigmoid().mean() + out["pred_boxes"].float().mean()
        scaler.scale(loss).backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        before = [p.detach().clone() for p in model.parameters()]
        scaler.step(opt)
        scaler.update()
        assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    assert boxes["cpu"] <= 2 * boxes["reference"] + 1e-3, boxes


def test_any_module_returning_feature_maps_can_be_the_backbone():
    from torch import nn

    from msdeformattn.models import Backbone, DeformableDETR, Joiner, PositionEmbeddingSine
    from msdeformattn.nn import DeformableTransformer

    class Pyramid(nn.Module):
        def __init__(self):
            super().__init__()
            self.convs = nn.ModuleList(
                nn.Conv2d(c, c2, 3, s, 1) for c, c2, s in ((3, 16, 8), (16, 32, 2), (32, 64, 2))
            )

        def forward(self, x):
            outs = []
            for conv in self.convs:
                x = conv(x)
                outs.append(x)
            return outs

    backbone = Joiner(Backbone(Pyramid(), [16, 32, 64], [8, 16, 32]), PositionEmbeddingSine(32))
    transformer = DeformableTransformer(
        d_model=64,
        n_heads=4,
        num_encoder_layers=1,
        num_decoder_layers=1,
        d_ffn=64,
        return_intermediate_dec=True,
    )
    config = DeformableDETRConfig(num_classes=3, num_queries=7, d_model=64, nheads=4)
    model = DeformableDETR(config, backbone=backbone, transformer=transformer)
    assert model.config is config and model.backbone is backbone
    out = model(torch.randn(1, 3, 64, 64))
    assert out["pred_logits"].shape == (1, 7, 3) and out["pred_boxes"].shape == (1, 7, 4)

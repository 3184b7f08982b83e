"""Published layouts load: transformers' Deformable DETR gives the same outputs through ours."""

from __future__ import annotations

import pytest
import torch

from msdeformattn.models import DeformableDETR, DeformableDETRConfig, build_model
from msdeformattn.models.convert import load_reference_checkpoint

from .conftest import hf_model, padded_batch

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize(
    ("layer_type", "variant"),
    [
        ("basic", {}),
        ("bottleneck", {}),
        ("basic", {"with_box_refine": True}),
        ("basic", {"with_box_refine": True, "two_stage": True}),
    ],
    ids=["plain", "bottleneck", "refine", "refine+two-stage"],
)
def test_transformers_model_gives_the_same_detections(layer_type, variant):
    hf = hf_model(layer_type, **variant).double()
    ours, report = DeformableDETR.from_transformers(hf, output_loading_info=True)
    assert report.exact, str(report)
    ours = ours.double()
    images, valid = padded_batch()
    images = images.double()
    with torch.no_grad():
        expected = hf(pixel_values=images, pixel_mask=valid)
        got = ours(images, mask=valid == 0)
    torch.testing.assert_close(got["pred_logits"], expected.logits, atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(got["pred_boxes"], expected.pred_boxes, atol=1e-9, rtol=1e-7)
    if variant.get("two_stage"):
        torch.testing.assert_close(
            got["enc_outputs"]["pred_logits"], expected.enc_outputs_class, atol=1e-9, rtol=1e-7
        )


def test_reference_layout_checkpoint_loads_with_a_report():
    config = DeformableDETRConfig.tiny()
    source = build_model(config)
    with torch.no_grad():
        for t in source.parameters():
            t.copy_(torch.randn_like(t))
    checkpoint = {"model": source.state_dict()}
    target = build_model(config)
    report = load_reference_checkpoint(target, checkpoint)
    assert report.exact
    for k, v in target.state_dict().items():
        torch.testing.assert_close(v, checkpoint["model"][k])
    # Missing and unexpected keys are named, not hidden.
    state = dict(checkpoint["model"])
    state.pop("query_embed.weight")
    state["transformer.bogus"] = torch.zeros(1)
    report = load_reference_checkpoint(build_model(config), state)
    assert report.missing_keys == ["query_embed.weight"]
    assert report.unexpected_keys == ["transformer.bogus"]

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

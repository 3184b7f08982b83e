"""The swap in every transformers family that runs multi-scale deformable attention.

Each family on a small config with random weights (all of them, so the attention
matters): outputs equal to float32 rounding, our registered operator runs and
transformers' grid_sample does not, and a second swap changes nothing.
"""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from msdeformattn.bench.transformers_models import FAMILIES, build
from msdeformattn.deploy import swap_into_transformers

from ..models.conftest import randomize
from .conftest import assert_outputs_close, outputs, profiled_outputs

pytest.importorskip("transformers")

OUR_OP = "msdeformattn::ms_deform_attn"
_SMALL_DETR = {"num_queries": 20, "decoder_layers": 2}

# family -> (config fields making it small, image (H, W)); non-square images on purpose.
SMALL = {
    "RT-DETRv2": (_SMALL_DETR, (96, 128)),
    "RT-DETRv2 discrete": ({**_SMALL_DETR, "decoder_method": "discrete"}, (96, 128)),
    "D-FINE": ({**_SMALL_DETR, "decoder_n_points": [3, 6, 3]}, (96, 128)),
    "D-FINE discrete": (
        {**_SMALL_DETR, "decoder_n_points": [3, 6, 3], "decoder_method": "discrete"},
        (96, 128),
    ),
    "DEIMv2": ({**_SMALL_DETR, "decoder_n_points": [2, 4, 2]}, (96, 128)),
    "RF-DETR": (_SMALL_DETR, (224, 224)),
    "LW-DETR": (
        {**_SMALL_DETR, "projector_scale_factors": [2.0, 0.5]},
        (128, 128),
    ),
    "OmDet-Turbo": ({"num_queries": 20, "decoder_num_layers": 2}, (96, 128)),
    "PP-DocLayoutV2": (_SMALL_DETR, (96, 128)),
    "PP-DocLayoutV3": (_SMALL_DETR, (96, 128)),
    "PP-DocLayoutV4": (_SMALL_DETR, (96, 128)),
    "MM Grounding DINO": ({**_SMALL_DETR, "encoder_layers": 1}, (96, 128)),
    "OneFormer": ({"encoder_layers": 1, "decoder_layers": 2, "num_queries": 10}, (96, 128)),
}


@pytest.mark.parametrize("case", list(SMALL))
def test_family_outputs_unchanged_on_our_operator(case, restore_transformers_functions):
    family = FAMILIES[case.removesuffix(" discrete")]
    config, size = SMALL[case]
    model, inputs = build(family, size=size, **config)
    randomize(model)
    before = outputs(model, inputs, family.outputs)
    names = swap_into_transformers(model)
    after, ops = profiled_outputs(model, inputs, family.outputs)
    assert OUR_OP in ops
    assert "aten::grid_sample" not in ops  # no attention site left behind
    assert_outputs_close(after, before)
    # Swapping again: nothing replaced twice, the same report, the same outputs.
    assert swap_into_transformers(model) == names
    assert_outputs_close(outputs(model, inputs, family.outputs), before)


def test_per_level_points_each_swapped_layer_reports_its_site(restore_transformers_functions):
    model, _ = build(FAMILIES["D-FINE"], num_queries=20, decoder_layers=2)
    # D-FINE's layers hold their core function: replaced per layer, not per process.
    assert swap_into_transformers(model) == [
        f"model.decoder.layers.{i}.encoder_attn.ms_deformable_attn_core" for i in range(2)
    ]


def _rt_detr_v2_functions():
    """transformers' RT-DETRv2 core function, and ours that a swap puts in its place."""
    from transformers.models.rt_detr_v2 import modeling_rt_detr_v2

    theirs = modeling_rt_detr_v2.multi_scale_deformable_attention_v2
    swap_into_transformers(build(FAMILIES["RT-DETRv2"], **_SMALL_DETR)[0])
    ours = modeling_rt_detr_v2.multi_scale_deformable_attention_v2
    assert ours is not theirs
    return theirs, ours


def test_discrete_sampling_clamps_each_axis_to_its_own_size(restore_transformers_functions):
    theirs, ours = _rt_detr_v2_functions()
    # Levels 2x5 (wide) and 1x1; each pixel's value is its index, one head, D=1.
    shapes = [(2, 5), (1, 1)]
    value = torch.arange(11.0).view(1, 11, 1, 1)
    # Level 0: x=0.95 -> column 5 clamped to W-1=4 (not H-1=1), y=0.9 -> row 1; x=0.3 ->
    # column 2, y=0.2 -> row 0. Level 1: anything reads its one pixel.
    loc = torch.tensor([[0.95, 0.9], [0.3, 0.2], [3.0, -2.0]]).view(1, 1, 1, 3, 2)
    weights = torch.tensor([1.0, 10.0, 100.0]).view(1, 1, 1, 3)
    expected = torch.tensor([[[9.0 + 10.0 * 2.0 + 100.0 * 10.0]]])
    for fn in (ours, theirs):
        torch.testing.assert_close(fn(value, shapes, loc, weights, [2, 1], "discrete"), expected)


def test_unknown_transformers_method_is_an_error(restore_transformers_functions):
    _, ours = _rt_detr_v2_functions()
    loc = torch.rand(1, 1, 1, 2, 2)
    with pytest.raises(ValueError, match=r"method must be one of .*'nearest'"):
        ours(torch.rand(1, 5, 1, 1), [(1, 5)], loc, torch.rand(1, 1, 1, 2), [2], "nearest")


def test_model_without_deformable_attention_is_refused_naming_its_family():
    from transformers import BertConfig, BertModel

    bert = BertModel(
        BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    )
    with pytest.raises(ValueError, match=r"BertModel \(transformers family 'bert'\) holds no"):
        swap_into_transformers(bert)


def test_attention_in_an_unknown_form_is_refused_naming_its_family(monkeypatch):
    # A future transformers family whose attention layer has none of the known forms.
    module = type(sys)("transformers.models.future_detr.modeling_future_detr")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    layer_cls = type(
        "FutureDetrMultiscaleDeformableAttention", (nn.Module,), {"__module__": module.__name__}
    )
    model = nn.Sequential(nn.Linear(2, 2), layer_cls())
    with pytest.raises(
        ValueError,
        match=r"FutureDetrMultiscaleDeformableAttention \(transformers family 'future_detr'\) "
        r"at '1' runs deformable attention in a form swap_into_transformers does not know",
    ):
        swap_into_transformers(model)

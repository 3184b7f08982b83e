"""The deformable transformer: reference layout, reference points, padding, the variants."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from msdeformattn.nn import DeformableTransformer, DeformableTransformerEncoder, inverse_sigmoid

LEVELS = ((8, 12), (4, 6), (2, 3))
C = 32


def tiny(**kw):
    torch.manual_seed(0)
    args = dict(
        d_model=C,
        n_heads=4,
        num_encoder_layers=2,
        num_decoder_layers=2,
        d_ffn=64,
        dropout=0.0,
        n_levels=len(LEVELS),
        dec_n_points=2,
        enc_n_points=2,
        two_stage_num_proposals=10,
    )
    args.update(kw)
    return DeformableTransformer(**args).eval()


def features(N=2, seed=0, pad_last_columns=0):
    g = torch.Generator().manual_seed(seed)
    srcs, masks, pos = [], [], []
    for H, W in LEVELS:
        srcs.append(torch.randn(N, C, H, W, generator=g))
        pos.append(torch.randn(N, C, H, W, generator=g))
        mask = torch.zeros(N, H, W, dtype=torch.bool)
        if pad_last_columns:
            mask[1, :, W - max(1, W * pad_last_columns // LEVELS[0][1]) :] = True
        masks.append(mask)
    return srcs, masks, pos


def test_reference_layout_names():
    keys = set(tiny().state_dict())
    for k in (
        "level_embed",
        "reference_points.weight",
        "encoder.layers.1.self_attn.sampling_offsets.weight",
        "encoder.layers.0.linear1.weight",
        "encoder.layers.0.norm2.bias",
        "decoder.layers.1.cross_attn.value_proj.weight",
        "decoder.layers.0.self_attn.in_proj_weight",
        "decoder.layers.0.self_attn.out_proj.weight",
        "decoder.layers.0.norm3.weight",
    ):
        assert k in keys, k
    two = set(tiny(two_stage=True).state_dict())
    assert {"enc_output.weight", "enc_output_norm.weight", "pos_trans.weight"} <= two
    assert "reference_points.weight" not in two


def test_encoder_reference_points_are_pixel_centres():
    shapes = [(2, 3), (1, 2)]
    ratios = torch.ones(1, 2, 2)
    ref = DeformableTransformerEncoder.get_reference_points(shapes, ratios, "cpu")
    assert ref.shape == (1, 8, 2, 2)
    torch.testing.assert_close(ref[0, 4, 0], torch.tensor([1.5 / 3, 1.5 / 2]))  # level 0 (1, 1)
    torch.testing.assert_close(ref[0, 7, 1], torch.tensor([1.5 / 2, 0.5]))  # level 1 (0, 1)
    # With the right half padded, centres are normalised by the valid width.
    half = torch.tensor([[[0.5, 1.0], [0.5, 1.0]]])
    ref = DeformableTransformerEncoder.get_reference_points(shapes, half, "cpu")
    torch.testing.assert_close(ref[0, 0, 0], torch.tensor([0.5 / 1.5 * 0.5, 0.25]))


def test_forward_shapes_and_backward():
    model = tiny(return_intermediate_dec=True).train()
    query_embed = nn.Parameter(torch.randn(10, 2 * C))
    srcs, masks, pos = features()
    hs, init_ref, inter_refs, enc_cls, enc_coord = model(srcs, masks, pos, query_embed)
    assert hs.shape == (2, 2, 10, C)
    assert init_ref.shape == (2, 10, 2) and inter_refs.shape == (2, 2, 10, 2)
    assert enc_cls is None and enc_coord is None
    hs.sum().backward()
    assert query_embed.grad.abs().sum() > 0
    assert model.encoder.layers[0].self_attn.sampling_offsets.weight.grad.abs().sum() > 0


def test_padding_content_does_not_reach_the_decoder():
    model = tiny(return_intermediate_dec=True)
    query_embed = torch.randn(10, 2 * C)
    srcs, masks, pos = features(pad_last_columns=4)
    hs = model(srcs, masks, pos, query_embed)[0]
    changed = [s.masked_fill(m[:, None], 50.0) for s, m in zip(srcs, masks, strict=True)]
    assert not all(torch.equal(a, b) for a, b in zip(srcs, changed, strict=True))
    torch.testing.assert_close(model(changed, masks, pos, query_embed)[0], hs)


def _heads(model, n):
    model.decoder.class_embed = nn.ModuleList(nn.Linear(C, 3) for _ in range(n))
    model.decoder.bbox_embed = nn.ModuleList(nn.Linear(C, 4) for _ in range(n))


def test_box_refinement_updates_references_per_layer():
    model = tiny(return_intermediate_dec=True)
    _heads(model, 2)
    srcs, masks, pos = features()
    _, init_ref, inter_refs, _, _ = model(srcs, masks, pos, torch.randn(10, 2 * C))
    assert inter_refs.shape == (2, 2, 10, 4)
    assert not torch.allclose(inter_refs[0, ..., :2], init_ref)
    assert ((inter_refs > 0) & (inter_refs < 1)).all()


def test_two_stage_proposes_the_queries():
    model = tiny(two_stage=True, return_intermediate_dec=True)
    _heads(model, 3)  # one per decoder layer plus the encoder's
    srcs, masks, pos = features(pad_last_columns=4)
    hs, init_ref, _, enc_cls, enc_coord = model(srcs, masks, pos)
    S = sum(h * w for h, w in LEVELS)
    assert enc_cls.shape == (2, S, 3) and enc_coord.shape == (2, S, 4)
    assert init_ref.shape == (2, 10, 4) and hs.shape == (2, 2, 10, C)
    # Padded pixels propose nothing: their boxes are +inf logits.
    flat_mask = torch.cat([m.flatten(1) for m in masks], 1)
    assert torch.isinf(enc_coord[flat_mask]).all()
    assert torch.isfinite(hs).all()


def test_query_embed_required_without_two_stage():
    srcs, masks, pos = features()
    with pytest.raises(ValueError, match="query_embed"):
        tiny()(srcs, masks, pos)


def test_inverse_sigmoid_inverts_sigmoid():
    x = torch.linspace(-4, 4, 9)
    torch.testing.assert_close(inverse_sigmoid(x.sigmoid()), x, atol=1e-4, rtol=1e-4)
    assert torch.isfinite(inverse_sigmoid(torch.tensor([0.0, 1.0]))).all()


@pytest.mark.parametrize("two_stage", [False, True])
def test_an_image_alone_and_padded_in_a_batch_decode_the_same(two_stage):
    """Features of one image alone, and the same features in a larger padded canvas
    beside another image: the same decoder outputs (reference points, offsets and
    position encodings are all relative to the valid extent).

    Exact at the transformer; a whole detector also pads through its backbone and
    GroupNorm, whose statistics see the padding (as in the reference implementation)."""
    from msdeformattn.models.backbone import PositionEmbeddingSine

    model = tiny(two_stage=two_stage, return_intermediate_dec=True)
    if two_stage:
        _heads(model, 3)
    embed = PositionEmbeddingSine(C // 2)
    query_embed = torch.randn(10, 2 * C)
    g = torch.Generator().manual_seed(5)
    alone, alone_masks, canvas, canvas_masks = [], [], [], []
    for H, W in LEVELS:
        x = torch.randn(1, C, H, W, generator=g)
        alone.append(x)
        alone_masks.append(torch.zeros(1, H, W, dtype=torch.bool))
        big = torch.randn(2, C, H, W + W // 2, generator=g)  # padding holds noise
        big[1, :, :, :W] = x[0]
        mask = torch.zeros(2, H, W + W // 2, dtype=torch.bool)
        mask[1, :, W:] = True
        canvas.append(big)
        canvas_masks.append(mask)
    pos_alone = [embed(m) for m in alone_masks]
    pos_canvas = [embed(m) for m in canvas_masks]
    hs_alone = model(alone, alone_masks, pos_alone, query_embed)[0]
    hs_canvas = model(canvas, canvas_masks, pos_canvas, query_embed)[0]
    torch.testing.assert_close(hs_canvas[:, 1], hs_alone[:, 0], atol=1e-4, rtol=1e-4)

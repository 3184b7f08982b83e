"""MSDeformAttnPixelDecoder: equal to transformers' Mask2FormerPixelDecoder, complete key
mapping, padding invariance, shapes, gradients and argument checks."""

from __future__ import annotations

import copy

import pytest
import torch

from msdeformattn.models import MSDeformAttnPixelDecoder

from ..conftest import TOL
from .conftest import randomize, tiny_resnet

transformers = pytest.importorskip("transformers")

CHANNELS = [16, 32, 64, 64]  # tiny_resnet's four stages, strides 4 to 32
STRIDES = (4, 8, 16, 32)


@pytest.fixture(scope="module")
def hf_decoder():
    """The pixel decoder of a small, randomly initialised transformers Mask2Former."""
    from transformers import Mask2FormerConfig, Mask2FormerModel

    config = Mask2FormerConfig(
        backbone_config=tiny_resnet(stages=("stage1", "stage2", "stage3", "stage4")),
        feature_size=32,
        mask_feature_size=24,
        hidden_dim=32,
        encoder_feedforward_dim=48,
        encoder_layers=2,
        decoder_layers=1,
        num_attention_heads=4,
        dim_feedforward=32,
        num_queries=4,
    )
    torch.manual_seed(0)
    decoder = randomize(Mask2FormerModel(config).eval()).pixel_level_module.decoder
    assert decoder.feature_channels == CHANNELS
    return decoder


def features(batch, height, width, seed=0, dtype=torch.float32, channels=CHANNELS):
    """Backbone-like maps of an image (height, width): sizes ceil(size / stride), finest first."""
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, c, -(-height // s), -(-width // s), generator=g, dtype=torch.float64).to(
            dtype
        )
        for c, s in zip(channels, STRIDES, strict=True)
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("size", [(64, 96), (72, 100)])
def test_outputs_equal_transformers(hf_decoder, size, dtype):
    hf = copy.deepcopy(hf_decoder).to(dtype)
    ours = MSDeformAttnPixelDecoder.from_transformers(hf)
    feats = features(2, *size, dtype=dtype)
    with torch.no_grad():
        want, got = hf(feats), ours(feats)
    assert got.mask_features.dtype == dtype
    torch.testing.assert_close(got.mask_features, want.mask_features, **TOL[dtype])
    assert len(got.multi_scale_features) == len(want.multi_scale_features) == 3
    for g, w in zip(got.multi_scale_features, want.multi_scale_features, strict=True):
        torch.testing.assert_close(g, w, **TOL[dtype])


def test_every_key_maps_to_mask2formers_layout(hf_decoder):
    ours, report = MSDeformAttnPixelDecoder.from_transformers(hf_decoder, output_loading_info=True)
    assert report.exact, str(report)
    state = ours.state_dict()
    assert len(state) == len(hf_decoder.state_dict())
    for key in (
        "input_proj.0.0.weight",
        "input_proj.2.1.bias",
        "transformer.level_embed",
        "transformer.encoder.layers.1.self_attn.sampling_offsets.weight",
        "transformer.encoder.layers.0.norm2.weight",
        "adapter_1.weight",
        "adapter_1.norm.weight",
        "layer_1.norm.bias",
        "mask_features.bias",
    ):
        assert key in state
    torch.testing.assert_close(state["layer_1.norm.weight"], hf_decoder.layer_1[1].weight)
    torch.testing.assert_close(
        state["transformer.encoder.layers.1.linear2.bias"], hf_decoder.encoder.layers[1].fc2.bias
    )
    assert not ours.training


def test_an_unknown_key_is_reported(hf_decoder):
    hf = copy.deepcopy(hf_decoder)
    hf.extra = torch.nn.Parameter(torch.zeros(3))
    with pytest.warns(UserWarning, match="did not load exactly"):
        MSDeformAttnPixelDecoder.from_transformers(hf)
    _, report = MSDeformAttnPixelDecoder.from_transformers(hf, output_loading_info=True)
    assert report.unexpected_keys == ["extra"] and not report.missing_keys


def test_padded_batch_equals_each_image_alone(hf_decoder):
    """Image 0 fills the 64x96 canvas, image 1 is 32x64 at its top left with noise in the
    padding: each one's valid outputs equal its run alone (sizes are multiples of 32)."""
    ours = MSDeformAttnPixelDecoder.from_transformers(hf_decoder)
    H, W, h, w = 64, 96, 32, 64
    full, crop = features(1, H, W, seed=1), features(1, h, w, seed=2)
    padded = features(1, H, W, seed=3)  # the noise the padding holds
    for p, c in zip(padded, crop, strict=True):
        p[..., : c.shape[-2], : c.shape[-1]] = c
    batch = [torch.cat(pair) for pair in zip(full, padded, strict=True)]
    mask = torch.zeros(2, H, W, dtype=torch.bool)
    mask[1, h:] = True
    mask[1, :, w:] = True
    with torch.no_grad():
        out = ours(batch, mask)
        alone = [ours(full), ours(crop)]
        unmasked = ours(batch)
    tol = TOL[torch.float32]
    for i, ref in enumerate(alone):
        for got, want in zip(
            [out.mask_features, *out.multi_scale_features],
            [ref.mask_features, *ref.multi_scale_features],
            strict=True,
        ):
            hh, ww = want.shape[-2:]
            torch.testing.assert_close(got[i, :, :hh, :ww], want[0], **tol)
    # Without the mask the noise leaks into the valid region: the check above can fail.
    hh, ww = alone[1].mask_features.shape[-2:]
    leak = (unmasked.mask_features[1, :, :hh, :ww] - alone[1].mask_features[0]).abs().max()
    assert leak > 1e-2


def test_mask_without_padding_equals_no_mask(hf_decoder):
    ours = MSDeformAttnPixelDecoder.from_transformers(hf_decoder)
    feats = features(2, 40, 56)
    with torch.no_grad():
        a = ours(feats)
        b = ours(feats, torch.zeros(2, 40, 56, dtype=torch.bool))
    torch.testing.assert_close(a.mask_features, b.mask_features, **TOL[torch.float32])


@pytest.mark.parametrize(("n_levels", "num_encoder_layers"), [(3, 2), (2, 1), (3, 0)])
def test_shapes(n_levels, num_encoder_layers):
    dec = MSDeformAttnPixelDecoder(
        CHANNELS,
        d_model=32,
        mask_dim=16,
        n_heads=4,
        n_points=2,
        num_encoder_layers=num_encoder_layers,
        d_ffn=48,
        n_levels=n_levels,
    )
    assert dec.num_fpn_levels == 4 - n_levels
    feats = features(3, 72, 100)
    out = dec(feats, torch.zeros(3, 72, 100, dtype=torch.bool))
    assert out.mask_features.shape == (3, 16, 18, 25)
    sizes = [tuple(f.shape[-2:]) for f in feats][::-1][:n_levels]
    assert [tuple(f.shape) for f in out.multi_scale_features] == [(3, 32, *s) for s in sizes]


def test_gradient_reaches_every_parameter():
    # Random weights: at initialisation the zero attention matrices cut the position
    # encoding, and with it the level embedding, off from the output.
    dec = randomize(
        MSDeformAttnPixelDecoder(
            CHANNELS, d_model=32, mask_dim=16, n_heads=4, n_points=2, num_encoder_layers=2, d_ffn=48
        )
    )
    feats = features(2, 64, 96)
    mask = torch.zeros(2, 64, 96, dtype=torch.bool)
    mask[1, 32:] = True
    out = dec(feats, mask)
    g = torch.Generator().manual_seed(5)
    # Random output weights: a plain sum of normalised outputs has zero gradient.
    loss = sum((t * torch.randn(t.shape, generator=g)).sum() for t in [out[0], *out[1]])
    loss.backward()
    for name, p in dec.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_wrong_arguments_are_named():
    dec = MSDeformAttnPixelDecoder(CHANNELS, d_model=32, n_heads=4, num_encoder_layers=1)
    feats = features(1, 32, 32)
    with pytest.raises(ValueError, match=r"features must be 4 maps .* C_l = \[16, 32, 64, 64\]"):
        dec(feats[1:])
    with pytest.raises(ValueError, match="features must be 4 maps"):
        dec([feats[1], feats[1], feats[2], feats[3]])
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        dec(feats, torch.zeros(1, 32, 32))
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        dec(feats, torch.zeros(2, 32, 32, dtype=torch.bool))
    with pytest.raises(ValueError, match="n_levels must be between 1 and len"):
        MSDeformAttnPixelDecoder(CHANNELS, n_levels=5)
    with pytest.raises(ValueError, match="d_model must be a multiple of 32"):
        MSDeformAttnPixelDecoder(CHANNELS, d_model=48)

"""DeformableSegmenter and its config: shapes, padding, the loss, overfitting one image,
gradients and argument checks, for the deformable pixel decoder and the plain-FPN baseline."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from msdeformattn.models import DeformableSegmenter, SegmenterConfig
from msdeformattn.models.config import config_from_dict
from msdeformattn.util.errors import UsageError

from ..conftest import TOL

DECODERS = ["deformable", "fpn"]
K = 3


def model(decoder="deformable", seed=0, **overrides):
    torch.manual_seed(seed)
    return DeformableSegmenter(SegmenterConfig.tiny(K, decoder=decoder, **overrides))


def padded(h, w, H, W, seed=0):
    """One image (h, w) on two canvases (H, W): zero padding and noise padding; and the mask."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(3, h, w, generator=g)
    images = torch.randn(2, 3, H, W, generator=g)
    images[0] = 0
    images[:, :, :h, :w] = image
    mask = torch.ones(2, H, W, dtype=torch.bool)
    mask[:, :h, :w] = False
    return images, mask


def scene():
    """A 48x64 image of three classes (a rectangle and a disc on a background) in noisy
    colours, and its labels; the right-most columns are unlabelled."""
    g = torch.Generator().manual_seed(0)
    target = torch.zeros(1, 48, 64, dtype=torch.int64)
    target[0, 8:28, 6:30] = 1
    yy, xx = torch.meshgrid(torch.arange(48), torch.arange(64), indexing="ij")
    target[0][(yy - 30) ** 2 + (xx - 44) ** 2 < 110] = 2
    colours = torch.tensor([[-1.0, 0.0, 0.5], [1.0, -0.5, 0.0], [0.0, 1.0, -1.0]])
    images = colours[target].permute(0, 3, 1, 2) + 0.3 * torch.randn(1, 3, 48, 64, generator=g)
    target[0, :, 60:] = 255
    return images, target


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("size", [(64, 96), (33, 47)], ids=["multiple-of-32", "odd"])
def test_shapes(decoder, size):
    m = model(decoder).eval()
    images = torch.randn(2, 3, *size)
    logits = m(images)
    # The trunk's C2 grid: each stride-2 step rounds up.
    assert logits.shape == (2, K, -(-size[0] // 4), -(-size[1] // 4))
    labels = m.predict(images)
    assert labels.shape == (2, *size) and labels.dtype == torch.int64
    want = F.interpolate(logits, size=size, mode="bilinear", align_corners=False).argmax(1)
    assert torch.equal(labels, want)


def test_the_fpn_baseline_is_the_model_without_encoder_layers():
    deformable, fpn = model("deformable").pixel_decoder, model("fpn").pixel_decoder
    assert len(deformable.transformer.encoder.layers) == 2
    assert (deformable.n_levels, deformable.num_fpn_levels) == (3, 1)
    assert len(fpn.transformer.encoder.layers) == 0
    # C5 alone as the encoder's level, so that C4 and C5 still reach the mask features.
    assert (fpn.n_levels, fpn.num_fpn_levels) == (1, 3)


@pytest.mark.parametrize("decoder", DECODERS)
def test_padding_reaches_valid_logits_only_through_the_trunk(decoder):
    # Sizes multiples of 32: every level's valid region is the unpadded image's map, where
    # the pixel decoder ignores padding exactly. The trunk's convolutions do not.
    m = model(decoder).eval()
    images, mask = padded(64, 96, 96, 128)
    with torch.no_grad():
        got = m(images, mask)[:, :, :16, :24]
        features = [
            f[:, :, : 64 // s, : 96 // s]
            for f, s in zip(m.backbone(images), (4, 8, 16, 32), strict=True)
        ]
        want = m.classifier(m.pixel_decoder(features).mask_features)
    torch.testing.assert_close(got, want, **TOL[torch.float32])


@pytest.mark.parametrize("decoder", DECODERS)
def test_the_mask_keeps_most_of_the_padding_out(decoder):
    # Zero and noise padding, with and without the mask: the relative change of the valid
    # logits (untrained: about 0.15 masked, 0.5 unmasked; unmasked, GroupNorm statistics and
    # attention read the noise everywhere).
    m = model(decoder).eval()
    images, mask = padded(64, 96, 96, 128, seed=1)

    def change(mask):
        with torch.no_grad():
            zero, noise = m(images, mask)[:, :, :16, :24]
        return ((noise - zero).abs().mean() / zero.abs().mean()).item()

    masked, unmasked = change(mask), change(None)
    assert masked < 0.5 * unmasked, (masked, unmasked)


def test_a_mask_without_padding_equals_no_mask():
    m = model().eval()
    images = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        a = m(images)
        b = m(images, torch.zeros(2, 40, 56, dtype=torch.bool))
    torch.testing.assert_close(a, b, **TOL[torch.float32])


def test_predict_labels_padding_with_the_ignore_index():
    m = model().eval()
    images, mask = padded(40, 56, 64, 64)
    labels = m.predict(images, mask)
    assert (labels[mask] == 255).all()
    assert ((labels[~mask] >= 0) & (labels[~mask] < K)).all()


def test_the_loss_skips_ignored_pixels():
    m = model()
    logits = torch.randn(2, K, 12, 16, requires_grad=True)
    target = torch.full((2, 45, 64), 255, dtype=torch.int64)
    target[1, 20, 33] = 2
    up = F.interpolate(logits, size=(45, 64), mode="bilinear", align_corners=False)
    want = -up[1, :, 20, 33].log_softmax(0)[2]
    torch.testing.assert_close(m.loss(logits, target), want)
    # Nothing to count: zero, not cross_entropy's 0/0, and still differentiable.
    target[1, 20, 33] = 255
    loss = m.loss(logits, target)
    loss.backward()
    assert loss.item() == 0 and torch.equal(logits.grad, torch.zeros_like(logits))


def test_the_loss_is_the_mean_over_counted_pixels():
    m = model()
    logits = torch.randn(1, K, 8, 8)
    target = torch.randint(0, K, (1, 32, 32))
    up = F.interpolate(logits, size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(m.loss(logits, target), F.cross_entropy(up, target))


@pytest.mark.parametrize("decoder", DECODERS)
def test_a_few_sgd_steps_overfit_one_image(decoder):
    m = model(decoder).train()
    images, target = scene()
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    losses = []
    for _ in range(8):
        loss = m.loss(m(images), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("decoder", DECODERS)
def test_gradient_reaches_every_trainable_parameter(decoder):
    m = model(decoder).train()
    images, target = scene()
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.01)
    # After one step: at initialisation the zero attention matrices cut the level embedding
    # off from the output (see the pixel decoder's tests).
    for _ in range(2):
        opt.zero_grad()
        m.loss(m(images), target).backward()
        opt.step()
    trainable = {n: p for n, p in m.named_parameters() if p.requires_grad}
    no_grad = [n for n, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == [], no_grad
    # The FPN has no encoder layer to read the level embedding: frozen, not left unused.
    frozen = sorted(set(dict(m.named_parameters())) - set(trainable))
    assert frozen == (["pixel_decoder.transformer.level_embed"] if decoder == "fpn" else [])


def test_model_keeps_its_config_and_the_config_round_trips():
    config = SegmenterConfig.tiny(K, decoder="fpn")
    assert DeformableSegmenter(config).config is config
    assert config_from_dict(dataclasses.asdict(config), SegmenterConfig) == config


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"decoder": "dense"}, r"decoder must be one of \('deformable', 'fpn'\), got 'dense'"),
        ({"backbone_norm": "group"}, r"backbone_norm must be one of \('frozen', 'batch'\)"),
        ({"backbone_block": "wide"}, r"backbone_block must be one of"),
        ({"num_classes": 0}, r"num_classes must be a positive integer, got 0"),
        ({"enc_layers": 0}, r"enc_layers must be a positive integer, got 0 \(decoder='fpn'"),
        ({"mask_dim": 1.5}, r"mask_dim must be a positive integer, got 1.5"),
        ({"dim_feedforward": 0}, r"dim_feedforward must be a positive integer, got 0"),
        ({"d_model": 48, "nheads": 4}, r"d_model must be a multiple of 32 .*got 48"),
        ({"nheads": 3}, r"d_model must be divisible by nheads, got d_model=64, nheads=3"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\), got 1.0"),
        (
            {"ignore_index": 2},
            r"ignore_index must be an integer outside the classes \[0, 3\), got 2",
        ),
        ({"backbone_widths": (32, 64, 128)}, r"backbone_widths must be 4 positive integers"),
        ({"backbone_depths": (1, 0, 1, 1)}, r"backbone_depths must be 4 positive integers"),
    ],
)
def test_config_errors_name_the_field(overrides, message):
    with pytest.raises(UsageError, match=message):
        SegmenterConfig(**{**dataclasses.asdict(SegmenterConfig.tiny(K)), **overrides})


def test_wrong_inputs_are_named():
    m = model()
    with pytest.raises(
        ValueError, match=r"images must have shape \(N, 3, H, W\), got \(1, 1, 32, 32\)"
    ):
        m(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"mask must be a bool tensor of shape \(1, 32, 32\)"):
        m(torch.randn(1, 3, 32, 32), torch.zeros(1, 32, 32))
    with pytest.raises(
        ValueError, match=r"logits must have shape \(N, 3, h, w\), got \(1, 4, 8, 8\)"
    ):
        m.loss(torch.randn(1, 4, 8, 8), torch.zeros(1, 32, 32, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"target must be an int64 tensor \(N, H, W\) with N = 1"):
        m.loss(torch.randn(1, K, 8, 8), torch.zeros(1, 32, 32, dtype=torch.int32))

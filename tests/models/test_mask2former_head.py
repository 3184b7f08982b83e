"""The masked-attention query decoder (Mask2Former's head) alone and as the segmenter's
second head: shapes, masked attention, padding, semantic inference, gradients, a few
training steps and old checkpoints."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from msdeformattn.models import DeformableSegmenter, MaskedAttentionDecoder, SegmenterConfig
from msdeformattn.models.mask2former_head import attention_mask, semantic_scores
from msdeformattn.util.errors import UsageError

from ..conftest import TOL
from .test_segmenter import scene

K, Q, D = 3, 6, 32
#: Mask features (stride 4 of a 128 px image) and three levels, coarsest first.
MASK_SIZE, LEVEL_SIZES = (32, 32), [(4, 4), (8, 8), (16, 16)]


def head(num_layers=3, seed=0):
    torch.manual_seed(seed)
    return MaskedAttentionDecoder(
        K, d_model=D, mask_dim=D, num_queries=Q, nheads=4, dim_feedforward=64,
        num_layers=num_layers,
    ).eval()  # fmt: skip


def features(N=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    mask_features = torch.randn(N, D, *MASK_SIZE, generator=g)
    levels = [torch.randn(N, D, *s, generator=g) for s in LEVEL_SIZES]
    return mask_features, levels


def same_mask_for_every_query(h, sign):
    """Make every query's mask logits equal to channel 0 of the mask features, and return
    mask features whose channel 0 is ``sign`` (1, W) * 10: each query's first mask is where
    ``sign`` is positive."""
    last = h.mask_embed.layers[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
        last.bias[0] = 1.0
    mask_features, levels = features()
    mask_features[:, 0] = 10.0 * sign
    return mask_features, levels


def test_shapes_and_auxiliary_outputs():
    h = head(num_layers=4)
    mask_features, levels = features()
    out = h(mask_features, levels)
    assert out["pred_logits"].shape == (2, Q, K + 1)
    assert out["pred_masks"].shape == (2, Q, *MASK_SIZE)
    # Before the first layer and after the first three.
    assert len(out["aux_outputs"]) == 4
    for aux in out["aux_outputs"]:
        assert aux["pred_logits"].shape == (2, Q, K + 1)
        assert aux["pred_masks"].shape == (2, Q, *MASK_SIZE)
    # The first prediction comes from the learnt query features alone: the same per image.
    first = out["aux_outputs"][0]["pred_logits"]
    torch.testing.assert_close(first[0], first[1])
    assert not torch.allclose(out["pred_logits"][0], out["pred_logits"][1])


def test_layers_cycle_over_the_levels_coarsest_first():
    # Layer 0 reads level 0 only: changing levels 1 and 2 leaves its output as it is, and
    # changes the output of layer 1, which reads level 1.
    h = head()
    mask_features, levels = features()
    with torch.no_grad():
        a = h(mask_features, levels)["aux_outputs"]
        levels[1] = levels[1] + 1.0
        levels[2] = levels[2] + 1.0
        b = h(mask_features, levels)["aux_outputs"]
    torch.testing.assert_close(a[1]["pred_logits"], b[1]["pred_logits"])
    assert not torch.allclose(a[2]["pred_logits"], b[2]["pred_logits"])


def test_masked_attention_reads_only_inside_the_previous_mask():
    h = head()
    left = torch.where(torch.arange(MASK_SIZE[1]) < MASK_SIZE[1] // 2, 1.0, -1.0)
    mask_features, levels = same_mask_for_every_query(h, left)
    # Level 0 (4x4): every query's mask covers columns 0 and 1.
    outside, inside = [lvl.clone() for lvl in levels], [lvl.clone() for lvl in levels]
    outside[0][..., 2:] += torch.randn_like(outside[0][..., 2:])
    inside[0][..., :2] += torch.randn_like(inside[0][..., :2])
    with torch.no_grad():
        base, moved_out, moved_in = (
            h(mask_features, lv)["aux_outputs"][1] for lv in (levels, outside, inside)
        )
    torch.testing.assert_close(moved_out["pred_logits"], base["pred_logits"])
    torch.testing.assert_close(moved_out["pred_masks"], base["pred_masks"])
    assert not torch.allclose(moved_in["pred_logits"], base["pred_logits"], atol=1e-3)


def test_a_query_with_an_empty_mask_attends_everywhere():
    h = head()
    ones = torch.ones(MASK_SIZE[1])
    results = {}
    for name, sign in (("empty", -ones), ("full", ones), ("left", ones.clone())):
        if name == "left":
            sign[MASK_SIZE[1] // 2 :] = -1
        mask_features, levels = same_mask_for_every_query(h, sign)
        with torch.no_grad():
            results[name] = h(mask_features, levels)["aux_outputs"][1]["pred_logits"]
    # The mask features reach the queries after layer 0 only through the attention mask.
    torch.testing.assert_close(results["empty"], results["full"], **TOL[torch.float32])
    assert not torch.allclose(results["empty"], results["left"], atol=1e-3)


def test_attention_mask_rules():
    logits = torch.full((1, 3, 2, 4), -5.0)
    logits[0, 0, :, :2] = 5.0  # query 0: the left half
    logits[0, 2, :, 3] = 5.0  # query 2: the last column only, which is padding
    padding = torch.zeros(1, 2, 4, dtype=torch.bool)
    padding[0, :, 3] = True
    blocked = attention_mask(logits, (2, 4), padding, padding)
    pad = padding.flatten(1)[0]
    left = torch.tensor([True, True, False, False] * 2)
    assert torch.equal(blocked[0, 0], ~left)
    # Empty (query 1), or holding only padding (query 2): every valid pixel, no padding.
    assert torch.equal(blocked[0, 1], pad)
    assert torch.equal(blocked[0, 2], pad)
    # Without padding an empty mask blocks nothing.
    assert not attention_mask(logits, (2, 4))[0, 1].any()


def test_padded_pixels_change_nothing():
    # A 64x96 image in a 128x128 canvas: the head on the padded maps with the mask gives
    # what it gives on the maps of the valid region alone, whatever the padding holds.
    h = head()
    mask_features, levels = features(N=1)
    mask = torch.ones(1, 128, 128, dtype=torch.bool)
    mask[:, :64, :96] = False
    noisy = [x.clone() for x in (mask_features, *levels)]
    for x in noisy:
        hh, ww = x.shape[-2] // 2, x.shape[-1] * 3 // 4
        x[..., hh:, :] = 100 * torch.randn_like(x[..., hh:, :])
        x[..., :, ww:] = -100
    crop = [x[..., : x.shape[-2] // 2, : x.shape[-1] * 3 // 4] for x in (mask_features, *levels)]
    with torch.no_grad():
        padded = h(noisy[0], noisy[1:], mask)
        alone = h(crop[0], crop[1:])
    for got, want in zip(
        [padded, *padded["aux_outputs"]], [alone, *alone["aux_outputs"]], strict=True
    ):
        torch.testing.assert_close(got["pred_logits"], want["pred_logits"], **TOL[torch.float32])
        torch.testing.assert_close(
            got["pred_masks"][..., :16, :24], want["pred_masks"], **TOL[torch.float32]
        )


def test_semantic_scores_sum_class_probabilities_times_masks():
    g = torch.Generator().manual_seed(0)
    logits, masks = torch.randn(2, Q, K + 1, generator=g), torch.randn(2, Q, 5, 7, generator=g)
    scores = semantic_scores(logits, masks)
    want = torch.zeros(2, K, 5, 7)
    for q in range(Q):
        want += logits[:, q].softmax(-1)[:, :K, None, None] * masks[:, q, None].sigmoid()
    torch.testing.assert_close(scores, want)
    up = semantic_scores(logits, masks, (10, 14))
    torch.testing.assert_close(
        up, semantic_scores(logits, F.interpolate(masks, (10, 14), mode="bilinear"))
    )


# The head in the segmenter.


def segmenter(head_name="mask2former", seed=0, **overrides):
    torch.manual_seed(seed)
    return DeformableSegmenter(SegmenterConfig.tiny(K, head=head_name, **overrides))


def train_on_scene(m, optimizer, steps, lr):
    """``steps`` steps of ``optimizer`` on :func:`scene`; the losses before each step."""
    images, target = scene()
    opt = optimizer([p for p in m.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = m.loss(m(images), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("head_name", ["per_pixel", "mask2former"])
def test_semantic_logits_and_predict_at_the_input_size(head_name):
    m = segmenter(head_name).eval()
    images = torch.randn(2, 3, 33, 47)
    scores = m.semantic_logits(images)
    assert scores.shape == (2, K, 33, 47)
    labels = m.predict(images)
    assert labels.shape == (2, 33, 47) and torch.equal(labels, scores.argmax(1))
    # Another output size in one interpolation (segment_image's original resolution).
    assert m.semantic_logits(images, size=(66, 94)).shape == (2, K, 66, 94)
    # forward gives the head's own outputs in either mode: what loss() takes.
    out = m(images)
    if head_name == "mask2former":
        assert out["pred_masks"].shape[-2:] == (9, 12)
    else:
        assert out.shape == (2, K, 9, 12)
    mask = torch.ones(2, 33, 47, dtype=torch.bool)
    mask[:, :20, :30] = False
    labels = m.predict(images, mask)
    assert (labels[mask] == 255).all() and (labels[~mask] < K).all()


def test_the_mask2former_segmenter_in_training_mode_gives_the_head_outputs():
    m = segmenter(num_queries=5, dec_layers=4).train()
    out = m(torch.randn(2, 3, 64, 96))
    assert out["pred_logits"].shape == (2, 5, K + 1)
    assert out["pred_masks"].shape == (2, 5, 16, 24)
    assert len(out["aux_outputs"]) == 4
    assert not hasattr(m, "classifier") and not hasattr(segmenter("per_pixel"), "predictor")
    with pytest.raises(ValueError, match="outputs must be the mask2former head's dict"):
        m.loss(torch.randn(2, K, 16, 24), torch.zeros(2, 64, 96, dtype=torch.int64))


@pytest.mark.parametrize("decoder", ["deformable", "fpn"])
def test_gradient_reaches_every_trainable_parameter(decoder):
    m = segmenter(decoder=decoder).train()
    # After one step, as for the per-pixel head (the pixel decoder's zero-initialised
    # attention cuts its level embedding off at first).
    train_on_scene(m, torch.optim.SGD, steps=2, lr=0.01)
    no_grad = [
        n
        for n, p in m.named_parameters()
        if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)
    ]
    assert no_grad == [], no_grad
    # The FPN baseline has one level: one level embedding in the head too.
    assert m.predictor.level_embed.weight.shape[0] == (1 if decoder == "fpn" else 3)


def test_a_few_steps_lower_the_loss():
    # The FPN pixel decoder: the head and its loss learn, in a fraction of the time.
    m = segmenter(decoder="fpn").train()
    losses = train_on_scene(m, torch.optim.AdamW, steps=10, lr=1e-3)
    assert losses[-1] < 0.5 * losses[0], losses


def test_config_defaults_and_errors():
    config = SegmenterConfig()
    assert (config.head, config.num_queries, config.dec_layers) == ("per_pixel", 100, 9)
    assert config.dec_dim_feedforward == 2048
    tiny = SegmenterConfig.tiny(K, head="mask2former")
    assert (tiny.num_queries, tiny.dec_layers) == (16, 3)
    base = dataclasses.asdict(tiny)
    with pytest.raises(UsageError, match=r"head must be one of \('per_pixel', 'mask2former'\)"):
        SegmenterConfig(**{**base, "head": "maskformer"})
    for name in ("num_queries", "dec_layers", "dec_dim_feedforward"):
        with pytest.raises(UsageError, match=rf"{name} must be a positive integer, got 0"):
            SegmenterConfig(**{**base, name: 0})


def test_an_old_per_pixel_checkpoint_loads(tmp_path):
    from msdeformattn.train.segmentation_loop import load_segmenter

    old = segmenter("per_pixel").eval()
    config = dataclasses.asdict(old.config)
    for name in ("head", "num_queries", "dec_layers", "dec_dim_feedforward"):
        del config[name]  # written before the head existed
    path = tmp_path / "old.pt"
    torch.save({"task": "segmentation", "config": config, "model": old.state_dict()}, path)
    loaded = load_segmenter(path)
    assert loaded.config.head == "per_pixel"
    images = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(loaded(images), old(images))

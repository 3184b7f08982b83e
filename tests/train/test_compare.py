"""The dense baseline trains through the same loop; the comparison plot is drawn from logs."""

from __future__ import annotations

import json

import pytest
import torch

from msdeformattn.models import DeformableDETRConfig, build_model
from msdeformattn.models.checkpoint import load_checkpoint
from msdeformattn.nn.dense import DenseDecoderLayer, DenseEncoderLayer, DenseTransformer
from msdeformattn.train.config import TrainConfig
from msdeformattn.train.loop import train
from msdeformattn.train.plots import plot_curves
from msdeformattn.train.synthetic import generate


def test_dense_detector_uses_ordinary_attention_and_masks_padding():
    torch.manual_seed(0)
    model = build_model(DeformableDETRConfig.tiny(attention="dense")).eval()
    assert isinstance(model.transformer, DenseTransformer)
    assert isinstance(model.transformer.encoder.layers[0], DenseEncoderLayer)
    assert isinstance(model.transformer.decoder.layers[0], DenseDecoderLayer)
    images = torch.randn(1, 3, 64, 64)
    mask = torch.zeros(1, 64, 64, dtype=torch.bool)
    out = model(images, mask)
    assert out["pred_logits"].shape == (1, 30, 4)
    # Padding is masked: what lies under it changes nothing.
    padded = torch.cat([images, torch.randn(1, 3, 64, 32)], -1)
    pad_mask = torch.cat([mask, torch.ones(1, 64, 32, dtype=torch.bool)], -1)
    noisy = padded.clone()
    noisy[..., 64:] = 10 * torch.randn(1, 3, 64, 32)
    torch.testing.assert_close(model(padded, pad_mask)["pred_boxes"],
                               model(noisy, pad_mask)["pred_boxes"])  # fmt: skip
    with pytest.raises(ValueError, match="attention must be one of \\('deformable', 'dense'\\)"):
        build_model(DeformableDETRConfig.tiny(attention="sparse"))
    with pytest.raises(ValueError, match="two_stage runs on deformable attention only"):
        DeformableDETRConfig.tiny(attention="dense", with_box_refine=True, two_stage=True)


def test_dense_baseline_trains_and_the_plot_is_written(tmp_path):
    data = generate(tmp_path / "data", num_train=4, num_val=2, seed=5)
    logs = {}
    for attention in ("deformable", "dense"):
        run = tmp_path / attention
        config = DeformableDETRConfig.tiny(attention=attention)
        train(
            data,
            run,
            config,
            TrainConfig(batch_size=2, epochs=2, eval_every=1, image_size=64, augmentation="simple"),
            progress=False,
        )
        logs[attention] = run / "log.jsonl"
        rows = [json.loads(x) for x in logs[attention].read_text().splitlines()]
        assert len(rows) == 2 and all("AP" in r for r in rows)
        # Each run trained its own kind of attention, and training moved its weights.
        model = load_checkpoint(run / "last.pt")
        assert model.config.attention == attention
        layer = model.transformer.encoder.layers[0]
        assert isinstance(layer, DenseEncoderLayer) == (attention == "dense")
        torch.manual_seed(0)
        fresh = build_model(config)
        assert not torch.equal(fresh.class_embed[0].weight, model.class_embed[0].weight)
    plot_curves(logs, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"

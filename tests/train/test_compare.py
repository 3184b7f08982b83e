"""The dense baseline trains through the same loop; the comparison plot is drawn from logs."""

from __future__ import annotations

import json

import pytest
import torch

from msdeformattn.models import DeformableDETRConfig, build_model
from msdeformattn.nn.dense import DenseDecoderLayer, DenseEncoderLayer
from msdeformattn.train.config import TrainConfig
from msdeformattn.train.loop import train
from msdeformattn.train.plots import plot_curves
from msdeformattn.train.synthetic import generate


def test_dense_detector_uses_ordinary_attention_and_masks_padding():
    torch.manual_seed(0)
    model = build_model(DeformableDETRConfig.tiny(attention="dense")).eval()
    assert isinstance(model.transformer.encoder.layers[0], DenseEncoderLayer)
    assert isinstance(model.transformer.decoder.layers[0], DenseDecoderLayer)
    images = torch.randn(1, 3, 64, 64)
    mask = torch.zeros(1, 64, 64, dtype=torch.bool)
    out = model(images, mask)
    assert out["pred_logits"].shape == (1, 30, 4)
    with pytest.raises(ValueError, match="attention must be one of \\('deformable', 'dense'\\)"):
        build_model(DeformableDETRConfig.tiny(attention="sparse"))


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
    plot_curves(logs, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"

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

from ..conftest import user_error


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


def test_segmentation_compare_trains_both_decoders_and_a_rerun_keeps_them(tmp_path, capsys):
    from msdeformattn.cli import main
    from msdeformattn.train.segmentation_data import generate_segmentation
    from msdeformattn.train.segmentation_loop import load_segmenter

    out = tmp_path / "cmp"
    # Small data where compare looks for it; otherwise it generates the demo's 2000 images.
    generate_segmentation(out / "data", num_train=4, num_val=2, seed=3, size=64)
    main(["compare", "--task", "segmentation", "-o", str(out), "--minutes", "0.01"])
    printed = capsys.readouterr().out
    assert "deformable_vs_fpn.png" in printed
    results = json.loads((out / "comparison.json").read_text())
    assert set(results) == {"deformable", "fpn"}
    for decoder, metrics in results.items():
        assert 0 <= metrics["mIoU"] <= 1 and 0 <= metrics["pixel_accuracy"] <= 1
        model = load_segmenter(out / decoder / "last.pt")
        assert model.config.decoder == decoder
        rows = [json.loads(x) for x in (out / decoder / "log.jsonl").read_text().splitlines()]
        assert rows and all(r.get("mIoU") is not None for r in rows)  # every epoch evaluated
    assert (out / "deformable_vs_fpn.png").read_bytes()[:4] == b"\x89PNG"
    before = (out / "fpn" / "last.pt").read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "--task", "segmentation", "-o", str(out), "--minutes", "0.01"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a run" in err[0], err
    assert (out / "fpn" / "last.pt").read_bytes() == before


def test_compare_refuses_a_budget_before_generating_anything(tmp_path, capsys):
    from msdeformattn.train.compare import compare

    with pytest.raises(ValueError, match="minutes must be > 0, got 0"):
        compare(tmp_path / "api", minutes=0, task="segmentation")
    line = user_error(["compare", "--task", "segmentation", "-o", str(tmp_path / "cli"),
                       "--minutes", "-1"], capsys)  # fmt: skip
    assert "--minutes" in line and "must be > 0" in line
    assert not (tmp_path / "api").exists() and not (tmp_path / "cli").exists()

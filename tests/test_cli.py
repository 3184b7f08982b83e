"""The command line: export a checkpoint, run the export elsewhere."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from msdeformattn.cli import main
from msdeformattn.models import DeformableDETRConfig, build_model
from msdeformattn.models.checkpoint import load_checkpoint, save_checkpoint


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    config = DeformableDETRConfig.tiny(num_classes=3)
    model = build_model(config)
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, config, epoch=7)
    return path


def test_checkpoint_round_trip(checkpoint):
    model, config, extra = load_checkpoint(checkpoint)
    assert config == DeformableDETRConfig.tiny(num_classes=3)
    assert extra == {"epoch": 7}
    torch.manual_seed(0)
    fresh = build_model(config)
    for k, v in fresh.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v)


def test_export_torch_program(checkpoint, tmp_path, capsys):
    out = tmp_path / "model.pt2"
    main(
        ["export", str(checkpoint), "--torch-export", "-o", str(out), "--image-size", "128", "128"]
    )
    assert "wrote" in capsys.readouterr().out
    program = torch.export.load(out).module()
    model, _, _ = load_checkpoint(checkpoint)
    images = torch.randn(1, 3, 96, 160)
    mask = torch.zeros(1, 96, 160, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(
            program(images, mask)["pred_boxes"], model(images, mask)["pred_boxes"]
        )


def test_export_onnx(checkpoint, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "model.onnx"
    main(["export", str(checkpoint), "--onnx", "-o", str(out), "--image-size", "128", "128"])
    session = ort.InferenceSession(str(out))
    assert [o.name for o in session.get_outputs()][:2] == ["pred_logits", "pred_boxes"]
    model, _, _ = load_checkpoint(checkpoint)
    images = torch.randn(2, 3, 160, 96)
    mask = torch.zeros(2, 160, 96, dtype=torch.bool)
    logits = session.run(["pred_logits"], {"images": images.numpy(), "mask": mask.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(
            logits, model(images, mask)["pred_logits"].numpy(), atol=1e-4, rtol=1e-4
        )


def test_bench_subcommand(capsys):
    main(["bench", "--cases", "small", "--no-memory", "--min-run-time", "0.01"])
    assert "| small | peer:grid_sample |" in capsys.readouterr().out


def test_load_rejects_foreign_files(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ValueError, match="not an msdeformattn checkpoint"):
        load_checkpoint(path)


def test_train_evaluate_visualize_predict(tmp_path, capsys):
    import json

    from msdeformattn.train.synthetic import generate

    data = generate(tmp_path / "data", num_train=8, num_val=4, seed=0)
    run = tmp_path / "run"
    main(
        [
            "train",
            "--data",
            str(data),
            "-o",
            str(run),
            "--epochs",
            "1",
            "--batch-size",
            "4",
            "--image-size",
            "64",
        ]
    )
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{") :])["AP50"] >= 0
    assert (run / "checkpoint.pt").exists() and (run / "metrics.json").exists()
    main(["evaluate", str(run / "checkpoint.pt"), "--data", str(data), "--image-size", "64"])
    assert '"AP50"' in capsys.readouterr().out
    main(
        [
            "visualize",
            str(run / "checkpoint.pt"),
            "--data",
            str(data),
            "-o",
            str(tmp_path / "vis"),
            "--image-size",
            "64",
        ]
    )
    for name in ("detections.png", "sampling_points.png"):
        assert (tmp_path / "vis" / name).read_bytes()[:4] == b"\x89PNG"
    main(
        [
            "predict",
            str(run / "checkpoint.pt"),
            str(data / "val" / "000000.png"),
            "-o",
            str(tmp_path / "pred"),
        ]
    )
    assert (tmp_path / "pred" / "000000_detections.png").exists()


def test_demo_end_to_end_on_a_small_budget(tmp_path, capsys):
    import json

    out = tmp_path / "demo"
    main(["demo", "-o", str(out), "--minutes", "0.02", "--train-images", "16", "--val-images", "4"])
    printed = capsys.readouterr().out
    assert "AP" in printed and "wrote" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"AP", "AP50", "AP75", "APs", "APm", "APl"} <= set(metrics)
    for name in ("detections.png", "sampling_points.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"

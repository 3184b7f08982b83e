"""The command line: export a checkpoint, run the export elsewhere."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from msdeformattn.cli import main
from msdeformattn.models import DeformableDETRConfig, build_model, post_process
from msdeformattn.models.checkpoint import load_checkpoint, save_checkpoint
from msdeformattn.models.deformable_detr import pad_to_stride

from .conftest import user_error


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    config = DeformableDETRConfig.tiny(num_classes=3)
    model = build_model(config)
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, config, epoch=7)
    return path


def test_checkpoint_round_trip(checkpoint):
    model, extra = load_checkpoint(checkpoint, output_extra=True)
    config = model.config
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
    model = load_checkpoint(checkpoint)
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
    assert [o.name for o in session.get_outputs()] == ["pred_logits", "pred_boxes"]
    model = load_checkpoint(checkpoint)
    # 160x213: what predict makes of a 4:3 image; the graph pads it to 160x224.
    images = torch.randn(2, 3, 160, 213)
    mask = torch.zeros(2, 160, 213, dtype=torch.bool)
    logits = session.run(["pred_logits"], {"images": images.numpy(), "mask": mask.numpy()})[0]
    with torch.no_grad():
        expected = model(*pad_to_stride(images, mask, 32))["pred_logits"]
    np.testing.assert_allclose(logits, expected.numpy(), atol=1e-4, rtol=1e-4)


def test_export_refuses_a_size_below_the_model_minimum(checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(checkpoint), "--onnx", "-o", str(tmp_path / "m.onnx"),
              "--image-size", "40", "128"])  # fmt: skip
    assert exit_info.value.code == 2
    assert "--image-size: each side must be at least 65" in capsys.readouterr().err


def test_bench_subcommand(capsys):
    main(["bench", "--cases", "small", "--no-memory", "--min-run-time", "0.01"])
    assert "| small | peer:grid_sample |" in capsys.readouterr().out


def test_load_rejects_foreign_files(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ValueError, match="not an msdeformattn checkpoint"):
        load_checkpoint(path)


@pytest.mark.slow
def test_train_evaluate_visualize_predict(tmp_path, capsys):
    import json

    from msdeformattn.train.synthetic import CLASSES, generate

    data = generate(tmp_path / "data", num_train=8, num_val=4, seed=0)
    run = tmp_path / "run"
    main(["train", "--data", str(data), "-o", str(run), "--epochs", "1", "--batch-size", "4",
          "--image-size", "64", "--device", "cpu"])  # fmt: skip
    out = capsys.readouterr().out
    assert "epoch 1/1" in out
    assert (run / "last.pt").exists() and (run / "best.pt").exists()
    assert json.loads(out[out.index("{") :]) == json.loads((run / "metrics.json").read_text())
    # No flags needed to match training: image size and categories come from the checkpoint.
    main(["evaluate", str(run / "best.pt"), "--data", str(data)])
    metrics = json.loads(capsys.readouterr().out)
    assert metrics == json.loads((run / "metrics.json").read_text())
    main(["visualize", str(run / "last.pt"), "--data", str(data), "-o", str(tmp_path / "vis")])
    for name in ("detections.png", "sampling_points.png"):
        assert (tmp_path / "vis" / name).read_bytes()[:4] == b"\x89PNG"
    image = data / "val" / "000000.png"
    main(["predict", str(run / "last.pt"), str(image), "-o", str(tmp_path / "pred"),
          "--threshold", "0"])  # fmt: skip
    assert (tmp_path / "pred" / "000000_detections.png").exists()
    found = json.loads((tmp_path / "pred" / "detections.json").read_text())
    assert found and {d["category_name"] for d in found} <= set(CLASSES)
    # Boxes in the original image's pixels (160 px), not the 64 px the model saw.
    model = load_checkpoint(run / "last.pt")
    pixels = torch.from_numpy(np.asarray(Image.open(image).convert("RGB"), dtype=np.float32) / 255)
    small = torch.nn.functional.interpolate(
        pixels.permute(2, 0, 1)[None], size=(64, 64), mode="bilinear", antialias=True
    )
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    with torch.no_grad():
        out = model((small - mean.view(3, 1, 1)) / std.view(3, 1, 1))
    (best,) = post_process(out, torch.tensor([[160, 160]]), top_k=1)
    x0, y0, x1, y1 = best["boxes"][0].tolist()
    assert found[0]["bbox"] == pytest.approx([x0, y0, x1 - x0, y1 - y0], abs=0.05)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["train", "--data", "{tmp}/nowhere", "-o", "{tmp}/run"],
            "--data: .*nowhere.* does not exist",
        ),
        (
            ["train", "--data", "{data}", "-o", "{tmp}/run", "--batch-size", "0"],
            "--batch-size: .*must be > 0",
        ),
        (
            ["train", "--data", "{data}", "-o", "{tmp}/run", "--minutes", "-1"],
            "--minutes: .*must be > 0",
        ),
        (
            ["train", "--data", "{data}", "-o", "{tmp}/run", "--resume"],
            "--resume: .* nothing to resume",
        ),
        (
            ["train", "--data", "{data}", "-o", "{tmp}/run", "--device", "cuda:7"]
            if not torch.cuda.is_available()
            else ["train", "--data", "{data}", "-o", "{tmp}/run", "--device", "tpu"],
            "--device",
        ),
        (
            ["train", "--data", "{data}", "-o", "{tmp}/run", "--config", "{tmp}/bad.json"],
            "bad.json: unknown TrainConfig fields \\['learning_rate'\\]",
        ),
        (
            ["evaluate", "{tmp}/missing.pt", "--data", "{data}"],
            "checkpoint: .*missing.pt does not exist",
        ),
        (
            ["train", "--data", "{data}", "-o", "{tmp}/run", "--resume", "--lr", "0.1"],
            "--resume continues the run as configured: drop --lr",
        ),
        (
            ["train", "--data", "{data}", "-o", "{tmp}/run", "--model-config", "{tmp}/two.json"],
            "two_stage needs with_box_refine",
        ),
        (
            ["train", "--data", "{data}", "-o", "{tmp}/run", "--epochs", "0"],
            "--epochs: .*must be > 0",
        ),
        (["train", "--data", "{data}", "-o", "{tmp}/run", "--lr", "0"], "--lr: .*must be > 0"),
        (
            ["train", "--data", "{tmp}/badjson", "-o", "{tmp}/run"],
            "malformed JSON .*instances_val.json:1:2",
        ),
        (
            ["train", "--data", "{data}", "-o", "{tmp}/old"],
            "--output .*old already holds a run \\(last.pt\\)",
        ),
        (["evaluate", "{tmp}/corrupt.pt", "--data", "{data}"], "checkpoint: .*corrupt.pt"),
        (
            ["evaluate", "{tmp}/foreign.pt", "--data", "{data}"],
            "checkpoint: .*not an msdeformattn checkpoint",
        ),
        (
            ["evaluate", "{tmp}/three.pt", "--data", "{data}"],
            "the checkpoint has 3 classes, the dataset 4 categories",
        ),
        (["predict", "{tmp}/three.pt", "{tmp}/bad.json", "-o", "{tmp}/p"], "bad.json is not"),
        (
            ["train", "--data", "{data}", "-o", "{tmp}/old", "--resume"],
            "--resume: .*old/last.pt is not a training run's last.pt",
        ),
    ],
    ids=[
        "data",
        "batch-size",
        "minutes",
        "resume",
        "device",
        "config",
        "checkpoint",
        "resume-flags",
        "two-stage",
        "epochs",
        "lr",
        "annotation-json",
        "output-holds-a-run",
        "corrupt-checkpoint",
        "foreign-checkpoint",
        "class-count",
        "image",
        "resume-corrupt-last",
    ],
)
def test_user_mistakes_are_one_line_and_exit_2(tmp_path, capsys, args, message):
    import re

    from msdeformattn.train.synthetic import generate

    data = generate(tmp_path / "data", num_train=2, num_val=1, seed=0)
    (tmp_path / "bad.json").write_text('{"learning_rate": 1}')
    (tmp_path / "two.json").write_text('{"two_stage": true}')
    (tmp_path / "corrupt.pt").write_bytes(b"PK\x03\x04 truncated")
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    save_checkpoint(tmp_path / "three.pt", build_model(DeformableDETRConfig.tiny(3)),
                    DeformableDETRConfig.tiny(3))  # fmt: skip
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "last.pt").write_bytes(b"an earlier run")
    import shutil

    shutil.copytree(data, tmp_path / "badjson")
    (tmp_path / "badjson/annotations/instances_val.json").write_text("{,}")
    line = user_error([a.format(tmp=tmp_path, data=data) for a in args], capsys)
    assert re.search(message, line), line
    assert not (tmp_path / "run" / "last.pt").exists()
    assert (tmp_path / "old" / "last.pt").read_bytes() == b"an earlier run"


@pytest.mark.slow
def test_demo_end_to_end_on_a_small_budget_and_a_rerun_keeps_the_first(tmp_path, capsys):
    import json

    out = tmp_path / "demo"
    argv = [
        "demo",
        "-o",
        str(out),
        "--minutes",
        "0.02",
        "--train-images",
        "16",
        "--val-images",
        "4",
    ]
    main(argv)
    printed = capsys.readouterr().out
    assert "AP" in printed and "wrote" in printed
    metrics = json.loads((out / "run" / "metrics.json").read_text())
    assert {"AP", "AP50", "AP75", "APs", "APm", "APl"} <= set(metrics)
    for name in ("detections.png", "sampling_points.png", "curves.png"):
        assert (out / "run" / name).read_bytes()[:4] == b"\x89PNG"
    first = (out / "run" / "last.pt").read_bytes()
    main(argv)
    assert (out / "run-2" / "last.pt").exists()
    assert (out / "run" / "last.pt").read_bytes() == first


@pytest.mark.slow
def test_fine_tune_a_save_pretrained_folder_in_one_command(tmp_path, capsys):
    pytest.importorskip("transformers")
    import json

    from msdeformattn.train.synthetic import CLASSES, generate
    from tests.models.conftest import hf_model

    hf = hf_model(num_labels=91, random_weights=False)
    hf.save_pretrained(tmp_path / "hf")
    data = generate(tmp_path / "data", num_train=4, num_val=2, seed=3)
    (tmp_path / "small.json").write_text(
        json.dumps({"augmentation": "simple", "image_size": 64, "batch_size": 4, "epochs": 1})
    )
    run = tmp_path / "run"
    main(["train", "--data", str(data), "-o", str(run), "--init", str(tmp_path / "hf"),
          "--config", str(tmp_path / "small.json")])  # fmt: skip
    printed = capsys.readouterr().out
    assert "re-initialised" in printed and "class_embed" in printed
    model, extra = load_checkpoint(run / "last.pt", output_extra=True)
    config = model.config
    assert config.num_classes == len(CLASSES) == 4
    assert extra["dataset"]["category_names"] == list(CLASSES)
    # The pretrained stem stays frozen while fine-tuning: still the folder's weights.
    torch.testing.assert_close(
        model.backbone[0].body.conv1.weight,
        hf.state_dict()["model.backbone.model.embedder.embedder.convolution.weight"],
    )


@pytest.mark.slow
def test_backbone_weights_flag_loads_a_torchvision_state_dict(tmp_path, capsys):
    from msdeformattn.train.synthetic import CLASSES, generate

    data = generate(tmp_path / "data", num_train=4, num_val=2, seed=3)
    torch.manual_seed(5)  # weights unlike the run's own seeded initialisation
    body = build_model(DeformableDETRConfig.tiny(num_classes=len(CLASSES))).backbone[0].body
    state = dict(body.state_dict())
    state["fc.weight"] = torch.zeros(10, 256)
    torch.save(state, tmp_path / "resnet.pth")
    main(["train", "--data", str(data), "-o", str(tmp_path / "run"), "--epochs", "1",
          "--batch-size", "4", "--image-size", "64", "--backbone-weights",
          str(tmp_path / "resnet.pth"), "--backbone-norm", "frozen"])  # fmt: skip
    assert "backbone from" in capsys.readouterr().out
    model = load_checkpoint(tmp_path / "run" / "last.pt")
    # Frozen stem: exactly the file's weights after training.
    torch.testing.assert_close(model.backbone[0].body.conv1.weight, state["conv1.weight"])


@pytest.mark.slow
def test_resume_of_a_run_that_used_its_budget_asks_for_more(tmp_path, capsys):
    from msdeformattn.train.synthetic import generate

    data = generate(tmp_path / "data", num_train=4, num_val=2, seed=0)
    run = tmp_path / "run"
    main(["train", "--data", str(data), "-o", str(run), "--minutes", "0.0001", "--epochs", "5",
          "--batch-size", "2", "--image-size", "64"])  # fmt: skip
    before = (run / "last.pt").read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--data", str(data), "-o", str(run), "--resume"])
    assert exit_info.value.code == 2
    assert "used its budget" in capsys.readouterr().err
    assert (run / "last.pt").read_bytes() == before


def test_check_data_prints_a_table_and_exits_by_what_it_found(tmp_path, capsys):
    from tests.train.conftest import real_like

    data = real_like(tmp_path / "data")
    main(["check-data", str(data)])  # usable: returns, exit status 0
    table = capsys.readouterr().out
    assert "repaired  box clipped to its image" in table and "FATAL" not in table
    (data / "val" / "b.jpg").unlink()
    with pytest.raises(SystemExit) as exit_info:
        main(["check-data", str(data)])
    assert exit_info.value.code == 1
    assert "FATAL     missing image" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["check-data", str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2


@pytest.mark.slow
def test_train_on_real_like_data_repairs_refuses_a_rerun_and_overwrites(tmp_path, capsys):
    import json
    import shutil

    from tests.train.conftest import real_like

    data = real_like(tmp_path / "data")
    run = tmp_path / "run"
    argv = ["train", "--data", str(data), "-o", str(run), "--epochs", "1", "--batch-size", "8",
            "--image-size", "64", "--device", "cpu"]  # fmt: skip
    with pytest.warns(UserWarning, match="fewer than --batch-size 8: batches of 5"):
        main(argv)
    err = capsys.readouterr().err
    assert "repaired in" in err and "train: 1 x box clipped to its image" in err
    log = (run / "log.jsonl").read_text()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "pass --resume to continue it, --overwrite to replace it" in capsys.readouterr().err
    assert (run / "log.jsonl").read_text() == log
    with pytest.warns(UserWarning, match="batches of 5"):
        main([*argv, "--overwrite"])
    capsys.readouterr()
    assert len((run / "log.jsonl").read_text().splitlines()) == 1  # replaced, not appended
    # Categories 1, 3, 7 and the cleaned ground truth: evaluation runs and is consistent.
    main(["evaluate", str(run / "last.pt"), "--data", str(data)])
    printed = capsys.readouterr().out
    assert json.loads(printed[printed.index("{") :]) == json.loads(
        (run / "metrics.json").read_text()
    )
    # COCO results: a COCO-style file name gives its number as image_id, boxes in pixels.
    shutil.copy(data / "val" / "a.jpg", tmp_path / "000000000042.jpg")
    main(["predict", str(run / "last.pt"), str(tmp_path / "000000000042.jpg"),
          str(data / "val" / "b.jpg"), "-o", str(tmp_path / "pred"), "--threshold", "0"])  # fmt: skip
    found = json.loads((tmp_path / "pred" / "detections.json").read_text())
    assert {d["image_id"] for d in found} == {42, 2}
    assert {d["category_id"] for d in found} <= {1, 3, 7}
    for d in found:
        x, y, w, h = d["bbox"]
        limit = (64, 48) if d["image_id"] == 42 else (40, 72)
        assert x >= -0.01 and x + w <= limit[0] + 0.01 and y + h <= limit[1] + 0.01


def test_training_refuses_fatal_data_naming_the_file(tmp_path, capsys):
    from tests.train.conftest import real_like

    data = real_like(tmp_path / "data")
    (data / "train" / "b.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--data", str(data), "-o", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "train: unreadable image (train/b.jpg: not an image" in line
    assert not (tmp_path / "run").exists()


def test_debug_variable_shows_the_traceback_of_a_user_error(tmp_path, monkeypatch):
    from msdeformattn.util.errors import UsageError

    monkeypatch.setenv("MSDEFORMATTN_DEBUG", "1")
    with pytest.raises(UsageError, match="does not exist"):
        main(["check-data", str(tmp_path / "nowhere")])


def test_an_error_from_a_loader_worker_is_its_last_line():
    from msdeformattn.cli import _one_line
    from msdeformattn.util.errors import UsageError

    error = UsageError(
        "Caught UsageError in DataLoader worker process 0.\nOriginal Traceback (most recent "
        'call last):\n  File "x.py", line 1\nmsdeformattn.util.errors.UsageError: '
        "data/train/a.jpg: not a readable image (truncated)\n"
    )
    assert _one_line(error) == "data/train/a.jpg: not a readable image (truncated)"


# Semantic segmentation: --task segmentation on train, evaluate, predict and demo.


def _segmentation_checkpoint(path, num_classes: int) -> None:
    """A segmentation checkpoint as training writes one, untrained, for the error tests."""
    import dataclasses

    from msdeformattn.models import DeformableSegmenter, SegmenterConfig

    config = SegmenterConfig.tiny(num_classes)
    torch.save(
        {"task": "segmentation", "config": dataclasses.asdict(config),
         "model": DeformableSegmenter(config).state_dict(),
         "class_names": [str(k) for k in range(num_classes)], "image_size": 64},
        path,
    )  # fmt: skip


@pytest.mark.slow
def test_segmentation_train_evaluate_predict(tmp_path, capsys):
    import json

    from msdeformattn.train.segmentation_data import generate_segmentation

    data = generate_segmentation(tmp_path / "data", num_train=8, num_val=4, seed=0, size=96)
    run = tmp_path / "run"
    main(["train", "--task", "segmentation", "--data", str(data), "-o", str(run),
          "--minutes", "0.05", "--epochs", "2", "--batch-size", "4", "--image-size", "48",
          "--lr", "1e-3", "--seed", "1", "--device", "cpu"])  # fmt: skip
    out = capsys.readouterr().out
    metrics = json.loads((run / "metrics.json").read_text())
    assert json.loads(out[out.index("{") :]) == metrics
    assert {"mIoU", "pixel_accuracy", "IoU/background", "IoU/ring"} <= set(metrics)
    # No flags needed to match training: image size and classes come from the checkpoint.
    main(["evaluate", "--task", "segmentation", str(run / "last.pt"), "--data", str(data)])
    assert json.loads(capsys.readouterr().out) == pytest.approx(metrics, abs=1e-9)
    image = data / "images" / "val" / "000001.png"
    main(["predict", "--task", "segmentation", str(run / "last.pt"), str(image),
          "-o", str(tmp_path / "pred")])  # fmt: skip
    assert "wrote" in capsys.readouterr().out
    # At the original resolution (96 px), not the 48 px the model saw.
    picture = Image.open(tmp_path / "pred" / "000001_segmentation.png")
    labels = np.asarray(Image.open(tmp_path / "pred" / "000001_labels.png"))
    assert picture.size == (96, 96) and picture.mode == "RGB"
    assert labels.shape == (96, 96) and labels.max() < 5
    main(["visualize", "--task", "segmentation", str(run / "last.pt"), "--data", str(data),
          "-o", str(tmp_path / "vis"), "--count", "3"])  # fmt: skip
    assert "predictions.png" in capsys.readouterr().out
    # Three rows of image | ground truth | prediction, each 96 px high at least.
    drawn = Image.open(tmp_path / "vis" / "predictions.png")
    assert drawn.height >= 3 * 96 and drawn.width > drawn.height / 3 * 2
    # A rerun into the same folder is refused; --overwrite replaces the run.
    argv = ["train", "--task", "segmentation", "--data", str(data), "-o", str(run),
            "--epochs", "1", "--batch-size", "4", "--image-size", "48"]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "already holds a run" in capsys.readouterr().err
    main([*argv, "--overwrite"])
    assert len((run / "log.jsonl").read_text().splitlines()) == 1


@pytest.mark.slow
def test_segmentation_demo_on_a_small_budget(tmp_path, capsys):
    import json

    out = tmp_path / "demo"
    main(["demo", "--task", "segmentation", "-o", str(out), "--minutes", "0.05",
          "--train-images", "8", "--val-images", "3", "--device", "cpu"])  # fmt: skip
    printed = capsys.readouterr().out
    assert "mIoU" in printed and "wrote" in printed
    metrics = json.loads((out / "run" / "metrics.json").read_text())
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert all(v is None or 0 <= v <= 1 for v in metrics.values())
    for name in ("predictions.png", "curves.png"):
        assert (out / "run" / name).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["train", "--task", "segmentation", "--data", "{tmp}/nowhere", "-o", "{tmp}/run"],
            "--data: .*nowhere does not exist",
        ),
        (
            ["train", "--task", "segmentation", "--data", "{data}", "-o", "{tmp}/run",
             "--init", "{tmp}/x.pt"],
            "--task segmentation does not take --init \\(detection only\\)",
        ),
        (
            ["train", "--task", "segmentation", "--data", "{data}", "-o", "{tmp}/run",
             "--batch-size", "0"],
            "--batch-size: .*must be > 0",
        ),
        (
            ["train", "--task", "segmentation", "--data", "{data}", "-o", "{tmp}/run",
             "--ema-decay", "1.5"],
            "--ema-decay",
        ),
        (
            ["train", "--task", "segmentation", "--data", "{data}", "-o", "{tmp}/old"],
            "--output .*old already holds a run \\(last.pt\\)",
        ),
        (["train", "--task", "panoptic", "--data", "{data}", "-o", "{tmp}/run"], "--task: invalid"),
        (
            ["evaluate", "--task", "segmentation", "{tmp}/missing.pt", "--data", "{data}"],
            "checkpoint: .*missing.pt does not exist",
        ),
        (
            ["evaluate", "--task", "segmentation", "{tmp}/detector.pt", "--data", "{data}"],
            "checkpoint: .*detector.pt is not an msdeformattn segmentation checkpoint",
        ),
        (
            ["evaluate", "--task", "segmentation", "{tmp}/corrupt.pt", "--data", "{data}"],
            "checkpoint: .*corrupt.pt is not",
        ),
        (
            ["evaluate", "--task", "segmentation", "{tmp}/three.pt", "--data", "{data}"],
            "the checkpoint has 3 classes, the dataset 5",
        ),
        (
            ["evaluate", "--task", "segmentation", "{tmp}/three.pt", "--data", "{tmp}/nowhere"],
            "--data: .*nowhere does not exist",
        ),
        (
            ["predict", "--task", "segmentation", "{tmp}/three.pt", "{tmp}/bad.json",
             "-o", "{tmp}/p"],
            "images: .*bad.json is not a readable image",
        ),
        (
            ["predict", "--task", "segmentation", "{tmp}/three.pt", "{tmp}/none.png",
             "-o", "{tmp}/p"],
            "images: .*none.png does not exist",
        ),
        (
            ["train", "--task", "segmentation", "--data", "{data}", "-o", "{tmp}/run",
             "--resume"],
            "--resume: .*run.last.pt does not exist, nothing to resume",
        ),
        (
            ["train", "--task", "segmentation", "--data", "{data}", "-o", "{tmp}/run",
             "--resume", "--lr", "0.1"],
            "--resume continues the run as configured: drop --lr",
        ),
        (
            ["train", "--task", "segmentation", "--data", "{data}", "-o", "{tmp}/old",
             "--resume", "--overwrite"],
            "--resume continues a run, --overwrite replaces it: pass one",
        ),
    ],
    ids=[
        "data",
        "detection-flag",
        "batch-size",
        "ema",
        "output-holds-a-run",
        "task",
        "checkpoint",
        "detection-checkpoint",
        "corrupt-checkpoint",
        "class-count",
        "evaluate-data",
        "image",
        "missing-image",
        "resume",
        "resume-flags",
        "resume-and-overwrite",
    ],
)  # fmt: skip
def test_segmentation_mistakes_are_one_line_and_exit_2(tmp_path, capsys, args, message):
    import re

    from msdeformattn.train.segmentation_data import generate_segmentation

    data = generate_segmentation(tmp_path / "data", num_train=2, num_val=1, seed=0, size=96)
    (tmp_path / "bad.json").write_text("{}")
    (tmp_path / "corrupt.pt").write_bytes(b"PK\x03\x04 truncated")
    config = DeformableDETRConfig.tiny(3)
    save_checkpoint(tmp_path / "detector.pt", build_model(config), config)
    _segmentation_checkpoint(tmp_path / "three.pt", 3)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "last.pt").write_bytes(b"an earlier run")
    line = user_error([a.format(tmp=tmp_path, data=data) for a in args], capsys)
    assert re.search(message, line), line
    assert not (tmp_path / "run").exists()
    assert (tmp_path / "old" / "last.pt").read_bytes() == b"an earlier run"


def test_resuming_a_run_of_the_other_task_is_one_line_and_exit_2(tmp_path, capsys):
    import dataclasses

    from msdeformattn.train.config import TrainConfig
    from msdeformattn.train.segmentation_data import generate_segmentation

    data = generate_segmentation(tmp_path / "data", num_train=2, num_val=1, seed=0, size=96)
    (tmp_path / "det").mkdir()
    # What --resume reads first of a detection run's last.pt (which has no task entry).
    saved = {"train_config": dataclasses.asdict(TrainConfig()), "epoch": 0, "elapsed": 1.0}
    torch.save(saved, tmp_path / "det" / "last.pt")
    line = user_error(["train", "--task", "segmentation", "--data", str(data), "-o",
                       str(tmp_path / "det"), "--resume"], capsys)  # fmt: skip
    assert "last.pt is a detection run; resume it with --task detection" in line
    assert sorted(p.name for p in (tmp_path / "det").iterdir()) == ["last.pt"]


@pytest.mark.slow
def test_segmentation_resume_continues_to_the_new_total(tmp_path, capsys):
    import json

    from msdeformattn.train.segmentation_data import generate_segmentation

    data = generate_segmentation(tmp_path / "data", num_train=4, num_val=2, seed=0, size=96)
    run = tmp_path / "run"
    main(["train", "--task", "segmentation", "--data", str(data), "-o", str(run),
          "--epochs", "1", "--batch-size", "4", "--image-size", "48", "--device", "cpu"])  # fmt: skip
    capsys.readouterr()
    resume = ["train", "--task", "segmentation", "--data", str(data), "-o", str(run), "--resume"]
    with pytest.raises(SystemExit) as exit_info:
        main(resume)
    assert exit_info.value.code == 2
    assert "the run finished its 1 epochs" in capsys.readouterr().err
    main([*resume, "--epochs", "2"])
    assert "epoch 2/2" in capsys.readouterr().out
    epochs = [json.loads(x)["epoch"] for x in (run / "log.jsonl").read_text().splitlines()]
    assert epochs == [0, 1]

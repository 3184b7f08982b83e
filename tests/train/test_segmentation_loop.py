"""The segmentation run end to end on a few synthetic images: files, metrics, best.pt by
mIoU, exact resume, refusals, the checkpoint loader and the pictures."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch

from msdeformattn.models import DeformableDETRConfig, DeformableSegmenter, SegmenterConfig
from msdeformattn.models.checkpoint import save_checkpoint
from msdeformattn.models.deformable_detr import build_model
from msdeformattn.train import run as run_module
from msdeformattn.train import segmentation_loop
from msdeformattn.train.config import SEGMENTATION_PRESETS
from msdeformattn.train.plots import headline_of
from msdeformattn.train.segmentation_data import generate_segmentation
from msdeformattn.train.segmentation_loop import (
    evaluate_segmenter,
    load_segmenter,
    segment_image,
    segmentation_eval_transform,
    segmentation_val_loader,
    train_one_epoch_segmenter,
    train_segmenter,
)
from msdeformattn.train.segmentation_visualize import PALETTE, colorize, overlay
from msdeformattn.util.errors import UsageError
from tests.train.conftest import assert_same_training

TINY = replace(
    SEGMENTATION_PRESETS["tiny"].train,
    batch_size=4,
    epochs=2,
    eval_every=1,
    image_size=64,
    num_workers=0,
    warmup_steps=2,
)
NAMES = ["background", "rectangle", "ellipse", "triangle", "ring"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return generate_segmentation(
        tmp_path_factory.mktemp("segdata"), num_train=8, num_val=4, seed=1, size=96
    )


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("segrun") / "run"
    return out, train_segmenter(data, out, cfg=TINY, device="cpu", progress=False)


def test_a_run_writes_its_files_and_metrics_in_0_1(run):
    out, metrics = run
    for name in ("last.pt", "best.pt", "log.jsonl", "metrics.json", "curves.png"):
        assert (out / name).exists(), name
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(out.glob("*.tmp"))
    assert set(metrics) == {"mIoU", "pixel_accuracy", *(f"IoU/{n}" for n in NAMES)}
    assert all(v is None or 0.0 <= v <= 1.0 for v in metrics.values())
    assert metrics["mIoU"] is not None and metrics["pixel_accuracy"] is not None
    assert json.loads((out / "metrics.json").read_text()) == metrics
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [0, 1] and all("mIoU" in x for x in lines)
    # The log names its headline metric, which curves.png draws.
    assert headline_of(lines) == "mIoU"


def test_best_pt_holds_the_epoch_of_the_best_miou(run):
    out, _ = run
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    best_epoch = max(lines, key=lambda x: (x["mIoU"], -x["epoch"]))["epoch"]
    _, best = load_segmenter(out / "best.pt", output_extra=True)
    assert best["epoch"] == best_epoch and "optimizer" not in best
    _, last = load_segmenter(out / "last.pt", output_extra=True)
    assert last["epoch"] == 1 and last["best_miou"] == max(x["mIoU"] for x in lines)
    # What evaluate and predict need to match training, without flags.
    assert last["class_names"] == NAMES and last["image_size"] == 64
    assert {"optimizer", "scheduler", "elapsed", "train_config"} <= set(last)


def test_evaluating_last_pt_gives_the_final_metrics(run, data):
    out, metrics = run
    model, extra = load_segmenter(out / "last.pt", output_extra=True)
    assert isinstance(model, DeformableSegmenter) and not model.training
    loader = segmentation_val_loader(data, replace(TINY, batch_size=3), extra["class_names"])
    again = evaluate_segmenter(model, loader, len(NAMES), "cpu", extra["class_names"])
    assert again == pytest.approx(metrics, abs=1e-9)


# Dropout: the randomness a resume must continue (shuffle and augmentation follow the epoch).
DROPOUT = SegmenterConfig.tiny(len(NAMES), dropout=0.1)


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    train_segmenter(data, out, DROPOUT, TINY, device="cpu", progress=False)
    return out


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def _interrupt_then_resume(data, out, monkeypatch) -> None:
    """Train into ``out``, interrupted as the second epoch starts, then resume it."""
    epochs = iter([train_one_epoch_segmenter, _interrupt])
    with monkeypatch.context() as patch:
        patch.setattr(
            segmentation_loop, "train_one_epoch_segmenter", lambda *a, **k: next(epochs)(*a, **k)
        )
        with pytest.raises(KeyboardInterrupt):
            train_segmenter(data, out, DROPOUT, TINY, device="cpu", progress=False)
    _, first = load_segmenter(out / "last.pt", output_extra=True)
    assert first["epoch"] == 0
    train_segmenter(data, out, device="cpu", progress=False, resume=True)


def test_resume_after_an_interruption_continues_bit_for_bit(data, straight, tmp_path, monkeypatch):
    _interrupt_then_resume(data, tmp_path / "run", monkeypatch)
    _, extra = load_segmenter(tmp_path / "run" / "last.pt", output_extra=True)
    assert extra["epoch"] == 1
    assert_same_training(straight, tmp_path / "run")
    assert (tmp_path / "run" / "metrics.json").read_text() == (
        straight / "metrics.json"
    ).read_text()


def test_a_resume_without_the_rng_state_is_noticed(data, straight, tmp_path, monkeypatch):
    # The test above can fail: skip one piece of the restore and the runs part.
    monkeypatch.setattr(run_module, "set_rng_state", lambda state: None)
    _interrupt_then_resume(data, tmp_path / "run", monkeypatch)
    with pytest.raises(AssertionError):
        assert_same_training(straight, tmp_path / "run")


def test_resume_refuses_a_folder_without_a_run_or_with_a_detection_run(data, tmp_path):
    with pytest.raises(UsageError, match="nothing to resume"):
        train_segmenter(data, tmp_path / "run", resume=True, progress=False)
    (tmp_path / "det").mkdir()
    torch.save(
        {"epoch": 0, "train_config": {}}, tmp_path / "det" / "last.pt"
    )  # no task entry: detection's
    with pytest.raises(UsageError, match="is a detection run; resume it with --task detection"):
        train_segmenter(data, tmp_path / "det", resume=True, progress=False)


def test_a_folder_holding_a_run_is_refused_unless_overwrite(run, data):
    out, _ = run
    before = (out / "last.pt").read_bytes()
    with pytest.raises(UsageError, match="already holds a run"):
        train_segmenter(data, out, cfg=TINY, device="cpu", progress=False)
    assert (out / "last.pt").read_bytes() == before


def test_overwrite_replaces_the_run_and_the_budget_stops_it(data, tmp_path):
    out = tmp_path / "run"
    (out).mkdir()
    (out / "log.jsonl").write_text('{"epoch": 0}\n{"epoch": 1}\n')
    cfg = replace(TINY, epochs=50, minutes=1e-4)
    metrics = train_segmenter(data, out, cfg=cfg, device="cpu", progress=False, overwrite=True)
    # The budget ends the first epoch after one step; the log is new, not appended to.
    (line,) = (out / "log.jsonl").read_text().splitlines()
    assert json.loads(line)["epoch"] == 0 and json.loads(line)["mIoU"] == metrics["mIoU"]


@pytest.mark.parametrize("change", [{"ema_decay": 0.9}, {"amp": "bf16"}, {"amp": "fp16"}])
def test_ema_and_mixed_precision_train_the_segmenter(data, tmp_path, change):
    """The run loop's EMA and autocast serve segmentation as they serve detection."""
    cfg = replace(TINY, epochs=1, **change)
    metrics = train_segmenter(data, tmp_path / "run", cfg=cfg, device="cpu", progress=False)
    assert 0 <= metrics["mIoU"] <= 1
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    if "ema_decay" in change:
        # Evaluated and saved: the average; kept for a resume: the trained weights.
        key = next(k for k, v in last["model"].items() if v.is_floating_point())
        assert not torch.equal(last["model"][key], last["train_model"][key])
        assert last["ema_updates"] >= 1
    else:
        assert ("scaler" in last) == (change["amp"] == "fp16")
        assert math.isfinite(json.loads((tmp_path / "run" / "log.jsonl").read_text())["loss"])


def test_a_model_of_another_class_count_is_refused(data, tmp_path):
    with pytest.raises(UsageError, match="the model has 3 classes, the dataset 5"):
        train_segmenter(data, tmp_path / "run", SegmenterConfig.tiny(3), TINY, progress=False)


def test_load_segmenter_names_foreign_corrupt_and_detection_files(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    (tmp_path / "corrupt.pt").write_bytes(b"PK\x03\x04 truncated")
    config = DeformableDETRConfig.tiny(3)
    save_checkpoint(tmp_path / "detector.pt", build_model(config), config)
    small = SegmenterConfig.tiny(3)
    torch.save(
        {"task": "segmentation", "config": asdict(SegmenterConfig.tiny(4)),
         "model": DeformableSegmenter(small).state_dict()},
        tmp_path / "mismatch.pt",
    )  # fmt: skip
    for name, message in [
        ("foreign.pt", "is not an msdeformattn segmentation checkpoint"),
        ("corrupt.pt", "is not an msdeformattn segmentation checkpoint"),
        ("detector.pt", "a detection checkpoint"),
        ("mismatch.pt", "the weights do not fit the checkpoint's config"),
    ]:
        with pytest.raises(ValueError, match=message) as info:
            load_segmenter(tmp_path / name)
        assert name in str(info.value)


def test_segment_image_labels_the_original_resolution(run):
    out, _ = run
    model, extra = load_segmenter(out / "last.pt", output_extra=True)
    image = torch.rand(3, 50, 90)
    transform = segmentation_eval_transform(replace(TINY, image_size=extra["image_size"]))
    labels = segment_image(model, image, transform, "cpu")
    assert labels.shape == (50, 90) and labels.dtype == torch.int64
    assert int(labels.min()) >= 0 and int(labels.max()) < len(NAMES)


def test_colours_come_from_the_fixed_palette():
    labels = np.array([[0, 1, 255], [21, 2, 0]])
    colours = colorize(labels)
    assert colours.shape == (2, 3, 3) and colours.dtype == np.uint8
    assert (colours[0, 1] == PALETTE[1]).all() and (colours[1, 0] == PALETTE[1]).all()
    assert (colours[0, 2] == 255).all()
    rgb = np.full((2, 3, 3), 100, dtype=np.uint8)
    blended = overlay(rgb, labels, alpha=0.5)
    assert (blended[0, 0] == 100).all()  # the background is left as it is
    assert (blended[0, 1] == ((100 + PALETTE[1].astype(float)) / 2).round()).all()

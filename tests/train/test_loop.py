"""The training loop end to end on a few synthetic images: logs, metrics, checkpoint, resume."""

from __future__ import annotations

import json

from msdeformattn.models.checkpoint import load_checkpoint
from msdeformattn.train.loop import TrainConfig, train
from msdeformattn.train.synthetic import generate


def test_train_writes_logs_metrics_and_resumes(tmp_path):
    data = generate(tmp_path / "data", num_train=8, num_val=4, seed=1)
    out = tmp_path / "run"
    cfg = TrainConfig(batch_size=4, epochs=2, eval_every_epochs=1, image_size=64)
    metrics = train(data, out, cfg=cfg, progress=False)
    assert set(metrics) >= {"AP", "AP50", "AP75"} and 0 <= metrics["AP"] <= 1
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [0, 1] and "AP50" in lines[-1]
    assert json.loads((out / "metrics.json").read_text()) == metrics
    _, _, extra = load_checkpoint(out / "checkpoint.pt")
    assert extra["epoch"] == 1
    # Resume: one more epoch continues from the checkpoint.
    train(
        data,
        out,
        cfg=TrainConfig(batch_size=4, epochs=3, eval_every_epochs=1, image_size=64),
        resume=True,
        progress=False,
    )
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [0, 1, 2]


def test_wall_clock_budget_stops_training(tmp_path):
    data = generate(tmp_path / "data", num_train=16, num_val=2, seed=2)
    cfg = TrainConfig(batch_size=2, epochs=1000, minutes=0.002, image_size=64)
    train(data, tmp_path / "run", cfg=cfg, progress=False)
    lines = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    assert len(lines) == 1 and "AP" in json.loads(lines[0])

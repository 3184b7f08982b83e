"""The training run end to end on a few synthetic images: devices, checkpoints, exact resume."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from torch import nn

from msdeformattn.models import DeformableDETRConfig
from msdeformattn.models.checkpoint import load_checkpoint
from msdeformattn.models.postprocess import PostProcess
from msdeformattn.train import loop
from msdeformattn.train.batches import batch_for
from msdeformattn.train.config import PRESETS, TrainConfig
from msdeformattn.train.engine import evaluate, train_one_epoch
from msdeformattn.train.synthetic import CLASSES, generate
from msdeformattn.util.errors import UsageError
from tests.conftest import DEVICES

TINY = replace(
    PRESETS["tiny"].train, batch_size=4, epochs=2, eval_every=1, image_size=64, num_workers=0
)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("data"), num_train=8, num_val=4, seed=1)


@pytest.mark.parametrize("device", DEVICES)
def test_train_writes_checkpoints_logs_metrics_and_curves(data, tmp_path, device, capsys):
    out = tmp_path / "run"
    metrics = loop.train(data, out, cfg=TINY, device=device)
    # The reported metrics are those of the saved weights, evaluated afresh.
    model = load_checkpoint(out / "last.pt")
    _, val_set, _, val_loader = loop.build_loaders(data, TINY)
    again = evaluate(model.to(device), PostProcess(), val_loader, val_set, torch.device(device))
    assert set(metrics) >= {"AP", "AP50", "AP75"}
    assert again == pytest.approx(metrics, abs=1e-6)
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [0, 1] and "AP50" in lines[-1]
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    # One line per epoch on stdout beside the bar.
    assert capsys.readouterr().out.count("epoch 2/2  loss") == 1
    saved, extra = load_checkpoint(out / "last.pt", output_extra=True)
    config = saved.config
    assert extra["epoch"] == 1 and config.num_classes == len(CLASSES)
    # What evaluate and predict need to match training, without flags.
    assert extra["dataset"]["category_names"] == list(CLASSES)
    assert extra["image_size"] == 64 and extra["augmentation"] == "simple"
    _, best = load_checkpoint(out / "best.pt", output_extra=True)
    assert best["epoch"] in (0, 1) and "optimizer" not in best
    assert not list(out.glob("*.tmp"))


def test_resume_after_an_interruption_continues_bit_for_bit(data, tmp_path, monkeypatch):
    # Dropout, flips and an EMA: every piece of state a resume must restore.
    config = DeformableDETRConfig.tiny(num_classes=len(CLASSES), dropout=0.1)
    cfg = replace(TINY, ema_decay=0.9, ema_warmup_steps=3, warmup_steps=2, schedule="step")
    loop.train(data, tmp_path / "straight", config, cfg, progress=False)

    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return train_one_epoch(*args, **kwargs)

    monkeypatch.setattr(loop, "train_one_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        loop.train(data, tmp_path / "resumed", config, cfg, progress=False)
    monkeypatch.undo()
    _, first = load_checkpoint(tmp_path / "resumed" / "last.pt", output_extra=True)
    assert first["epoch"] == 0
    loop.train(data, tmp_path / "resumed", resume=True, progress=False)

    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 1
    for key in ("model", "train_model"):
        for name, tensor in a[key].items():
            assert torch.equal(b[key][name], tensor), f"{key}.{name}"
    for (k, x), y in zip(
        a["optimizer"]["state"].items(), b["optimizer"]["state"].values(), strict=True
    ):
        assert torch.equal(x["exp_avg"], y["exp_avg"]), k
    assert a["scheduler"] == b["scheduler"]
    logs = [
        (tmp_path / run / "log.jsonl").read_text().splitlines() for run in ("straight", "resumed")
    ]
    clock = {"images_per_s", "elapsed_s"}
    strip = [
        [{k: v for k, v in json.loads(x).items() if k not in clock} for x in lg] for lg in logs
    ]
    assert strip[0] == strip[1]


def test_a_run_folder_is_never_overwritten(data, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(UsageError, match="nothing to resume"):
        loop.train(data, out, cfg=TINY, resume=True, progress=False)
    loop.train(data, out, cfg=replace(TINY, epochs=1), progress=False)
    before = (out / "last.pt").read_bytes()
    with pytest.raises(UsageError, match="already holds a run"):
        loop.train(data, out, cfg=TINY, progress=False)
    assert (out / "last.pt").read_bytes() == before


def test_a_training_set_smaller_than_one_batch_trains_on_batches_of_the_set(data, tmp_path):
    cfg = replace(TINY, batch_size=16, epochs=1)
    with pytest.warns(UserWarning, match="8 images, fewer than --batch-size 16: batches of 8"):
        loop.train(data, tmp_path / "run", cfg=cfg, progress=False)
    (record,) = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert record["images"] == 8


def test_batch_for_clips_to_the_set_in_multiples_of_the_processes():
    assert batch_for(100, 16) == 16
    with pytest.warns(UserWarning):
        assert batch_for(7, 16, world=2) == 6
    with pytest.raises(UsageError, match="fewer than the 2 processes"):
        batch_for(1, 16, world=2)


def test_wall_clock_budget_stops_training_when_spent(data, tmp_path):
    cfg = replace(TINY, batch_size=2, epochs=1000, minutes=0.002)
    loop.train(data, tmp_path / "run", cfg=cfg, progress=False)
    lines = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    assert len(lines) == 1 and "AP" in json.loads(lines[0])
    # Over several epochs: training stops only once the whole budget is used.
    cfg = replace(cfg, minutes=0.05, eval_every=1000)
    loop.train(data, tmp_path / "run2", cfg=cfg, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run2" / "log.jsonl").read_text().splitlines()]
    assert len(rows) > 1 and rows[-1]["elapsed_s"] >= 3.0 and "AP" in rows[-1]


# fp16's scaler skips overflowing steps; the schedule must skip them too (torch warns if not).
@pytest.mark.filterwarnings("error::UserWarning")
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_trains(data, tmp_path, amp):
    metrics = loop.train(
        data, tmp_path / "run", cfg=replace(TINY, epochs=1, amp=amp), progress=False
    )
    line = json.loads((tmp_path / "run" / "log.jsonl").read_text())
    assert torch.isfinite(torch.tensor(line["loss"])) and line["images"] == 8
    assert set(metrics) >= {"AP", "AP50"}
    # fp16 trains with a gradient scaler, and a resume needs its state.
    saved = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert ("scaler" in saved) == (amp == "fp16")


class _Spy(nn.Module):
    """Records the devices of what it is handed; computes on its own (CPU) parameter."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))
        self.seen: list[torch.device] = []

    def forward(self, images, mask):
        self.seen += [images.device, mask.device]
        return {"out": self.w * 2}


class _SpyCriterion(nn.Module):
    def __init__(self):
        super().__init__()
        self.seen: list[torch.device] = []
        self.weight_dict = {"loss": 1.0}

    def forward(self, outputs, targets):
        self.seen += [v.device for t in targets for v in t.values() if torch.is_tensor(v)]
        return {"loss": outputs["out"] ** 2}

    def weighted_sum(self, terms):
        return terms["loss"]


def test_train_one_epoch_hands_every_batch_and_target_to_the_device():
    # The loader's tensors are on the CPU; the meta device shows whether they were moved.
    batches = [
        (torch.zeros(2, 3, 8, 8), torch.zeros(2, 8, 8, dtype=torch.bool), [_target(), _target()])
        for _ in range(3)
    ]
    model, criterion = _Spy(), _SpyCriterion()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    stats = train_one_epoch(model, criterion, batches, optimizer, torch.device("meta"))
    assert stats["steps"] == 3 and stats["images"] == 6
    assert len(model.seen) == 6 and len(criterion.seen) == 12
    assert {d.type for d in model.seen + criterion.seen} == {"meta"}
    assert model.w.item() != 1.0  # the optimiser stepped


def _target():
    return {"labels": torch.zeros(1, dtype=torch.int64), "boxes": torch.rand(1, 4), "image_id": 1}


def test_train_config_rejects_bad_values():
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="minutes"):
        TrainConfig(minutes=-1)
    with pytest.raises(ValueError, match="schedule must be one of"):
        TrainConfig(schedule="linear")


def test_train_and_val_must_share_their_categories(data, tmp_path):
    import shutil

    other = tmp_path / "data"
    shutil.copytree(data, other)
    path = other / "annotations" / "instances_val.json"
    coco = json.loads(path.read_text())
    shift = {c["id"]: c["id"] + 10 for c in coco["categories"]}
    for c in coco["categories"]:
        c["id"] = shift[c["id"]]
    for a in coco["annotations"]:
        a["category_id"] = shift[a["category_id"]]
    path.write_text(json.dumps(coco))
    with pytest.raises(UsageError, match="train and val categories differ"):
        loop.train(other, tmp_path / "run", cfg=TINY, progress=False)

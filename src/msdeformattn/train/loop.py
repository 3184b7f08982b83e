"""The training loop: AdamW with the paper's learning-rate groups, clipping, a wall-clock budget,
JSON-lines logs, checkpoints and resume."""

from __future__ import annotations

import dataclasses
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..models.checkpoint import load_checkpoint, save_checkpoint
from ..models.deformable_detr import DeformableDETRConfig, build_model
from .data import CocoDetection, Compose, Normalize, RandomHorizontalFlip, Resize, collate
from .evaluate import evaluate
from .losses import SetCriterion

__all__ = ["TrainConfig", "build_loaders", "seed_everything", "train"]


@dataclasses.dataclass
class TrainConfig:
    """Optimisation settings; defaults suit the tiny preset on a laptop CPU."""

    lr: float = 5e-4
    #: backbone, sampling offsets and reference points train at lr * this (the paper: 0.1)
    lr_slow_factor: float = 0.1
    weight_decay: float = 1e-4
    clip_max_norm: float = 0.1
    batch_size: int = 8
    epochs: int = 1000
    #: stop after this many minutes of training, whatever the epochs
    minutes: float | None = None
    image_size: int = 160
    num_workers: int = 0
    seed: int = 0
    eval_every_epochs: int = 5


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _param_groups(model, cfg: TrainConfig):
    slow_names = ("backbone.0", "sampling_offsets", "reference_points")
    slow, fast = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (slow if any(s in name for s in slow_names) else fast).append(p)
    return [{"params": fast, "lr": cfg.lr}, {"params": slow, "lr": cfg.lr * cfg.lr_slow_factor}]


def build_loaders(data: Path, cfg: TrainConfig):
    g = torch.Generator().manual_seed(cfg.seed)
    train_tf = Compose([RandomHorizontalFlip(0.5, g), Resize([cfg.image_size]), Normalize()])
    eval_tf = Compose([Resize([cfg.image_size]), Normalize()])
    train_set = CocoDetection(data / "train", data / "annotations/instances_train.json", train_tf)
    val_set = CocoDetection(data / "val", data / "annotations/instances_val.json", eval_tf)
    train_loader = torch.utils.data.DataLoader(
        train_set,
        batch_size=cfg.batch_size,
        shuffle=True,
        collate_fn=collate,
        num_workers=cfg.num_workers,
        generator=torch.Generator().manual_seed(cfg.seed),
        drop_last=True,
    )
    val_loader = torch.utils.data.DataLoader(
        val_set, batch_size=cfg.batch_size, collate_fn=collate, num_workers=cfg.num_workers
    )
    return train_set, val_set, train_loader, val_loader


def train(
    data: str | Path,
    output: str | Path,
    model_config: DeformableDETRConfig | None = None,
    cfg: TrainConfig | None = None,
    resume: bool = False,
    progress: bool = True,
) -> dict:
    """Train on a COCO-format folder (``train/``, ``val/``, ``annotations/``) into ``output``.

    Writes ``checkpoint.pt`` (resumable), ``log.jsonl`` (one line per epoch, with
    COCO metrics when evaluated) and ``metrics.json`` (the final evaluation).
    Returns the final metrics.
    """
    data, output = Path(data), Path(output)
    output.mkdir(parents=True, exist_ok=True)
    cfg = cfg or TrainConfig()
    seed_everything(cfg.seed)
    train_set, val_set, train_loader, val_loader = build_loaders(data, cfg)
    if model_config is None:
        model_config = DeformableDETRConfig.tiny(num_classes=train_set.num_classes)
    model = build_model(model_config)
    optimizer = torch.optim.AdamW(_param_groups(model, cfg), weight_decay=cfg.weight_decay)
    criterion = SetCriterion(model_config.num_classes)
    start_epoch, elapsed = 0, 0.0
    ckpt = output / "checkpoint.pt"
    if resume and ckpt.exists():
        model, model_config, extra = load_checkpoint(ckpt)
        optimizer = torch.optim.AdamW(_param_groups(model, cfg), weight_decay=cfg.weight_decay)
        optimizer.load_state_dict(extra["optimizer"])
        start_epoch, elapsed = extra["epoch"] + 1, extra["elapsed"]
    with open(output / "log.jsonl", "a") as log:
        budget = None if cfg.minutes is None else cfg.minutes * 60
        metrics: dict = {}
        for epoch in range(start_epoch, cfg.epochs):
            model.train()
            t0 = time.perf_counter()
            seen, running, steps = 0, 0.0, 0
            bar = tqdm(train_loader, desc=f"epoch {epoch}", disable=not progress, leave=False)
            for images, mask, targets in bar:
                losses = criterion(model(images, mask), targets)
                optimizer.zero_grad()
                losses["loss"].backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_max_norm)
                optimizer.step()
                seen += len(images)
                steps += 1
                running += losses["loss"].item()
                rate = seen / (time.perf_counter() - t0)
                bar.set_postfix(loss=f"{losses['loss'].item():.3f}", img_s=f"{rate:.1f}")
                if budget is not None and elapsed + time.perf_counter() - t0 >= budget:
                    break
            elapsed += time.perf_counter() - t0
            record = {
                "epoch": epoch,
                "loss": running / max(1, steps),
                "images": seen,
                "elapsed_s": round(elapsed, 1),
            }
            done = budget is not None and elapsed >= budget
            if done or (epoch + 1) % cfg.eval_every_epochs == 0 or epoch + 1 == cfg.epochs:
                metrics = evaluate(model, val_loader, val_set)
                record.update(metrics)
            log.write(json.dumps(record) + "\n")
            log.flush()
            save_checkpoint(
                ckpt,
                model,
                model_config,
                optimizer=optimizer.state_dict(),
                epoch=epoch,
                elapsed=elapsed,
            )
            if done:
                break
    if not metrics:
        metrics = evaluate(model, val_loader, val_set)
    (output / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics

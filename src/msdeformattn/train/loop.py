"""The training loop: AdamW with the paper's learning-rate groups, clipping, a wall-clock budget,
JSON-lines logs, checkpoints and resume."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
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
    #: random horizontal flips of training images
    flip: bool = True


def distributed() -> tuple[int, int]:
    """(rank, world size); joins the process group that ``torchrun`` describes, if any."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if not torch.distributed.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            torch.distributed.init_process_group(backend)
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Shuffled global batches, each split across ranks (rank r takes items r, r+W, ...).

    With one process it yields the global batches themselves, so 2 processes with
    half the batch each see exactly the images 1 process sees, step by step.
    """

    def __init__(
        self, size: int, batch_size: int, rank: int = 0, world: int = 1, seed: int = 0
    ) -> None:
        if batch_size % world:
            raise ValueError(
                f"batch_size ({batch_size}) must be divisible by the world size ({world})"
            )
        self.size, self.batch_size, self.rank, self.world, self.seed = (
            size,
            batch_size,
            rank,
            world,
            seed,
        )
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size // self.batch_size

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=g)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            yield order[start : start + self.batch_size][self.rank :: self.world].tolist()


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


def build_loaders(data: Path, cfg: TrainConfig, rank: int = 0, world: int = 1):
    g = torch.Generator().manual_seed(cfg.seed + rank)
    flip = [RandomHorizontalFlip(0.5, g)] if cfg.flip else []
    train_tf = Compose([*flip, Resize([cfg.image_size]), Normalize()])
    eval_tf = Compose([Resize([cfg.image_size]), Normalize()])
    train_set = CocoDetection(data / "train", data / "annotations/instances_train.json", train_tf)
    val_set = CocoDetection(data / "val", data / "annotations/instances_val.json", eval_tf)
    sampler = GlobalBatchSampler(len(train_set), cfg.batch_size, rank, world, cfg.seed)
    train_loader = torch.utils.data.DataLoader(
        train_set, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.num_workers
    )
    val_loader = torch.utils.data.DataLoader(
        val_set, batch_size=cfg.batch_size, collate_fn=collate, num_workers=cfg.num_workers
    )
    return train_set, val_set, train_loader, val_loader


def _out_of_time(elapsed: float, budget: float, world: int) -> bool:
    """Whether to stop; with several processes, all stop at the same step (any one's clock)."""
    stop = torch.tensor([float(elapsed >= budget)])
    if world > 1:
        torch.distributed.all_reduce(stop, op=torch.distributed.ReduceOp.MAX)
    return bool(stop.item())


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
    rank, world = distributed()
    main_process = rank == 0
    if main_process:
        output.mkdir(parents=True, exist_ok=True)
    cfg = cfg or TrainConfig()
    seed_everything(cfg.seed)
    train_set, val_set, train_loader, val_loader = build_loaders(data, cfg, rank, world)
    if model_config is None:
        model_config = DeformableDETRConfig.tiny(num_classes=train_set.num_classes)
    model = build_model(model_config)
    start_epoch, elapsed, extra = 0, 0.0, None
    ckpt = output / "checkpoint.pt"
    if resume and ckpt.exists():
        model, model_config, extra = load_checkpoint(ckpt)
        start_epoch, elapsed = extra["epoch"] + 1, extra["elapsed"]
    net = model
    if world > 1:
        if torch.cuda.is_available():
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        net = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(_param_groups(model, cfg), weight_decay=cfg.weight_decay)
    if extra is not None:
        optimizer.load_state_dict(extra["optimizer"])
    criterion = SetCriterion(model_config.num_classes)
    budget = None if cfg.minutes is None else cfg.minutes * 60
    metrics: dict = {}
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        train_loader.batch_sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        seen, running, steps = 0, 0.0, 0
        bar = tqdm(
            train_loader,
            desc=f"epoch {epoch}",
            leave=False,
            disable=not (progress and main_process),
        )
        for images, mask, targets in bar:
            losses = criterion(net(images, mask), targets)
            optimizer.zero_grad()
            losses["loss"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_max_norm)
            optimizer.step()
            seen += len(images) * world
            steps += 1
            running += losses["loss"].item()
            rate = seen / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{losses['loss'].item():.3f}", img_s=f"{rate:.1f}")
            if budget is not None and _out_of_time(
                elapsed + time.perf_counter() - t0, budget, world
            ):
                break
        elapsed += time.perf_counter() - t0
        done = budget is not None and _out_of_time(elapsed, budget, world)
        if main_process:
            record = {
                "epoch": epoch,
                "loss": running / max(1, steps),
                "images": seen,
                "elapsed_s": round(elapsed, 1),
            }
            if done or (epoch + 1) % cfg.eval_every_epochs == 0 or epoch + 1 == cfg.epochs:
                metrics = evaluate(model, val_loader, val_set)
                record.update(metrics)
            with open(output / "log.jsonl", "a") as log:
                log.write(json.dumps(record) + "\n")
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
    if world > 1:
        torch.distributed.barrier()
        if not main_process:
            return {}
    if not metrics:
        metrics = evaluate(model, val_loader, val_set)
    (output / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics

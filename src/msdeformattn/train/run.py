"""One training run of any task: the run folder, devices and processes, optimiser, schedule,
EMA, mixed precision, the wall-clock budget, evaluation, checkpoints, logging and exact
resume. What differs between detection and segmentation comes from a :class:`.task.Task`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from ..models.config import config_from_dict
from ..util.errors import UsageError
from .budget import Clock
from .config import TrainConfig
from .devices import resolve_device, setup_distributed
from .rng import rng_state, seed_everything, set_rng_state
from .run_folder import (
    append_log,
    check_output,
    prepare_output,
    read_last,
    write_checkpoints,
    write_results,
)
from .schedule import build_optimizer, build_scheduler, ema_model
from .task import Task

__all__ = ["run_training"]


def run_training(
    task: Task,
    output: str | Path,
    model_config: Any | None = None,
    cfg: TrainConfig | None = None,
    *,
    resume: bool = False,
    device: str | torch.device | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Train ``task``'s model into ``output``; returns the final metrics.

    model_config: the model (default: the task's preset with the dataset's classes);
    cfg: the recipe (default: the preset's). ``output`` must not hold a run unless
    ``resume`` (continue ``last.pt`` exactly: the saved configs, with ``cfg``'s
    ``epochs`` and ``minutes`` as the new totals) or ``overwrite`` (replace its files).
    Writes the files of :mod:`.run_folder`; ``metrics.json`` holds the final evaluation,
    of the EMA weights when EMA is on. Under ``torchrun`` every rank trains and rank 0
    alone evaluates and writes; the other ranks return ``{}``.
    """
    output = Path(output)
    device = resolve_device(device)
    check_output(output, resume, overwrite)
    rank, world, device = setup_distributed(device)
    main_process = rank == 0
    saved = read_last(output, task.name) if resume else None
    if saved is not None:
        # The run continues as it was configured; only its length may change.
        model_config = config_from_dict(saved["config"], task.config_class)
        first = config_from_dict(saved["train_config"], TrainConfig)
        cfg = first if cfg is None else replace(first, epochs=cfg.epochs, minutes=cfg.minutes)
    cfg = cfg or task.preset.train
    task.check(cfg)
    data = task.load_data(cfg, rank, world, verbose=progress and main_process)
    model_config = model_config or task.preset.model(data.num_classes)
    if model_config.num_classes != data.num_classes:
        raise UsageError(
            f"the model has {model_config.num_classes} classes, the dataset "
            f"{data.num_classes}: pass num_classes={data.num_classes}"
        )
    # Only now, with the settings and the data found usable, is the folder touched.
    if main_process:
        prepare_output(output, overwrite)
    seed_everything(cfg.seed)
    model = task.build_model(model_config, cfg, saved, device)
    if saved is not None:
        # With EMA, "model" holds the average and "train_model" the trained weights.
        model.load_state_dict(saved.get("train_model", saved["model"]))
    net = model
    if world > 1:
        if device.type == "cuda":
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        net = nn.parallel.DistributedDataParallel(net)
    optimizer = build_optimizer(model, cfg)
    clock = Clock(cfg.minutes, saved["elapsed"] if saved is not None else 0.0, device, world)
    scheduler = build_scheduler(optimizer, cfg, len(data.train_loader), lambda: clock.seconds)
    scaler = torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None
    ema = None if cfg.ema_decay is None else ema_model(model, cfg.ema_decay, cfg.ema_warmup_steps)
    # best.pt's metric is kept under this name in last.pt: "best_ap", "best_miou".
    best_key = f"best_{task.headline.lower()}"
    start_epoch, best, metrics = 0, -1.0, {}
    if saved is not None:
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        if scaler is not None and "scaler" in saved:
            scaler.load_state_dict(saved["scaler"])
        if ema is not None:
            ema.module.load_state_dict(saved["model"])
            ema.n_averaged.fill_(saved["ema_updates"])
        start_epoch, best = saved["epoch"] + 1, saved[best_key]
        # Last, after everything that might draw from them: dropout continues its sequence.
        set_rng_state(saved["rng"])
    eval_model = model if ema is None else ema.module
    meta = {
        "config": dataclasses.asdict(model_config),
        **task.checkpoint_meta(),
        "image_size": cfg.image_size,
        "max_size": cfg.max_size,
        "augmentation": cfg.augmentation,
        "train_config": dataclasses.asdict(cfg),
    }
    for epoch in range(start_epoch, cfg.epochs):
        clock.start_epoch()
        if clock.out_of_time():
            break
        data.set_epoch(epoch)
        stats = task.train_epoch(
            net,
            data.train_loader,
            optimizer=optimizer,
            device=device,
            scheduler=scheduler,
            clip_max_norm=cfg.clip_max_norm,
            amp=cfg.amp,
            scaler=scaler,
            ema=ema,
            ema_source=model,
            should_stop=clock.out_of_time,
            progress=f"epoch {epoch}" if progress and main_process else None,
        )
        clock.end_epoch(stats["seconds"])
        done = clock.out_of_time() or epoch + 1 == cfg.epochs
        if not main_process:
            if done:
                break
            continue
        record = {
            "epoch": epoch,
            "loss": stats["loss"],
            "lr": optimizer.param_groups[0]["lr"],
            "images": stats["images"] * world,
            "images_per_s": round(stats["images"] * world / max(stats["seconds"], 1e-9), 1),
            "elapsed_s": round(clock.elapsed, 1),
        }
        if done or (epoch + 1) % cfg.eval_every == 0:
            metrics = task.evaluate(eval_model, data.val_loader, device, cfg)
            # The log names its headline: curves.png draws it whatever the task.
            record.update(metrics, headline=task.headline)
        state = {
            **meta,
            "model": eval_model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": epoch,
            "elapsed": clock.elapsed,
            **task.checkpoint_state(),
            "rng": rng_state(),
        }
        if ema is not None:
            state["train_model"] = model.state_dict()
            state["ema_updates"] = int(ema.n_averaged)
        if scaler is not None:
            state["scaler"] = scaler.state_dict()
        value = record.get(task.headline)
        improved = value is not None and value > best
        if improved:
            best = value
        state[best_key] = best
        write_checkpoints(output, state, meta, improved)
        append_log(output, record)
        if progress:
            tqdm.write(_epoch_line(record, cfg.epochs, task.shown))
        if done:
            break
    if world > 1:
        torch.distributed.barrier()
        if not main_process:
            return {}
    if not metrics:
        # No epoch evaluated (a budget spent at once, or nothing left to resume): the
        # weights as they are.
        metrics = task.evaluate(eval_model, data.val_loader, device, cfg)
    write_results(output, metrics)
    return metrics


def _epoch_line(record: dict, epochs: int, shown: tuple[str, ...]) -> str:
    parts = [
        f"epoch {record['epoch'] + 1}/{epochs}",
        f"loss {record['loss']:.3f}",
        f"lr {record['lr']:.2e}",
        f"{record['images_per_s']:.1f} img/s",
        f"{record['elapsed_s'] / 60:.1f} min",
    ]
    parts += [f"{name} {record[name]:.3f}" for name in shown if record.get(name) is not None]
    return "  ".join(parts)

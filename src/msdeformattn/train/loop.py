"""The training run: devices and processes, data, optimiser, schedule, EMA, evaluation,
checkpoints worth keeping and exact resume. The per-epoch work is in :mod:`.engine`."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import random
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..models.config import config_from_dict
from ..models.deformable_detr import DeformableDETR, DeformableDETRConfig
from ..util.errors import UsageError
from .build import build
from .check import DataReport, annotation_file, check_dataset
from .config import PRESETS, TrainConfig
from .data import (
    CocoDetection,
    collate,
    detr_eval_transforms,
    detr_train_transforms,
    simple_eval_transforms,
    simple_train_transforms,
)
from .engine import evaluate, train_one_epoch
from .plots import plot_training_curves
from .schedule import build_scheduler, ema_model

__all__ = [
    "GlobalBatchSampler",
    "TrainConfig",
    "batch_for",
    "build_loaders",
    "checked_dataset",
    "eval_transforms",
    "resolve_device",
    "seed_everything",
    "train",
]

#: What a run folder holds; a new run refuses a folder that has any of them.
RUN_FILES = ("last.pt", "best.pt", "log.jsonl", "metrics.json")


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device``, or CUDA when available else the CPU; a clear error for one that is absent."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device: unknown device {device!r} (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def setup_distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """(rank, world size, this process's device); joins ``torchrun``'s process group if any.

    Under torchrun each rank takes ``cuda:LOCAL_RANK`` with NCCL, or the CPU with gloo.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        # Rank 0 evaluates alone while the others wait: allow a COCO-size evaluation.
        torch.distributed.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=2)
        )
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), device


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Shuffled global batches, each split across ranks (rank r takes items r, r+W, ...).

    With one process it yields the global batches themselves, so 2 processes with
    half the batch each see exactly the images 1 process sees, step by step.
    """

    def __init__(
        self, size: int, batch_size: int, rank: int = 0, world: int = 1, seed: int = 0
    ) -> None:
        if batch_size % world:
            raise UsageError(
                f"--batch-size {batch_size} must be divisible by the number of processes ({world})"
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


def _rng_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """The reference's three learning rates: the rest, the backbone, and the sampling
    offsets and reference points (the linear projections that place the samples)."""
    groups: dict[str, list] = {"rest": [], "backbone": [], "linear_proj": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("backbone.0"):
            groups["backbone"].append(p)
        elif "sampling_offsets" in name or "reference_points" in name:
            groups["linear_proj"].append(p)
        else:
            groups["rest"].append(p)
    factors = {
        "rest": 1.0,
        "backbone": cfg.lr_backbone_factor,
        "linear_proj": cfg.lr_linear_proj_factor,
    }
    return [{"params": ps, "lr": cfg.lr * factors[k]} for k, ps in groups.items() if ps]


def _freeze_pretrained_stem(model: DeformableDETR) -> None:
    """As the reference does for a pretrained (frozen-BN) trunk: the stem and layer1 stay fixed."""
    body = model.backbone[0].body
    for module in (body.conv1, body.bn1, body.layer1):
        for p in module.parameters():
            p.requires_grad_(False)


def eval_transforms(cfg: TrainConfig):
    if cfg.augmentation == "detr":
        return detr_eval_transforms(cfg.image_size, cfg.max_size)
    return simple_eval_transforms(cfg.image_size)


def val_dataset(
    data: Path, cfg: TrainConfig | None = None, annotations: dict | None = None
) -> CocoDetection:
    """The validation split of a COCO-format folder, with ``cfg``'s evaluation transforms
    (none without ``cfg``: for its categories only). annotations: the cleaned COCO dict
    of :func:`check_dataset` (default: the JSON file as it is)."""
    transforms = None if cfg is None else eval_transforms(cfg)
    return CocoDetection(data / "val", annotations or annotation_file(data, "val"), transforms)


def checked_dataset(
    data: Path, splits: tuple[str, ...] = ("train", "val"), *, verbose: bool = True
) -> DataReport:
    """:func:`check_dataset`, refusing fatal problems and saying what it repaired."""
    report = check_dataset(data, splits)
    report.raise_if_fatal()
    if report.repaired and verbose:
        # On stderr: stdout carries results (evaluate's JSON) that users pipe elsewhere.
        print(f"repaired in {data}: {report.summary()}", file=sys.stderr, flush=True)
    return report


def batch_for(size: int, batch_size: int, world: int = 1) -> int:
    """The global batch for a training set of ``size`` images: ``batch_size``, clipped
    (with a warning) to the set when the set is smaller, in multiples of ``world``."""
    if size >= batch_size:
        return batch_size
    clipped = size - size % world
    if clipped == 0:
        raise UsageError(
            f"the training set has {size} images, fewer than the {world} processes: "
            "an epoch would take no step"
        )
    warnings.warn(
        f"the training set has {size} images, fewer than --batch-size {batch_size}: "
        f"batches of {clipped}",
        stacklevel=2,
    )
    return clipped


def build_loaders(
    data: Path,
    cfg: TrainConfig,
    rank: int = 0,
    world: int = 1,
    annotations: dict[str, dict] | None = None,
):
    """(train set, val set, train loader, val loader) of a COCO-format folder.

    annotations: ``{"train": ..., "val": ...}`` COCO dicts, e.g. :func:`check_dataset`'s
    cleaned ones (default: the JSON files as they are).
    """
    annotations = annotations or {}
    if cfg.augmentation == "detr":
        train_tf = detr_train_transforms(max_size=cfg.max_size, flip=cfg.flip)
    else:
        train_tf = simple_train_transforms(cfg.image_size, flip=cfg.flip)
    train_set = CocoDetection(
        data / "train",
        annotations.get("train") or annotation_file(data, "train"),
        train_tf,
        seed=cfg.seed,
    )
    val_set = val_dataset(data, cfg, annotations.get("val"))
    if train_set.category_ids != val_set.category_ids:
        raise UsageError(
            f"--data: train categories {train_set.category_ids} differ from val categories "
            f"{val_set.category_ids}"
        )
    batch_size = batch_for(len(train_set), cfg.batch_size, world)
    sampler = GlobalBatchSampler(len(train_set), batch_size, rank, world, cfg.seed)
    workers = {"num_workers": cfg.num_workers, "persistent_workers": cfg.num_workers > 0}
    # Their own generators: creating an iterator then never draws from the global RNG,
    # which a resumed run must find as the interrupted one left it.
    train_loader = torch.utils.data.DataLoader(
        train_set,
        batch_sampler=sampler,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(cfg.seed),
        **workers,
    )
    val_loader = torch.utils.data.DataLoader(
        val_set,
        batch_size=max(1, batch_size // world),
        collate_fn=collate,
        generator=torch.Generator().manual_seed(cfg.seed),
        **workers,
    )
    return train_set, val_set, train_loader, val_loader


def atomic_save(obj: dict, path: Path) -> None:
    """torch.save to a temporary file renamed over ``path``: a crash never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def check_output(output: Path, resume: bool, overwrite: bool) -> None:
    present = [name for name in RUN_FILES if (output / name).exists()]
    if resume and overwrite:
        raise UsageError("--resume continues a run, --overwrite replaces it: pass one")
    if resume and not (output / "last.pt").exists():
        raise UsageError(f"--resume: {output / 'last.pt'} does not exist, nothing to resume")
    if not resume and present and not overwrite:
        raise UsageError(
            f"--output {output} already holds a run ({', '.join(present)}); "
            "pass --resume to continue it, --overwrite to replace it, or choose another folder"
        )


def clear_run(output: Path) -> None:
    """Remove an earlier run's files (``--overwrite``); nothing else in the folder."""
    for name in (*RUN_FILES, "curves.png"):
        (output / name).unlink(missing_ok=True)


def train(
    data: str | Path,
    output: str | Path,
    model_config: DeformableDETRConfig | None = None,
    cfg: TrainConfig | None = None,
    *,
    resume: bool = False,
    progress: bool = True,
    device: str | torch.device | None = None,
    model: DeformableDETR | None = None,
    overwrite: bool = False,
    data_report: DataReport | None = None,
) -> dict:
    """Train on a COCO-format folder (``train/``, ``val/``, ``annotations/``) into ``output``.

    model_config: the detector (default: the tiny preset with the dataset's
    classes); ``model``: start from these weights (e.g. ``from_pretrained``)
    instead of a fresh initialisation. Writes ``last.pt`` (resumable, every
    epoch), ``best.pt`` (best AP), ``log.jsonl`` (a line per epoch),
    ``metrics.json`` (the final evaluation, of the EMA weights when EMA is on)
    and ``curves.png``. Returns the final metrics.

    The data is checked first (:func:`check_dataset`): fatal problems stop the run
    before it starts, repairs are reported and trained on. ``output`` must not hold
    a run unless ``resume`` (continue it) or ``overwrite`` (replace its files).
    data_report: a check already made (by the command line), not repeated.
    """
    data, output = Path(data), Path(output)
    device = resolve_device(device)
    check_output(output, resume, overwrite)
    rank, world, device = setup_distributed(device)
    main_process = rank == 0
    report = data_report or checked_dataset(data, verbose=progress and main_process)
    if main_process:
        if overwrite:
            clear_run(output)
        output.mkdir(parents=True, exist_ok=True)
    ckpt = None
    if resume:
        # The run continues as it was configured; only the length may change.
        ckpt = torch.load(output / "last.pt", map_location="cpu", weights_only=True)
        model_config = config_from_dict(ckpt["config"])
        saved = config_from_dict(ckpt["train_config"], TrainConfig)
        cfg = saved if cfg is None else replace(saved, epochs=cfg.epochs, minutes=cfg.minutes)
    cfg = cfg or PRESETS["tiny"].train
    seed_everything(cfg.seed)
    train_set, val_set, train_loader, val_loader = build_loaders(
        data, cfg, rank, world, report.cleaned
    )
    if model_config is None:
        model_config = PRESETS["tiny"].model(train_set.num_classes)
    if model_config.num_classes != train_set.num_classes:
        raise UsageError(
            f"the model has {model_config.num_classes} classes, the dataset "
            f"{train_set.num_classes}: pass num_classes={train_set.num_classes}"
        )
    # As the reference, a pretrained trunk keeps its stem and layer1 fixed.
    frozen_stem = (
        ckpt.get("frozen_stem", False)
        if ckpt is not None
        else model is not None and model_config.backbone_norm == "frozen"
    )
    if model is None and model_config.backbone_norm == "frozen" and ckpt is None:
        warnings.warn(
            "training a randomly initialised backbone with frozen BatchNorm: pass --init or "
            "--backbone-weights (an ImageNet ResNet), or --backbone-norm batch",
            stacklevel=2,
        )
    model, criterion, postprocessor = build(model_config, cfg, model)
    if frozen_stem:
        _freeze_pretrained_stem(model)
    if ckpt is not None:
        model.load_state_dict(ckpt.get("train_model", ckpt["model"]))
    model.to(device)
    criterion.to(device)
    net = model
    if world > 1:
        if device.type == "cuda":
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        net = nn.parallel.DistributedDataParallel(net)
    optimizer = torch.optim.AdamW(_param_groups(model, cfg), weight_decay=cfg.weight_decay)
    elapsed = 0.0
    epoch_start = [time.perf_counter()]
    budget = None if cfg.minutes is None else cfg.minutes * 60

    def training_seconds() -> float:
        return elapsed + time.perf_counter() - epoch_start[0]

    # Training seconds as all ranks agree on them (the slowest clock), read by the schedule so
    # every rank steps with the same learning rate.
    clock = [0.0]
    scheduler = build_scheduler(optimizer, cfg, len(train_loader), lambda: clock[0])
    scaler = torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None
    ema = None if cfg.ema_decay is None else ema_model(model, cfg.ema_decay, cfg.ema_warmup_steps)
    start_epoch, best_ap, metrics = 0, -1.0, {}
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if scaler is not None and "scaler" in ckpt:
            scaler.load_state_dict(ckpt["scaler"])
        if ema is not None:
            ema.module.load_state_dict(ckpt["model"])
            ema.n_averaged.fill_(ckpt["ema_updates"])
        start_epoch, elapsed, best_ap = ckpt["epoch"] + 1, ckpt["elapsed"], ckpt["best_ap"]
        _set_rng_state(ckpt["rng"])
    eval_model = model if ema is None else ema.module

    def out_of_time() -> bool:
        if budget is None:
            return False
        seconds = torch.tensor([training_seconds()], dtype=torch.float64, device=device)
        if world > 1:
            torch.distributed.all_reduce(seconds, op=torch.distributed.ReduceOp.MAX)
        clock[0] = float(seconds.item())
        return clock[0] >= budget

    names = [val_set.coco.cats[c]["name"] for c in val_set.category_ids]
    meta = {
        "config": dataclasses.asdict(model_config),
        "dataset": {"category_ids": list(val_set.category_ids), "category_names": names},
        "image_size": cfg.image_size,
        "max_size": cfg.max_size,
        "augmentation": cfg.augmentation,
        "train_config": dataclasses.asdict(cfg),
    }
    log_path = output / "log.jsonl"
    done = False
    for epoch in range(start_epoch, cfg.epochs):
        epoch_start[0] = time.perf_counter()
        if out_of_time():
            break
        train_loader.batch_sampler.set_epoch(epoch)
        train_set.set_epoch(epoch)
        stats = train_one_epoch(
            net,
            criterion,
            train_loader,
            optimizer,
            device,
            scheduler=scheduler,
            clip_max_norm=cfg.clip_max_norm,
            amp=cfg.amp,
            scaler=scaler,
            ema=ema,
            ema_source=model,
            should_stop=out_of_time,
            progress=f"epoch {epoch}" if progress and main_process else None,
        )
        elapsed += stats["seconds"]
        # The epoch's time is in ``elapsed`` now: the clock restarts from here.
        epoch_start[0] = time.perf_counter()
        done = out_of_time() or epoch + 1 == cfg.epochs
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
            "elapsed_s": round(elapsed, 1),
        }
        if done or (epoch + 1) % cfg.eval_every == 0:
            metrics = evaluate(eval_model, postprocessor, val_loader, val_set, device, amp=cfg.amp)
            record.update(metrics)
        state = {
            **meta,
            "model": eval_model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": epoch,
            "elapsed": elapsed,
            "frozen_stem": frozen_stem,
            "rng": _rng_state(),
        }
        if ema is not None:
            state["train_model"] = model.state_dict()
            state["ema_updates"] = int(ema.n_averaged)
        if scaler is not None:
            state["scaler"] = scaler.state_dict()
        improved = "AP" in record and record["AP"] > best_ap
        if improved:
            best_ap = record["AP"]
        state["best_ap"] = best_ap
        atomic_save(state, output / "last.pt")
        if improved:
            atomic_save({**meta, "model": state["model"], "epoch": epoch}, output / "best.pt")
        with open(log_path, "a") as log:
            log.write(json.dumps(record) + "\n")
        if progress:
            tqdm.write(_epoch_line(record, cfg.epochs))
        if done:
            break
    if world > 1:
        torch.distributed.barrier()
        if not main_process:
            return {}
    if not metrics:
        metrics = evaluate(eval_model, postprocessor, val_loader, val_set, device, amp=cfg.amp)
    (output / "metrics.json").write_text(json.dumps(metrics, indent=1))
    plot_training_curves(log_path, output / "curves.png")
    return metrics


def _epoch_line(record: dict, epochs: int) -> str:
    parts = [
        f"epoch {record['epoch'] + 1}/{epochs}",
        f"loss {record['loss']:.3f}",
        f"lr {record['lr']:.2e}",
        f"{record['images_per_s']:.1f} img/s",
        f"{record['elapsed_s'] / 60:.1f} min",
    ]
    if "AP" in record:
        parts += [f"AP {record['AP']:.3f}", f"AP50 {record['AP50']:.3f}"]
    return "  ".join(parts)

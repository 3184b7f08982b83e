"""Deformable against dense attention for the same wall-clock budget: the convergence claim."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from ..models.deformable_detr import DeformableDETRConfig
from .loop import TrainConfig, train
from .synthetic import CLASSES, generate

__all__ = ["compare", "plot_curves"]


def _read(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines() if '"AP"' in line]


def plot_curves(logs: dict[str, Path], path: str | Path) -> None:
    """AP against training time and against epochs, one line per run, into one PNG."""
    fig, (by_time, by_epoch) = plt.subplots(1, 2, figsize=(10, 4))
    for name, log in logs.items():
        rows = _read(log)
        minutes = [r["elapsed_s"] / 60 for r in rows]
        epochs = [r["epoch"] + 1 for r in rows]
        for ax, xs in ((by_time, minutes), (by_epoch, epochs)):
            ax.plot(xs, [r["AP"] for r in rows], marker="o", label=f"{name} AP")
            ax.plot(xs, [r["AP50"] for r in rows], marker=".", linestyle="--", label=f"{name} AP50")
    by_time.set_xlabel("training time (minutes)")
    by_epoch.set_xlabel("epochs")
    for ax in (by_time, by_epoch):
        ax.set_ylabel("COCO AP on the synthetic val split")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Deformable vs dense attention, same detector and budget")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare(
    output: str | Path, minutes: float = 10.0, seed: int = 0, progress: bool = True
) -> dict[str, dict]:
    """Train the tiny detector with each attention for ``minutes``; plot and return metrics."""
    output = Path(output)
    data = output / "data"
    if not (data / "annotations/instances_val.json").exists():
        generate(data, seed=seed)
    results, logs = {}, {}
    for attention in ("deformable", "dense"):
        run = output / attention
        config = DeformableDETRConfig.tiny(num_classes=len(CLASSES), attention=attention)
        cfg = TrainConfig(minutes=minutes, seed=seed, eval_every_epochs=1)
        results[attention] = train(data, run, config, cfg, progress=progress)
        logs[attention] = run / "log.jsonl"
    plot_curves(logs, output / "deformable_vs_dense.png")
    (output / "comparison.json").write_text(json.dumps(results, indent=1))
    return results

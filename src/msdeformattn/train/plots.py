"""Figures of training runs: loss and metric curves (matplotlib, written as PNG)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

__all__ = ["headline_of", "plot_curves", "plot_training_curves", "read_log"]


def read_log(log: str | Path) -> list[dict]:
    """The records of a ``log.jsonl``, one dict per epoch."""
    return [json.loads(line) for line in Path(log).read_text().splitlines() if line.strip()]


def headline_of(rows: list[dict]) -> str | None:
    """The metric a run is judged by (``AP``, ``mIoU``, ...), as its log names it on the
    evaluated lines; None when no line does (nothing was evaluated)."""
    return next((r["headline"] for r in reversed(rows) if "headline" in r), None)


def plot_training_curves(log: str | Path, path: str | Path) -> None:
    """Training loss and the validation headline metric (see :func:`headline_of`) against
    epochs, side by side, into one PNG."""
    rows = read_log(log)
    headline = headline_of(rows)
    fig, (loss_ax, metric_ax) = plt.subplots(1, 2, figsize=(10, 4))
    loss_ax.plot([r["epoch"] + 1 for r in rows], [r["loss"] for r in rows], marker=".")
    loss_ax.set_ylabel("training loss")
    if headline is not None:
        evaluated = [r for r in rows if r.get(headline) is not None]
        metric_ax.plot([r["epoch"] + 1 for r in evaluated], [r[headline] for r in evaluated], "o-")
        metric_ax.set_ylabel(f"{headline} on the validation split")
    metric_ax.set_ylim(0, 1)
    for ax in (loss_ax, metric_ax):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(
    logs: dict[str, Path],
    path: str | Path,
    metrics: tuple[str, ...] = ("AP", "AP50"),
    title: str = "Deformable vs dense attention, same detector and budget",
) -> None:
    """``metrics`` of each run's evaluated epochs against training time and against epochs,
    one line per run and metric (the first solid, the others dashed), into one PNG."""
    fig, (by_time, by_epoch) = plt.subplots(1, 2, figsize=(10, 4))
    for name, log in logs.items():
        rows = [r for r in read_log(log) if r.get(metrics[0]) is not None]
        minutes = [r["elapsed_s"] / 60 for r in rows]
        epochs = [r["epoch"] + 1 for r in rows]
        for ax, xs in ((by_time, minutes), (by_epoch, epochs)):
            for k, metric in enumerate(metrics):
                style = {"marker": "o"} if k == 0 else {"marker": ".", "linestyle": "--"}
                ax.plot(xs, [r[metric] for r in rows], label=f"{name} {metric}", **style)
    by_time.set_xlabel("training time (minutes)")
    by_epoch.set_xlabel("epochs")
    for ax in (by_time, by_epoch):
        ax.set_ylabel("on the synthetic validation split")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

"""The files of a run folder and the rules for them.

A run writes ``last.pt`` (everything a resume needs, every epoch), ``best.pt`` (the
weights of the best headline metric so far), ``log.jsonl`` (a line per epoch),
``metrics.json`` (the final evaluation) and ``curves.png``. A folder that holds a run is
never written over by accident: a new run refuses it unless told to ``resume`` it or to
``overwrite`` it.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from ..util.errors import UsageError
from .plots import plot_training_curves

__all__ = [
    "RUN_FILES",
    "append_log",
    "atomic_save",
    "check_output",
    "clear_run",
    "next_free_run",
    "prepare_output",
    "read_last",
    "write_checkpoints",
    "write_results",
]

#: What a run folder holds; a new run refuses a folder that has any of them.
RUN_FILES = ("last.pt", "best.pt", "log.jsonl", "metrics.json")
#: The ``task`` entry of a checkpoint without one: detection's came first and carry none.
DEFAULT_TASK = "detection"


def check_output(output: Path, resume: bool, overwrite: bool) -> None:
    """Refuse ``--resume`` with ``--overwrite``, a resume without ``last.pt``, and a new run
    into a folder that already holds one."""
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


def next_free_run(parent: Path) -> Path:
    """``parent/run``, or ``run-2``, ``run-3``, ... when it holds a run: a demo re-run keeps
    the earlier runs."""
    run, k = parent / "run", 1
    while any((run / name).exists() for name in RUN_FILES):
        k += 1
        run = parent / f"run-{k}"
    return run


def clear_run(output: Path) -> None:
    """Remove an earlier run's files (``--overwrite``); nothing else in the folder."""
    for name in (*RUN_FILES, "curves.png"):
        (output / name).unlink(missing_ok=True)


def prepare_output(output: Path, overwrite: bool) -> None:
    """Create ``output``, first removing an earlier run's files when ``overwrite``."""
    if overwrite:
        clear_run(output)
    output.mkdir(parents=True, exist_ok=True)


def read_last(output: Path, task: str, *, mmap: bool = False) -> dict[str, Any]:
    """``output/last.pt`` for a resume, on the CPU; refused when it is not one or another
    task wrote it. ``mmap``: map the file instead of reading it (a few entries wanted)."""
    path = output / "last.pt"
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, ValueError) as e:
        saved = e
    if not isinstance(saved, dict) or "train_config" not in saved:
        raise UsageError(f"--resume: {path} is not a training run's last.pt")
    found = saved.get("task", DEFAULT_TASK)
    if found != task:
        raise UsageError(f"--resume: {path} is a {found} run; resume it with --task {found}")
    return saved


def atomic_save(obj: dict, path: Path) -> None:
    """torch.save to a temporary file renamed over ``path``: a crash never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_checkpoints(output: Path, state: dict, meta: dict, best: bool) -> None:
    """``last.pt`` (``state``: everything a resume needs) and, when ``best``, ``best.pt``:
    ``meta`` with the weights and the epoch only (what evaluation and prediction read)."""
    atomic_save(state, output / "last.pt")
    if best:
        atomic_save({**meta, "model": state["model"], "epoch": state["epoch"]}, output / "best.pt")


def append_log(output: Path, record: dict) -> None:
    """One epoch's line of ``log.jsonl``."""
    with open(output / "log.jsonl", "a") as log:
        log.write(json.dumps(record) + "\n")


def write_results(output: Path, metrics: dict) -> None:
    """``metrics.json`` and, when epochs were logged, ``curves.png``."""
    (output / "metrics.json").write_text(json.dumps(metrics, indent=1))
    log = output / "log.jsonl"
    # A budget spent before the first epoch ends leaves no log to draw.
    if log.exists():
        plot_training_curves(log, output / "curves.png")

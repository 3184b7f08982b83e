"""Deformable against dense attention for the same wall-clock budget: the convergence claim."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from ..models.deformable_detr import DeformableDETRConfig
from .config import PRESETS
from .loop import train
from .plots import plot_curves
from .synthetic import CLASSES, generate

__all__ = ["compare"]


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
        cfg = replace(PRESETS["tiny"].train, minutes=minutes, seed=seed, eval_every=1)
        results[attention] = train(data, run, config, cfg, progress=progress)
        logs[attention] = run / "log.jsonl"
    plot_curves(logs, output / "deformable_vs_dense.png")
    (output / "comparison.json").write_text(json.dumps(results, indent=1))
    return results

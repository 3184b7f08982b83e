"""Deformable attention against its baseline for the same wall-clock budget: the convergence
claim, for detection (deformable vs dense attention in the same detector) and segmentation
(the deformable pixel decoder vs the same decoder without its deformable layers, a plain FPN).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from ..models.deformable_detr import DeformableDETRConfig
from ..models.segmenter import SegmenterConfig
from .config import PRESETS, SEGMENTATION_PRESETS
from .loop import train
from .plots import plot_curves
from .segmentation_data import generate_segmentation
from .segmentation_loop import train_segmenter
from .synthetic import CLASSES, generate

__all__ = ["FIGURES", "compare"]

#: The figure each task's comparison writes into its output folder.
FIGURES = {"detection": "deformable_vs_dense.png", "segmentation": "deformable_vs_fpn.png"}


def compare(
    output: str | Path,
    minutes: float = 10.0,
    seed: int = 0,
    progress: bool = True,
    task: str = "detection",
) -> dict[str, dict]:
    """Train the task's tiny model with deformable attention and with its baseline, each for
    ``minutes`` on the synthetic data (generated into ``output/data`` unless there), and
    evaluate after every epoch. Writes each run's folder, ``comparison.json`` (the final
    metrics) and one figure (:data:`FIGURES`) of the headline metric against training time
    and epochs; returns ``{run name: final metrics}``.

    Detection: ``deformable`` vs ``dense`` (AP, AP50). Segmentation: ``deformable`` vs
    ``fpn`` (mIoU, pixel accuracy).
    """
    if task not in FIGURES:
        raise ValueError(f"task must be one of {tuple(FIGURES)}, got {task!r}")
    if not minutes > 0:
        # Before the data is generated: minutes of work for nothing otherwise.
        raise ValueError(f"minutes must be > 0, got {minutes!r}")
    output = Path(output)
    data = output / "data"
    results, logs = {}, {}
    if task == "detection":
        if not (data / "annotations/instances_val.json").exists():
            generate(data, seed=seed)
        cfg = replace(PRESETS["tiny"].train, minutes=minutes, seed=seed, eval_every=1)
        for attention in ("deformable", "dense"):
            config = DeformableDETRConfig.tiny(num_classes=len(CLASSES), attention=attention)
            results[attention] = train(data, output / attention, config, cfg, progress=progress)
            logs[attention] = output / attention / "log.jsonl"
        metrics, title = ("AP", "AP50"), "Deformable vs dense attention, same detector and budget"
    else:
        if not (data / "classes.json").exists():
            generate_segmentation(data, seed=seed)
        # The demo's recipe, evaluated every epoch for the curve.
        cfg = replace(SEGMENTATION_PRESETS["tiny"].train, minutes=minutes, seed=seed, eval_every=1)
        for decoder in ("deformable", "fpn"):
            config = SegmenterConfig.tiny(num_classes=len(CLASSES) + 1, decoder=decoder)
            run = output / decoder
            results[decoder] = train_segmenter(data, run, config, cfg, progress=progress)
            logs[decoder] = run / "log.jsonl"
        metrics = ("mIoU", "pixel_accuracy")
        title = "Deformable pixel decoder vs plain FPN, same segmenter and budget"
    plot_curves(logs, output / FIGURES[task], metrics, title)
    (output / "comparison.json").write_text(json.dumps(results, indent=1))
    return results

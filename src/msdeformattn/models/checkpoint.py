"""The project's checkpoint file: the config and the weights of a detector, in one torch.save."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from .config import DeformableDETRConfig, config_from_dict
from .convert import load_reference_checkpoint, read_weights_file
from .deformable_detr import DeformableDETR, build_model

__all__ = ["load_checkpoint", "save_checkpoint"]


def save_checkpoint(
    path: str | Path, model: DeformableDETR, config: DeformableDETRConfig, **extra
) -> None:
    """Write ``{"config", "model", **extra}`` (extra: optimizer state, epoch, ...)."""
    torch.save({"config": dataclasses.asdict(config), "model": model.state_dict(), **extra}, path)


def load_checkpoint(
    path: str | Path, *, output_extra: bool = False
) -> DeformableDETR | tuple[DeformableDETR, dict]:
    """The detector of a checkpoint, in eval mode, with its config as ``model.config``;
    with ``output_extra=True`` also the file's other entries (epoch, dataset, sizes, ...),
    as ``(model, extra)``, the way ``from_pretrained`` gives its report on request."""
    data = read_weights_file(Path(path), "an msdeformattn checkpoint")
    if not isinstance(data, dict) or "config" not in data or "model" not in data:
        raise ValueError(f"{path} is not an msdeformattn checkpoint (needs 'config' and 'model')")
    config = config_from_dict(data.pop("config"))
    model = build_model(config)
    report = load_reference_checkpoint(model, data.pop("model"))
    if not report.exact:
        raise ValueError(f"{path}: the weights do not fit the checkpoint's config:\n{report}")
    return (model.eval(), data) if output_extra else model.eval()

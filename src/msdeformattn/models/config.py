"""The detector's hyper-parameters, in a module with no heavy imports (loaders read it alone)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from ..util.errors import UsageError

__all__ = [
    "LAPTOP_TRUNK",
    "DeformableDETRConfig",
    "check_choices",
    "check_positive_ints",
    "config_from_dict",
]

#: The trunk of the ``tiny`` presets (detector and segmenter): basic blocks of widths
#: 32-256, one per stage, BatchNorm trained from scratch.
LAPTOP_TRUNK: dict[str, Any] = {
    "backbone_norm": "batch",
    "backbone_widths": (32, 64, 128, 256),
    "backbone_depths": (1, 1, 1, 1),
}


def check_choices(config: Any, choices: Mapping[str, tuple[str, ...]]) -> None:
    """Refuse a field of ``config`` whose value is not among its ``choices``."""
    for name, allowed in choices.items():
        if getattr(config, name) not in allowed:
            raise UsageError(f"{name} must be one of {allowed}, got {getattr(config, name)!r}")


def check_positive_ints(
    config: Any, names: tuple[str, ...], hints: Mapping[str, str] | None = None
) -> None:
    """Refuse a field of ``config`` that is not an integer >= 1 (``hints`` adds a word on one)."""
    for name in names:
        value = getattr(config, name)
        # bool is an int to Python, but True layers is a mistake.
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            hint = (hints or {}).get(name, "")
            raise UsageError(f"{name} must be a positive integer, got {value!r}{hint}")


@dataclass(frozen=True)
class DeformableDETRConfig:
    """Model hyper-parameters; the defaults are the paper's (ResNet-50, 300 queries)."""

    num_classes: int = 91
    backbone: str = "resnet50"
    #: "frozen" BatchNorm for pretrained backbones, "batch" to train from scratch.
    backbone_norm: str = "frozen"
    #: A custom trunk (block type, widths and blocks per stage, stem width); overrides ``backbone``.
    backbone_block: str = "basic"
    backbone_widths: tuple[int, ...] | None = None
    backbone_depths: tuple[int, ...] | None = None
    backbone_stem: int | None = None
    d_model: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 1024
    dropout: float = 0.1
    num_feature_levels: int = 4
    #: How many backbone stages feed the transformer (the last ones of C3, C4, C5; 1 to 3);
    #: the remaining levels are strided convolutions on top. None: min(3, num_feature_levels),
    #: the reference's choice. transformers' default ResNet config gives C5 alone (1).
    num_backbone_levels: int | None = None
    enc_n_points: int = 4
    dec_n_points: int = 4
    num_queries: int = 300
    aux_loss: bool = True
    with_box_refine: bool = False
    two_stage: bool = False
    backend: str | None = None
    #: "dense": the DETR-style baseline with ordinary attention in encoder and cross-attention
    attention: str = "deformable"

    def __post_init__(self) -> None:
        check_choices(
            self,
            {
                "backbone_norm": ("frozen", "batch"),
                "backbone_block": ("basic", "bottleneck"),
                "attention": ("deformable", "dense"),
            },
        )
        check_positive_ints(self, ("num_classes", "d_model", "nheads", "dec_layers", "num_queries"))
        if self.two_stage and self.attention == "dense":
            raise UsageError("two_stage runs on deformable attention only (attention='dense')")
        if self.two_stage and not self.with_box_refine:
            # The reference's two-stage decoder refines the proposals it starts from.
            raise UsageError("two_stage needs with_box_refine (as in the reference)")

    @classmethod
    def tiny(cls, num_classes: int = 4, **overrides) -> DeformableDETRConfig:
        """A model that trains on a laptop CPU: d_model 128, 2+2 layers, 30 queries,
        a basic-block trunk of widths 32-256 with one block per stage, trainable BatchNorm."""
        base = cls(
            num_classes=num_classes,
            **LAPTOP_TRUNK,
            d_model=128,
            nheads=8,
            enc_layers=2,
            dec_layers=2,
            dim_feedforward=512,
            dropout=0.0,
            num_queries=30,
        )
        return replace(base, **overrides)


def config_from_dict(raw: Mapping[str, Any], cls: type | None = None) -> Any:
    """The config of ``dataclasses.asdict(config)`` as a checkpoint stores it (tuples as lists);
    ``cls``: the config dataclass (default DeformableDETRConfig; also TrainConfig).

    Entries that are not fields (from another version of the package) are left out.
    """
    cls = cls or DeformableDETRConfig
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in fields})

"""Detectors built on the deformable transformer."""

from .backbone import Backbone, FrozenBatchNorm2d, Joiner, PositionEmbeddingSine, ResNet, resnet
from .deformable_detr import (
    MLP,
    DeformableDETR,
    DeformableDETRConfig,
    box_cxcywh_to_xyxy,
    build_model,
    post_process,
)

__all__ = [
    "MLP",
    "Backbone",
    "DeformableDETR",
    "DeformableDETRConfig",
    "FrozenBatchNorm2d",
    "Joiner",
    "PositionEmbeddingSine",
    "ResNet",
    "box_cxcywh_to_xyxy",
    "build_model",
    "post_process",
    "resnet",
]

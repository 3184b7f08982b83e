"""Detectors built on the deformable transformer."""

from .backbone import Backbone, FrozenBatchNorm2d, Joiner, PositionEmbeddingSine, ResNet, resnet
from .config import DeformableDETRConfig
from .convert import LoadReport, load_backbone_weights
from .deformable_detr import MLP, DeformableDETR, box_cxcywh_to_xyxy, build_model, post_process
from .mask2former_head import MaskedAttentionDecoder
from .pixel_decoder import MSDeformAttnPixelDecoder, PixelDecoderOutput
from .segmenter import DeformableSegmenter, SegmenterConfig

__all__ = [
    "MLP",
    "Backbone",
    "DeformableDETR",
    "DeformableDETRConfig",
    "DeformableSegmenter",
    "FrozenBatchNorm2d",
    "Joiner",
    "LoadReport",
    "MSDeformAttnPixelDecoder",
    "MaskedAttentionDecoder",
    "PixelDecoderOutput",
    "PositionEmbeddingSine",
    "ResNet",
    "SegmenterConfig",
    "box_cxcywh_to_xyxy",
    "build_model",
    "load_backbone_weights",
    "post_process",
    "resnet",
]

"""Deployment helpers: drop-in speed-ups for existing models, export to files.

(The operator's ONNX decomposition lives with the operator: :mod:`msdeformattn.ops.onnx`.)
"""

from .export import export_onnx, export_program, min_image_size
from .transformers import FusedMultiScaleDeformableAttention, swap_into_transformers

__all__ = [
    "FusedMultiScaleDeformableAttention",
    "export_onnx",
    "export_program",
    "min_image_size",
    "swap_into_transformers",
]

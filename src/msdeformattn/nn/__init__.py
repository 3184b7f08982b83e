"""Layers built on the operator: the attention layer, the deformable transformer, and the
dense baseline with the same interface."""

from .attention import MSDeformAttn
from .dense import DenseTransformer
from .transformer import (
    DeformableTransformer,
    DeformableTransformerDecoder,
    DeformableTransformerDecoderLayer,
    DeformableTransformerEncoder,
    DeformableTransformerEncoderLayer,
    inverse_sigmoid,
)

__all__ = [
    "DeformableTransformer",
    "DeformableTransformerDecoder",
    "DeformableTransformerDecoderLayer",
    "DeformableTransformerEncoder",
    "DeformableTransformerEncoderLayer",
    "DenseTransformer",
    "MSDeformAttn",
    "inverse_sigmoid",
]

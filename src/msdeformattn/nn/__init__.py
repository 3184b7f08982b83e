"""Layers built on the operator: the attention layer and the deformable transformer."""

from .attention import MSDeformAttn
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
    "MSDeformAttn",
    "inverse_sigmoid",
]

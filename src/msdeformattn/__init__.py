"""msdeformattn: multi-scale deformable attention with fused kernels and no compiler.

>>> import msdeformattn
>>> out = msdeformattn.ms_deform_attn(value, spatial_shapes, level_start_index,
...                                   sampling_locations, attention_weights)
>>> msdeformattn.available_backends()
['cpu', 'reference']
"""

from .nn import MSDeformAttn
from .ops import (
    BackendNotSupportedError,
    Resolution,
    available_backends,
    ms_deform_attn,
    resolve,
)

__version__ = "0.1.0"

__all__ = [
    "BackendNotSupportedError",
    "MSDeformAttn",
    "Resolution",
    "__version__",
    "available_backends",
    "ms_deform_attn",
    "resolve",
]

"""msdeformattn: multi-scale deformable attention with fused kernels and no compiler.

>>> import msdeformattn
>>> out = msdeformattn.ms_deform_attn(value, spatial_shapes, level_start_index,
...                                   sampling_locations, attention_weights)
>>> msdeformattn.available_backends()
['cpu', 'reference']
"""

from importlib.metadata import PackageNotFoundError, version

from .nn import MSDeformAttn
from .ops import (
    BackendNotSupportedError,
    Resolution,
    available_backends,
    level_start_index,
    ms_deform_attn,
    resolve,
)

try:
    # One place for the version: pyproject.toml, as installed.
    __version__ = version("msdeformattn")
except PackageNotFoundError:  # run from a source tree (PYTHONPATH=src), not installed
    __version__ = "0+unknown"

__all__ = [
    "BackendNotSupportedError",
    "MSDeformAttn",
    "Resolution",
    "__version__",
    "available_backends",
    "level_start_index",
    "ms_deform_attn",
    "resolve",
]

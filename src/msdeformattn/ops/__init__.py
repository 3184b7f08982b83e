"""The operator: one registry of backends, one validation, one torch.library op."""

from .levels import level_start_index
from .op import ms_deform_attn
from .registry import (
    Backend,
    BackendNotSupportedError,
    Resolution,
    available_backends,
    get_backend,
    register,
    resolve,
)
from .validate import check_inputs

# After the operator is registered: its standard-op decomposition for the ONNX exporter.
from . import onnx as _onnx  # noqa: F401  isort: skip

__all__ = [
    "Backend",
    "BackendNotSupportedError",
    "Resolution",
    "available_backends",
    "check_inputs",
    "get_backend",
    "level_start_index",
    "ms_deform_attn",
    "register",
    "resolve",
]

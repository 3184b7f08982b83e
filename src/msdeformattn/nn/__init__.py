"""Layers built on the operator."""

from .attention import MSDeformAttn

__all__ = ["MSDeformAttn"]

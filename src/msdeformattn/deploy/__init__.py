"""Deployment helpers: drop-in speed-ups for existing models."""

from .transformers import FusedMultiScaleDeformableAttention, swap_into_transformers

__all__ = ["FusedMultiScaleDeformableAttention", "swap_into_transformers"]

"""One registry of backends, and the dispatch that picks one.

A backend states its capabilities as data and answers
``not_supported_reasons(...)`` in words; :func:`resolve` walks the backends in
priority order and takes the first with no reasons. When an explicit backend
cannot run a call, or none can, the error lists every reason.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import ClassVar

import torch

__all__ = [
    "Backend",
    "BackendNotSupportedError",
    "Resolution",
    "available_backends",
    "cast_grads",
    "get_backend",
    "register",
    "resolve",
]


class BackendNotSupportedError(ValueError):
    """No backend, or not the one asked for, can run this call; the message says why."""


class Backend:
    """A kernel family for the operator: capabilities as data plus two kernels.

    Subclasses set the class attributes and implement :meth:`forward` and
    :meth:`backward`; :meth:`not_supported_reasons` covers the attributes and
    may be extended for backend-specific limits.
    """

    NAME: ClassVar[str]
    #: dispatch order for ``backend=None``: higher runs first when supported.
    PRIORITY: ClassVar[int] = 0
    #: device types (``"cpu"``, ``"cuda"``, ...); ``None`` accepts any device.
    SUPPORTED_DEVICES: ClassVar[frozenset[str] | None] = None
    SUPPORTED_DTYPES: ClassVar[frozenset[torch.dtype]] = frozenset(
        {torch.float16, torch.bfloat16, torch.float32, torch.float64}
    )
    #: bitwise-identical gradients across runs (for a fixed thread count).
    IS_DETERMINISTIC: ClassVar[bool] = True
    #: Python modules the backend needs; a missing one makes it unavailable, never an import error.
    REQUIRES: ClassVar[tuple[str, ...]] = ()

    def unavailable_reason(self) -> str | None:
        # Looked up once per process: resolve() runs on every call of the operator.
        if not hasattr(self, "_unavailable"):
            missing = [m for m in self.REQUIRES if importlib.util.find_spec(m) is None]
            self._unavailable = (
                f"needs the Python package {missing[0]!r}, which is not installed"
                if missing
                else None
            )
        return self._unavailable

    def not_supported_reasons(
        self,
        value: torch.Tensor,
        sampling_locations: torch.Tensor,
        attention_weights: torch.Tensor,
    ) -> list[str]:
        reasons = []
        missing = self.unavailable_reason()
        if missing:
            reasons.append(missing)
        device = value.device.type
        if self.SUPPORTED_DEVICES is not None and device not in self.SUPPORTED_DEVICES:
            wanted = ", ".join(sorted(self.SUPPORTED_DEVICES))
            reasons.append(f"runs on {wanted} tensors, not {device}")
        for name, t in (
            ("value", value),
            ("sampling_locations", sampling_locations),
            ("attention_weights", attention_weights),
        ):
            if t.dtype not in self.SUPPORTED_DTYPES:
                reasons.append(f"does not support {name} of dtype {t.dtype}")
        if not self.IS_DETERMINISTIC and torch.are_deterministic_algorithms_enabled():
            reasons.append(
                "is not deterministic and torch.use_deterministic_algorithms(True) is on"
            )
        return reasons

    def dispatch_reasons(
        self,
        value: torch.Tensor,
        sampling_locations: torch.Tensor,
        attention_weights: torch.Tensor,
    ) -> list[str]:
        """Extra reasons not to pick this backend automatically (``backend=None``)."""
        return []

    def supports(
        self,
        value: torch.Tensor,
        sampling_locations: torch.Tensor,
        attention_weights: torch.Tensor,
    ) -> bool:
        return not self.not_supported_reasons(value, sampling_locations, attention_weights)

    def forward(
        self,
        value: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        sampling_locations: torch.Tensor,
        attention_weights: torch.Tensor,
    ) -> torch.Tensor:
        raise NotImplementedError

    def backward(
        self,
        grad_output: torch.Tensor,
        value: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        sampling_locations: torch.Tensor,
        attention_weights: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError


def cast_grads(
    grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    value: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each gradient in its input's dtype and shape (kernels work in float32/64)."""
    return tuple(
        g.view(t.shape).to(t.dtype)
        for g, t in zip(grads, (value, sampling_locations, attention_weights), strict=True)
    )


# Kept sorted by PRIORITY, highest first: the first that supports a call runs it.
_REGISTRY: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    """Add a backend to the dispatch list at its ``PRIORITY``."""
    _REGISTRY[backend.NAME] = backend
    ordered = sorted(_REGISTRY.values(), key=lambda b: -b.PRIORITY)
    _REGISTRY.clear()
    _REGISTRY.update((b.NAME, b) for b in ordered)
    return backend


def get_backend(name: str) -> Backend:
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(repr(n) for n in _REGISTRY)
        raise ValueError(f"backend must be one of {known} or None, got {name!r}") from None


def available_backends() -> list[str]:
    """Names of the backends whose dependencies are installed, highest priority first."""
    return [name for name, b in _REGISTRY.items() if b.unavailable_reason() is None]


@dataclass(frozen=True)
class Resolution:
    """Which backend a call runs and why; ``rejected`` holds the reasons of those passed over."""

    backend: str
    reason: str
    rejected: dict[str, list[str]] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"{self.backend}: {self.reason}"]
        lines += [f"  not {name}: {'; '.join(r)}" for name, r in self.rejected.items()]
        return "\n".join(lines)


def resolve(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    backend: str | None = None,
) -> Resolution:
    """Say which backend :func:`msdeformattn.ms_deform_attn` would run for these inputs.

    With ``backend=None`` the first backend in priority order that supports
    the call is chosen; with a name, that backend or a
    :class:`BackendNotSupportedError` listing why it cannot run the call.
    """
    if backend is not None:
        chosen = get_backend(backend)
        reasons = chosen.not_supported_reasons(value, sampling_locations, attention_weights)
        if reasons:
            raise BackendNotSupportedError(
                f"backend {backend!r} cannot run this call: {'; '.join(reasons)}"
            )
        return Resolution(backend, "asked for explicitly")
    rejected: dict[str, list[str]] = {}
    for name, candidate in _REGISTRY.items():
        reasons = candidate.not_supported_reasons(
            value, sampling_locations, attention_weights
        ) or candidate.dispatch_reasons(value, sampling_locations, attention_weights)
        if not reasons:
            why = "highest-priority backend that supports the call"
            return Resolution(name, why, rejected)
        rejected[name] = reasons
    listed = "; ".join(f"{n}: {', '.join(r)}" for n, r in rejected.items())
    raise BackendNotSupportedError(f"no backend can run this call ({listed})")

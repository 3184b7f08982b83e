"""The ``triton`` backend: fused Triton kernels for CUDA tensors.

float16, bfloat16, float32 and float64 inputs (and mixes, as autocast
produces). Arithmetic in float32, or float64 when an input is float64 (what
gradcheck needs); outputs and gradients in the inputs' dtypes. The fast
backward adds grad_value with atomics; when
``torch.are_deterministic_algorithms_enabled()`` it instead sorts the samples
by the value row they touch and sums each row in that fixed order (bitwise
reproducible, at the cost of a sort and O(N*Lq*M*L*P) index memory).

Testing without a GPU: with ``TRITON_INTERPRET=1`` set before the kernels
are first used, Triton's interpreter runs the same kernels on CPU tensors.
``backend="triton"`` then accepts CPU tensors; ``backend=None`` never picks
the interpreter, which is for tests only.

The kernels' launchers are ``torch.library.triton_op``s (see
:mod:`._triton_kernels`). :func:`apply` is the route the public function takes
once it has picked this backend: the forward triton_op with an autograd rule
whose backward is the atomic triton_op (or the opaque deterministic operator),
so torch.compile of a model traces into the kernels' allocations and launches
and Inductor schedules them with the rest of the graph, instead of one opaque
``msdeformattn::ms_deform_attn`` node. Calling that operator directly with
``backend="triton"`` still runs the same kernels, opaquely.
"""

from __future__ import annotations

import os

import torch

from .registry import Backend, cast_grads, register

__all__ = ["TritonBackend", "apply"]


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _kernels():
    from . import _triton_kernels

    return _triton_kernels


def _contiguous(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.contiguous() for t in tensors]


def apply(*inputs: torch.Tensor) -> torch.Tensor:
    """The forward as the kernel operators themselves, differentiable: (N, Lq, M*D).

    ``inputs`` are :func:`~msdeformattn.ms_deform_attn`'s five tensors, checked
    (the public function validates and picks the backend first).
    """
    return _kernels().forward(*_contiguous(*inputs))


class TritonBackend(Backend):
    NAME = "triton"
    PRIORITY = 20
    SUPPORTED_DEVICES = frozenset({"cuda", "cpu"})
    SUPPORTED_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
    # The deterministic path is taken automatically under deterministic mode.
    IS_DETERMINISTIC = True
    REQUIRES = ("triton",)

    def not_supported_reasons(self, value, sampling_locations, attention_weights):
        reasons = super().not_supported_reasons(value, sampling_locations, attention_weights)
        if value.device.type == "cpu" and not interpreter_on():
            reasons.append(
                "runs on CPU tensors only under Triton's interpreter (TRITON_INTERPRET=1)"
            )
        return reasons

    def dispatch_reasons(self, value, sampling_locations, attention_weights):
        if value.device.type == "cpu":
            return ["the Triton interpreter is for tests: ask for backend='triton' explicitly"]
        return []

    def forward(self, *inputs):
        return apply(*inputs)

    def backward(self, grad_output, *inputs):
        grads = _kernels().backward(
            *_contiguous(grad_output, *inputs),
            deterministic=torch.are_deterministic_algorithms_enabled(),
        )
        value, _, _, sampling_locations, attention_weights = inputs
        return cast_grads(grads, value, sampling_locations, attention_weights)


register(TritonBackend())

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
:mod:`._triton_kernels`), but they run inside the opaque
``msdeformattn::ms_deform_attn``, so torch.compile of the public function
still sees one opaque node: only code calling ``torch.ops.msdeformattn.triton_*``
directly is traced into the kernels today.
"""

from __future__ import annotations

import os

import torch

from .registry import Backend, cast_grads, register

__all__ = ["TritonBackend"]


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _kernels():
    from . import _triton_kernels

    return _triton_kernels


def _contiguous(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.contiguous() for t in tensors]


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
        return _kernels().forward(*_contiguous(*inputs))

    def backward(self, grad_output, *inputs):
        grads = _kernels().backward(
            *_contiguous(grad_output, *inputs),
            deterministic=torch.are_deterministic_algorithms_enabled(),
        )
        value, _, _, sampling_locations, attention_weights = inputs
        return cast_grads(grads, value, sampling_locations, attention_weights)


register(TritonBackend())

"""The operator benchmark: every contender on every case, checked, timed and measured.

Speed-ups are over the grid_sample formulation that the reference implementation
and Hugging Face transformers use; GB/s are of the least traffic a fused kernel needs.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch

from .agreement import agreement_check, disagreement
from .cases import CASES, make_inputs
from .memory import peak_memory
from .peers import contenders
from .timing import Inputs, sync, time_case

#: The contender every speed-up is relative to.
BASELINE = "peer:grid_sample"


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def result_bytes(inputs: Inputs) -> int:
    """Bytes of what a forward+backward must return: the output and three gradients."""
    value, _, _, loc, attn = inputs
    N, _, M, D = value.shape
    out = N * loc.shape[1] * M * D * value.element_size()
    return out + _nbytes(value, loc, attn)


def moved_bytes(inputs: Inputs, backward: bool) -> int:
    """Bytes a fused kernel must move at least: inputs and output (and the gradients)."""
    value, _, _, loc, attn = inputs
    once = _nbytes(value, loc, attn)
    out = result_bytes(inputs) - once
    return 2 * once + 2 * out if backward else once + out


def run(
    cases: Sequence[str], dtype: str, device: str, min_run_time: float, memory: bool
) -> list[dict]:
    """One row per case and contender that agrees with the formula (the others are named
    on stderr): seconds, speed-ups over :data:`BASELINE`, GB/s and, with ``memory``, bytes.
    """
    rows = []
    fns = contenders(device)
    for case_name in cases:
        inputs = make_inputs(CASES[case_name], getattr(torch, dtype), device)
        check, expected = agreement_check(inputs)
        case_rows = []
        for name, fn in fns.items():
            why = disagreement(fn, check, expected)
            if why is not None:
                print(f"{case_name}: {name} left out: {why}", file=sys.stderr, flush=True)
                continue
            t_f, t_fb = time_case(fn, inputs, min_run_time)
            mem = peak_memory(case_name, name, dtype, device) if memory else None
            case_rows.append(
                dict(
                    fwd_gbps=moved_bytes(inputs, False) / t_f / 1e9,
                    fwd_bwd_gbps=moved_bytes(inputs, True) / t_fb / 1e9,
                    case=case_name,
                    contender=name,
                    fwd_s=t_f,
                    fwd_bwd_s=t_fb,
                    peak_bytes=mem,
                    workspace_bytes=None if mem is None else mem - result_bytes(inputs),
                )
            )
        base = next((r for r in case_rows if r["contender"] == BASELINE), None)
        if base is not None:  # else the baseline was left out: no speed-ups
            for r in case_rows:
                r["speedup_fwd"] = base["fwd_s"] / r["fwd_s"]
                r["speedup_fwd_bwd"] = base["fwd_bwd_s"] / r["fwd_bwd_s"]
        rows += case_rows
        sync(device)
    return rows

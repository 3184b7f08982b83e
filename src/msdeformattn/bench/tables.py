"""The markdown tables the benchmark prints (docs/benchmarks.md copies them)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

_OPERATOR_COLUMNS = [
    "case",
    "contender",
    "forward ms",
    "x grid_sample",
    "fwd+bwd ms",
    "x grid_sample",
    "peak extra MiB",
    "workspace MiB",
]


def _mib(b: int | None) -> str:
    # A workspace a few pages below zero is the RSS's granularity: show 0.
    return "-" if b is None else f"{max(b, 0) / 2**20:.0f}"


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def format_table(rows: list[dict], bandwidth: bool = False) -> str:
    """The operator benchmark's rows; with ``bandwidth``, the achieved GB/s of the least traffic."""
    cols = _OPERATOR_COLUMNS + (["fwd GB/s", "fwd+bwd GB/s"] if bandwidth else [])

    def speedup(r: dict, key: str) -> str:  # "-" when the baseline itself was left out
        return f"{r[key]:.1f}x" if key in r else "-"

    lines = [_row(cols), "|" + "---|" * len(cols)]
    for r in rows:
        cells = [
            r["case"],
            r["contender"],
            f"{r['fwd_s'] * 1e3:.2f}",
            speedup(r, "speedup_fwd"),
            f"{r['fwd_bwd_s'] * 1e3:.2f}",
            speedup(r, "speedup_fwd_bwd"),
            _mib(r["peak_bytes"]),
            _mib(r["workspace_bytes"]),
        ]
        if bandwidth:
            cells += [f"{r['fwd_gbps']:.0f}", f"{r['fwd_bwd_gbps']:.0f}"]
        lines.append(_row(cells))
    return "\n".join(lines)


def versus_transformers(
    columns: Sequence[str],
    seconds: Mapping[str, float],
    digits: int,
    peak_bytes: Mapping[str, int] | None = None,
) -> str:
    """An end-to-end table: one row per model, its seconds (``digits`` decimals), its
    speed-up over ``seconds["transformers"]`` and, given ``peak_bytes``, its peak MiB."""
    lines = [_row(columns), "|" + "---|" * len(columns)]
    for name, t in seconds.items():
        cells = [name, f"{t:.{digits}f}", f"{seconds['transformers'] / t:.2f}x"]
        if peak_bytes is not None:
            cells.append(f"{peak_bytes[name] / 2**20:.0f}")
        lines.append(_row(cells))
    return "\n".join(lines)

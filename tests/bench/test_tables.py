"""The tables' format, which docs/benchmarks.md copies."""

from __future__ import annotations

from msdeformattn.bench.tables import format_table, versus_transformers

ROW = dict(
    case="small",
    contender="msdeformattn:cpu",
    fwd_s=0.00728,
    fwd_bwd_s=0.04394,
    speedup_fwd=12.08,
    speedup_fwd_bwd=5.99,
    peak_bytes=3 * 2**20,
    workspace_bytes=-4096,
    fwd_gbps=0.166,
    fwd_bwd_gbps=55.4,
)


def test_operator_table():
    no_memory = {**ROW, "peak_bytes": None, "workspace_bytes": None}
    no_baseline = {k: v for k, v in ROW.items() if not k.startswith("speedup")}
    assert format_table([ROW, no_memory, no_baseline]).splitlines() == [
        "| case | contender | forward ms | x grid_sample | fwd+bwd ms | x grid_sample "
        "| peak extra MiB | workspace MiB |",
        "|---|---|---|---|---|---|---|---|",
        # A workspace a page below zero is the RSS's granularity: 0.
        "| small | msdeformattn:cpu | 7.28 | 12.1x | 43.94 | 6.0x | 3 | 0 |",
        "| small | msdeformattn:cpu | 7.28 | 12.1x | 43.94 | 6.0x | - | - |",
        "| small | msdeformattn:cpu | 7.28 | - | 43.94 | - | 3 | 0 |",
    ]


def test_operator_table_with_bandwidth():
    header, rule, row = format_table([ROW], bandwidth=True).splitlines()
    assert header.endswith("| workspace MiB | fwd GB/s | fwd+bwd GB/s |")
    assert rule == "|" + "---|" * 10
    assert row.endswith("| 3 | 0 | 0 | 55 |")


def test_versus_transformers():
    table = versus_transformers(
        ["encoder layer (train step)", "fwd+bwd s", "speed-up", "peak extra MiB"],
        {"msdeformattn": 0.5, "transformers": 2.0},
        digits=3,
        peak_bytes={"msdeformattn": 380 * 2**20, "transformers": 1061 * 2**20},
    )
    assert table.splitlines() == [
        "| encoder layer (train step) | fwd+bwd s | speed-up | peak extra MiB |",
        "|---|---|---|---|",
        "| msdeformattn | 0.500 | 4.00x | 380 |",
        "| transformers | 2.000 | 1.00x | 1061 |",
    ]
    assert versus_transformers(
        ["model", "inference s", "speed-up over transformers"],
        {"transformers": 1.0, "msdeformattn": 0.25},
        digits=2,
    ).splitlines()[2:] == ["| transformers | 1.00 | 1.00x |", "| msdeformattn | 0.25 | 4.00x |"]

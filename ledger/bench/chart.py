"""The benchmark's chart (a PNG next to its JSON): throughput per phase (and per process
count, when the scale-out phase ran) on the left, the suspension latency distribution on the
right. Needs matplotlib (the `dev` extras); without it the chart is skipped, with a note."""

from __future__ import annotations

from pathlib import Path
from typing import Any

PHASES = (
    ("raw", "raw consume", "steady_rate"),
    ("decode", "raw + decode", "steady_rate"),
    ("ledger", "ledger", "steady_rate"),
    ("projections", "projections", "steady_rate"),
    ("rebuild", "rebuild", "rate"),
    ("replay", "replay", "rate"),
    ("verify", "verify", "rate"),
)


def throughputs(results: dict[str, Any]) -> list[tuple[str, float]]:
    """(label, events or entries per second) of every phase that ran, in order."""
    bars = [(label, results[k][field]) for k, label, field in PHASES if k in results]
    for row in results.get("scale_out", []):
        bars.append((f"ledger ×{row['processes']}", row["rate"]))
    return bars


def write_chart(results: dict[str, Any], path: Path) -> Path | None:
    """Draw the chart into `path`; None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    bars = throughputs(results)
    rounds = [
        (results[key], label, color)
        for key, label, color in (
            ("latency_idle", "nothing else ingested", "#55a868"),
            ("latency", "while ingesting", "#dd8452"),
        )
        if results.get(key, {}).get("samples_ms")
    ]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), width_ratios=(3, 2))
    labels = [label for label, _ in bars]
    left.barh(labels, [rate for _, rate in bars], color="#4c72b0")
    left.invert_yaxis()
    left.set_xlabel("events (or journal entries) per second")
    for i, (_, rate) in enumerate(bars):
        left.text(rate, i, f" {rate:,.0f}", va="center", fontsize=8)
    left.set_title("throughput per phase")
    if rounds:
        for lat, label, color in rounds:
            samples = lat["samples_ms"]
            bins = min(40, max(5, len(samples) // 5))
            right.hist(samples, bins=bins, color=color, alpha=0.7, label=label)
            value = lat["p99_ms"]
            right.axvline(value, color=color, linestyle="--", linewidth=0.8)
            right.text(value, right.get_ylim()[1] * 0.9, f" p99 {value:.0f} ms", fontsize=8)
        right.legend(fontsize=8)
        right.set_xlabel("usage sent → AccountSuspended received (ms)")
        right.set_title("suspension latency")
    else:
        right.set_axis_off()
    machine = results["machine"]
    fig.suptitle(
        f"ledger benchmark {results['started_at']} · code {results['code']} · "
        f"{machine['cores']} cores, {machine['cpu']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

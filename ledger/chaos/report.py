"""The fault run's table: what was sent, what was injected, what the checker found."""

from __future__ import annotations

from collections import Counter

from ledger.chaos.run import Outcome

SHOWN = 25  # differences printed (all are counted)


def render(outcome: Outcome) -> str:
    o, model, result = outcome.options, outcome.model, outcome.result
    counts = result.counts
    injected = Counter(i.fault.kind for i in outcome.injected)
    failed = [i for i in outcome.injected if i.error]
    lines = [
        f"fault run  seed {o.seed}  events {o.events:,}  brokers {o.brokers}  "
        f"partitions {o.partitions}  faults {','.join(o.faults) or 'none'}",
        f"home {outcome.home}" + ("" if outcome.home.exists() else " (removed: the run passed)"),
        "",
        _row("events sent (accepted)", f"{len(model.accepted):,}"),
        _row(
            "transactions",
            f"{model.transactions['committed']:,} committed, {model.transactions['aborted']:,} "
            f"aborted ({len(model.aborted):,} events that must not be journaled)",
        ),
        _row(
            "malformed / odd records",
            ", ".join(
                f"{k} {n:,}"
                for k, n in sorted(model.sent_by_kind.items())
                if k not in ("traffic", "aborted")
            )
            or "none",
        ),
        _row(
            "faults injected",
            ", ".join(f"{k} {injected[k]}" for k in ("kill", "broker", "pg", "stop"))
            + (f"  ({len(failed)} failed to inject)" if failed else ""),
        ),
        _row(
            "worker exits not injected",
            ", ".join(f"{k} {n}" for k, n in sorted(outcome.worker_exits.items())) or "none",
        ),
        "",
        _row("lost", f"{counts['lost']:,}"),
        _row("duplicated", f"{counts['duplicated'] + counts['overcharged']:,}"),
        _row("aborted but journaled", f"{counts['aborted_journaled']:,}"),
        _row(
            "quarantined",
            f"{counts['quarantined']:,} of {model.expected_quarantined:,} expected "
            f"({counts['quarantine_missing']:,} missing, {counts['quarantined_copies']:,} "
            "copies of retried sends)",
        ),
        _row("dead-letter copies missing", f"{counts['deadletter_missing']:,}"),
        _row("unexplained rows", f"{counts['unexplained']:,}"),
        _row("account totals differing", f"{counts['totals_mismatch']:,}"),
        _row(
            "status events",
            f"{counts['status_events']:,} ({counts['status_resent']:,} re-sent)",
        ),
        _row(
            "ledger verify", "clean" if not counts["verify"] else f"{counts['verify']} differences"
        ),
        _row(
            "max stall per shard",
            "  ".join(f"{s}:{t:.1f}s" for s, t in sorted(outcome.stalls.items())) or "-",
        ),
        _row(
            "seconds",
            ", ".join(f"{k} {v:.0f}" for k, v in outcome.seconds.items()),
        ),
        "",
        "faults (due at progress, kind, target, down for, time until every shard committed again):",
    ]
    for injected_fault, (recovered, never) in zip(
        outcome.injected, outcome.recoveries, strict=True
    ):
        f = injected_fault.fault
        took = "-" if recovered is None else f"{recovered:.1f}s"
        if never:
            took += f" (shards {','.join(map(str, never))}: no commit after it)"
        error = f"  FAILED: {injected_fault.error}" if injected_fault.error else ""
        lines.append(f"  {f.at:6.1%}  {f.kind:<6} {f.target:<14} {f.hold_s:5.1f}s  {took}{error}")
    lines.append("")
    if result.ok:
        lines.append("PASS: nothing lost, duplicated or different")
    else:
        lines.append(f"FAIL: {len(result.differences):,} differences; the first: {result.first}")
        for difference in result.differences[:SHOWN]:
            lines.append(f"  {difference}")
        if len(result.differences) > SHOWN:
            lines.append(f"  … and {len(result.differences) - SHOWN:,} more")
    return "\n".join(lines)


def _row(label: str, value: str) -> str:
    return f"{label:<28} {value}"

"""The benchmark's report: progress lines as it goes, then the table of every phase (and,
with --profile, where write_batch's time goes)."""

from __future__ import annotations

import io
import pstats
import sys
from typing import Any


def say(*parts: object, end: str = "\n", file=None, flush: bool = True) -> None:
    """The benchmark's report: it is a command-line program, and this is its output."""
    stream = file or sys.stdout
    stream.write(" ".join(str(p) for p in parts) + end)
    if flush:
        stream.flush()


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}/s"


def print_table(results: dict[str, Any]) -> None:
    r = results
    m = r["machine"]
    ledger = r["ledger"]
    raw = r["raw"]
    proj = r.get("projections")
    journal = r["journal"]
    rows: list[tuple[str, str]] = [
        (
            "records",
            f"{r['events_total']:,} ({r['usage_events']:,} UsageRecorded + {r['accounts']:,} "
            f"AccountOpened + {r['payment_methods']:,} PaymentMethodAdded)",
        ),
        (
            "    of which noise",
            f"{r.get('duplicates', 0):,} duplicates (sent twice) + {r.get('malformed', 0):,} "
            "malformed (random bytes, truncated)",
        ),
        ("accounts / partitions", f"{r['accounts']:,} / {r['partitions']}"),
        ("encode (codec.encode)", _rate(r["encode_rate"])),
        ("produce (send + acks)", _rate(r["produce"]["rate"])),
        ("    cpu cores", _cores(r["produce"]["cpu_cores"])),
        (
            "(a) raw consume",
            f"{_rate(raw['steady_rate'])}  (incl. start-up: {_rate(raw['rate'])})",
        ),
        ("    cpu cores", _cores(raw["cpu_cores"])),
        (
            "(b) raw consume + decode",
            f"{_rate(r['decode']['steady_rate'])}  (incl. start-up: {_rate(r['decode']['rate'])})",
        ),
        (
            "(c) ledger -> PostgreSQL",
            f"{_rate(ledger['rate'])}  ({ledger['items']:,} in {ledger['seconds']:.1f}s "
            "from process start)",
        ),
        (
            "    after warm-up",
            f"{_rate(ledger['steady_rate'])}  (first row after {ledger['warm_seconds']:.1f}s)",
        ),
        (
            "    ledger / raw",
            f"{ledger['steady_rate'] / raw['steady_rate']:.1%}  (after warm-up, both)",
        ),
        ("    worker peak RSS", f"{ledger['peak_rss_mib']:.0f} MiB (VmHWM)"),
        ("    cpu cores", _cores(ledger["cpu_cores"])),
        (
            "    cpu per record",
            # Less sensitive to a busy machine than the rates: what each record cost.
            f"worker {_us(ledger, 'worker', ledger['items'])} + postgres "
            f"{_us(ledger, 'postgres', ledger['items'])}  (raw consume: "
            f"{_us(raw, 'bench', raw['records'])})",
        ),
        (
            "    after warm-up",
            f"worker {ledger['steady_cpu_us']:.0f} µs of CPU per record (start-up, imports "
            "and the first batch left out)",
        ),
        (
            "    journal",
            f"{journal['entries']:,} entries, {journal['postings']:,} postings, "
            f"{journal['rejected']:,} rejected; trial balance "
            f"{'0 (balanced)' if journal['balanced'] else 'UNBALANCED'}",
        ),
    ]
    if proj:
        rows += [
            (
                "(d) projections",
                f"{_rate(proj['rate'])} entries  ({proj['seconds']:.1f}s from process start)",
            ),
            ("    after warm-up", _rate(proj["steady_rate"])),
            ("    worker peak RSS", f"{proj['peak_rss_mib']:.0f} MiB (VmHWM)"),
            (
                "    cpu per entry",
                f"worker {proj['steady_cpu_us']:.0f} µs after warm-up",
            ),
            ("    cpu cores", _cores(proj["cpu_cores"])),
        ]
    else:
        rows.append(("(d) projections", "skipped"))
    for key, label, what in (
        ("rebuild", "(g) projections rebuild", "entries"),
        ("replay", "(h) ledger replay", "events"),
    ):
        if key in r:
            rows += [
                (
                    label,
                    f"{_rate(r[key]['rate'])} {what}  ({r[key]['entries']:,} in "
                    f"{r[key]['seconds']:.1f}s, in the benchmark's process)",
                ),
                ("    cpu cores", _cores(r[key]["cpu_cores"])),
            ]
    if "verify" in r:
        v = r["verify"]
        rows += [
            (
                "(j) ledger verify",
                f"{_rate(v['rate'])} entries  ({v['entries']:,} in {v['seconds']:.1f}s, its own "
                f"process; peak RSS {v['peak_rss_mib']:.0f} MiB)",
            ),
            (
                "    cpu",
                f"verify {v['cpu_us_per_entry']:.0f} µs per entry (its own CPU time); "
                + _cores(v["cpu_cores"]),
            ),
        ]
    if "storage" in r:
        st = r["storage"]
        biggest = ", ".join(
            f"{name} {size / st['records']:,.0f}" for name, size in list(st["tables"].items())[:4]
        )
        rows.append(
            (
                "storage",
                f"{st['bytes_per_record']:,.0f} bytes per input record, tables + indexes + TOAST "
                f"({st['bytes'] / 2**20:,.1f} MiB; {biggest})",
            )
        )
    for row in r.get("scale_out", []):
        rows.append(
            (
                f"(i) ledger x{row['processes']} process(es)",
                f"{_rate(row['rate'])}  ({row['seconds']:.1f}s from start; workers "
                f"{row['worker_cores']:.2f} cores, postgres "
                f"{row['cpu_cores'].get('postgres', 0):.2f}; RSS sum "
                f"{row['peak_rss_mib_sum']:.0f} MiB)",
            )
        )
    if "in_process" in r:
        ip = r["in_process"]
        rows.append(
            (
                "(e) write_batch in-process",
                f"{_rate(ip['rate'])}  ({ip['batches']} batches, "
                f"{1000 * ip['seconds'] / ip['batches']:.0f} ms/batch; no Kafka)",
            )
        )
    if "latency_idle" in r:
        lat = r["latency_idle"]
        rows.append(("(f) suspension latency", _latency(lat) + "  nothing else ingested"))
        if "cpu_cores" in lat:
            rows.append(("    cpu cores", _cores(lat["cpu_cores"])))
        if lat.get("stages_ms"):
            rows.append(("    stages p50/p99", _stages(lat["stages_ms"])))
    if "latency" in r:
        lat = r["latency"]
        rows.append(
            (
                "(f) suspension latency",
                _latency(lat)
                + f"  ({lat['accounts']} accounts: usage sent → AccountSuspended received)",
            )
        )
        if lat.get("background_sent"):
            rows.append(
                (
                    "    while ingesting",
                    f"{_rate(lat['background_rate'])} usage in the background "
                    f"({lat['background_sent']:,} sent; "
                    + (
                        "as given: "
                        if lat.get("background_rate_given")
                        else "half of (c) after warm-up: "
                    )
                    + f"{_rate(lat['background_rate_target'])})",
                )
            )
        if "cpu_cores" in lat:
            rows.append(("    cpu cores", _cores(lat["cpu_cores"])))
        if lat.get("stages_ms"):
            rows.append(("    stages p50/p99", _stages(lat["stages_ms"])))
    rows += [
        (
            "machine",
            f"{m['cpu']}, {m['cores_usable']}/{m['cores']} cores, "
            f"{m['ram_gib']} GiB RAM, {m['os']}",
        ),
        ("python / code", f"{m['python']} / {r['code']}"),
        ("kafka broker", r["broker"]),
        ("postgresql", r["postgres_version"]),
    ]
    others = [
        r[k]["cpu_cores"]["other"]
        for k in ("produce", "raw", "decode", "ledger", "projections")
        if k in r
    ]
    width = max(len(k) for k, _ in rows)
    say()
    say(f"ledger benchmark, {r['started_at']}")
    say("-" * (width + 70))
    for key, value in rows:
        say(f"{key:<{width}}  {value}")
    say("-" * (width + 70))
    if others and max(others) >= 0.25:
        say(
            f"note: other processes used up to {max(others):.2f} cores during the phases "
            "('other' above); the rates are pessimistic for this machine."
        )


def print_in_process(ip: dict[str, Any], stats: pstats.Stats) -> None:
    total = ip["seconds"]
    say(
        f"\n(e) LedgerWriter.write_batch in-process, {ip['batches']} batches: "
        f"{ip['rate']:,.0f} events/s (timed), {ip['profile']['rate']:,.0f}/s under cProfile"
    )
    say("where the time goes (wall time of each step, wrapped with timers):")
    for label, seconds in ip["sections"].items():
        say(
            f"  {label:<52} {seconds:7.2f}s {100 * seconds / total:5.1f}% "
            f"{1e6 * seconds / ip['events']:7.1f} us/event"
        )
    ptotal = ip["profile"]["seconds"]
    say(f"under cProfile (cumulative; Python parts inflated), {ip['profile']['file']}:")
    for label, seconds in ip["profile"]["functions"].items():
        say(f"  {label:<52} {seconds:7.2f}s {100 * seconds / ptotal:5.1f}%")
    out = io.StringIO()
    stats.stream = out  # type: ignore[attr-defined]
    stats.sort_stats("tottime").print_stats(15)
    say(out.getvalue().rstrip())


def _us(phase: dict[str, Any], group: str, items: int) -> str:
    """Microseconds of CPU per item used by a process group during a phase."""
    cores = phase["cpu_cores"].get(group, 0.0)
    return f"{1e6 * cores * phase['seconds'] / max(items, 1):,.0f} µs"


def _latency(lat: dict) -> str:
    return (
        f"p50 {lat['p50_ms']:.0f} ms · p95 {lat['p95_ms']:.0f} ms · "
        f"p99 {lat['p99_ms']:.0f} ms · max {lat['max_ms']:.0f} ms"
    )


def _stages(stages: dict[str, dict[str, float]]) -> str:
    return " · ".join(
        f"{stage} {v['p50_ms']:.0f}/{v['p99_ms']:.0f} ms" for stage, v in stages.items()
    )


def _cores(cores: dict[str, float]) -> str:
    parts = [f"{k} {v:.2f}" for k, v in cores.items() if not k.startswith("machine")]
    return (
        " · ".join(parts)
        + f" · machine {cores['machine']:.2f} of {cores['machine_capacity']:.0f} cores"
    )

"""The benchmark script runs end to end at a small size (its numbers are not asserted: speed
is measured by `make bench`, not by tests), and the journal it fills balances."""

import json
import os
import subprocess
import sys
from pathlib import Path


def test_the_benchmark_runs_and_reports_every_phase(stack, base_settings):
    env = os.environ | {
        "LEDGER_KAFKA_BOOTSTRAP": stack.bootstrap,
        "LEDGER_DATABASE_URL": stack.dsn,
        "LEDGER_OWNER_DATABASE_URL": stack.owner_dsn,  # it makes and migrates its database
        "LEDGER_HOME": str(base_settings.home),
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ledger.bench",
            "--events",
            "3000",
            "--accounts",
            "50",
            "--partitions",
            "4",
            "--latency-accounts",
            "20",
            "--scale-out",
            "2",
            "--py-spy",
            "--worker-log-level",
            "INFO",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    out = result.stdout
    for phase in (
        "(a) raw consume",
        "(b) raw consume + decode",
        "(c) ledger -> PostgreSQL",
        "ledger / raw",
        "worker peak RSS",
        "(d) projections",
        "(f) suspension latency",
        "nothing else ingested",
        "while ingesting",
        "stages p50/p99",
        "(g) projections rebuild",
        "(h) ledger replay",
        "(i) ledger x2 process(es)",
        "(j) ledger verify",
        "storage",
        "py-spy samples of the worker",
        "machine",
    ):
        assert phase in out, phase
    assert "3,000 UsageRecorded" in out
    # 1 % of the usage sent twice (dropped as redeliveries) and 1 % malformed (quarantined).
    assert "30 duplicates (sent twice) + 30 malformed" in out
    assert "30 rejected; trial balance 0 (balanced)" in out
    results = Path(out.split("results: ", 1)[1].split()[0])
    report = json.loads(results.read_text())
    assert report["journal"]["rejected_by_reason"] and report["scale_out"][0]["processes"] == 2
    assert results.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Suspension latency, idle and under load, each with the CPU of every role's process.
    for key in ("latency_idle", "latency"):
        assert len(report[key]["samples_ms"]) == 20
        assert {"ledger", "projections", "relay"} <= set(report[key]["cpu_cores"]), key
        # Where the time went, per stage, from the database's timestamps: the ledger's insert
        # follows the send and the projection's outbox row follows the insert (a reader may
        # see the record before the relay marks it published, so delivery can be below 0).
        stages = report[key]["stages_ms"]
        assert list(stages) == ["ledger", "projection", "relay", "delivery"], key
        assert stages["ledger"]["p50_ms"] > 0 and stages["projection"]["p50_ms"] > 0, stages
        assert all(s["p50_ms"] <= s["p99_ms"] <= s["max_ms"] for s in stages.values()), stages
    # The verify phase checked the whole drained journal, and the storage covers its tables.
    assert report["verify"]["entries"] == report["journal"]["entries"]
    # Its peak RSS is read from its own VmHWM while it runs (the rusage of a child also counts
    # the process it was forked from), within the verify's budget of 300 MB.
    assert 0 < report["verify"]["peak_rss_mib"] < 250
    assert {"journal_entries", "raw_events", "postings"} <= set(report["storage"]["tables"])
    assert report["storage"]["bytes"] == sum(report["storage"]["tables"].values())
    # py-spy sampled the ledger worker in the writer's code.
    samples = results.with_name(results.stem + "-ledger.pyspy.txt").read_text()
    assert "write_batch" in samples
    # At INFO, the latency phase's ledger logged a line per batch (at WARNING it logs none).
    batches = results.with_name(results.stem + "-latency-ledger.log").read_text()
    assert '"event": "batch_committed"' in batches


def test_the_sample_summary_splits_cpu_time_by_function(tmp_path):
    from ledger.bench.samples import read_stacks, split_time, summary

    path = tmp_path / "samples.txt"
    path.write_text(
        "main (cli.py:10);write_batch (journal.py:300);post (book.py:40) 6\n"
        "main (cli.py:10);write_batch (journal.py:310);copy (journal.py:900) 3\n"
        "main (cli.py:11);poll (consumer.py:200) 1\n"
        "not a sample line\n"
    )
    stacks = read_stacks(path)
    total, inclusive, own = split_time(stacks)
    assert total == 10
    # Lines of one function are one function; a frame is counted once per sample.
    assert inclusive["write_batch (journal.py)"] == 9 and own["write_batch (journal.py)"] == 0
    assert inclusive["main (cli.py)"] == 10 and own["post (book.py)"] == 6
    # 2 s of CPU over 1,000 records is 2,000 µs per record, split in proportion.
    lines = summary(path, cpu_seconds=2.0, records=1000)
    row = next(line for line in lines if line.endswith("write_batch (journal.py)"))
    assert row.split()[:2] == ["1800.0", "0.0"]


def test_a_role_that_drained_everything_in_its_first_step_reports_its_whole_run():
    from ledger.bench.worker_roles import RoleRun

    def run(warm_items: int) -> RoleRun:
        return RoleRun("projections", 1000, 2.0, 1.0, warm_items, 70.0, 0.5, 0.3, {}, 0)

    # After warm-up: the 600 items after the first progress, in the second second.
    assert run(400).steady_rate == 600 and round(run(400).steady_cpu_us) == 333
    # Everything was done when progress was first seen: no steady part to time, so the whole
    # run (it was a negative rate before).
    assert run(1000).steady_rate == 500 and run(1000).steady_cpu_us == 500


def test_the_background_rate_of_the_latency_phase_can_be_fixed_and_must_be_positive(capsys):
    import pytest

    from ledger.bench.cli import build_parser

    assert build_parser().parse_args([]).latency_rate is None  # half of (c)
    assert build_parser().parse_args(["--latency-rate", "3500"]).latency_rate == 3500
    for bad in ("0", "-5", "fast"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["--latency-rate", bad])
        assert "--latency-rate" in capsys.readouterr().err

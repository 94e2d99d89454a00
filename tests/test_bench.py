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
        "while ingesting",
        "(g) projections rebuild",
        "(h) ledger replay",
        "(i) ledger x2 process(es)",
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

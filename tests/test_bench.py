"""The benchmark script runs end to end at a small size (its numbers are not asserted: speed
is measured by `make bench`, not by tests), and the journal it fills balances."""

import os
import subprocess
import sys


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
        "machine",
    ):
        assert phase in out, phase
    assert "3,000 UsageRecorded" in out
    assert "0 rejected; trial balance 0 (balanced)" in out

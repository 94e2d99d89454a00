"""Phases (c) and (d): a worker role as a real `ledger worker --role <role>` process, timed
from its start until it has drained everything, with its peak RSS and CPU use."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

from ledger.bench import BenchError
from ledger.bench.proc_readings import CpuMeter, proc_cpu_seconds, proc_status_kib
from ledger.runner import start_worker, stop_worker

POLL_S = 0.05


@dataclasses.dataclass
class RoleRun:
    role: str
    items: int
    seconds: float  # process start → done
    warm_seconds: float  # process start → first progress seen
    warm_items: int  # progress already made when first seen
    peak_rss_mib: float
    cpu_seconds: float
    cpu_cores: dict[str, float]  # average cores per process group while the role ran
    exit_code: int

    @property
    def rate(self) -> float:
        return self.items / self.seconds

    @property
    def steady_rate(self) -> float:
        return (self.items - self.warm_items) / max(self.seconds - self.warm_seconds, 1e-9)


def run_role(
    role: str,
    env: dict[str, str],
    log_path: Path,
    progress: Callable[[], int],
    target: int,
    timeout: float,
    meter: CpuMeter,
    stall: float,
) -> RoleRun:
    """Start `ledger worker --role <role>`, wait until `progress()` reaches `target`, read its
    peak RSS and CPU time, SIGTERM it and check it exits 0. Gives up when there is no progress
    for `stall` seconds (a worker that keeps failing its batch retries forever)."""
    meter.start()
    started = time.perf_counter()
    proc = start_worker((role,), env, log_path)
    try:
        first: tuple[float, int] | None = None
        last = (started, -1)
        while True:
            count = progress()
            now = time.perf_counter()
            if count > 0 and first is None:
                first = (now, count)
            if count >= target:
                break
            if count != last[1]:
                last = (now, count)
            elif now - last[0] > stall:
                raise BenchError(
                    f"{role}: no progress for {stall:.0f}s at {count} of {target}; see {log_path}"
                )
            if proc.poll() is not None:
                raise BenchError(
                    f"{role} worker exited with {proc.returncode} after {count} of {target}; "
                    f"see {log_path}"
                )
            if now - started > timeout:
                raise BenchError(f"{role}: {count} of {target} after {timeout}s; see {log_path}")
            time.sleep(POLL_S)
        done = now
        cores = meter.stop({"worker": proc.pid})
        peak_rss = proc_status_kib(proc.pid, "VmHWM") / 1024
        cpu_seconds = proc_cpu_seconds(proc.pid)
        code = stop_worker(proc, timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if code != 0:
        raise BenchError(f"{role} worker exited with {code} after SIGTERM; see {log_path}")
    assert first is not None
    return RoleRun(
        role, target, done - started, first[0] - started, first[1], peak_rss, cpu_seconds, cores, 0
    )

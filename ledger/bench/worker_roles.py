"""Phases (c) and (d): a worker role as a real `ledger worker --role <role>` process, timed
from its start until it has drained everything, with its peak RSS and CPU use."""

from __future__ import annotations

import dataclasses
import shutil
import signal
import subprocess
import sys
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
    warm_cpu_seconds: float  # the worker's CPU time when the first progress was seen
    cpu_cores: dict[str, float]  # average cores per process group while the role ran
    exit_code: int

    @property
    def rate(self) -> float:
        return self.items / self.seconds

    @property
    def steady_cpu_us(self) -> float:
        """The worker's CPU per item after warm-up (imports, connections, the first batch);
        over the whole run when the first progress seen was already all of it."""
        if self.items <= self.warm_items:
            return self.cpu_seconds * 1e6 / max(self.items, 1)
        return (self.cpu_seconds - self.warm_cpu_seconds) * 1e6 / (self.items - self.warm_items)

    @property
    def steady_rate(self) -> float:
        """Items per second after warm-up; from the process start when the first progress
        seen was already all of it (nothing was timed after warm-up)."""
        if self.items <= self.warm_items:
            return self.rate
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
    samples_to: Path | None = None,
) -> RoleRun:
    """Start `ledger worker --role <role>`, wait until `progress()` reaches `target`, read its
    peak RSS and CPU time, SIGTERM it and check it exits 0. Gives up when there is no progress
    for `stall` seconds (a worker that keeps failing its batch retries forever). With
    `samples_to`, py-spy samples the worker's Python stacks (the thread holding the GIL) into
    that file, as collapsed stacks, until the role has drained everything."""
    meter.start()
    started = time.perf_counter()
    proc = start_worker((role,), env, log_path)
    sampler = start_sampler(proc.pid, samples_to) if samples_to is not None else None
    try:
        first: tuple[float, int] | None = None
        warm_cpu = 0.0
        last = (started, -1)
        while True:
            count = progress()
            now = time.perf_counter()
            if count > 0 and first is None:
                first = (now, count)
                warm_cpu = proc_cpu_seconds(proc.pid)
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
        if sampler is not None:
            stop_sampler(sampler)
        cores = meter.stop({"worker": proc.pid})
        peak_rss = proc_status_kib(proc.pid, "VmHWM") / 1024
        cpu_seconds = proc_cpu_seconds(proc.pid)
        code = stop_worker(proc, timeout=60)
    finally:
        if sampler is not None and sampler.poll() is None:
            sampler.kill()
            sampler.wait()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if code != 0:
        raise BenchError(f"{role} worker exited with {code} after SIGTERM; see {log_path}")
    assert first is not None
    return RoleRun(
        role,
        target,
        done - started,
        first[0] - started,
        first[1],
        peak_rss,
        cpu_seconds,
        warm_cpu,
        cores,
        0,
    )


SAMPLES_PER_S = 250


def start_sampler(pid: int, out: Path) -> subprocess.Popen:
    """py-spy recording process `pid`'s Python stacks (only the thread holding the GIL, so the
    samples split the process's Python CPU time) into `out` as collapsed stacks; its own
    messages go to `out` + ".log"."""
    exe = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if exe is None:
        raise BenchError("--py-spy needs py-spy on the PATH (pip install -e '.[dev]')")
    with open(f"{out}.log", "wb") as messages:
        return subprocess.Popen(
            [
                *(exe, "record", "--pid", str(pid), "--gil", "--rate", str(SAMPLES_PER_S)),
                *("--format", "raw", "--output", str(out)),
            ],
            stdout=messages,
            stderr=subprocess.STDOUT,
        )


def stop_sampler(sampler: subprocess.Popen) -> None:
    """Stop py-spy (on SIGINT it writes its file and exits) and check that it exited cleanly."""
    sampler.send_signal(signal.SIGINT)
    try:
        sampler.wait(timeout=30)
    except subprocess.TimeoutExpired:
        sampler.kill()
        raise BenchError("py-spy did not stop within 30 s of SIGINT") from None
    if sampler.returncode not in (0, -signal.SIGINT):
        raise BenchError(f"py-spy exited {sampler.returncode}; see its .log next to the samples")

"""Readings from /proc: a process's peak RSS and CPU time, and `CpuMeter`, the cores each of
our process trees (and everything else on the machine) used during a phase."""

from __future__ import annotations

import os
import time
from collections import defaultdict
from pathlib import Path

from ledger.bench import BenchError


def proc_status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise BenchError(f"/proc/{pid}/status has no {field}")


def proc_cpu_seconds(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _machine_cpu() -> tuple[int, int]:
    """(busy, total) jiffies over all cores; steal counts as busy."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    total = sum(values[:8])
    return total - idle, total


def _process_table() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds so far) of every process on the machine."""
    tick = os.sysconf("SC_CLK_TCK")
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        fields = stat[stat.rindex(")") + 2 :].split()
        table[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    return table


class CpuMeter:
    """Average cores used during a phase by each of our process trees (the bench, the worker,
    the local PostgreSQL and broker) and by everything else on the machine ("other": e.g. a
    test suite running beside the benchmark, which makes the numbers less trustworthy)."""

    def __init__(self, roots: dict[str, int]):
        self.roots = roots
        self._started = 0.0
        self._procs: dict[int, tuple[int, float]] = {}
        self._machine = (0, 0)

    def start(self) -> None:
        self._started = time.perf_counter()
        self._procs = _process_table()
        self._machine = _machine_cpu()

    def stop(self, extra_roots: dict[str, int] | None = None) -> dict[str, float]:
        wall = time.perf_counter() - self._started
        procs = _process_table()
        busy, total = _machine_cpu()
        tick = os.sysconf("SC_CLK_TCK")
        label_of = {pid: label for label, pid in self.roots.items()}
        label_of.update({pid: label for label, pid in (extra_roots or {}).items()})
        used: dict[str, float] = defaultdict(float)
        for pid, (_, cpu) in procs.items():
            label, walk, hops = None, pid, 0
            while walk > 1 and hops < 64:
                label = label_of.get(walk)
                if label is not None:
                    break
                walk, hops = procs.get(walk, (0, 0.0))[0], hops + 1
            if label is not None:
                used[label] += cpu - self._procs.get(pid, (0, 0.0))[1]
        machine = (busy - self._machine[0]) / tick
        cores = {label: round(seconds / wall, 2) for label, seconds in sorted(used.items())}
        cores["other"] = round(max(0.0, machine - sum(used.values())) / wall, 2)
        cores["machine"] = round(machine / wall, 2)
        cores["machine_capacity"] = round((total - self._machine[1]) / tick / wall, 2)
        return cores

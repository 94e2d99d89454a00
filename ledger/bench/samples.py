"""`--py-spy`: where a worker's Python time went, from py-spy's collapsed stacks.

Each line of the file is `frame;frame;...;frame count`, outermost frame first, a frame being
`function (file:line)`. Only the thread holding the GIL was sampled, so the counts split the
process's Python CPU time (C extensions called from Python count to their caller)."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

# "function (path/to/file.py:123)" → "function (file.py)"; lines differ per sample, functions not.
_FRAME = re.compile(r"^(?P<fn>.*?) \((?P<file>[^():]*?)(?::\d+)?\)$")


def frame_name(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip()
    return f"{match['fn']} ({Path(match['file']).name})"


def read_stacks(path: Path) -> Counter[tuple[str, ...]]:
    stacks: Counter[tuple[str, ...]] = Counter()
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks[tuple(frame_name(f) for f in stack.split(";"))] += int(count)
    return stacks


def split_time(stacks: Counter[tuple[str, ...]]) -> tuple[int, Counter[str], Counter[str]]:
    """Total samples, and per function the samples it was on the stack (inclusive, counted once
    per sample however deep the recursion) and at the top of it (self)."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for stack, count in stacks.items():
        total += count
        own[stack[-1]] += count
        for fn in set(stack):
            inclusive[fn] += count
    return total, inclusive, own


def summary(path: Path, cpu_seconds: float, records: int, top: int = 25) -> list[str]:
    """Lines of a table: per function, its share of the samples and its µs of CPU per record
    (the worker's measured CPU time split in proportion), inclusive and self."""
    total, inclusive, own = split_time(read_stacks(path))
    if total == 0:
        return [f"py-spy: no samples in {path}"]
    per_record = cpu_seconds * 1e6 / max(records, 1) / total
    lines = [
        f"py-spy samples of the worker: {total:,} ({path.name}); µs of CPU per record, "
        f"inclusive / self:"
    ]
    for fn, count in inclusive.most_common(top):
        lines.append(f"  {count * per_record:8.1f} {own[fn] * per_record:8.1f}  {fn[:90]}")
    lines.append("  top self:")
    for fn, count in own.most_common(top):
        lines.append(f"  {inclusive[fn] * per_record:8.1f} {count * per_record:8.1f}  {fn[:90]}")
    return lines

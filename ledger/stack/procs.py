"""Small process, port and file helpers shared by the local-stack modules.

Everything here is POSIX/Linux only (it reads `/proc`), which is what the local stack
supports.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import socket
import stat
import time
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

import structlog

from ledger.errors import StackError

log = structlog.get_logger()

HOST = "127.0.0.1"


# --- ports -----------------------------------------------------------------------------------


def free_port() -> int:
    """A port that was free on 127.0.0.1 a moment ago (the OS picks it: bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int) -> bool:
    """True if a server could listen on `port` now. SO_REUSEADDR, as Kafka and PostgreSQL
    use it, so connections of a previous run still in TIME_WAIT do not count."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def pick_port(previous: int | None, *, taken: Collection[int] = ()) -> int:
    """Reuse `previous` if it is still free, else a new free port not in `taken`."""
    if previous and previous not in taken and port_is_free(previous):
        return previous
    while True:
        port = free_port()
        if port not in taken:
            if previous:
                log.info("stack.port_changed", old=previous, new=port)
            return port


def tcp_reachable(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def split_hostport(hostport: str) -> tuple[str, int]:
    host, _, port = hostport.strip().rpartition(":")
    return host.strip("[]"), int(port)


# --- processes -------------------------------------------------------------------------------


def cmdline(pid: int) -> str:
    """The command line of `pid`, arguments joined by spaces ("" if there is no such process)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, process group) of `pid` from /proc, or None if there is none."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0], int(fields[1]), int(fields[2])
    except (OSError, IndexError, ValueError):
        return None


def is_alive(pid: int | None, marker: str | None = None) -> bool:
    """True if `pid` runs (zombies count as dead) and, if given, `marker` is in its cmdline.

    The marker guards against a stale pid file whose pid has been reused by another process.
    """
    if not pid or pid <= 0:
        return False
    _reap(pid)
    stat_ = _stat(pid)
    if stat_ is None or stat_[0] in ("Z", "X"):
        return False
    return marker is None or marker in cmdline(pid)


def _reap(pid: int) -> None:
    # If this process started `pid` (tests do), collect it once it exits so it does not
    # linger as a zombie; for anyone else's child this is a harmless ChildProcessError.
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def cwd(pid: int) -> Path | None:
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        return None


def _live_processes() -> dict[int, tuple[str, int, int]]:
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat_ = _stat(int(entry.name))
            if stat_ is not None and stat_[0] not in ("Z", "X"):
                table[int(entry.name)] = stat_
    return table


def process_tree(pid: int) -> set[int]:
    """`pid`, its live descendants, and the live members of its process group if it leads one.

    PostgreSQL's backends each lead their own group, so descendants are needed; a JVM's
    threads are not processes, but anything it spawned stays in its group.
    """
    table = _live_processes()
    tree = {pid}
    if pid != os.getpgrp():
        tree |= {p for p, (_, _, pgrp) in table.items() if pgrp == pid}
    grew = True
    while grew:
        more = {p for p, (_, ppid, _) in table.items() if ppid in tree} - tree
        tree |= more
        grew = bool(more)
    tree.discard(os.getpid())
    return tree


def pids_matching(*markers: str) -> list[int]:
    """Every live process (but us) whose command line contains all of `markers`."""
    found = []
    for pid in _live_processes():
        line = cmdline(pid) if pid != os.getpid() else ""
        if line and all(m in line for m in markers):
            found.append(pid)
    return found


def ensure_gone(pids: set[int], *, name: str, timeout: float = 10.0) -> None:
    """Wait for all `pids` to exit; SIGKILL any left after `timeout`; raise if one survives."""
    if wait_for(lambda: not any(is_alive(p) for p in pids), timeout):
        return
    left = sorted(p for p in pids if is_alive(p))
    log.warning("stack.kill", service=name, pids=left, reason=f"still running after {timeout}s")
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if not wait_for(lambda: not any(is_alive(p) for p in pids), 10.0):
        left = sorted(p for p in pids if is_alive(p))
        raise StackError(f"{name}: processes {left} did not stop, even after SIGKILL")


def terminate(
    pid: int,
    *,
    name: str,
    marker: str,
    timeout: float = 20.0,
    sig: signal.Signals = signal.SIGTERM,
) -> None:
    """Send `sig` to `pid` (and its group, if it leads one), wait for its whole process tree
    to exit, SIGKILL what is left; raise if anything survives."""
    if not is_alive(pid, marker):
        return
    tree = process_tree(pid)
    with contextlib.suppress(ProcessLookupError):
        if os.getpgid(pid) == pid and pid != os.getpgrp():
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    ensure_gone(tree, name=name, timeout=timeout)


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    """Poll `predicate` until it is true (return True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


# --- files -----------------------------------------------------------------------------------


def tail(path: Path, lines: int = 25) -> str:
    """The last `lines` lines of a log file, for error messages."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 64 * 1024))
            text = fh.read().decode(errors="replace")
    except OSError as exc:
        return f"(cannot read {path}: {exc.strerror})"
    return "\n".join(text.splitlines()[-lines:]) or "(empty)"


_ERROR = re.compile(r"\b(ERROR|FATAL|PANIC)\b")


def first_errors(path: Path, limit: int = 3) -> list[str]:
    """The first `limit` ERROR/FATAL/PANIC lines of a log, each with the line after it."""
    try:
        with path.open("rb") as fh:
            lines = fh.read(4 * 1024 * 1024).decode(errors="replace").splitlines()
    except OSError:
        return []
    found: list[str] = []
    for i, line in enumerate(lines):
        if _ERROR.search(line):
            found.append(line)
            if i + 1 < len(lines) and not _ERROR.search(lines[i + 1]):
                found.append("    " + lines[i + 1].strip())
            limit -= 1
            if limit == 0:
                break
    return found


def failure(message: str, logfile: Path) -> StackError:
    """A StackError that names the log file and quotes its first errors and last lines."""
    text = message
    errors = first_errors(logfile)
    if errors:
        text += f"\n--- first errors in {logfile} ---\n" + "\n".join(errors)
    text += f"\n--- last lines of {logfile} ---\n{tail(logfile, 15)}"
    return StackError(text)


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def write_text_atomic(path: Path, text: str, *, mode: int | None = None) -> None:
    """Replace `path` with `text` at once; with `mode` (e.g. 0o600 for a file holding a
    secret) the file never exists with looser permissions."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if mode is None:
        tmp.write_text(text)
    else:
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "w") as out:
            out.write(text)
    os.replace(tmp, path)


def load_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("stack.state_unreadable", path=str(path), error=str(exc))
        return {}
    return data if isinstance(data, dict) else {}


def save_json(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def rotate(logfile: Path) -> None:
    """Keep the previous run's log as `<name>.1` so each start begins with a fresh file."""
    if logfile.exists():
        os.replace(logfile, logfile.with_name(logfile.name + ".1"))


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (flock) on `path`, held for the `with` block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_traversable(path: Path) -> None:
    """Give `path` and its ancestors the o+x bit, so another OS user can reach `path`.

    Used when we run as root and PostgreSQL has to run as the `postgres` user: it needs
    to walk down to its data directory. Only the search bit is added, never read or write.
    """
    for directory in [path, *path.parents]:
        mode = directory.stat().st_mode
        if not mode & stat.S_IXOTH:
            log.warning(
                "stack.chmod_o+x",
                path=str(directory),
                reason="so the postgres OS user can reach its data directory",
            )
            os.chmod(directory, stat.S_IMODE(mode) | stat.S_IXOTH)

"""A single-node Apache Kafka broker (KRaft, broker+controller in one JVM) for development.

The jars come from Maven Central: `deploy/kafka/pom.xml` is resolved once with
`mvn dependency:copy-dependencies` into `<cache_dir>/kafka-<version>/libs` (outside the
repository, shared by every checkout), and a marker file records the success so later
starts skip Maven entirely. Per-stack state lives in `<home>/kafka/`:

    server.properties   written on every start (ports may change)
    data/               the log dirs (formatted once with kafka.tools.StorageTool)
    broker.log          stdout+stderr of the JVM (previous run kept as broker.log.1)
    pid                 the JVM's pid; it leads its own process group
"""

from __future__ import annotations

import base64
import hashlib
import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import structlog

import ledger
from ledger.errors import StackError
from ledger.settings import Settings
from ledger.stack import procs

log = structlog.get_logger()

MAIN_CLASS = "kafka.Kafka"
JVM_OPTS = ("-Xmx768m", "-Xms256m", "-XX:+ExitOnOutOfMemoryError", "-Djava.awt.headless=true")
MVN_TIMEOUT_S = 900.0
FORMAT_TIMEOUT_S = 120.0
READY_TIMEOUT_S = 90.0

# Settings beyond the listener/quorum ones, tuned for one small local node.
_TUNING = """\
num.partitions=1
auto.create.topics.enable=false
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=4
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
share.coordinator.state.topic.num.partitions=1
group.initial.rebalance.delay.ms=0
# Local disk is not precious, but keep a week at most, in 64 MiB segments so that
# retention can actually delete something on a small topic.
log.retention.hours=168
log.segment.bytes=67108864
log.retention.check.interval.ms=300000
# The default 128 MiB dedupe buffer is a big slice of a 768 MiB heap.
log.cleaner.dedupe.buffer.size=33554432
"""


# --- paths -----------------------------------------------------------------------------------


def state_dir(settings: Settings) -> Path:
    return settings.home.resolve() / "kafka"


def props_path(settings: Settings) -> Path:
    return state_dir(settings) / "server.properties"


def log_path(settings: Settings) -> Path:
    return state_dir(settings) / "broker.log"


def pid_path(settings: Settings) -> Path:
    return state_dir(settings) / "pid"


def marker(settings: Settings) -> str:
    """A string only this stack's broker has in its command line: its properties file."""
    return str(props_path(settings))


def pom_path() -> Path:
    pom = Path(ledger.__file__).resolve().parent.parent / "deploy" / "kafka" / "pom.xml"
    if not pom.is_file():
        raise StackError(
            f"{pom} not found: the local Kafka broker is assembled from the repository's "
            "deploy/kafka/pom.xml, which an installed wheel does not ship. Run from a "
            "checkout (pip install -e .), use LEDGER_BROKER=tansu, or set LEDGER_KAFKA_BOOTSTRAP."
        )
    return pom


def version(pom: Path) -> str:
    found = re.search(r"<kafka\.version>\s*([^<\s]+)\s*</kafka\.version>", pom.read_text())
    if not found:
        raise StackError(f"{pom}: no <kafka.version> property")
    return found.group(1)


# --- jars ------------------------------------------------------------------------------------


def resolve(settings: Settings) -> Path:
    """The directory of Kafka's jars, running Maven once if they are not cached yet."""
    if shutil.which("java") is None:
        raise StackError("java is not on PATH (Kafka needs Java 17+)")
    pom = pom_path()
    base = settings.cache_dir.expanduser().resolve() / f"kafka-{version(pom)}"
    libs = base / "libs"
    done = base / ".resolved"
    digest = hashlib.sha256(pom.read_bytes()).hexdigest()
    with procs.locked(base.parent / f".{base.name}.lock"):
        if done.is_file() and done.read_text().strip() == digest and any(libs.glob("*.jar")):
            return libs
        mvn = shutil.which("mvn")
        if mvn is None:
            raise StackError(
                f"mvn is not on PATH and Kafka's jars are not cached in {libs} "
                "(install Maven, or use LEDGER_BROKER=tansu)"
            )
        if libs.exists():
            shutil.rmtree(libs)  # a partial or outdated copy
        base.mkdir(parents=True, exist_ok=True)
        mvn_log = base / "mvn.log"
        cmd = [
            mvn,
            "-q",
            "-B",
            "-f",
            str(pom),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={libs}",
            "-DincludeScope=runtime",
        ]
        log.info("kafka.resolve", pom=str(pom), into=str(libs), log=str(mvn_log))
        started = time.monotonic()
        with mvn_log.open("w") as out:
            try:
                rc = subprocess.run(
                    cmd, stdout=out, stderr=subprocess.STDOUT, timeout=MVN_TIMEOUT_S, check=False
                ).returncode
            except subprocess.TimeoutExpired:
                raise procs.failure(
                    f"Maven did not finish resolving {pom} in {MVN_TIMEOUT_S:.0f}s", mvn_log
                ) from None
        if rc != 0 or not any(libs.glob("*.jar")):
            raise procs.failure(f"Maven could not resolve {pom} (exit code {rc})", mvn_log)
        done.write_text(digest + "\n")
        log.info("kafka.resolved", seconds=round(time.monotonic() - started, 1))
        return libs


# --- lifecycle -------------------------------------------------------------------------------


def running_pid(settings: Settings) -> int | None:
    pid = procs.read_pid(pid_path(settings))
    return pid if procs.is_alive(pid, marker(settings)) else None


def running_port(settings: Settings) -> int | None:
    """The client port in server.properties: the one the running broker listens on."""
    if running_pid(settings) is None:
        return None
    try:
        text = props_path(settings).read_text()
    except OSError:
        return None
    found = re.search(r"^advertised\.listeners=PLAINTEXT://[^\s,]+:(\d+)", text, re.M)
    return int(found.group(1)) if found else None


def new_cluster_id() -> str:
    """A KRaft cluster id: 16 random bytes, base64url without padding (like Uuid.randomUuid)."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


def write_properties(settings: Settings, port: int, controller_port: int) -> None:
    data = state_dir(settings) / "data"
    text = (
        "# Written by `ledger stack up` on every start; edits are overwritten.\n"
        "process.roles=broker,controller\n"
        "node.id=1\n"
        f"controller.quorum.voters=1@{procs.HOST}:{controller_port}\n"
        f"listeners=PLAINTEXT://{procs.HOST}:{port},CONTROLLER://{procs.HOST}:{controller_port}\n"
        f"advertised.listeners=PLAINTEXT://{procs.HOST}:{port}\n"
        "controller.listener.names=CONTROLLER\n"
        "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT\n"
        "inter.broker.listener.name=PLAINTEXT\n"
        f"log.dirs={data}\n" + _TUNING
    )
    procs.write_text_atomic(props_path(settings), text)


def start(settings: Settings, state: dict) -> dict:
    """Start the broker (formatting storage the first time); return its state entry.

    `state` is the previous entry from stack.json (ports and cluster id are reused).
    Returns once the broker answers a metadata request.
    """
    libs = resolve(settings)
    directory = state_dir(settings)
    directory.mkdir(parents=True, exist_ok=True)
    port = procs.pick_port(state.get("port"))
    controller_port = procs.pick_port(state.get("controller_port"), taken={port})
    write_properties(settings, port, controller_port)
    classpath = str(libs / "*")
    logfile = log_path(settings)

    cluster_id = state.get("cluster_id") or new_cluster_id()
    if not (directory / "data" / "meta.properties").is_file():
        fmt_log = directory / "format.log"
        cmd = ["java", "-cp", classpath, "kafka.tools.StorageTool", "format"]
        cmd += ["-t", cluster_id, "-c", str(props_path(settings))]
        log.info("kafka.format", cluster_id=cluster_id, data=str(directory / "data"))
        with fmt_log.open("w") as out:
            try:
                rc = subprocess.run(
                    cmd,
                    cwd=directory,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    timeout=FORMAT_TIMEOUT_S,
                    check=False,
                ).returncode
            except subprocess.TimeoutExpired:
                rc = -1
        if rc != 0:
            raise procs.failure(f"formatting Kafka storage failed (exit code {rc})", fmt_log)

    procs.rotate(logfile)
    cmd = ["java", *JVM_OPTS, "-cp", classpath, MAIN_CLASS, str(props_path(settings))]
    with logfile.open("wb") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=directory,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: survives us, stopped as a group
        )
    procs.write_text_atomic(pid_path(settings), f"{proc.pid}\n")
    bootstrap = f"{procs.HOST}:{port}"
    log.info("kafka.starting", pid=proc.pid, bootstrap=bootstrap, log=str(logfile))
    started = time.monotonic()
    try:
        wait_ready(bootstrap, pid=proc.pid, logfile=logfile, name="Kafka")
    except StackError:
        stop(settings)
        raise
    log.info("kafka.ready", bootstrap=bootstrap, seconds=round(time.monotonic() - started, 1))
    return {"port": port, "controller_port": controller_port, "cluster_id": cluster_id}


def stop(settings: Settings) -> None:
    pids = {procs.read_pid(pid_path(settings))}
    # Also any broker of ours whose pid file was lost.
    pids.update(procs.pids_matching(MAIN_CLASS, marker(settings)))
    for pid in pids:
        if pid is not None and procs.is_alive(pid, marker(settings)):
            log.info("kafka.stopping", pid=pid)
            procs.terminate(pid, name="Kafka", marker=marker(settings), timeout=30.0)
    pid_path(settings).unlink(missing_ok=True)


# --- readiness (shared with the Tansu broker and external brokers) ---------------------------


def answers(bootstrap: str, timeout_ms: int = 3000) -> bool:
    """True if the broker at `bootstrap` answers a metadata (list topics) request."""
    from kafka import KafkaAdminClient

    try:
        admin = KafkaAdminClient(
            bootstrap_servers=bootstrap,
            client_id="ledger-stack-probe",
            bootstrap_timeout_ms=timeout_ms,
            request_timeout_ms=timeout_ms,
        )
    except Exception:  # kafka-python raises several types (NoBrokersAvailable, timeouts...)
        return False
    try:
        admin.list_topics()
        return True
    except Exception:
        return False
    finally:
        admin.close()


def wait_ready(
    bootstrap: str,
    *,
    pid: int,
    logfile: Path,
    name: str,
    timeout: float = READY_TIMEOUT_S,
) -> None:
    host, port = procs.split_hostport(bootstrap)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not procs.is_alive(pid):
            raise procs.failure(f"{name} (pid {pid}) exited during start-up", logfile)
        if procs.tcp_reachable(host, port, timeout=0.5) and answers(bootstrap):
            return
        time.sleep(0.2)
    raise procs.failure(
        f"{name} did not become ready on {bootstrap} within {timeout:.0f}s", logfile
    )

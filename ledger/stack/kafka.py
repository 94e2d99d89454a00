"""A single-node Apache Kafka broker (KRaft, broker+controller in one JVM) for development.

The jars come from Maven Central: `deploy/kafka/pom.xml` is resolved once with
`mvn dependency:copy-dependencies` into `<cache_dir>/kafka-<version>/libs` (outside the
repository, shared by every checkout), and a marker file records the success so later
starts skip Maven entirely. Per-stack state lives in `<home>/kafka/`:

    server.properties   written on every start (ports may change)
    data/               the log dirs (formatted once with kafka.tools.StorageTool)
    broker.log          stdout+stderr of the JVM (previous run kept as broker.log.1)
    pid                 the JVM's pid; it leads its own process group
    broker.secret       with SASL: the broker's own password (mode 0600)

**SASL (optional).** With LEDGER_KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT (and no
LEDGER_KAFKA_BOOTSTRAP) the broker's client listener is SASL_PLAINTEXT with the mechanisms
SCRAM-SHA-256, SCRAM-SHA-512 and PLAIN; the user LEDGER_KAFKA_USERNAME gets the password
LEDGER_KAFKA_PASSWORD(_FILE) for all three (SCRAM credentials are written into the storage
when it is formatted, `--add-scram`, as KRaft needs; PLAIN's are in the listener's JAAS
line). The broker itself is the super user `ledger-broker` (random password in
broker.secret), also on the controller listener (SASL PLAIN: KRaft controllers do not take
SCRAM). ACLs are enforced (StandardAuthorizer) for topics that have any; a topic without
ACLs is open to every authenticated user. server.properties holds passwords then: mode 0600.
A stack formatted without SASL cannot switch to it (or back): `ledger stack down` and remove
`<home>/kafka` first.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

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


def secret_path(settings: Settings) -> Path:
    return state_dir(settings) / "broker.secret"


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
    found = re.search(r"^advertised\.listeners=(?:SASL_)?PLAINTEXT://[^\s,]+:(\d+)", text, re.M)
    return int(found.group(1)) if found else None


def new_cluster_id() -> str:
    """A KRaft cluster id: 16 random bytes, base64url without padding (like Uuid.randomUuid)."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


BROKER_USER = "ledger-broker"
_SCRAM = ("SCRAM-SHA-256", "SCRAM-SHA-512")
# What may appear inside a JAAS or `--add-scram` value without quoting trouble.
_SAFE_SECRET = re.compile(r"[^\s\"\\,\[\]=;]{1,200}")


def sasl_enabled(settings: Settings) -> bool:
    """Whether the local broker is to listen with SASL (LEDGER_KAFKA_SECURITY_PROTOCOL)."""
    protocol = settings.kafka_security_protocol
    if protocol in ("SSL", "SASL_SSL"):
        raise StackError(
            f"LEDGER_KAFKA_SECURITY_PROTOCOL={protocol}: the local broker listens in PLAINTEXT "
            "or SASL_PLAINTEXT; for TLS use your own Kafka (LEDGER_KAFKA_BOOTSTRAP)"
        )
    return protocol == "SASL_PLAINTEXT"


def _sasl_users(settings: Settings) -> dict[str, str]:
    """user → password for the local SASL broker: its own super user and the ledger's."""
    from ledger.kafka_auth import password

    path = secret_path(settings)
    if not path.is_file():
        procs.write_text_atomic(path, secrets.token_hex(24) + "\n", mode=0o600)
    users = {BROKER_USER: path.read_text().strip()}
    user, secret = settings.kafka_username or "", password(settings)
    for what, value in (("LEDGER_KAFKA_USERNAME", user), ("the SASL password", secret)):
        if not _SAFE_SECRET.fullmatch(value):
            raise StackError(
                f"{what}: the local broker takes 1-200 characters without spaces, quotes, "
                "backslashes, commas, brackets, '=' or ';'"
            )
    if user == BROKER_USER:
        raise StackError(f"LEDGER_KAFKA_USERNAME: {BROKER_USER!r} is the local broker's own user")
    users[user] = secret
    return users


def _sasl_properties(users: dict[str, str]) -> str:
    broker_password = users[BROKER_USER]
    plain_users = " ".join(f'user_{u}="{p}"' for u, p in users.items())
    plain = (
        "org.apache.kafka.common.security.plain.PlainLoginModule required "
        f'username="{BROKER_USER}" password="{broker_password}" {plain_users};'
    )
    scram = (
        "org.apache.kafka.common.security.scram.ScramLoginModule required "
        f'username="{BROKER_USER}" password="{broker_password}";'
    )
    return (
        "sasl.enabled.mechanisms=SCRAM-SHA-256,SCRAM-SHA-512,PLAIN\n"
        "sasl.mechanism.inter.broker.protocol=SCRAM-SHA-512\n"
        "sasl.mechanism.controller.protocol=PLAIN\n"
        f"listener.name.sasl_plaintext.scram-sha-256.sasl.jaas.config={scram}\n"
        f"listener.name.sasl_plaintext.scram-sha-512.sasl.jaas.config={scram}\n"
        f"listener.name.sasl_plaintext.plain.sasl.jaas.config={plain}\n"
        f"listener.name.controller.sasl.enabled.mechanisms=PLAIN\n"
        f"listener.name.controller.plain.sasl.jaas.config={plain}\n"
        "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer\n"
        f"super.users=User:{BROKER_USER}\n"
        # A topic without ACLs stays open to every authenticated user; one with ACLs is not.
        "allow.everyone.if.no.acl.found=true\n"
    )


def write_properties(
    settings: Settings, port: int, controller_port: int, users: dict[str, str] | None = None
) -> None:
    """server.properties; with `users` (user → password), a SASL_PLAINTEXT broker."""
    data = state_dir(settings) / "data"
    client = "SASL_PLAINTEXT" if users else "PLAINTEXT"
    controller = "SASL_PLAINTEXT" if users else "PLAINTEXT"
    text = (
        "# Written by `ledger stack up` on every start; edits are overwritten.\n"
        "process.roles=broker,controller\n"
        "node.id=1\n"
        f"controller.quorum.voters=1@{procs.HOST}:{controller_port}\n"
        f"listeners={client}://{procs.HOST}:{port},CONTROLLER://{procs.HOST}:{controller_port}\n"
        f"advertised.listeners={client}://{procs.HOST}:{port}\n"
        "controller.listener.names=CONTROLLER\n"
        f"listener.security.protocol.map={client}:{client},CONTROLLER:{controller}\n"
        f"inter.broker.listener.name={client}\n"
        f"log.dirs={data}\n" + _TUNING + (_sasl_properties(users) if users else "")
    )
    procs.write_text_atomic(props_path(settings), text, mode=0o600 if users else None)


def _scram_arguments(users: dict[str, str]) -> list[str]:
    """`--add-scram` arguments for the storage format: every user, both SCRAM mechanisms."""
    return [
        arg
        for user, secret in users.items()
        for mechanism in _SCRAM
        for arg in ("--add-scram", f'{mechanism}=[name={user},password="{secret}"]')
    ]


def start(settings: Settings, state: dict) -> dict:
    """Start the broker (formatting storage the first time); return its state entry.

    `state` is the previous entry from stack.json (ports and cluster id are reused).
    Returns once the broker answers a metadata request.
    """
    libs = resolve(settings)
    directory = state_dir(settings)
    directory.mkdir(parents=True, exist_ok=True)
    security = "SASL_PLAINTEXT" if sasl_enabled(settings) else "PLAINTEXT"
    formatted = (directory / "data" / "meta.properties").is_file()
    if formatted and state.get("security", "PLAINTEXT") != security:
        raise StackError(
            f"the local Kafka under {directory} was formatted for "
            f"{state.get('security', 'PLAINTEXT')}, not {security}: `ledger stack down` and "
            f"remove {directory} to start it afresh"
        )
    users = _sasl_users(settings) if security == "SASL_PLAINTEXT" else None
    port = procs.pick_port(state.get("port"))
    controller_port = procs.pick_port(state.get("controller_port"), taken={port})
    write_properties(settings, port, controller_port, users)
    classpath = str(libs / "*")
    logfile = log_path(settings)

    cluster_id = state.get("cluster_id") or new_cluster_id()
    if not formatted:
        fmt_log = directory / "format.log"
        cmd = ["java", "-cp", classpath, "kafka.tools.StorageTool", "format"]
        cmd += ["-t", cluster_id, "-c", str(props_path(settings))]
        cmd += _scram_arguments(users or {})
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
    log.info(
        "kafka.starting", pid=proc.pid, bootstrap=bootstrap, log=str(logfile), security=security
    )
    started = time.monotonic()
    try:
        wait_ready(
            bootstrap, pid=proc.pid, logfile=logfile, name="Kafka", options=options(settings)
        )
    except StackError:
        stop(settings)
        raise
    log.info("kafka.ready", bootstrap=bootstrap, seconds=round(time.monotonic() - started, 1))
    return {
        "port": port,
        "controller_port": controller_port,
        "cluster_id": cluster_id,
        "security": security,
    }


def options(settings: Settings) -> dict[str, Any]:
    """Client options for talking to the local broker (the ledger's SASL user, if any)."""
    from ledger.kafka_auth import client_options

    return client_options(settings)


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


def answers(bootstrap: str, timeout_ms: int = 3000, options: dict | None = None) -> bool:
    """True if the broker at `bootstrap` answers a metadata (list topics) request (made with
    the client `options`, e.g. SASL credentials)."""
    from kafka import KafkaAdminClient

    try:
        admin = KafkaAdminClient(
            bootstrap_servers=bootstrap,
            client_id="ledger-stack-probe",
            bootstrap_timeout_ms=timeout_ms,
            request_timeout_ms=timeout_ms,
            **(options or {}),
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
    options: dict | None = None,
) -> None:
    host, port = procs.split_hostport(bootstrap)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not procs.is_alive(pid):
            raise procs.failure(f"{name} (pid {pid}) exited during start-up", logfile)
        if procs.tcp_reachable(host, port, timeout=0.5) and answers(bootstrap, options=options):
            return
        time.sleep(0.2)
    raise procs.failure(
        f"{name} did not become ready on {bootstrap} within {timeout:.0f}s", logfile
    )

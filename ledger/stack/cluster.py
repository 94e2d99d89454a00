"""A local Apache Kafka cluster of N KRaft nodes (each broker + controller in one JVM, N voters
in the controller quorum) on loopback, for fault injection: every node starts and is SIGKILLed
on its own.

    cluster = KafkaCluster(home / "kafka-cluster", size=3)
    cluster.start()            # format (first time), start every node, wait for all
    cluster.bootstrap          # "127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3"
    cluster.kill(2)            # SIGKILL node 2's JVM (its process group)
    cluster.start_node(2)      # the same node again, same ports and data
    cluster.stop()             # every node that still runs

The jars are the single-node broker's (`ledger.stack.kafka.resolve`, cached outside the
repository). Per node, under `<directory>/node-<id>/`: server.properties, data/, broker.log
and pid, as for the single broker. Replicated internal topics have `size` copies and
`min.insync.replicas` is min(2, size), so with 3 nodes any one may die without losing an
acknowledged (acks=all) write.
"""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import structlog

from ledger.errors import StackError
from ledger.settings import Settings
from ledger.stack import kafka, procs

log = structlog.get_logger()

DEFAULT_HEAP = "384m"  # per node: 3 nodes stay well under 1.5 GB of heap


@dataclasses.dataclass
class Node:
    node_id: int
    port: int
    controller_port: int
    directory: Path

    @property
    def props(self) -> Path:
        return self.directory / "server.properties"

    @property
    def logfile(self) -> Path:
        return self.directory / "broker.log"

    @property
    def pid_file(self) -> Path:
        return self.directory / "pid"

    @property
    def bootstrap(self) -> str:
        return f"{procs.HOST}:{self.port}"


class KafkaCluster:
    def __init__(
        self, settings: Settings, directory: Path, *, size: int = 3, heap: str = DEFAULT_HEAP
    ):
        if size < 1:
            raise StackError(f"a Kafka cluster needs at least one node, not {size}")
        self.settings = settings
        self.directory = directory.resolve()
        self.size = size
        self.heap = heap
        self.nodes: dict[int, Node] = {}
        self.cluster_id = ""

    @property
    def bootstrap(self) -> str:
        return ",".join(node.bootstrap for node in self.nodes.values())

    @property
    def min_insync(self) -> int:
        return min(2, self.size)

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Pick ports, format every node's storage (first time) and start them all."""
        libs = kafka.resolve(self.settings)
        self.directory.mkdir(parents=True, exist_ok=True)
        state = procs.load_json(self.directory / "cluster.json")
        self.cluster_id = state.get("cluster_id") or kafka.new_cluster_id()
        taken: set[int] = set()
        for node_id in range(1, self.size + 1):
            previous = state.get("nodes", {}).get(str(node_id), {})
            port = procs.pick_port(previous.get("port"), taken=taken)
            taken.add(port)
            controller_port = procs.pick_port(previous.get("controller_port"), taken=taken)
            taken.add(controller_port)
            self.nodes[node_id] = Node(
                node_id, port, controller_port, self.directory / f"node-{node_id}"
            )
        procs.save_json(
            self.directory / "cluster.json",
            {
                "cluster_id": self.cluster_id,
                "nodes": {
                    str(n.node_id): {"port": n.port, "controller_port": n.controller_port}
                    for n in self.nodes.values()
                },
            },
        )
        for node in self.nodes.values():
            node.directory.mkdir(parents=True, exist_ok=True)
            self._write_properties(node)
        with ThreadPoolExecutor(max_workers=self.size) as pool:  # a JVM each: in parallel
            list(pool.map(lambda node: self._format(node, libs), self.nodes.values()))
        for node in self.nodes.values():
            self._launch(node, libs)
        # A node answers metadata requests only once the controller quorum has a leader,
        # which needs a majority of the nodes up: wait for them together.
        with ThreadPoolExecutor(max_workers=self.size) as pool:
            list(pool.map(self._wait_ready, self.nodes.values()))
        log.info("cluster.ready", bootstrap=self.bootstrap, nodes=self.size)

    def start_node(self, node_id: int) -> None:
        """Start one node again (after `kill`) with its ports and data; wait until it answers."""
        node = self.nodes[node_id]
        if self.alive(node_id):
            return
        self._launch(node, kafka.resolve(self.settings))
        self._wait_ready(node)

    def kill(self, node_id: int) -> None:
        """SIGKILL the node's JVM: no clean shutdown, no leadership hand-over."""
        node = self.nodes[node_id]
        pid = self.pid(node_id)
        if pid is None:
            return
        log.info("cluster.kill_node", node=node_id, pid=pid)
        procs.terminate(
            pid, name=f"Kafka node {node_id}", marker=str(node.props), timeout=0, sig=signal.SIGKILL
        )
        procs.ensure_gone({pid}, name=f"Kafka node {node_id}")
        node.pid_file.unlink(missing_ok=True)

    def stop(self) -> None:
        """Stop every node that runs, all at once (one by one, the last ones wait for a
        controller quorum that is gone): SIGTERM, then SIGKILL after 30 s."""

        def stop_node(node: Node) -> None:
            pid = self.pid(node.node_id)
            if pid is not None:
                procs.terminate(
                    pid, name=f"Kafka node {node.node_id}", marker=str(node.props), timeout=30.0
                )
            node.pid_file.unlink(missing_ok=True)

        with ThreadPoolExecutor(max_workers=max(1, len(self.nodes))) as pool:
            list(pool.map(stop_node, self.nodes.values()))

    def pid(self, node_id: int) -> int | None:
        node = self.nodes[node_id]
        pid = procs.read_pid(node.pid_file)
        return pid if procs.is_alive(pid, str(node.props)) else None

    def alive(self, node_id: int) -> bool:
        return self.pid(node_id) is not None

    # --- pieces ----------------------------------------------------------------------------

    def _write_properties(self, node: Node) -> None:
        voters = ",".join(
            f"{n.node_id}@{procs.HOST}:{n.controller_port}" for n in self.nodes.values()
        )
        rf = self.size
        text = (
            "# Written by ledger.stack.cluster on every start; edits are overwritten.\n"
            "process.roles=broker,controller\n"
            f"node.id={node.node_id}\n"
            f"controller.quorum.voters={voters}\n"
            f"listeners=PLAINTEXT://{procs.HOST}:{node.port},"
            f"CONTROLLER://{procs.HOST}:{node.controller_port}\n"
            f"advertised.listeners=PLAINTEXT://{procs.HOST}:{node.port}\n"
            "controller.listener.names=CONTROLLER\n"
            "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT\n"
            "inter.broker.listener.name=PLAINTEXT\n"
            f"log.dirs={node.directory / 'data'}\n"
            "num.partitions=1\n"
            "auto.create.topics.enable=false\n"
            f"default.replication.factor={rf}\n"
            f"min.insync.replicas={self.min_insync}\n"
            f"offsets.topic.replication.factor={rf}\n"
            "offsets.topic.num.partitions=4\n"
            f"transaction.state.log.replication.factor={rf}\n"
            f"transaction.state.log.min.isr={self.min_insync}\n"
            "transaction.state.log.num.partitions=4\n"
            f"share.coordinator.state.topic.replication.factor={rf}\n"
            f"share.coordinator.state.topic.min.isr={self.min_insync}\n"
            "share.coordinator.state.topic.num.partitions=1\n"
            "group.initial.rebalance.delay.ms=0\n"
            "unclean.leader.election.enable=false\n"
            # A killed node comes back quickly: notice it fast, move leaders back to it.
            "replica.lag.time.max.ms=10000\n"
            "broker.session.timeout.ms=6000\n"
            "broker.heartbeat.interval.ms=1000\n"
            "log.segment.bytes=67108864\n"
            "log.retention.hours=24\n"
            "log.cleaner.dedupe.buffer.size=16777216\n"
            # Records up to ~2 MB: the fault run sends 1 MB ones (and their dead-letter copies).
            "message.max.bytes=2097152\n"
            "replica.fetch.max.bytes=2097152\n"
        )
        procs.write_text_atomic(node.props, text)

    def _format(self, node: Node, libs: Path) -> None:
        if (node.directory / "data" / "meta.properties").is_file():
            return
        fmt_log = node.directory / "format.log"
        cmd = ["java", "-cp", str(libs / "*"), "kafka.tools.StorageTool", "format"]
        cmd += ["-t", self.cluster_id, "-c", str(node.props)]
        with fmt_log.open("w") as out:
            rc = subprocess.run(
                cmd,
                cwd=node.directory,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=kafka.FORMAT_TIMEOUT_S,
                check=False,
            ).returncode
        if rc != 0:
            raise procs.failure(f"formatting node {node.node_id} failed (exit code {rc})", fmt_log)

    def _launch(self, node: Node, libs: Path) -> None:
        jvm = [f"-Xmx{self.heap}", "-Xms128m", "-XX:+ExitOnOutOfMemoryError"]
        jvm += ["-XX:MaxDirectMemorySize=256m", "-Djava.awt.headless=true"]
        procs.rotate(node.logfile)
        cmd = ["java", *jvm, "-cp", str(libs / "*"), kafka.MAIN_CLASS, str(node.props)]
        with node.logfile.open("wb") as out:
            proc = subprocess.Popen(
                cmd,
                cwd=node.directory,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        procs.write_text_atomic(node.pid_file, f"{proc.pid}\n")
        log.info("cluster.node_starting", node=node.node_id, pid=proc.pid, port=node.port)

    def _wait_ready(self, node: Node) -> None:
        pid = procs.read_pid(node.pid_file)
        if pid is None:
            raise StackError(f"Kafka node {node.node_id} has no pid file")
        kafka.wait_ready(
            node.bootstrap,
            pid=pid,
            logfile=node.logfile,
            name=f"Kafka node {node.node_id}",
            timeout=kafka.READY_TIMEOUT_S * 2,
        )

    def wait_all_ready(self, timeout: float = 120.0) -> None:
        """Until every node answers (after a restart, before the next fault)."""
        deadline = time.monotonic() + timeout
        for node in self.nodes.values():
            while not kafka.answers(node.bootstrap):
                if time.monotonic() > deadline:
                    raise StackError(f"Kafka node {node.node_id} does not answer")
                time.sleep(0.5)

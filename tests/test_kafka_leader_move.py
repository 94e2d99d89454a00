"""A partition leader that moves between live brokers (the preferred leader election a broker
gets ~5 min after it came back, a reassignment) must not stop a worker from reading where its
partitions begin: kafka-python 3.0 retries a ListOffsets answered "not leader" against the
leaders it has cached, so only the clients' metadata refresh (`kafka_reconnect_options`)
gets it through. With the old 60 s refresh this timed out (`make chaos`: a ledger worker
taking shards over right after such a move, every shard stalled 44 s). A two-node Kafka
cluster of the test's own."""

from __future__ import annotations

import time

from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.admin import NewTopic

from ledger.consumer import kafka_consumer_options
from ledger.stack.cluster import KafkaCluster
from tests.harness import wait_until

TOPIC = "moves"


def leaders(consumer: KafkaConsumer, partitions: list[TopicPartition]) -> set[int]:
    return {consumer._cluster.leader_for_partition(tp) for tp in partitions}  # cached metadata


def test_beginning_offsets_after_the_leader_moved_to_another_live_broker(base_settings, tmp_path):
    cluster = KafkaCluster(base_settings, tmp_path / "kafka", size=2)
    cluster.start()
    admin = consumer = None
    try:
        admin = KafkaAdminClient(bootstrap_servers=cluster.bootstrap)
        admin.create_topics([NewTopic(TOPIC, replica_assignments={0: [1, 2], 1: [1, 2]})])
        partitions = [TopicPartition(TOPIC, p) for p in (0, 1)]
        consumer = KafkaConsumer(
            bootstrap_servers=cluster.bootstrap,
            group_id=None,
            **kafka_consumer_options(base_settings),
        )
        wait_until(
            lambda: (
                consumer.beginning_offsets(partitions, timeout_ms=10_000)
                == {tp: 0 for tp in partitions}
            ),
            60,
            "the consumer reads where the partitions begin",
        )
        assert leaders(consumer, partitions) == {1}

        # Node 2 becomes the preferred replica, then the leader; node 1 stays up and answers
        # "not leader" to a client that still sends there.
        admin.alter_partition_reassignments({tp: [2, 1] for tp in partitions})

        def moved() -> bool:  # the election is refused until node 2 is in sync again
            admin.elect_leaders(0, [TOPIC], raise_errors=False)  # 0: preferred
            (topic,) = admin.describe_topics([TOPIC])  # asks the cluster, not a cache
            return {p["leader_id"] for p in topic["partitions"]} == {2}

        wait_until(moved, 60, "the leaders moved to node 2")
        assert leaders(consumer, partitions) == {1}  # what the consumer still believes

        started = time.monotonic()
        offsets = consumer.beginning_offsets(partitions, timeout_ms=10_000)  # timed out before
        print(f"beginning offsets {time.monotonic() - started:.1f} s after the leaders moved")
        assert offsets == {tp: 0 for tp in partitions}
        # The client's cache follows within a refresh. (Not asserted at once: a broker applies
        # the new leadership from the metadata log a little after the controller, so under
        # load node 1 may still have answered as the leader, and a refresh asked of it still
        # say 1.)
        wait_until(lambda: leaders(consumer, partitions) == {2}, 30, "the cache to follow")
    finally:
        for client in (consumer, admin):
            if client is not None:
                client.close()
        cluster.stop()

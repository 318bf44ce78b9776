"""Decisions keep the partition Kafka's default partitioner gives their key."""

from __future__ import annotations

import random

from aiokafka.partitioner import DefaultPartitioner
from aiokafka.partitioner import murmur2 as aiokafka_murmur2

from router_worker.kafka import key_partition, murmur2


def test_murmur2_matches_the_kafka_client_hash_on_random_keys() -> None:
    rng = random.Random(7)
    for _ in range(20_000):
        key = rng.randbytes(rng.randrange(0, 48))
        assert murmur2(key) == aiokafka_murmur2(key)


def test_key_partition_matches_the_default_partitioner() -> None:
    rng = random.Random(8)
    partitioner = DefaultPartitioner()
    for n in (1, 3, 8, 12):
        partitions = list(range(n))
        for _ in range(2_000):
            key = f"req-{rng.getrandbits(64):x}".encode()
            assert key_partition(key, partitions) == partitioner(key, partitions, partitions)


def test_two_fetches_merge_into_one_batch_with_the_later_offsets() -> None:
    from aiokafka import TopicPartition

    from router_worker.kafka import Fetched

    a, b = TopicPartition("t", 0), TopicPartition("t", 1)
    first = Fetched(["r1", "r2"], {a: 2})
    later = Fetched(["r3", "r4"], {a: 3, b: 1})
    merged = first.then(later)
    assert merged.records == ["r1", "r2", "r3", "r4"]
    assert merged.offsets == {a: 3, b: 1}
    assert first.then(None) is first


def test_lag_leaves_out_partitions_a_rebalance_took_away() -> None:
    from aiokafka import TopicPartition

    from router_worker.kafka import partition_lag

    kept, taken, unfetched = (TopicPartition("t", p) for p in range(3))

    class Consumer:  # aiokafka's contract: highwater() asserts the partition is assigned
        def assignment(self) -> set[TopicPartition]:
            return {kept, unfetched}

        def highwater(self, tp: TopicPartition) -> int | None:
            assert tp in self.assignment(), "Partition is not assigned"
            return 10 if tp == kept else None

    lag = partition_lag(Consumer(), {kept: 4, taken: 2, unfetched: 0})
    assert lag == {("t", 0): 6}

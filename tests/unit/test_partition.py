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

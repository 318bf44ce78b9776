"""How `router-worker bench` picks the partitions of its topics."""

from __future__ import annotations

from router_worker.bench import SOAK_PARTITIONS, bench_partitions


def test_the_flag_wins_over_the_environment() -> None:
    assert bench_partitions(3, {"ROUTER_TOPIC_PARTITIONS": "8"}, workers=1) == 3


def test_the_environment_wins_over_the_worker_count() -> None:
    assert bench_partitions(None, {"ROUTER_TOPIC_PARTITIONS": "8"}, workers=2) == 8


def test_without_either_each_worker_gets_one_partition() -> None:
    assert bench_partitions(None, {}, workers=1) == 1
    assert bench_partitions(None, {"ROUTER_TOPIC_PARTITIONS": ""}, workers=3) == 3


def test_a_soak_spreads_its_batches_over_more_partitions() -> None:
    assert bench_partitions(None, {}, workers=1, soak=True) == SOAK_PARTITIONS
    assert bench_partitions(2, {}, workers=1, soak=True) == 2

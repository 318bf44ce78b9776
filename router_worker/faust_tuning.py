"""Faust consumer tuning that Faust does not expose as a setting."""

from __future__ import annotations

from typing import Any

from faust.transport.drivers import aiokafka as faust_aiokafka

_PATCHED = "_router_worker_fetch_wait"


def set_fetch_max_wait(milliseconds: int) -> None:
    """Make Faust's worker consumer use our fetch wait instead of its hard-coded 1,500 ms.

    A broker that does not wake a waiting fetch when data arrives (the embedded Tansu broker)
    otherwise adds up to that much queue latency to every request; Kafka/Redpanda answer a
    waiting fetch as soon as data arrives, so a short wait only costs a few idle fetches there.
    """
    thread_cls: Any = faust_aiokafka.AIOKafkaConsumerThread
    original = getattr(thread_cls, _PATCHED, None) or thread_cls._create_worker_consumer

    def create_worker_consumer(self: Any, transport: Any) -> Any:
        consumer = original(self, transport)
        consumer._fetch_max_wait_ms = milliseconds
        return consumer

    setattr(thread_cls, _PATCHED, original)
    thread_cls._create_worker_consumer = create_worker_consumer

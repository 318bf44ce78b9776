"""`topics apply` and `db migrate`: topics and tables as code, both idempotent."""

from __future__ import annotations

import asyncio
import contextlib

import click
from aiokafka.admin import AIOKafkaAdminClient, NewPartitions, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from router_worker.kafka import client_options
from router_worker.settings import Settings, get_settings
from router_worker.store.migrate import migrate
from router_worker.topics import TOPICS_DIR, TopicSpec, load_topic_specs


async def apply_topics(settings: Settings) -> list[str]:
    """Create missing topics and grow partition counts; returns one line per action."""
    specs = [
        TopicSpec(settings.topic(s.name), s.partitions, s.replication_factor, s.config)
        for s in load_topic_specs(settings.topic_partitions, settings.topics_dir or TOPICS_DIR)
    ]
    admin = AIOKafkaAdminClient(**client_options(settings), request_timeout_ms=10000)
    await admin.start()
    actions: list[str] = []
    try:
        existing = set(await admin.list_topics())
        missing = [s for s in specs if s.name not in existing]
        if missing:
            # another process may win the race to create them; same definition either way
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(
                    [
                        NewTopic(s.name, s.partitions, s.replication_factor, topic_configs=s.config)
                        for s in missing
                    ]
                )
            actions += [f"created {s.name} ({s.partitions} partitions)" for s in missing]
        for spec in specs:
            if spec.name in existing:
                actions.append(await _grow(admin, spec))
    finally:
        await admin.close()
    return actions


async def _grow(admin: AIOKafkaAdminClient, spec: TopicSpec) -> str:
    described = await admin.describe_topics([spec.name])
    current = len(described[0]["partitions"]) if described else 0
    if current >= spec.partitions:
        return f"ok {spec.name} ({current} partitions)"
    try:
        await admin.create_partitions({spec.name: NewPartitions(spec.partitions)})
    except KafkaError as exc:
        return f"warning {spec.name}: cannot grow {current} -> {spec.partitions}: {exc}"
    return f"grew {spec.name} {current} -> {spec.partitions} partitions"


@click.group("topics")
def topics_group() -> None:
    """Topics as code (definitions in topics/)."""


@topics_group.command("apply")
def topics_apply() -> None:
    """Create or grow the routing topics on the configured brokers."""
    settings = get_settings()
    for line in asyncio.run(apply_topics(settings)):
        click.echo(line)


@click.group("db")
def db_group() -> None:
    """Postgres schema management."""


@db_group.command("migrate")
def db_migrate() -> None:
    """Apply pending SQL migrations (idempotent)."""
    settings = get_settings()
    applied = asyncio.run(
        migrate(settings.database_url.get_secret_value(), settings.database_schema)
    )
    click.echo(f"applied {', '.join(applied)}" if applied else "database is up to date")


COMMANDS: list[click.Command] = [topics_group, db_group]

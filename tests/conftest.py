"""Shared fixtures: the real broker (embedded Tansu), Redis and Postgres, isolated per test."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from router_worker.commands.admin import apply_topics
from router_worker.embedded import EmbeddedStack, resolve_stack
from router_worker.enrich import drop_keys
from router_worker.settings import Settings
from router_worker.store.migrate import drop_schema, migrate

DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
DEFAULT_DATABASE = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture(scope="session")
def stack_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """ROUTER_* URLs: a fresh embedded broker always; the machine's Redis/Postgres when they
    answer at the configured URLs, embedded ones otherwise."""
    configured = {
        "ROUTER_REDIS_URL": os.environ.get("ROUTER_REDIS_URL", DEFAULT_REDIS),
        "ROUTER_DATABASE_URL": os.environ.get("ROUTER_DATABASE_URL", DEFAULT_DATABASE),
    }
    plan = asyncio.run(resolve_stack(configured, probe=True))
    stack = EmbeddedStack(tmp_path_factory.mktemp("stack"), kafka=True, redis=plan.redis,
                          postgres=plan.postgres)
    urls = asyncio.run(stack.start())
    env = {**configured, **urls.env()}
    try:
        yield env
    finally:
        asyncio.run(stack.stop())


@pytest.fixture
async def isolated(stack_env: dict[str, str]) -> AsyncIterator[dict[str, str]]:
    """Environment for one test: its own topics, consumer groups, Redis keys and schema,
    with topics created and migrations applied; everything is removed afterwards."""
    tag = "t" + uuid.uuid4().hex[:10]
    env = {
        **stack_env,
        "ROUTER_TOPIC_PREFIX": f"{tag}.",
        "ROUTER_REDIS_PREFIX": f"{tag}:",
        "ROUTER_DATABASE_SCHEMA": tag,
        "ROUTER_APP_ID": f"{tag}-router",
        "ROUTER_SINK_GROUP": f"{tag}-sink",
        "ROUTER_TOPIC_PARTITIONS": "4",
        "ROUTER_ENGINE": "keyword",
        "ROUTER_LOG_FORMAT": "json",
        "ROUTER_LOG_LEVEL": "warning",
    }
    settings = settings_from(env)
    await apply_topics(settings)
    await migrate(settings.database_url.get_secret_value(), settings.database_schema)
    try:
        yield env
    finally:
        await drop_schema(settings.database_url.get_secret_value(), tag)
        await drop_keys(settings.redis_url.get_secret_value(), settings.redis_prefix)


def settings_from(env: dict[str, str]) -> Settings:
    """Settings built from an env mapping (never from this process's environment)."""
    return Settings.from_env(env)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """Scratch directory for worker processes (Faust's datadir lives here)."""
    return tmp_path

"""Pick and load the classifier engine named in settings (keyword, cpu or vllm)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import structlog

from router_worker.classify.artifacts import ArtifactWatcher
from router_worker.classify.engine import Engine
from router_worker.settings import Settings

log = structlog.get_logger(__name__)

# Redis keys (under settings.redis_prefix) that publish the fleet's live classifier version.
CURRENT_KEY = "classifier:current"
HISTORY_KEY = "classifier:history"
CHANNEL = "classifier:promotions"
# A watcher asks Redis between batches: never let a slow Redis stall routing for long.
_REDIS_TIMEOUT_S = 0.25


def load_engine(
    settings: Settings, artifact: Path | None = None, previous: Engine | None = None
) -> Engine:
    """The engine `settings.engine` names, loaded from `artifact` (default settings.artifact).

    `previous` is the engine a reload replaces (the CPU engine reuses its word cache).
    Raises ArtifactError for a missing/corrupt artifact and EngineUnavailable when the
    backend's optional dependencies are absent.
    """
    path = artifact or settings.artifact
    if settings.engine == "keyword":
        from router_worker.classify.keyword import load_keyword_engine

        return load_keyword_engine(settings)
    if settings.engine == "vllm":
        from router_worker.classify.vllm import load_vllm_engine  # gpu extra

        return load_vllm_engine(path, settings.vllm_model)
    from router_worker.classify.cpu import CpuEngine, load_cpu_engine

    return load_cpu_engine(
        path,
        settings.static_model,
        threads=settings.engine_threads,
        encoder_stage=settings.encoder_stage,
        previous=previous if isinstance(previous, CpuEngine) else None,
    )


def redis_version_source(settings: Settings) -> Callable[[], str | None]:
    """A cheap `() -> version | None` reading `{redis_prefix}classifier:current` (one GET).

    Redis trouble yields None (the watcher then follows CURRENT alone) and is logged once.
    """
    import redis

    client = redis.Redis.from_url(
        settings.redis_url.get_secret_value(),
        socket_timeout=_REDIS_TIMEOUT_S,
        socket_connect_timeout=_REDIS_TIMEOUT_S,
    )
    key = f"{settings.redis_prefix}{CURRENT_KEY}"
    failing = [False]

    def current() -> str | None:
        try:
            value = client.get(key)
        except redis.RedisError as exc:
            if not failing[0]:
                log.warning("classifier_version_unreadable", error=str(exc)[:200])
            failing[0] = True
            return None
        failing[0] = False
        return value.decode() if isinstance(value, bytes) else None

    return current


def make_watcher(
    settings: Settings, engine: Engine | None = None, *, follow_redis: bool = True
) -> ArtifactWatcher[Engine]:
    """A watcher that reloads the learned engine when `settings.artifact`'s CURRENT changes
    or `router-worker classifier promote` publishes a version on Redis.

    Call `watcher.maybe_reload()` between batches: it stats one file (and GETs one key) at
    most every `settings.artifact_poll_s` and returns a new engine only when the version changed.
    """
    last = [engine]  # the engine the next reload replaces

    def reload(path: Path) -> Engine:
        fresh = load_engine(settings, path, previous=last[0])
        last[0] = fresh
        return fresh

    return ArtifactWatcher(
        settings.artifact,
        reload,
        poll_s=settings.artifact_poll_s,
        initial_version=engine.version if engine is not None else None,
        remote=redis_version_source(settings) if follow_redis else None,
    )

"""Pick and load the classifier engine named in settings (keyword, cpu or vllm)."""

from __future__ import annotations

from pathlib import Path

from router_worker.classify.artifacts import ArtifactWatcher
from router_worker.classify.engine import Engine
from router_worker.settings import Settings


def load_engine(settings: Settings, artifact: Path | None = None) -> Engine:
    """The engine `settings.engine` names, loaded from `artifact` (default settings.artifact).

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
    from router_worker.classify.cpu import load_cpu_engine

    return load_cpu_engine(
        path,
        settings.static_model,
        threads=settings.engine_threads,
        encoder_stage=settings.encoder_stage,
    )


def make_watcher(settings: Settings, engine: Engine | None = None) -> ArtifactWatcher[Engine]:
    """A watcher that reloads the learned engine when `settings.artifact`'s CURRENT changes.

    Call `watcher.maybe_reload()` between batches: it stats one file at most every
    `settings.artifact_poll_s` and returns a new engine only when the version changed.
    """
    return ArtifactWatcher(
        settings.artifact,
        lambda path: load_engine(settings, path),
        poll_s=settings.artifact_poll_s,
        initial_version=engine.version if engine is not None else None,
    )

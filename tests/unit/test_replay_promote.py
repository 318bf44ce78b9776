"""Promotion and rollback of classifier versions, and watchers following the fleet's version."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from router_worker.classify.artifacts import (
    ArtifactMeta,
    ArtifactWatcher,
    Labels,
    current_version,
    previous_versions,
    promote,
    resolve,
    rollback,
    write_artifact,
)
from router_worker.errors import ArtifactError


def _artifact(root: Path, version: str, f1: float, *, current: bool = False) -> Path:
    meta = ArtifactMeta(
        version=version, engine="cpu",
        labels=Labels(categories=["code", "chat"], complexities=["simple", "complex"]),
        encoder_id="test", static_model_hash="x", training_data_hash="y",
        metrics={"test": {"n": 10, "macro_f1": f1}}, created_at="2026-01-01T00:00:00+00:00",
    )
    return write_artifact(root, meta, {"w": np.zeros((2, 2), np.float32)}, make_current=current)


def test_promote_copies_a_candidate_in_and_records_the_previous_version(tmp_path: Path) -> None:
    live = tmp_path / "live"
    _artifact(live, "v1", 0.80, current=True)
    candidate = _artifact(tmp_path / "candidates", "v2", 0.85)
    done = promote(live, candidate)
    assert (done.version, done.previous) == ("v2", "v1")
    assert current_version(live) == "v2"
    assert (live / "v2" / "meta.json").is_file()
    assert previous_versions(live) == ["v1"]


def test_promote_refuses_a_worse_candidate_unless_forced(tmp_path: Path) -> None:
    live = tmp_path / "live"
    _artifact(live, "v1", 0.80, current=True)
    worse = _artifact(tmp_path / "candidates", "v2", 0.70)
    with pytest.raises(ArtifactError, match="worse"):
        promote(live, worse)
    assert current_version(live) == "v1"
    assert promote(live, worse, force=True).version == "v2"


def test_rollback_returns_to_the_previous_version_and_pops_history(tmp_path: Path) -> None:
    live = tmp_path / "live"
    _artifact(live, "v1", 0.80, current=True)
    _artifact(live, "v2", 0.81)
    _artifact(live, "v3", 0.82)
    promote(live, "v2")
    promote(live, "v3")
    assert rollback(live).version == "v2"
    assert rollback(live).version == "v1"
    with pytest.raises(ArtifactError, match="nothing to roll back"):
        rollback(live)


def test_watcher_follows_a_version_published_on_redis(tmp_path: Path) -> None:
    live = tmp_path / "live"
    _artifact(live, "v1", 0.80, current=True)
    _artifact(live, "v2", 0.81)  # on the shared store, but CURRENT still names v1
    remote: list[str | None] = [None]
    now = [0.0]
    watcher: ArtifactWatcher[str] = ArtifactWatcher(
        live, lambda p: resolve(p).name, poll_s=1.0, clock=lambda: now[0],
        remote=lambda: remote[0],
    )
    now[0] = 2.0
    assert watcher.maybe_reload() is None
    remote[0] = "v9"  # not on this host's store (yet): ignored, looked for again
    now[0] = 4.0
    assert watcher.maybe_reload() is None
    remote[0] = "v2"
    assert watcher.maybe_reload() is None  # not before the next poll
    now[0] = 6.0
    assert watcher.maybe_reload() == "v2"
    now[0] = 8.0
    assert watcher.maybe_reload() is None  # the same remote version is not reloaded again

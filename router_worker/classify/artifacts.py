"""Versioned classifier artifacts: `<root>/<version>/{head.npz, meta.json}` + `<root>/CURRENT`."""

from __future__ import annotations

import os
import re
import shutil
import time
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
import numpy.typing as npt
import orjson
import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from router_worker.errors import ArtifactError, RouterError

log = structlog.get_logger(__name__)

CURRENT = "CURRENT"
PREVIOUS = "PREVIOUS"  # versions CURRENT named before, oldest first: what rollback returns to
HEAD_FILE = "head.npz"
META_FILE = "meta.json"
FORMAT_VERSION = 1
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

Arrays = dict[str, npt.NDArray[Any]]


class Labels(BaseModel):
    """The label sets a head was trained on, in the order of its output columns."""

    model_config = ConfigDict(frozen=True)

    categories: list[str]
    complexities: list[str]


class ArtifactMeta(BaseModel):
    """meta.json: what a head is, what it was trained on and how well it did."""

    model_config = ConfigDict(frozen=True, extra="allow", protected_namespaces=())

    format: int = FORMAT_VERSION
    version: str
    engine: str
    labels: Labels
    encoder_id: str
    static_model_hash: str
    # sha256 of the intent lexicon the head's concept columns mean (None: trained before it).
    lexicon_hash: str | None = None
    training_data_hash: str
    metrics: dict[str, Any] = Field(default_factory=dict)
    params: dict[str, Any] = Field(default_factory=dict)
    created_at: str


@dataclass(frozen=True, slots=True)
class Artifact:
    """A loaded artifact: its directory, metadata and head arrays."""

    path: Path
    meta: ArtifactMeta
    arrays: Arrays


def check_version(version: str) -> str:
    """`version` if it is a safe directory name, else ArtifactError."""
    if not _VERSION_RE.match(version):
        raise ArtifactError(f"invalid artifact version {version!r}")
    return version


def resolve(path: Path) -> Path:
    """The artifact directory `path` names: itself if it holds meta.json, else root/CURRENT."""
    if (path / META_FILE).is_file():
        return path
    current = path / CURRENT
    if not current.is_file():
        raise ArtifactError(
            f"no classifier artifact at {path} (no {META_FILE} or {CURRENT}); "
            "run `router-worker train` first"
        )
    version = check_version(current.read_text(encoding="utf-8").strip())
    target = path / version
    if not (target / META_FILE).is_file():
        raise ArtifactError(f"{current} names version {version!r} but {target} has no {META_FILE}")
    return target


def load_artifact(path: Path) -> Artifact:
    """Load and validate the artifact at `path` (a version directory or a root with CURRENT)."""
    directory = resolve(path)
    try:
        meta = ArtifactMeta.model_validate_json((directory / META_FILE).read_bytes())
    except (OSError, ValidationError) as exc:
        raise ArtifactError(f"corrupt {directory / META_FILE}: {exc}") from exc
    try:
        with np.load(directory / HEAD_FILE, allow_pickle=False) as npz:
            arrays: Arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise ArtifactError(f"corrupt {directory / HEAD_FILE}: {exc}") from exc
    return Artifact(path=directory, meta=meta, arrays=arrays)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _save_npz(path: Path, arrays: Mapping[str, npt.NDArray[Any]]) -> None:
    # numpy's stubs type **kwds as if an array could be named `allow_pickle`.
    savez: Callable[..., None] = np.savez
    savez(path, **dict(arrays))


def write_artifact(
    root: Path,
    meta: ArtifactMeta,
    arrays: Mapping[str, npt.NDArray[Any]],
    *,
    extra: Mapping[str, Mapping[str, npt.NDArray[Any]]] | None = None,
    make_current: bool = True,
) -> Path:
    """Write a new version under `root` and (by default) point CURRENT at it.

    The version directory is built under a temporary name and renamed into place, and CURRENT
    is replaced by rename, so a watcher never sees a half-written artifact.
    """
    version = check_version(meta.version)
    root.mkdir(parents=True, exist_ok=True)
    final = root / version
    if final.exists():
        raise ArtifactError(f"artifact version {version} already exists at {final}")
    staging = root / f".staging-{version}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    _save_npz(staging / HEAD_FILE, arrays)
    for name, extra_arrays in (extra or {}).items():
        _save_npz(staging / name, extra_arrays)
    (staging / META_FILE).write_bytes(orjson.dumps(meta.model_dump(), option=orjson.OPT_INDENT_2))
    os.replace(staging, final)
    if make_current:
        set_current(root, version)
    log.info("artifact_written", version=version, path=str(final), current=make_current)
    return final


def set_current(root: Path, version: str) -> None:
    """Atomically point `root/CURRENT` at an existing version."""
    if not (root / check_version(version) / META_FILE).is_file():
        raise ArtifactError(f"cannot make {version} current: {root / version} is not an artifact")
    _atomic_write(root / CURRENT, f"{version}\n".encode())


def current_version(root: Path) -> str | None:
    """The version root/CURRENT names, or None when there is none."""
    try:
        return check_version((root / CURRENT).read_text(encoding="utf-8").strip())
    except (OSError, ArtifactError):
        return None


def read_meta(directory: Path) -> ArtifactMeta:
    """meta.json of one version directory."""
    try:
        return ArtifactMeta.model_validate_json((directory / META_FILE).read_bytes())
    except (OSError, ValidationError) as exc:
        raise ArtifactError(f"no valid {META_FILE} in {directory}: {exc}") from exc


def test_macro_f1(meta: ArtifactMeta) -> float | None:
    """The held-out test macro-F1 recorded at training time (what promotion compares)."""
    test = meta.metrics.get("test")
    value = test.get("macro_f1") if isinstance(test, dict) else None
    return float(value) if isinstance(value, int | float) else None


def previous_versions(root: Path) -> list[str]:
    """The promotion history in root/PREVIOUS, oldest first."""
    try:
        lines = (root / PREVIOUS).read_text(encoding="utf-8").split()
    except OSError:
        return []
    return [v for v in lines if _VERSION_RE.match(v)]


@dataclass(frozen=True, slots=True)
class Promotion:
    """What a promote or rollback changed."""

    version: str
    previous: str | None
    path: Path


def _import_version(root: Path, source: Path) -> str:
    """The version of `source`, copied into `root` (staged, renamed) unless already there."""
    meta = read_meta(source)
    version = check_version(meta.version)
    target = root / version
    if target.resolve() == source.resolve() or (target / META_FILE).is_file():
        return version
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".staging-{version}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging)
    os.replace(staging, target)
    return version


def promote(root: Path, candidate: Path | str, *, force: bool = False) -> Promotion:
    """Make `candidate` (a version directory anywhere, or a version name under root) CURRENT.

    Refuses (ArtifactError) when its test macro-F1 is below the live version's unless `force`.
    The live version is appended to root/PREVIOUS first, so `rollback` can return to it.
    """
    source = Path(candidate)
    if not (source / META_FILE).is_file():
        source = root / check_version(str(candidate))
    candidate_meta = read_meta(source)
    live = current_version(root)
    if live is not None and live != candidate_meta.version and not force:
        live_f1 = test_macro_f1(read_meta(root / live))
        new_f1 = test_macro_f1(candidate_meta)
        if live_f1 is not None and (new_f1 is None or new_f1 < live_f1):
            raise ArtifactError(
                f"refusing to promote {candidate_meta.version}: test macro_f1 {new_f1} is worse "
                f"than live {live}'s {live_f1:.4f} (use --force to promote anyway)"
            )
    version = _import_version(root, source)
    if live is not None and live != version:
        history = [*previous_versions(root), live][-50:]
        _atomic_write(root / PREVIOUS, ("\n".join(history) + "\n").encode())
    set_current(root, version)
    log.info("artifact_promoted", version=version, previous=live)
    return Promotion(version=version, previous=live, path=root / version)


def rollback(root: Path) -> Promotion:
    """Point CURRENT back at the last version in root/PREVIOUS and pop it from the history."""
    history = previous_versions(root)
    live = current_version(root)
    while history and not (root / history[-1] / META_FILE).is_file():
        history.pop()  # a pruned version cannot be rolled back to
    if not history:
        raise ArtifactError(f"nothing to roll back to: {root / PREVIOUS} is empty")
    version = history.pop()
    _atomic_write(root / PREVIOUS, ("\n".join(history) + "\n" if history else "").encode())
    set_current(root, version)
    log.info("artifact_rolled_back", version=version, previous=live)
    return Promotion(version=version, previous=live, path=root / version)


def read_extra(artifact: Artifact, name: str) -> Arrays | None:
    """Arrays of an optional extra file in the artifact (e.g. the encoder head), or None."""
    path = artifact.path / name
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise ArtifactError(f"corrupt {path}: {exc}") from exc


E = TypeVar("E")


def _fingerprint(path: Path) -> tuple[int, int, int] | None:
    """(inode, size, mtime_ns) of what names the live artifact: one stat, no reads."""
    target = path / CURRENT if (path / CURRENT).exists() else path / META_FILE
    try:
        st = target.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class ArtifactWatcher(Generic[E]):
    """Reloads the engine when the artifact changes; cheap enough to call between batches.

    `maybe_reload()` stats CURRENT at most every `poll_s` seconds and only then reads it; a
    new artifact that fails to load is logged and skipped, and the old engine keeps serving.
    """

    def __init__(
        self,
        path: Path,
        loader: Callable[[Path], E],
        *,
        poll_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        initial_version: str | None = None,
        remote: Callable[[], str | None] | None = None,
    ) -> None:
        self.path = path
        self._loader = loader
        # The fleet-wide version (Redis), asked once per poll; a change there wins, so hosts
        # whose CURRENT is stale or not shared still follow a promotion.
        self._remote = remote
        self._remote_seen: str | None = None
        self._poll_s = poll_s
        self._clock = clock
        self._next_check = clock() + poll_s
        self._seen = _fingerprint(path)
        self._version = initial_version or self._current_version()

    def _current_version(self) -> str | None:
        try:
            return resolve(self.path).name
        except (ArtifactError, OSError):
            return None

    def maybe_reload(self, *, force: bool = False) -> E | None:
        """A freshly loaded engine when the live artifact changed, else None."""
        now = self._clock()
        if not force and now < self._next_check:
            return None
        self._next_check = now + self._poll_s
        target, version = self.path, None
        remote = self._remote() if self._remote is not None else None
        # A version this host's store does not hold (yet) is looked for again next poll.
        if (remote is not None and remote != self._remote_seen and _VERSION_RE.match(remote)
                and (self.path / remote / META_FILE).is_file()):
            self._remote_seen = remote
            if remote != self._version:
                target, version = self.path / remote, remote
        fingerprint = _fingerprint(self.path)
        if version is None:
            if fingerprint == self._seen and not force:
                return None
            version = self._current_version()
        self._seen = fingerprint
        if version is None or (version == self._version and not force):
            return None
        try:
            engine = self._loader(target)
        except RouterError as exc:
            log.error("artifact_reload_failed", version=version, error=str(exc), code=exc.code)
            return None
        log.info("artifact_reloaded", old_version=self._version, version=version)
        self._version = version
        return engine

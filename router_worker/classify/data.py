"""Labelled prompt corpus: loading, hash-based stratified splits and the training-data hash."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import orjson

from router_worker.errors import ConfigError
from router_worker.events import CATEGORIES, COMPLEXITIES

Split = Literal["train", "validation", "test"]
SPLITS: tuple[Split, ...] = ("train", "validation", "test")
# Fractions of train and validation; test takes the rest (70/15/15).
TRAIN_FRACTION = 0.70
VALIDATION_FRACTION = 0.15
# Changing the seed reshuffles every split; it is part of the split's identity, not a knob.
SPLIT_SEED = "router-worker-split-v1"

_WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True, slots=True)
class Record:
    """One labelled prompt."""

    prompt: str
    category: str
    complexity: str


def normalise(text: str) -> str:
    """Case- and whitespace-folded text: the identity of a prompt for splits and hashes."""
    return _WHITESPACE.sub(" ", text).strip().lower()


def _parse_line(line: bytes, where: str) -> Record:
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise ConfigError(f"{where}: invalid JSON ({exc})") from exc
    if not isinstance(obj, dict):
        raise ConfigError(f"{where}: expected a JSON object")
    prompt, category, complexity = obj.get("prompt"), obj.get("category"), obj.get("complexity")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ConfigError(f"{where}: 'prompt' must be a non-empty string")
    if category not in CATEGORIES:
        raise ConfigError(f"{where}: unknown category {category!r}")
    if complexity not in COMPLEXITIES:
        raise ConfigError(f"{where}: unknown complexity {complexity!r}")
    return Record(prompt=prompt, category=str(category), complexity=str(complexity))


def load_file(path: Path) -> list[Record]:
    """Records of one jsonl file; blank lines are skipped, a bad line names file and line."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read corpus file {path}: {exc}") from exc
    return [
        _parse_line(line, f"{path}:{number}")
        for number, line in enumerate(raw.splitlines(), start=1)
        if line.strip()
    ]


def corpus_files(paths: Iterable[Path]) -> list[Path]:
    """The jsonl files named by `paths`: files as given, directories expanded in sorted order."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(path.glob("*.jsonl")))
        elif path.is_file():
            files.append(path)
        else:
            raise ConfigError(f"corpus path {path} does not exist")
    return files


def load_records(paths: Iterable[Path]) -> list[Record]:
    """All records under `paths` (files or directories), exact duplicates dropped."""
    seen: set[tuple[str, str, str]] = set()
    records: list[Record] = []
    for file in corpus_files(paths):
        for record in load_file(file):
            key = (normalise(record.prompt), record.category, record.complexity)
            if key not in seen:
                seen.add(key)
                records.append(record)
    return records


def split_of(prompt: str) -> Split:
    """The split a prompt belongs to, from a hash of its normalised text.

    Each record is placed on its own, so adding lines never moves another record, and every
    category is split 70/15/15 in expectation (stratified by construction); prompts that
    normalise alike always share a split, so near-copies cannot leak from train into test.
    """
    digest = hashlib.sha256(f"{SPLIT_SEED}\0{normalise(prompt)}".encode()).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64
    if position < TRAIN_FRACTION:
        return "train"
    if position < TRAIN_FRACTION + VALIDATION_FRACTION:
        return "validation"
    return "test"


def split_records(records: Sequence[Record]) -> dict[Split, list[Record]]:
    """Train, validation and test records, each in input order."""
    parts: dict[Split, list[Record]] = {name: [] for name in SPLITS}
    for record in records:
        parts[split_of(record.prompt)].append(record)
    return parts


def data_hash(records: Iterable[Record]) -> str:
    """sha256 of the sorted normalised records: the same corpus in any order hashes alike."""
    lines = sorted(orjson.dumps([normalise(r.prompt), r.category, r.complexity]) for r in records)
    digest = hashlib.sha256()
    for line in lines:
        digest.update(line)
        digest.update(b"\n")
    return digest.hexdigest()

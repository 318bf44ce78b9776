"""Corpus loading, hash splits (deterministic, stable as files grow) and the data hash."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from router_worker.classify.data import (
    Record,
    data_hash,
    load_records,
    split_of,
    split_records,
)
from router_worker.errors import ConfigError
from router_worker.events import CATEGORIES


def _records(n: int, start: int = 0) -> list[Record]:
    return [
        Record(
            f"prompt number {i} about topic {i * 7}",
            CATEGORIES[i % 8],
            ("simple", "complex")[i % 2],
        )
        for i in range(start, start + n)
    ]


def _write(path: Path, records: list[Record]) -> None:
    path.write_text(
        "".join(
            json.dumps({"prompt": r.prompt, "category": r.category, "complexity": r.complexity})
            + "\n"
            for r in records
        )
    )


def test_directory_and_files_load_alike(tmp_path: Path) -> None:
    _write(tmp_path / "a.jsonl", _records(10))
    _write(tmp_path / "b.jsonl", _records(5, start=10))
    assert load_records([tmp_path]) == load_records([tmp_path / "a.jsonl", tmp_path / "b.jsonl"])
    assert len(load_records([tmp_path])) == 15


def test_exact_duplicates_are_dropped(tmp_path: Path) -> None:
    _write(tmp_path / "a.jsonl", _records(3) + _records(3))
    assert len(load_records([tmp_path])) == 3


@pytest.mark.parametrize(
    "line",
    [
        "{not json",
        '{"prompt": "x", "category": "poetry", "complexity": "simple"}',
        '{"prompt": "x", "category": "code", "complexity": "hard"}',
        '{"prompt": "", "category": "code", "complexity": "simple"}',
        "[1, 2]",
    ],
)
def test_bad_line_is_a_config_error_naming_the_line(tmp_path: Path, line: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok", "category": "code", "complexity": "simple"}\n' + line + "\n")
    with pytest.raises(ConfigError, match=r"bad\.jsonl:2"):
        load_records([path])


def test_missing_path_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_records([tmp_path / "nope.jsonl"])


def test_split_is_deterministic_and_roughly_70_15_15() -> None:
    records = _records(4000)
    parts = split_records(records)
    assert parts == split_records(records)
    sizes = {name: len(rs) / len(records) for name, rs in parts.items()}
    assert sizes["train"] == pytest.approx(0.70, abs=0.03)
    assert sizes["validation"] == pytest.approx(0.15, abs=0.03)
    assert sizes["test"] == pytest.approx(0.15, abs=0.03)


def test_split_is_stratified_per_category() -> None:
    parts = split_records(_records(8000))
    for category in CATEGORIES:
        per = {name: sum(r.category == category for r in rs) for name, rs in parts.items()}
        assert per["test"] / sum(per.values()) == pytest.approx(0.15, abs=0.04), (category, per)


def test_adding_records_never_moves_existing_ones() -> None:
    before = _records(500)
    after = before + _records(300, start=500)
    assert [split_of(r.prompt) for r in before] == [split_of(r.prompt) for r in after[:500]]


def test_prompts_that_normalise_alike_share_a_split() -> None:
    assert split_of("Write a Poem  about the sea") == split_of("write a poem about the sea ")


def test_data_hash_ignores_order_and_whitespace_but_not_labels() -> None:
    records = _records(20)
    assert data_hash(records) == data_hash(list(reversed(records)))
    spaced = [Record(r.prompt + "  ", r.category, r.complexity) for r in records]
    assert data_hash(spaced) == data_hash(records)
    relabelled = [Record(records[0].prompt, "ops", records[0].complexity), *records[1:]]
    assert data_hash(relabelled) != data_hash(records)

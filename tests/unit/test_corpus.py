"""The labelled corpus: schema, per-category counts, no near-duplicates, no holdout leakage."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from rapidfuzz import fuzz, process

from router_worker.classify.data import Record, load_records, normalise
from router_worker.events import CATEGORIES, COMPLEXITIES

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "data" / "prompts"
HOLDOUT = ROOT / "data" / "holdout" / "holdout.jsonl"
MIN_PER_CATEGORY = 300
# fuzz.ratio on normalised text; 90 flags templated rewrites, not prompts on the same topic.
NEAR_DUPLICATE = 90.0


@pytest.fixture(scope="module")
def corpus() -> list[Record]:
    return load_records([CORPUS])


def test_every_corpus_file_is_one_category(corpus: list[Record]) -> None:
    for path in sorted(CORPUS.glob("*.jsonl")):
        assert path.stem in CATEGORIES, path
        assert {r.category for r in load_records([path])} == {path.stem}


def test_each_category_has_enough_prompts_of_both_complexities(corpus: list[Record]) -> None:
    counts = Counter(r.category for r in corpus)
    for category in CATEGORIES:
        assert counts[category] >= MIN_PER_CATEGORY, (category, counts[category])
        levels = Counter(r.complexity for r in corpus if r.category == category)
        assert set(levels) == set(COMPLEXITIES), (category, levels)
        assert min(levels.values()) >= MIN_PER_CATEGORY // 5, (category, levels)


def _near_pairs(left: list[str], right: list[str] | None = None) -> list[tuple[str, str]]:
    scores = process.cdist(
        left,
        right if right is not None else left,
        scorer=fuzz.ratio,
        score_cutoff=NEAR_DUPLICATE,
        workers=-1,
        dtype="uint8",
    )
    pairs = []
    for i, j in zip(*scores.nonzero(), strict=True):
        if right is None and j <= i:
            continue
        pairs.append((left[i], (right if right is not None else left)[j]))
    return pairs


@pytest.mark.slow
def test_corpus_has_no_near_duplicate_prompts(corpus: list[Record]) -> None:
    texts = [normalise(r.prompt) for r in corpus]
    pairs = _near_pairs(texts)
    assert not pairs, f"{len(pairs)} near-duplicate pairs, e.g. {pairs[:3]}"


@pytest.mark.slow
def test_holdout_does_not_leak_training_prompts(corpus: list[Record]) -> None:
    holdout = load_records([HOLDOUT])
    assert holdout, "the holdout set is empty"
    pairs = _near_pairs(
        [normalise(r.prompt) for r in holdout], [normalise(r.prompt) for r in corpus]
    )
    assert not pairs, f"{len(pairs)} holdout prompts near-duplicate training ones: {pairs[:3]}"

"""The keyword/fuzzy tier: batch contract, typo tolerance, fallback to default."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from router_worker.bench import load_prompts
from router_worker.classify.keyword import (
    _ASCII_WORD,
    _WORD,
    KeywordEngine,
    estimate_complexity,
    phrase_pattern,
)
from router_worker.events import Tier

ENGINE = KeywordEngine({"code": ["python", "stack trace"], "ops": ["kubernetes"],
                        "chat": ["hello"]})


def test_batch_in_batch_out_keeps_order() -> None:
    texts = ["hello friend", "python list sorting", "kubernetes node drained"]
    assert [p.category for p in ENGINE.classify(texts)] == ["chat", "code", "ops"]
    assert ENGINE.classify([]) == []


def test_typo_is_matched_by_the_fuzzy_tier() -> None:
    [prediction] = ENGINE.classify(["my kubernetse cluster is down"])
    assert prediction.category == "ops"
    assert prediction.tier is Tier.FUZZY


def test_no_match_falls_back_to_default_category() -> None:
    [prediction] = ENGINE.classify(["zzz qqq"])
    assert prediction.category == "chat"
    assert prediction.tier is Tier.DEFAULT
    assert abs(sum(prediction.scores.values()) - 1.0) < 1e-6


def test_long_structured_prompts_are_complex() -> None:
    assert estimate_complexity("hi")[0] == "simple"
    long = "Please design a detailed architecture.\n1. ingest\n2. store\n3. serve\n" + "word " * 80
    assert estimate_complexity(long)[0] == "complex"


def test_phrase_trie_prefers_the_longest_whole_phrase() -> None:
    phrases = ["ci", "ci/cd", "c++", "stack", "stack trace"]
    pattern = re.compile(r"(?<!\w)(" + phrase_pattern(phrases) + r")(?!\w)")
    assert pattern.findall("ci/cd broke, c++ stack trace, ci and stacks") == [
        "ci/cd", "c++", "stack trace", "ci"]


def test_a_word_seen_again_is_answered_from_memory_with_the_same_result() -> None:
    engine = KeywordEngine({"ops": ["kubernetes"]})
    first = engine.classify(["kubernetse is down"])[0]
    assert engine._memo["kubernetse"] == "kubernetes"
    assert engine.classify(["kubernetse is down"])[0] == first


@given(st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=127), max_size=200))
def test_ascii_words_match_the_unicode_word_pattern(text: str) -> None:
    lowered = text.lower()
    assert _ASCII_WORD.findall(lowered) == _WORD.findall(lowered)


def test_the_corpus_gives_the_same_words_either_way() -> None:
    for text in load_prompts():
        lowered = text[:1500].lower()
        if lowered.isascii():
            assert _ASCII_WORD.findall(lowered) == _WORD.findall(lowered)

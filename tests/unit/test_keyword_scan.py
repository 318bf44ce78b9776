"""The compiled keyword scan gives exactly what the reference regexes give."""

from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router_worker.bench import load_prompts
from router_worker.classify.keyword import (
    _CUE_LITERALS,
    KeywordEngine,
    flatten_trie,
    native_scan_available,
)
from router_worker.config import load_config
from router_worker.errors import EngineUnavailable
from router_worker.settings import Settings

needs_native = pytest.mark.skipif(
    not native_scan_available(), reason="the compiled keyword scan is not built here"
)

PHRASES = {"code": ["python", "stack trace", "c++", "ci/cd", "ci", "pythonic", "née"],
           "ops": ["kubernetes", "k8s", "on-call"], "chat": ["hello", "привет"]}
# Pieces that sit on every boundary the scans care about: phrases and cues with their
# prefixes and extensions, word and non-word neighbours, digits (ASCII and not), '_', and
# characters whose class differs between ASCII and Unicode.
FRAGMENTS = [
    *(p for ps in PHRASES.values() for p in ps), *(c.rstrip("*") for c in _CUE_LITERALS),
    "architecture", "scalability", "trade-offsx", "step by-step", "in detailed", "plann",
    "stack", "pytho", "kubernetse", "helloo", " ", "  ", "\n", "\t", "\u3000", "\x85", "\x1c",
    "-", "_", "/", "+", ".", "?", "`", "1", "٣", "²", "é", "ß", "İ", "中文", "ǅ", "ŉ", "\u0301",
    "a", "xyz", "abcde", "Python", "ÉCOLE",
    # structure: fences, list markers at line starts, whitespace the regex's \s and ^ differ on
    "```", "``", "*", ")", "12", "\n- ", "\n1. ", "\n  * ", "\r", "\u2028", "\x0b", "\x0c",
    "\u2003",
]
text_strategy = st.lists(
    st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=3)), max_size=40
).map("".join)


def _default_engines() -> tuple[KeywordEngine, KeywordEngine]:
    config = load_config(Settings().config)
    return (KeywordEngine(config.keywords, config.default_category, native=True),
            KeywordEngine(config.keywords, config.default_category, native=False))


@needs_native
def test_every_corpus_prompt_scans_the_same_compiled_and_by_regex() -> None:
    native, _ = _default_engines()
    texts = load_prompts(limit=100_000)
    for _warm in (False, True):  # words fresh to the fuzzy memo, then known to it
        for text in texts:
            lowered = text[:1500].lower()
            assert native.scan(text, lowered) == native.scan_reference(text, lowered), text
        native.classify(texts)
    assert any(native.scan(t, t[:1500].lower()).near for t in texts)  # near-misses were seen


@needs_native
def test_the_corpus_is_classified_the_same_compiled_and_by_regex() -> None:
    native, reference = _default_engines()
    texts = load_prompts(limit=100_000)
    for start in range(0, len(texts), 256):
        batch = texts[start:start + 256]
        assert native.classify(batch) == reference.classify(batch)


@needs_native
@settings(max_examples=600, deadline=None)
@given(text_strategy)
def test_random_text_scans_the_same_compiled_and_by_regex(text: str) -> None:
    native = KeywordEngine(PHRASES, native=True)
    lowered = text[:1500].lower()
    assert native.scan(text, lowered) == native.scan_reference(text, lowered)
    native.classify([text])  # now every word is in the fuzzy memo
    assert native.scan(text, lowered) == native.scan_reference(text, lowered)


@needs_native
@settings(max_examples=200, deadline=None)
@given(text_strategy)
def test_the_default_phrases_scan_random_text_the_same_both_ways(text: str) -> None:
    native, _ = _default_engines()
    lowered = text.lower()
    assert native.scan(text, lowered) == native.scan_reference(text, lowered)


@needs_native
def test_a_long_text_is_scanned_past_the_stack_buffer() -> None:
    native = KeywordEngine(PHRASES, native=True)
    text = "python stack trace on kubernetes, step by step analysis " * 400
    assert native.scan(text, text) == native.scan_reference(text, text)


@needs_native
@pytest.mark.parametrize("text", [
    "1. one\n2) two\n- three\n* four\n```py\nx\n```",
    "- a list item first",
    " \n\n  - after blank lines\n-no space\n٣. eastern digits",
    "```" * 2000,  # fences past the structure bound count only up to it
    "x" * 3999 + "\n- ",
    "\n" * 3998 + "- ",
])
def test_structure_is_counted_the_same_compiled_and_by_regex(text: str) -> None:
    native = KeywordEngine(PHRASES, native=True)
    assert native.scan(text, text) == native.scan_reference(text, text)


@needs_native
def test_fences_and_list_items_are_structure() -> None:
    native = KeywordEngine(PHRASES, native=True)
    text = "1. one\n2) two\n- three\n* four\n-five\n```py\nx\n```"
    assert native.scan(text, text).structure == 6


@needs_native
def test_a_malformed_trie_is_refused() -> None:
    from router_worker.classify import _keyword_scan

    nodes, edges = flatten_trie([("ab", False)])
    with pytest.raises(ValueError, match="whole int32"):
        _keyword_scan.load_trie(nodes[:-1], edges)
    with pytest.raises(ValueError, match="root"):
        _keyword_scan.load_trie(b"", b"")
    trie = _keyword_scan.load_trie(nodes, edges)
    with pytest.raises(TypeError, match="memo"):
        _keyword_scan.scan(trie, trie, [], "ab", "ab")  # type: ignore[arg-type]
    bad_child = bytearray(edges)
    bad_child[4:8] = (99).to_bytes(4, "little", signed=True)
    with pytest.raises(ValueError, match="outside the node table"):
        _keyword_scan.load_trie(nodes, bytes(bad_child))


def test_the_regexes_answer_where_the_compiled_scan_is_not_wanted() -> None:
    engine = KeywordEngine(PHRASES, native=False)
    assert not engine.native
    [prediction] = engine.classify(["my python stack trace"])
    assert prediction.category == "code"


def test_requiring_a_missing_compiled_scan_is_a_typed_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import router_worker.classify.keyword as keyword

    monkeypatch.setattr(keyword, "_native", None)
    with pytest.raises(EngineUnavailable, match="not built"):
        KeywordEngine(PHRASES, native=True)
    assert not KeywordEngine(PHRASES).native  # unset: the regexes, quietly


def test_the_compiled_scan_is_built_wherever_a_c_compiler_and_headers_are() -> None:
    include = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not (shutil.which("cc") or shutil.which("gcc")) or not include.exists():
        pytest.skip("no C compiler or Python headers: the regexes are the keyword scan here")
    assert native_scan_available(), "setup.py's optional extension failed to build"


def test_an_engine_without_phrase_words_looks_at_no_words() -> None:
    for native in ({True, False} if native_scan_available() else {False}):
        engine = KeywordEngine({"code": ["ci", "c++"]}, native=native)
        scan = engine.scan("kubernetes pipeline", "kubernetes pipeline")
        assert (scan.near, scan.fresh) == ([], [])
        assert not engine._memo


def test_blank_phrases_are_ignored_by_the_engine_and_refused_by_the_config() -> None:
    engine = KeywordEngine({"code": ["", "  ", "python"]})
    text = "a  b python"
    assert engine.scan(text, text).phrases == engine.scan_reference(text, text).phrases == [0]
    raw = load_config(Settings().config).model_dump()
    raw["keywords"]["code"] = [*raw["keywords"]["code"], " "]
    with pytest.raises(ValueError, match=r"keywords\.code: an empty phrase"):
        type(load_config(Settings().config)).model_validate(raw)

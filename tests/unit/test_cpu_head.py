"""The CPU engine's compiled head (_cpu_head.c) against its numpy reference, and its checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router_worker.classify import cpu
from router_worker.classify.cpu import (
    MAX_TOKENS,
    CpuEngine,
    FastHead,
    compiled_head_inputs,
    load_cpu_engine,
)
from router_worker.settings import Settings
from tests.unit.test_classifier_engine import _publish, static_model  # noqa: F401 (fixture)

native = pytest.importorskip("router_worker.classify._cpu_head")

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = Settings()

# What the numpy head does in ways a C loop could get wrong: NULs (blanked to spaces), case
# folding that changes length, unknown words, phrases of the real lexicon, empty texts, more
# than MAX_TOKENS pieces, several scripts.
TEXTS = [
    "write a poem",
    "fix the bug in python",
    "",
    "   ",
    "sum the server",
    "zzz unknown words",
    "a\0b",
    "\0\0\0",
    "İSTANBUL ΣΟΦΟΣ straße",
    "write " * (MAX_TOKENS + 40),
    "step by step, write unit tests for the server",
    "请解释一下什么是量子计算。 write a poem",
    "line one\nline two\n\n- item\n```python\nsum()\n```",
    "x" * 5000,
]


@pytest.fixture
def engine(tmp_path: Path, static_model: Path) -> CpuEngine:  # noqa: F811 (fixture)
    _publish(tmp_path, "cpu-v1", static_model)
    return load_cpu_engine(tmp_path, static_model)


def test_this_install_built_the_compiled_head(engine: CpuEngine) -> None:
    assert engine.fast.kernel == "compiled"


def test_compiled_logits_equal_the_numpy_head(engine: CpuEngine) -> None:
    got = engine.fast.logits(TEXTS)
    want = engine.fast.numpy_logits(TEXTS)
    assert got.dtype == np.float32
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_each_text_gets_the_logits_it_gets_alone(engine: CpuEngine) -> None:
    batch = engine.fast.logits(TEXTS)
    for i, text in enumerate(TEXTS):
        np.testing.assert_array_equal(engine.fast.logits([text])[0], batch[i])


def test_an_empty_batch_has_no_logits(engine: CpuEngine) -> None:
    assert engine.fast.logits([]).shape == (0, engine.fast.width)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(max_size=300), min_size=1, max_size=6))
def test_random_text_gives_the_numpy_logits(static_model: Path, texts: list[str]) -> None:  # noqa: F811
    engine = _tiny_engine(static_model)
    np.testing.assert_allclose(
        engine.fast.logits(texts), engine.fast.numpy_logits(texts), rtol=1e-5, atol=1e-5
    )


_ENGINES: dict[Path, CpuEngine] = {}


def _tiny_engine(static_model: Path) -> CpuEngine:  # noqa: F811
    # One engine for all hypothesis examples (a function-scoped fixture would be shared anyway).
    if static_model not in _ENGINES:
        root = static_model.parent / "head-artifacts"
        _publish(root, "cpu-v1", static_model)
        _ENGINES[static_model] = load_cpu_engine(root, static_model)
    return _ENGINES[static_model]


def test_without_the_extension_the_numpy_head_serves(
    engine: CpuEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cpu, "_native", None)
    fallback = FastHead(engine.head, engine.encoder)
    assert fallback.kernel == "numpy"
    np.testing.assert_array_equal(fallback.logits(TEXTS), engine.fast.numpy_logits(TEXTS))


@pytest.mark.skipif(
    not (ROOT / SETTINGS.static_model / "model.safetensors").exists()
    or not (ROOT / SETTINGS.artifact).exists(),
    reason="static model/artifact not built: run `make model train`",
)
def test_the_trained_artifact_predicts_the_same_with_either_head() -> None:
    from router_worker.bench import load_prompts

    engine = load_cpu_engine(ROOT / SETTINGS.artifact, ROOT / SETTINGS.static_model)
    prompts = load_prompts(limit=100_000)
    categories = engine.fast.n_categories
    for start in range(0, len(prompts), 64):
        batch = prompts[start : start + 64]
        got, want = engine.fast.logits(batch), engine.fast.numpy_logits(batch)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        margin = np.sort(want[:, :categories], axis=1)
        clear = margin[:, -1] - margin[:, -2] > 1e-3  # a near tie may go either way
        assert (got[clear, :categories].argmax(1) == want[clear, :categories].argmax(1)).all()


def test_tables_that_do_not_fit_are_refused(engine: CpuEngine) -> None:
    arrays, params = compiled_head_inputs(engine.fast)
    native.load_head(arrays, params, cpu.CHAR_NGRAMS)  # as the engine loads it
    bad_lookup = arrays[5].copy()
    bad_lookup[3] = engine.fast.table.shape[0]  # one past the last row
    with pytest.raises(ValueError, match="lookup"):
        native.load_head([*arrays[:5], bad_lookup, *arrays[6:]], params, cpu.CHAR_NGRAMS)
    with pytest.raises(ValueError, match="items"):
        native.load_head([*arrays[:5], bad_lookup.astype(np.int64), *arrays[6:]], params,
                         cpu.CHAR_NGRAMS)
    with pytest.raises(ValueError, match="w_peak"):
        native.load_head([arrays[0], arrays[1], arrays[2][:-1], *arrays[3:]], params,
                         cpu.CHAR_NGRAMS)
    with pytest.raises(ValueError, match="9 arrays"):
        native.load_head(arrays[:-1], params, cpu.CHAR_NGRAMS)
    with pytest.raises(ValueError, match="n-gram size"):
        native.load_head(arrays, params, (2, 0))


def test_inconsistent_batches_are_refused_not_read_out_of_bounds(engine: CpuEngine) -> None:
    head = engine.fast._compiled
    width = engine.fast.width
    out = np.empty((1, width), np.float32)
    cache: dict[str, tuple[int, ...]] = {"a": (1,), "far": (10**12,)}

    def learn(words: list[str]) -> dict[str, tuple[int, ...]]:
        return {}

    with pytest.raises(ValueError, match="out"):
        native.logits(head, ["a"], ["a"], [["a"]], cache, learn, np.empty((2, width), np.float32))
    with pytest.raises(ValueError, match="length"):
        native.logits(head, ["a"], [], [["a"]], cache, learn, out)
    with pytest.raises(TypeError, match="list of str"):
        native.logits(head, ["a"], ["a"], ["a"], cache, learn, out)
    with pytest.raises(KeyError, match="no entry"):
        native.logits(head, ["b"], ["b"], [["b"]], cache, learn, out)
    with pytest.raises(TypeError, match="tuple"):
        native.logits(head, ["a"], ["a"], [["a"]], {"a": [1]}, learn, out)  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="outside the bag"):
        native.logits(head, ["far"], ["far"], [["far"]], cache, learn, out)
    with pytest.raises(ValueError, match="PyCapsule"):
        native.logits(object(), ["a"], ["a"], [["a"]], cache, learn, out)


def test_words_never_seen_are_learned_once_per_batch(engine: CpuEngine) -> None:
    calls: list[list[str]] = []
    learn = engine.encoder.learn_missing

    def counting(words: list[str]) -> dict[str, tuple[int, ...]]:
        calls.append(words)
        return learn(words)

    engine.encoder.learn_missing = counting  # type: ignore[method-assign]
    texts = ["id-123 and id-123 again", "a fresh id-456", "write a poem"]
    got = engine.fast.logits(texts)
    assert len(calls) == 1
    assert {"id-123", "id-456"} <= set(calls[0])
    engine.fast.logits(["write a poem"])  # every word known now: no call
    assert len(calls) == 1
    np.testing.assert_allclose(got, engine.fast.numpy_logits(texts), rtol=1e-5, atol=1e-5)


def test_a_cache_cleared_while_learning_loses_no_entry(engine: CpuEngine) -> None:
    enc = engine.encoder
    texts = ["write a poem", "fix the bug 99-unique"]
    want = engine.fast.numpy_logits(texts)
    learn = enc.learn_missing

    def clearing(words: list[str]) -> dict[str, tuple[int, ...]]:
        enc.word_cache.clear()  # what _learn_words does when the cache is full
        return learn(words)

    enc.learn_missing = clearing  # type: ignore[method-assign]
    np.testing.assert_allclose(engine.fast.logits(texts), want, rtol=1e-5, atol=1e-5)

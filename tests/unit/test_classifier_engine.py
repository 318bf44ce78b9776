"""CPU engine and artifacts on a tiny self-made static model: batch contract, reload, errors."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file
from tokenizers import Tokenizer, models, pre_tokenizers

from router_worker.classify.artifacts import (
    ArtifactMeta,
    ArtifactWatcher,
    Labels,
    load_artifact,
    write_artifact,
)
from router_worker.classify.cpu import (
    VOCABULARY_FILE,
    CpuEngine,
    StaticEncoder,
    add_parts,
    char_ngrams,
    hash_dir,
    load_cpu_engine,
    pool,
    principal_directions,
    segment_sum,
    training_vocabulary,
    vocabulary_arrays,
    vocabulary_from_arrays,
)
from router_worker.classify.engine import Engine
from router_worker.errors import ArtifactError
from router_worker.events import CATEGORIES, COMPLEXITIES, Tier

WORDS = ["[UNK]", "write", "a", "poem", "fix", "bug", "python", "sum", "the", "server"]
DIM = 16


@pytest.fixture(scope="module")
def static_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("static")
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(path / "tokenizer.json"))
    rng = np.random.default_rng(0)
    save_file(
        {"embeddings": rng.normal(size=(len(WORDS), DIM)).astype(np.float16)},
        str(path / "model.safetensors"),
    )
    return path


def _meta(version: str, static_model: Path) -> ArtifactMeta:
    return ArtifactMeta(
        version=version,
        engine="cpu",
        labels=Labels(categories=list(CATEGORIES), complexities=list(COMPLEXITIES)),
        encoder_id="test",
        static_model_hash=hash_dir(static_model),
        training_data_hash="0" * 64,
        created_at=datetime.now(UTC).isoformat(),
    )


def _publish(
    root: Path, version: str, static_model: Path, seed: int = 1, lexicon_hash: str | None = None,
    vocabulary: list[str] | None = None,
) -> Path:
    encoder = StaticEncoder(static_model)
    width = len(CATEGORIES) + len(COMPLEXITIES)
    rng = np.random.default_rng(seed)
    dense = encoder.dense_width()
    arrays = {
        "mean": np.zeros(dense, dtype=np.float32),
        "std": np.ones(dense, dtype=np.float32),
        "w_dense": rng.normal(size=(dense, width)).astype(np.float32),
        "w_bag": rng.normal(size=(encoder.bag_size(), width)).astype(np.float32),
        "bias": np.zeros(width, dtype=np.float32),
    }
    meta = _meta(version, static_model).model_copy(update={"lexicon_hash": lexicon_hash})
    extra = {VOCABULARY_FILE: vocabulary_arrays(vocabulary)} if vocabulary is not None else None
    return write_artifact(root, meta, arrays, extra=extra)


@pytest.fixture
def engine(tmp_path: Path, static_model: Path) -> CpuEngine:
    _publish(tmp_path, "cpu-v1", static_model)
    return load_cpu_engine(tmp_path, static_model)


TEXTS = ["write a poem", "fix the bug in python", "", "sum the server", "zzz unknown words", "a\0b"]


def test_engine_implements_the_protocol(engine: CpuEngine) -> None:
    assert isinstance(engine, Engine)
    assert engine.name == "cpu"
    assert engine.version == "cpu-v1"


def test_batch_keeps_order_and_length_and_matches_single_calls(engine: CpuEngine) -> None:
    batch = engine.classify(TEXTS)
    assert len(batch) == len(TEXTS)
    singles = [engine.classify([t])[0] for t in TEXTS]
    for got, want in zip(batch, singles, strict=True):
        assert got.category == want.category
        assert got.complexity == want.complexity
        assert got.confidence == pytest.approx(want.confidence, rel=1e-5)


def test_scores_are_a_distribution_over_categories(engine: CpuEngine) -> None:
    for prediction in engine.classify(TEXTS):
        assert set(prediction.scores) == set(CATEGORIES)
        assert sum(prediction.scores.values()) == pytest.approx(1.0, abs=1e-6)
        assert prediction.confidence == pytest.approx(max(prediction.scores.values()))
        assert prediction.category in CATEGORIES
        assert prediction.complexity in COMPLEXITIES
        assert 0.5 <= prediction.complexity_confidence <= 1.0
        assert prediction.tier is Tier.CLASSIFIER


def test_empty_batch_gives_empty_list(engine: CpuEngine) -> None:
    assert engine.classify([]) == []


def test_fast_head_matches_the_trained_linear_head(engine: CpuEngine) -> None:
    feats = engine.encoder.features(TEXTS)
    want = engine.head.logits(feats.dense, feats)
    got = engine.fast.logits(TEXTS)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_fast_head_skips_bag_rows_training_never_used(static_model: Path, tmp_path: Path) -> None:
    path = _publish(tmp_path, "cpu-v1", static_model)
    artifact = load_artifact(tmp_path)
    w_bag = artifact.arrays["w_bag"].copy()
    w_bag[len(WORDS) :] = 0.0  # only unigram rows used: every hashed bucket is dead
    arrays = {**artifact.arrays, "w_bag": w_bag}
    np.savez(path / "head.npz", **arrays)
    engine = load_cpu_engine(tmp_path, static_model)
    assert engine.fast.table.shape[0] == 2 * len(WORDS) + 1  # token rows, used rows, zero row
    feats = engine.encoder.features(TEXTS)
    np.testing.assert_allclose(
        engine.fast.logits(TEXTS), engine.head.logits(feats.dense, feats), rtol=1e-4, atol=1e-4
    )


def test_pool_sums_and_maxes_per_text_with_empty_texts() -> None:
    rows = np.array([[1, -2], [3, 4], [-5, 6]], dtype=np.float32)
    counts = np.array([0, 2, 0, 1])
    np.testing.assert_array_equal(pool(rows, counts), [[0, 0], [4, 2], [0, 0], [-5, 6]])
    np.testing.assert_array_equal(pool(rows, counts, np.maximum), [[0, 0], [3, 4], [0, 0], [-5, 6]])


def test_principal_directions_are_orthonormal_and_deterministic() -> None:
    table = np.random.default_rng(3).normal(size=(50, 8)).astype(np.float32)
    v = principal_directions(table, 4)
    assert v.shape == (8, 4)
    np.testing.assert_allclose(v.T @ v, np.eye(4), atol=1e-5)
    np.testing.assert_array_equal(v, principal_directions(table.copy(), 4))


def test_segment_sum_handles_empty_groups() -> None:
    values = np.arange(6, dtype=np.float32).reshape(3, 2)
    owner = np.array([1, 1, 3])
    sums = segment_sum(values, owner, 5)
    np.testing.assert_array_equal(sums, [[0, 0], [2, 4], [0, 0], [4, 5], [0, 0]])


def _add_parts_one_by_one(out: np.ndarray, gathered: np.ndarray, parts: list) -> None:
    start = 0  # the part-by-part loop add_parts replaced: its float operations, in its order
    for _, owner, scale in parts:
        m = owner.shape[0]
        if m:
            per = np.bincount(owner, minlength=out.shape[0])
            present = per > 0
            starts = (np.cumsum(per) - per)[present]
            block = np.add.reduceat(gathered[start : start + m], starts, axis=0)
            out[present] += block * scale[present, None]
        start += m


@pytest.mark.parametrize("seed", range(40))
def test_adding_every_bag_part_at_once_is_bitwise_the_part_by_part_sum(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 6))
    parts = []
    for _ in range(int(rng.integers(1, 9))):
        m = int(rng.choice([0, 0, 1, 5, 40]))  # empty parts too, first, last or between
        owner = np.sort(rng.integers(0, n, m)).astype(np.int64)
        parts.append((owner, owner, rng.random(n, dtype=np.float32)))
    gathered = rng.standard_normal((sum(o.shape[0] for _, o, _ in parts), 10)).astype(np.float32)
    start = rng.standard_normal((n, 10)).astype(np.float32)
    expected, got = start.copy(), start.copy()
    _add_parts_one_by_one(expected, gathered, parts)
    add_parts(got, gathered, parts)
    np.testing.assert_array_equal(got, expected)


def test_char_ngrams_never_cross_texts() -> None:
    parts = char_ngrams(["ab", "", "abc"], offset=0)
    owners = np.concatenate([owner for _, owner, _ in parts])
    assert set(owners.tolist()) == {0, 2}
    bigrams_of = {int(o): int((parts[0][1] == o).sum()) for o in (0, 2)}
    assert bigrams_of == {0: 1, 2: 2}


def test_artifact_round_trip(tmp_path: Path, static_model: Path) -> None:
    path = _publish(tmp_path, "cpu-v1", static_model)
    artifact = load_artifact(tmp_path)
    assert artifact.path == path
    assert artifact.meta.version == "cpu-v1"
    assert (tmp_path / "CURRENT").read_text().strip() == "cpu-v1"
    assert set(artifact.arrays) == {"mean", "std", "w_dense", "w_bag", "bias"}


def test_watcher_picks_up_a_new_version_without_restart(tmp_path: Path, static_model: Path) -> None:
    _publish(tmp_path, "cpu-v1", static_model)
    now = [0.0]
    watcher: ArtifactWatcher[CpuEngine] = ArtifactWatcher(
        tmp_path, lambda p: load_cpu_engine(p, static_model), poll_s=1.0, clock=lambda: now[0]
    )
    now[0] = 5.0
    assert watcher.maybe_reload() is None  # nothing changed
    _publish(tmp_path, "cpu-v2", static_model, seed=2)
    assert watcher.maybe_reload() is None  # polled too soon
    now[0] = 10.0
    reloaded = watcher.maybe_reload()
    assert reloaded is not None
    assert reloaded.version == "cpu-v2"
    now[0] = 20.0
    assert watcher.maybe_reload() is None


def test_watcher_keeps_the_old_engine_when_the_new_artifact_is_corrupt(
    tmp_path: Path, static_model: Path
) -> None:
    _publish(tmp_path, "cpu-v1", static_model)
    watcher: ArtifactWatcher[CpuEngine] = ArtifactWatcher(
        tmp_path, lambda p: load_cpu_engine(p, static_model), poll_s=0.0
    )
    path = _publish(tmp_path, "cpu-v2", static_model)
    (path / "head.npz").write_bytes(b"not a zip")
    assert watcher.maybe_reload(force=True) is None


def test_missing_artifact_is_an_artifact_error(tmp_path: Path, static_model: Path) -> None:
    with pytest.raises(ArtifactError, match="run `router-worker train`"):
        load_cpu_engine(tmp_path / "nothing", static_model)


def test_corrupt_head_is_an_artifact_error(tmp_path: Path, static_model: Path) -> None:
    path = _publish(tmp_path, "cpu-v1", static_model)
    (path / "head.npz").write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match="corrupt"):
        load_cpu_engine(tmp_path, static_model)


def test_corrupt_meta_is_an_artifact_error(tmp_path: Path, static_model: Path) -> None:
    path = _publish(tmp_path, "cpu-v1", static_model)
    (path / "meta.json").write_text("{}")
    with pytest.raises(ArtifactError, match="corrupt"):
        load_artifact(tmp_path)


def test_current_naming_a_missing_version_is_an_artifact_error(tmp_path: Path) -> None:
    (tmp_path / "CURRENT").write_text("cpu-gone\n")
    with pytest.raises(ArtifactError, match="cpu-gone"):
        load_artifact(tmp_path)


def test_artifact_from_another_static_model_is_rejected(
    tmp_path: Path, static_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    _publish(tmp_path, "cpu-v1", static_model)
    other = tmp_path_factory.mktemp("other")
    for name in ("tokenizer.json", "model.safetensors"):
        (other / name).write_bytes((static_model / name).read_bytes())
    save_file(
        {"embeddings": np.ones((len(WORDS), DIM), dtype=np.float16)},
        str(other / "model.safetensors"),
    )
    with pytest.raises(ArtifactError, match="another static model"):
        load_cpu_engine(tmp_path, other)


def test_artifact_from_another_lexicon_is_rejected(tmp_path: Path, static_model: Path) -> None:
    _publish(tmp_path, "cpu-v1", static_model, lexicon_hash="0" * 64)
    with pytest.raises(ArtifactError, match="another intent lexicon"):
        load_cpu_engine(tmp_path, static_model)


def test_artifact_from_this_lexicon_loads(tmp_path: Path, static_model: Path) -> None:
    from router_worker.classify.lexicon import LEXICON

    _publish(tmp_path, "cpu-v1", static_model, lexicon_hash=LEXICON.digest)
    assert load_cpu_engine(tmp_path, static_model).version == "cpu-v1"


def test_bench_classifier_reports_every_batch_size_and_the_loop_speedup(engine: CpuEngine) -> None:
    from router_worker.classify.bench import BATCH_SIZES, bench

    texts = [f"write a python function number {i} that sorts a list" for i in range(200)]
    result = bench(engine, texts, threads=1, raw=False)
    assert set(result["batch"]) == {str(size) for size in BATCH_SIZES}
    assert all(row["throughput_per_s"] > 0 for row in result["batch"].values())
    assert result["per_item_loop"]["n"] == len(texts)
    assert result["speedup_vs_loop_at_128"] > 0
    assert result["raw_encoder_forward"] is None
    assert result["raw_encoder_forward_reason"] == "skipped (--no-raw)"
    assert result["engine"] == "cpu"
    assert result["classifier_version"] == engine.version


def test_words_with_digits_are_cached_from_their_second_sighting_only(engine: CpuEngine) -> None:
    encoder = engine.encoder
    once = engine.classify(["write a poem id-7f3a9c quixotically"])
    assert "id-7f3a9c" not in encoder._words
    assert "quixotically" in encoder._words  # vocabulary recurs: cached at once
    again = engine.classify(["write a poem id-7f3a9c quixotically"])
    assert "id-7f3a9c" in encoder._words
    assert once[0].scores == pytest.approx(again[0].scores)


def test_the_training_vocabulary_is_learned_when_the_artifact_loads(
    tmp_path: Path, static_model: Path
) -> None:
    vocabulary = training_vocabulary(["Write a poem, please", "fix the bug", "write id-7"])
    assert vocabulary[0] == "write"  # most frequent first
    assert "id-7" not in vocabulary  # digit words wait for their second sighting, as ever
    _publish(tmp_path, "cpu-v1", static_model, vocabulary=vocabulary)
    warm = load_cpu_engine(tmp_path, static_model)
    assert set(vocabulary) <= set(warm.encoder._words)
    cold_root = tmp_path / "cold"
    _publish(cold_root, "cpu-v1", static_model)  # an artifact from before vocabularies
    cold = load_cpu_engine(cold_root, static_model)
    assert not cold.encoder._words
    assert warm.classify(TEXTS) == cold.classify(TEXTS)  # only sooner, never different


def test_prelearning_never_overfills_the_word_cache(
    engine: CpuEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    import router_worker.classify.cpu as cpu

    monkeypatch.setattr(cpu, "WORD_CACHE", 3)
    assert engine.encoder.prelearn(["write", "a", "poem", "fix", "bug"]) == 3
    assert list(engine.encoder._words) == ["write", "a", "poem"]
    assert engine.encoder.prelearn(["write", "sum"]) == 0


def test_a_vocabulary_survives_its_file_format() -> None:
    words = ["write", "éclair", "перевод", "中文", "c++", "\udc80x", "a\x00b"]
    assert vocabulary_from_arrays(vocabulary_arrays(words)) == words
    assert vocabulary_from_arrays(vocabulary_arrays([])) == []


def test_a_corrupt_vocabulary_is_an_artifact_error(tmp_path: Path, static_model: Path) -> None:
    _publish(tmp_path, "cpu-v1", static_model)
    np.savez(tmp_path / "cpu-v1" / VOCABULARY_FILE, other=np.zeros(3))
    with pytest.raises(ArtifactError, match="no vocabulary"):
        load_cpu_engine(tmp_path, static_model)


def test_a_reload_on_the_same_static_model_keeps_the_words_traffic_taught(
    tmp_path: Path, static_model: Path
) -> None:
    _publish(tmp_path, "cpu-v1", static_model, vocabulary=["write", "poem"])
    first = load_cpu_engine(tmp_path, static_model)
    first.classify(["quixotically fix the server"])
    assert "quixotically" in first.encoder._words
    _publish(tmp_path, "cpu-v2", static_model, seed=2, vocabulary=["write", "poem"])
    reloaded = load_cpu_engine(tmp_path, static_model, previous=first)
    assert "quixotically" in reloaded.encoder._words
    assert reloaded.classify(TEXTS) == load_cpu_engine(tmp_path, static_model).classify(TEXTS)
    first.static_model_hash = "another static model"
    assert not load_cpu_engine(tmp_path, static_model, previous=first).encoder._words.get(
        "quixotically")


def test_the_watcher_hands_each_reload_the_engine_it_replaces(
    tmp_path: Path, static_model: Path
) -> None:
    from router_worker.classify.factory import make_watcher
    from router_worker.settings import Settings

    settings = Settings(engine="cpu", artifact=tmp_path, static_model=static_model,
                        artifact_poll_s=0.01)
    _publish(tmp_path, "cpu-v1", static_model)
    engine = load_cpu_engine(tmp_path, static_model)
    engine.classify(["quixotically"])
    watcher = make_watcher(settings, engine, follow_redis=False)
    for version in ("cpu-v2", "cpu-v3"):
        _publish(tmp_path, version, static_model)
        reloaded = watcher.maybe_reload(force=True)
        assert isinstance(reloaded, CpuEngine)
        assert reloaded.version == version
        assert "quixotically" in reloaded.encoder._words

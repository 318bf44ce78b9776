"""Quality gates of the trained CPU engine on the test split (built by `make model train`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from router_worker.classify.data import Record, load_records, split_records
from router_worker.classify.engine import Engine
from router_worker.classify.evaluate import prediction_metrics
from router_worker.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = Settings()
STATIC_MODEL = ROOT / SETTINGS.static_model
ARTIFACT = ROOT / SETTINGS.artifact

pytestmark = pytest.mark.skipif(
    not (STATIC_MODEL / "model.safetensors").is_file() or not (ARTIFACT / "CURRENT").is_file(),
    reason="static model/artifact not built: run `make model train`",
)


@pytest.fixture(scope="module")
def test_split() -> list[Record]:
    return split_records(load_records([ROOT / "data" / "prompts"]))["test"]


@pytest.fixture(scope="module")
def cpu_engine() -> Engine:
    from router_worker.classify.cpu import load_cpu_engine

    return load_cpu_engine(ARTIFACT, STATIC_MODEL, threads=2)


@pytest.fixture(scope="module")
def cpu_metrics(cpu_engine: Engine, test_split: list[Record]) -> dict[str, object]:
    return prediction_metrics(test_split, cpu_engine.classify([r.prompt for r in test_split]))


def test_cpu_engine_macro_f1_on_test_split_reaches_the_target(
    cpu_metrics: dict[str, float],
) -> None:
    assert cpu_metrics["macro_f1"] >= 0.90


def test_cpu_engine_generalises_to_the_holdout_written_apart(cpu_engine: Engine) -> None:
    # Never used for training or tuning: prompts we did not write for the training corpus.
    holdout = load_records([ROOT / "data" / "holdout"])
    metrics = prediction_metrics(holdout, cpu_engine.classify([r.prompt for r in holdout]))
    assert metrics["macro_f1"] >= 0.90


def test_batched_predictions_equal_per_item_predictions(
    cpu_engine: Engine, test_split: list[Record]
) -> None:
    texts = [r.prompt for r in test_split[:50]]
    batch = cpu_engine.classify(texts)
    for text, got in zip(texts, batch, strict=True):
        want = cpu_engine.classify([text])[0]
        assert (got.category, got.complexity) == (want.category, want.complexity)
        assert got.confidence == pytest.approx(want.confidence, rel=1e-5, abs=1e-6)
        for label, score in want.scores.items():
            assert got.scores[label] == pytest.approx(score, rel=1e-4, abs=1e-6)


def test_cpu_engine_complexity_accuracy_on_test_split(cpu_metrics: dict[str, float]) -> None:
    assert cpu_metrics["complexity_accuracy"] >= 0.85


def test_cpu_engine_beats_keyword_tier(
    cpu_metrics: dict[str, float], test_split: list[Record]
) -> None:
    keyword = pytest.importorskip("router_worker.classify.keyword")
    engine = keyword.load_keyword_engine(Settings(config=SETTINGS.config))
    keyword_metrics = prediction_metrics(
        test_split, engine.classify([r.prompt for r in test_split])
    )
    assert cpu_metrics["macro_f1"] - keyword_metrics["macro_f1"] >= 0.25


def test_artifact_records_its_provenance(cpu_engine: Engine) -> None:
    from router_worker.classify.artifacts import load_artifact

    meta = load_artifact(ARTIFACT).meta
    assert meta.version == cpu_engine.version
    assert meta.labels.categories
    assert len(meta.training_data_hash) == 64
    assert {"test", "validation"} <= set(meta.metrics)

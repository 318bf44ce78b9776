"""vLLM engine on a CUDA host: same encoder and head as the CPU engine's second stage."""

from __future__ import annotations

from pathlib import Path

import pytest

from router_worker.events import CATEGORIES, Tier

ROOT = Path(__file__).resolve().parents[2]
ARTIFACT = ROOT / "artifacts" / "classifier"

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def vllm_engine() -> object:
    pytest.importorskip("vllm")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if not (ARTIFACT / "CURRENT").is_file():
        pytest.skip("no trained artifact: run `make train`")
    from router_worker.classify.vllm import load_vllm_engine

    return load_vllm_engine(ARTIFACT)


def test_vllm_engine_batch_contract(vllm_engine: object) -> None:
    texts = ["write a haiku about rain", "", "kubectl rollout restart failing", "integrate x^2"]
    predictions = vllm_engine.classify(texts)  # type: ignore[attr-defined]
    assert len(predictions) == len(texts)
    for p in predictions:
        assert p.category in CATEGORIES
        assert p.tier is Tier.ENCODER
        assert sum(p.scores.values()) == pytest.approx(1.0, abs=1e-6)


def test_raw_forward_runs_on_cuda() -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from router_worker.classify.encoder import raw_forward_throughput

    result = raw_forward_throughput(["hello world"] * 64, device="cuda", batch_size=32)
    assert result["throughput_per_s"] > 0

"""GPU engine: the MiniLM encoder on vLLM's in-process offline engine + the encoder head."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from tokenizers import Tokenizer

from router_worker.classify.artifacts import load_artifact, read_extra
from router_worker.classify.cpu import ENCODER_HEAD_FILE, F32
from router_worker.classify.encoder import (
    ENCODER_MAX_TOKENS,
    EncoderEngine,
    encoder_model_dir,
    offline_hub,
)
from router_worker.errors import ArtifactError, EngineUnavailable

log = structlog.get_logger(__name__)

ENGINE_NAME = "vllm"
GPU_HINT = "pip install router-worker[gpu]"


def _import_vllm() -> Any:
    try:
        import vllm  # optional gpu extra
    except ImportError as exc:
        raise EngineUnavailable(f"the vllm engine needs vLLM: {GPU_HINT}") from exc
    return vllm


class VllmEmbedder:
    """Normalised MiniLM embeddings from `vllm.LLM(..., runner="pooling", convert="embed")`.

    Texts are tokenised here (batched, truncated to the encoder's 256-token window) and sent
    as token ids, so long prompts never trip vLLM's max_model_len check.
    """

    def __init__(self, model_dir: Path, *, gpu_memory_utilization: float = 0.3) -> None:
        offline_hub()
        # Measured on H100s (benchmarks/gpu-vllm-h100.json): with the engine core in this
        # process, batch 128 embeds 3,800-5,700 texts/s against 2,300/s through vLLM's default
        # separate engine process (an IPC round trip per batch).
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        # Pooling never samples; without this, engine start imports flashinfer's sampler.
        os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
        vllm = _import_vllm()
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(ENCODER_MAX_TOKENS)
        try:
            self.llm = vllm.LLM(
                model=str(model_dir),
                runner="pooling",
                convert="embed",
                enforce_eager=True,
                gpu_memory_utilization=gpu_memory_utilization,
                max_model_len=ENCODER_MAX_TOKENS,
            )
        except Exception as exc:  # vLLM raises many types (CUDA, config, OOM)
            raise EngineUnavailable(f"vLLM could not start the encoder: {exc}") from exc

    def __call__(self, texts: Sequence[str]) -> F32:
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=True)
        prompts = [{"prompt_token_ids": e.ids} for e in encodings]
        outputs = self.llm.embed(prompts, use_tqdm=False)
        vectors = np.asarray([o.outputs.embedding for o in outputs], dtype=np.float32)
        # vLLM's pooler for this model normalises already; renormalising is cheap insurance.
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return vectors


def load_vllm_engine(artifact_path: Path, model_dir: Path | None = None) -> EncoderEngine:
    """The vllm engine: same encoder and head as the CPU engine's second stage."""
    artifact = load_artifact(artifact_path)
    arrays = read_extra(artifact, ENCODER_HEAD_FILE)
    if arrays is None:
        raise ArtifactError(
            f"artifact {artifact.meta.version} has no encoder head; train with the ml extra"
        )
    embed = VllmEmbedder(model_dir or encoder_model_dir())
    engine = EncoderEngine.from_artifact(artifact, arrays, embed=embed, name=ENGINE_NAME)
    log.info("engine_loaded", engine=ENGINE_NAME, version=engine.version)
    return engine

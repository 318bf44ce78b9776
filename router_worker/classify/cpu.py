"""CPU engine: distilled static MiniLM embeddings + token n-grams + linear heads, numpy only."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from router_worker.classify.artifacts import Artifact, load_artifact, read_extra
from router_worker.classify.engine import Prediction
from router_worker.errors import ArtifactError
from router_worker.events import Tier

log = structlog.get_logger(__name__)

ENGINE_NAME = "cpu"
ENCODER_ID = "sentence-transformers/all-MiniLM-L6-v2"
ENCODER_HEAD_FILE = "encoder_head.npz"
# Bigram hashing space; collisions at this size are rare for a corpus of thousands of prompts.
BIGRAM_BUCKETS = 1 << 18
# Prompts are capped (64 KiB by default) but a few thousand tokens say all a label needs.
MAX_TOKENS = 512
_MAX_CHARS = MAX_TOKENS * 8
CHUNK = 128
_BIGRAM_MULT = np.uint64(0x9E3779B97F4A7C15)
# Character n-grams carry what word pieces miss: typos, code symbols, CJK and Cyrillic text.
CHAR_BUCKETS = 1 << 18
CHAR_NGRAMS = (2, 3, 4)
# Intent is stated early; a bounded prefix keeps the n-gram cost flat for long prompts.
CHAR_LIMIT = 1024
_CHAR_PRIME = np.uint64(1_000_003)

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]


def configure_threads(threads: int) -> None:
    """Bound the engine's native thread pools (tokenizers' rayon, BLAS) to `threads`.

    Rayon reads its variable when its pool starts, so this runs before the first encode;
    BLAS pools are already up once numpy is imported, so threadpoolctl limits them if present.
    """
    os.environ["RAYON_NUM_THREADS"] = str(threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads > 1 else "false"
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(threads))
    try:
        from threadpoolctl import threadpool_limits  # optional, ml extra only
    except ImportError:
        return
    threadpool_limits(limits=threads)


def segment_sum(values: F32, owner: I64, n: int) -> F32:
    """Row sums of `values` grouped by `owner` (sorted, in 0..n-1); empty groups are zero."""
    counts = np.bincount(owner, minlength=n)
    starts = np.cumsum(counts) - counts
    # A trailing zero row keeps every start index valid, including those of empty groups at the end.
    padded = np.vstack([values, np.zeros((1, values.shape[1]), dtype=values.dtype)])
    sums = np.add.reduceat(padded, starts, axis=0)
    sums[counts == 0] = 0.0
    return sums


def _inv_sqrt(counts: F32) -> F32:
    return (1.0 / np.sqrt(np.maximum(counts, 1.0))).astype(np.float32)


def char_ngrams(texts: Sequence[str], offset: int) -> list[tuple[I64, I64, F32]]:
    """Hashed lower-cased character n-grams of every text, as bag parts, without a text loop.

    All texts are joined with NUL and hashed as one code-point array; windows that cross a
    NUL are dropped, and the count of NULs before a window names its text.
    """
    n = len(texts)
    joined = "\0".join(t[:CHAR_LIMIT] for t in texts)
    if joined.count("\0") != n - 1:  # a text held NULs itself: blank them so owners stay right
        joined = "\0".join(t[:CHAR_LIMIT].replace("\0", " ") for t in texts)
    codes = np.frombuffer(joined.lower().encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    sep = codes == 0
    before = np.cumsum(sep)
    parts: list[tuple[I64, I64]] = []
    for size in CHAR_NGRAMS:
        m = codes.shape[0] - size + 1
        if m <= 0:
            continue
        h = codes[:m].copy()
        for k in range(1, size):
            h = h * _CHAR_PRIME + codes[k : k + m]
        valid = (before[size - 1 : size - 1 + m] == before[:m]) & ~sep[:m]
        buckets = ((h[valid] * _BIGRAM_MULT) >> np.uint64(46)).astype(np.int64) % CHAR_BUCKETS
        parts.append((buckets + offset, before[:m][valid].astype(np.int64)))
    total = np.zeros(n, dtype=np.float32)
    for _, owner in parts:
        total += np.bincount(owner, minlength=n).astype(np.float32)
    scale = _inv_sqrt(total)
    return [(idx, owner, scale) for idx, owner in parts]


def hash_dir(path: Path) -> str:
    """sha256 of a static model's weights and tokenizer: ties an artifact to its encoder."""
    digest = hashlib.sha256()
    for name in ("model.safetensors", "tokenizer.json"):
        try:
            digest.update((path / name).read_bytes())
        except OSError as exc:
            raise ArtifactError(f"static model at {path} lacks {name}: {exc}") from exc
    return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class Features:
    """A batch's features: a dense block plus sparse bag parts (column, owning text, scale)."""

    dense: F32
    bag: tuple[tuple[I64, I64, F32], ...]
    bag_width: int

    @property
    def n(self) -> int:
        """Number of texts."""
        return int(self.dense.shape[0])


class StaticEncoder:
    """Tokenizer + static embedding table distilled from MiniLM (built by `build-encoder`)."""

    def __init__(self, model_dir: Path) -> None:
        try:
            self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
            table = load_file(str(model_dir / "model.safetensors"))["embeddings"]
        except Exception as exc:  # tokenizers raises bare Exception on a bad file
            raise ArtifactError(
                f"cannot load static model from {model_dir}: {exc}; "
                "run `router-worker build-encoder` (make model)"
            ) from exc
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(MAX_TOKENS)
        self.embeddings: F32 = np.ascontiguousarray(table, dtype=np.float32)
        self.vocab_size = int(self.embeddings.shape[0])
        self.dim = int(self.embeddings.shape[1])
        unk = self.tokenizer.token_to_id("[UNK]")
        self.unk_id = -1 if unk is None else int(unk)
        self.model_dir = model_dir

    def bag_size(self) -> int:
        """Bag columns: one per vocabulary token, then token-bigram and char-n-gram buckets."""
        return self.vocab_size + BIGRAM_BUCKETS + CHAR_BUCKETS

    def token_ids(self, texts: Sequence[str]) -> tuple[I64, I64]:
        """Flat token ids and the text each belongs to (unknown tokens dropped), in one batch."""
        clipped = [t[:_MAX_CHARS] for t in texts]
        encodings = self.tokenizer.encode_batch(clipped, add_special_tokens=False)
        ids_lists = [e.ids for e in encodings]
        lengths = np.fromiter(map(len, ids_lists), dtype=np.int64, count=len(ids_lists))
        total = int(lengths.sum())
        flat = np.fromiter(chain.from_iterable(ids_lists), dtype=np.int64, count=total)
        owner = np.repeat(np.arange(len(texts), dtype=np.int64), lengths)
        keep = flat != self.unk_id
        return flat[keep], owner[keep]

    def features(self, texts: Sequence[str]) -> Features:
        """Mean-pooled normalised embeddings, length stats and the unigram/bigram bag."""
        n = len(texts)
        ids, owner = self.token_ids(texts)
        counts = np.bincount(owner, minlength=n).astype(np.float32)
        pooled = segment_sum(self.embeddings[ids], owner, n)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        pooled /= np.maximum(norms, 1e-12)
        chars = np.fromiter(map(len, texts), dtype=np.float32, count=n)
        lines = np.fromiter((t.count("\n") for t in texts), dtype=np.float32, count=n)
        stats = np.log1p(np.stack([counts, chars, lines], axis=1))
        same = owner[1:] == owner[:-1]
        pair = ids[:-1][same].astype(np.uint64) * np.uint64(self.vocab_size) + ids[1:][same].astype(
            np.uint64
        )
        buckets = ((pair * _BIGRAM_MULT) >> np.uint64(46)).astype(np.int64) % BIGRAM_BUCKETS
        bigram_owner = owner[:-1][same]
        n_feats = counts + np.bincount(bigram_owner, minlength=n).astype(np.float32)
        scale = _inv_sqrt(n_feats)
        dense = np.hstack([pooled, stats]).astype(np.float32)
        char_parts = char_ngrams(texts, self.vocab_size + BIGRAM_BUCKETS)
        bag = ((ids, owner, scale), (buckets + self.vocab_size, bigram_owner, scale), *char_parts)
        return Features(dense=dense, bag=bag, bag_width=self.bag_size())


@dataclass(frozen=True, slots=True)
class LinearHead:
    """Both heads fused: standardise dense features, then one gather-sum over the bag."""

    mean: F32
    std: F32
    w_dense: F32
    w_bag: F32 | None
    bias: F32
    n_categories: int

    @classmethod
    def from_arrays(cls, arrays: dict[str, Any], prefix: str, n_categories: int) -> LinearHead:
        """Rebuild from `<prefix>mean|std|w_dense|w_bag|bias` arrays of an artifact."""
        try:
            w_bag = arrays.get(f"{prefix}w_bag")
            return cls(
                mean=arrays[f"{prefix}mean"].astype(np.float32),
                std=arrays[f"{prefix}std"].astype(np.float32),
                w_dense=arrays[f"{prefix}w_dense"].astype(np.float32),
                w_bag=None if w_bag is None else w_bag.astype(np.float32),
                bias=arrays[f"{prefix}bias"].astype(np.float32),
                n_categories=n_categories,
            )
        except KeyError as exc:
            raise ArtifactError(f"artifact head lacks array {exc}") from exc

    def to_arrays(self, prefix: str) -> dict[str, npt.NDArray[Any]]:
        """Arrays for head.npz."""
        arrays: dict[str, npt.NDArray[Any]] = {
            f"{prefix}mean": self.mean,
            f"{prefix}std": self.std,
            f"{prefix}w_dense": self.w_dense,
            f"{prefix}bias": self.bias,
        }
        if self.w_bag is not None:
            arrays[f"{prefix}w_bag"] = self.w_bag
        return arrays

    def logits(self, dense: F32, feats: Features | None = None) -> F32:
        """Category logits then complexity logits, side by side."""
        out = ((dense - self.mean) / self.std) @ self.w_dense + self.bias
        if feats is not None and self.w_bag is not None:
            for idx, owner, scale in feats.bag:
                out += segment_sum(self.w_bag[idx], owner, feats.n) * scale[:, None]
        return out.astype(np.float32, copy=False)

    def probabilities(self, dense: F32, feats: Features | None = None) -> tuple[F64, F64]:
        """Softmax over categories and over complexities."""
        z = self.logits(dense, feats).astype(np.float64)
        return softmax(z[:, : self.n_categories]), softmax(z[:, self.n_categories :])


def softmax(z: F64) -> F64:
    """Row-wise softmax, stable for large logits."""
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)  # type: ignore[no-any-return]


def to_predictions(
    p_cat: F64, p_cx: F64, categories: Sequence[str], complexities: Sequence[str], tier: Tier
) -> list[Prediction]:
    """One Prediction per row; argmax and max are vectorised, only the objects are per item."""
    cat_idx = p_cat.argmax(axis=1).tolist()
    cx_idx = p_cx.argmax(axis=1).tolist()
    conf = p_cat.max(axis=1).tolist()
    cx_conf = p_cx.max(axis=1).tolist()
    return [
        Prediction(
            category=categories[c],
            complexity=complexities[k],
            confidence=f,
            scores=dict(zip(categories, row, strict=True)),
            complexity_confidence=g,
            tier=tier,
        )
        for c, k, f, g, row in zip(cat_idx, cx_idx, conf, cx_conf, p_cat.tolist(), strict=True)
    ]


class CpuEngine:
    """The default engine: fast static stage, optional full-encoder second stage."""

    name = ENGINE_NAME

    def __init__(
        self,
        artifact: Artifact,
        encoder: StaticEncoder,
        *,
        second_stage: Any | None = None,
        threshold: float = 0.5,
    ) -> None:
        meta = artifact.meta
        self._version = meta.version
        self.categories = tuple(meta.labels.categories)
        self.complexities = tuple(meta.labels.complexities)
        self.encoder = encoder
        self.head = LinearHead.from_arrays(artifact.arrays, "", len(self.categories))
        self._check_shapes(encoder)
        self.second_stage = second_stage
        self.threshold = threshold

    def _check_shapes(self, encoder: StaticEncoder) -> None:
        width = len(self.categories) + len(self.complexities)
        if self.head.w_dense.shape != (encoder.dim + 3, width):
            raise ArtifactError(
                f"head expects {self.head.w_dense.shape[0]} dense features, static model gives "
                f"{encoder.dim + 3}; retrain with this static model"
            )
        if self.head.w_bag is not None and self.head.w_bag.shape != (encoder.bag_size(), width):
            raise ArtifactError("head bag size does not match the static model's vocabulary")

    @property
    def version(self) -> str:
        """The artifact version stamped on decisions."""
        return self._version

    def probabilities(self, texts: Sequence[str]) -> tuple[F64, F64]:
        """Category and complexity probabilities of the fast stage.

        Large batches run in chunks: the gathered token and n-gram rows of a few hundred
        prompts stay in cache, where one 512-prompt gather measurably does not.
        """
        if len(texts) > CHUNK:
            parts = [self.probabilities(texts[i : i + CHUNK]) for i in range(0, len(texts), CHUNK)]
            return np.vstack([p[0] for p in parts]), np.vstack([p[1] for p in parts])
        feats = self.encoder.features(texts)
        return self.head.probabilities(feats.dense, feats)

    def classify(self, texts: list[str]) -> list[Prediction]:
        """Classify a batch; unsure rows go to the second stage when it is on."""
        if not texts:
            return []
        p_cat, p_cx = self.probabilities(texts)
        predictions = to_predictions(
            p_cat, p_cx, self.categories, self.complexities, Tier.CLASSIFIER
        )
        if self.second_stage is None:
            return predictions
        unsure = np.flatnonzero(p_cat.max(axis=1) < self.threshold).tolist()
        if unsure:
            redo = self.second_stage.classify([texts[i] for i in unsure])
            for i, prediction in zip(unsure, redo, strict=True):
                predictions[i] = prediction
        return predictions


def load_cpu_engine(
    artifact_path: Path,
    static_model: Path,
    *,
    threads: int = 1,
    encoder_stage: bool = False,
    verify_hash: bool = True,
) -> CpuEngine:
    """Load the CPU engine; ArtifactError when the artifact or static model is unusable."""
    configure_threads(threads)
    artifact = load_artifact(artifact_path)
    if artifact.meta.engine != ENGINE_NAME:
        raise ArtifactError(
            f"artifact {artifact.meta.version} is for engine {artifact.meta.engine}"
        )
    if verify_hash and hash_dir(static_model) != artifact.meta.static_model_hash:
        raise ArtifactError(
            f"artifact {artifact.meta.version} was trained on another static model than "
            f"{static_model}; rebuild the model or retrain"
        )
    second = _second_stage(artifact, threads) if encoder_stage else None
    threshold = float(artifact.meta.params.get("encoder_threshold", 0.5))
    engine = CpuEngine(
        artifact, StaticEncoder(static_model), second_stage=second, threshold=threshold
    )
    log.info(
        "engine_loaded", engine=ENGINE_NAME, version=engine.version, second_stage=second is not None
    )
    return engine


def _second_stage(artifact: Artifact, threads: int) -> Any | None:
    arrays = read_extra(artifact, ENCODER_HEAD_FILE)
    if arrays is None:
        log.warning("encoder_stage_unavailable", reason="artifact has no encoder head")
        return None
    from router_worker.classify.encoder import EncoderEngine  # needs the ml extra
    from router_worker.errors import EngineUnavailable

    try:
        return EncoderEngine.from_artifact(artifact, arrays, threads=threads)
    except EngineUnavailable as exc:
        log.warning("encoder_stage_unavailable", reason=str(exc))
        return None

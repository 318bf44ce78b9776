"""Train the CPU engine's heads (and the encoder head), evaluate them and write an artifact."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog

from router_worker.classify.artifacts import Artifact, ArtifactMeta, Labels, write_artifact
from router_worker.classify.cpu import (
    ENCODER_HEAD_FILE,
    ENCODER_ID,
    ENGINE_NAME,
    F32,
    VOCABULARY_FILE,
    CpuEngine,
    Features,
    LinearHead,
    StaticEncoder,
    hash_dir,
    training_vocabulary,
    vocabulary_arrays,
)
from router_worker.classify.data import (
    Record,
    Split,
    data_hash,
    load_records,
    split_records,
)
from router_worker.classify.evaluate import prediction_metrics
from router_worker.errors import ConfigError, EngineUnavailable
from router_worker.events import CATEGORIES, COMPLEXITIES

log = structlog.get_logger(__name__)

# (C, dense-block scale) per head, chosen on validation only (never test or holdout) with
# mean pooled embeddings + max over their 64-d projection: a fixed choice keeps a training run
# to four fits. Category grid on the 5,242-prompt corpus, validation macro-F1 of train-only
# fits: C in {16, 32, 64} x scale in {0.02, 0.03, 0.05, 0.1}; C=32/0.05 best (0.873; C=16 0.869,
# C=64 0.873). Hashed whole-word unigrams added 0.005 and 1-5 char n-grams 0.001: not kept.
# With word prefixes and the multilingual lexicon (cpu.py, lexicon.py) C=16/32/64 gave
# 0.920/0.919/0.915 at scale 0.05: C=32 kept.
HEAD_PARAMS = {"y_cat": (32.0, 0.05), "y_cx": (16.0, 0.03)}
ENCODER_THRESHOLD = 0.5


def progress(message: str) -> None:
    """Progress for a person at a terminal; stderr so `--json` output stays clean."""
    print(f"[train] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True, slots=True)
class Fitted:
    """One head's weights (dense block already divided by its scale) and its validation score."""

    w_dense: F32
    w_bag: F32 | None
    bias: F32
    score: float
    params: dict[str, float]


def _design(dense: F32, feats: Features | None, mean: F32, std: F32, scale: float) -> Any:
    """sklearn design matrix: standardised dense block (times scale) next to the sparse bag."""
    from scipy import sparse  # training-only dependency (ml extra)

    block = (dense - mean) / std * scale
    if feats is None:
        return block
    n, width = feats.n, feats.bag_width
    rows = np.concatenate([owner for _, owner, _ in feats.bag])
    cols = np.concatenate([idx for idx, _, _ in feats.bag])
    values = np.concatenate([scale[owner] for _, owner, scale in feats.bag])
    bag = sparse.csr_matrix((values, (rows, cols)), shape=(n, width))
    return sparse.hstack([sparse.csr_matrix(block), bag], format="csr")


def _fit_logreg(x: Any, y: npt.NDArray[np.int64], c: float, n_classes: int) -> tuple[F32, F32]:
    """Multinomial logistic regression; returns (weights features x classes, bias).

    Only columns some row uses are fitted: an unused column's weight is exactly zero under L2,
    and dropping the hundreds of thousands of empty hash buckets makes each fit several times
    faster.
    """
    try:
        from sklearn.linear_model import LogisticRegression  # ml extra
    except ImportError as exc:
        raise EngineUnavailable(
            "training needs scikit-learn: pip install router-worker[ml]"
        ) from exc
    used = np.unique(x.indices) if hasattr(x, "indices") else np.arange(x.shape[1])
    model = LogisticRegression(C=c, max_iter=1000, tol=1e-4)
    model.fit(x[:, used], y)
    coef = np.asarray(model.coef_, dtype=np.float32)
    bias = np.asarray(model.intercept_, dtype=np.float32)
    if n_classes == 2 and coef.shape[0] == 1:
        # Binary sklearn models keep one logit z; softmax([0, z]) is exactly sigmoid(z).
        coef = np.vstack([np.zeros_like(coef), coef])
        bias = np.concatenate([np.zeros(1, dtype=np.float32), bias])
    weights = np.zeros((x.shape[1], coef.shape[0]), dtype=np.float32)
    weights[used] = coef.T
    return weights, bias


def _score(p: npt.NDArray[Any], y: npt.NDArray[np.int64], n_classes: int, macro: bool) -> float:
    predicted = p.argmax(axis=1)
    if not macro:
        return float((predicted == y).mean())
    f1s = []
    for k in range(n_classes):
        tp = float(((predicted == k) & (y == k)).sum())
        fp = float(((predicted == k) & (y != k)).sum())
        fn = float(((predicted != k) & (y == k)).sum())
        if tp + fn > 0:
            f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return float(np.mean(f1s))


@dataclass(frozen=True, slots=True)
class SplitData:
    """One split's features and label indices."""

    dense: F32
    feats: Features | None
    y_cat: npt.NDArray[np.int64]
    y_cx: npt.NDArray[np.int64]


def _fit_head(
    train: SplitData,
    val: SplitData,
    refit: SplitData,
    mean: F32,
    std: F32,
    target: str,
    n_classes: int,
    dense_dim: int,
) -> Fitted:
    """Score the fixed C and dense scale on validation, then refit on train+validation."""
    # A dense-only head (the encoder stage) has no bag to balance against: plain C=1.
    c, scale = HEAD_PARAMS[target] if train.feats is not None else (1.0, 1.0)
    w, b = _fit_logreg(
        _design(train.dense, train.feats, mean, std, scale), getattr(train, target), c, n_classes
    )
    p = _design(val.dense, val.feats, mean, std, scale) @ w + b
    score = _score(np.asarray(p), getattr(val, target), n_classes, macro=target == "y_cat")
    progress(f"{target}: C={c} dense_scale={scale} validation={score:.4f}")
    w, b = _fit_logreg(
        _design(refit.dense, refit.feats, mean, std, scale), getattr(refit, target), c, n_classes
    )
    w_dense = w[:dense_dim] * scale
    w_bag = w[dense_dim:] if w.shape[0] > dense_dim else None
    return Fitted(w_dense, w_bag, b, score, {"C": c, "dense_scale": scale})


def _labels(records: Sequence[Record]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    cat = {c: i for i, c in enumerate(CATEGORIES)}
    cx = {c: i for i, c in enumerate(COMPLEXITIES)}
    return (
        np.array([cat[r.category] for r in records], dtype=np.int64),
        np.array([cx[r.complexity] for r in records], dtype=np.int64),
    )


def _static_split(encoder: StaticEncoder, records: Sequence[Record]) -> SplitData:
    feats = encoder.features([r.prompt for r in records])
    y_cat, y_cx = _labels(records)
    return SplitData(feats.dense, feats, y_cat, y_cx)


def _concat(a: Sequence[Record], b: Sequence[Record]) -> list[Record]:
    return [*a, *b]


def fit_heads(
    train: SplitData, val: SplitData, refit: SplitData, dense_dim: int
) -> tuple[LinearHead, dict[str, Any]]:
    """Fit category and complexity heads and fuse them into one LinearHead."""
    mean = refit.dense.mean(axis=0).astype(np.float32)
    std = (refit.dense.std(axis=0) + 1e-6).astype(np.float32)
    cat = _fit_head(train, val, refit, mean, std, "y_cat", len(CATEGORIES), dense_dim)
    cx = _fit_head(train, val, refit, mean, std, "y_cx", len(COMPLEXITIES), dense_dim)
    w_bag = None
    if cat.w_bag is not None and cx.w_bag is not None:
        w_bag = np.hstack([cat.w_bag, cx.w_bag]).astype(np.float32)
    head = LinearHead(
        mean=mean,
        std=std,
        w_dense=np.hstack([cat.w_dense, cx.w_dense]).astype(np.float32),
        w_bag=w_bag,
        bias=np.concatenate([cat.bias, cx.bias]).astype(np.float32),
        n_categories=len(CATEGORIES),
    )
    params = {
        "category": cat.params,
        "complexity": cx.params,
        "validation_selection": {"macro_f1": cat.score, "complexity_accuracy": cx.score},
    }
    return head, params


@dataclass(frozen=True, slots=True)
class TrainResult:
    """What `train` produced."""

    path: Path
    meta: ArtifactMeta


def train(
    data: Sequence[Path],
    out: Path,
    static_model: Path,
    *,
    holdout: Path | None = None,
    encoder_head: bool | None = None,
    threads: int = 2,
    make_current: bool = True,
) -> TrainResult:
    """Train on `data`, evaluate on validation/test/holdout and write a new artifact."""
    records = load_records(data)
    if not records:
        raise ConfigError(f"no training records under {', '.join(map(str, data))}")
    parts = split_records(records)
    holdout_records = load_records([holdout]) if holdout is not None and holdout.exists() else []
    digest = data_hash(records)
    progress(
        f"{len(records)} records: train={len(parts['train'])} validation="
        f"{len(parts['validation'])} test={len(parts['test'])} holdout={len(holdout_records)}"
    )
    encoder = StaticEncoder(static_model)
    splits = {name: _static_split(encoder, rs) for name, rs in parts.items()}
    refit = _static_split(encoder, _concat(parts["train"], parts["validation"]))
    progress("fitting static heads")
    head, params = fit_heads(splits["train"], splits["validation"], refit, encoder.dense_width())
    version = f"{ENGINE_NAME}-{datetime.now(UTC):%Y%m%d%H%M%S}-{digest[:8]}"
    meta = ArtifactMeta(
        version=version,
        engine=ENGINE_NAME,
        labels=Labels(categories=list(CATEGORIES), complexities=list(COMPLEXITIES)),
        encoder_id=ENCODER_ID,
        static_model_hash=hash_dir(static_model),
        lexicon_hash=encoder.lexicon.digest,
        training_data_hash=digest,
        created_at=datetime.now(UTC).isoformat(),
        params={**params, "encoder_threshold": ENCODER_THRESHOLD},
    )
    arrays = head.to_arrays("")
    engine = CpuEngine(Artifact(out / version, meta, arrays), encoder)
    # Validation is reported from the train-only fits that chose the hyper-parameters: the
    # final head was refit on train+validation, so scoring it there would flatter it.
    eval_sets = {"test": parts["test"], "holdout": holdout_records}
    metrics: dict[str, Any] = {
        name: _summary(prediction_metrics(rs, engine.classify([r.prompt for r in rs])))
        for name, rs in eval_sets.items()
        if rs
    }
    metrics["validation"] = {"n": len(parts["validation"]), **params["validation_selection"]}
    metrics["counts"] = {name: len(rs) for name, rs in parts.items()}
    metrics["counts"]["holdout"] = len(holdout_records)
    # The words of what the final head was fit on (train and validation); the test split's
    # prompts stay partly unseen, as new traffic is.
    extra: dict[str, dict[str, npt.NDArray[Any]]] = {
        VOCABULARY_FILE: vocabulary_arrays(
            training_vocabulary(r.prompt for r in _concat(parts["train"], parts["validation"]))
        )
    }
    if encoder_head is not False:
        encoder_arrays, encoder_metrics = _maybe_encoder_head(
            parts, holdout_records, threads, required=encoder_head is True
        )
        if encoder_arrays is not None:
            extra[ENCODER_HEAD_FILE] = encoder_arrays
            metrics["encoder"] = encoder_metrics
    meta = meta.model_copy(update={"metrics": metrics})
    path = write_artifact(out, meta, arrays, extra=extra, make_current=make_current)
    return TrainResult(path=path, meta=meta)


def _summary(metrics: dict[str, Any]) -> dict[str, Any]:
    keep = ("n", "accuracy", "macro_f1", "complexity_accuracy", "per_class")
    return {k: metrics[k] for k in keep if k in metrics}


def _maybe_encoder_head(
    parts: Mapping[Split, list[Record]], holdout: list[Record], threads: int, *, required: bool
) -> tuple[dict[str, npt.NDArray[Any]] | None, dict[str, Any]]:
    """Fit the second-stage head on full MiniLM embeddings, if sentence-transformers is here."""
    from router_worker.classify.encoder import sentence_transformer_embedder, text_stats

    try:
        embed = sentence_transformer_embedder(threads=threads)
    except EngineUnavailable:
        if required:
            raise
        progress("sentence-transformers missing: skipping the encoder head")
        return None, {}
    progress("embedding all splits with the full MiniLM encoder (second stage)")

    def split(rs: Sequence[Record]) -> SplitData:
        texts = [r.prompt for r in rs]
        dense = np.hstack([embed(texts), text_stats(texts)]).astype(np.float32)
        y_cat, y_cx = _labels(rs)
        return SplitData(dense, None, y_cat, y_cx)

    train_s, val_s = split(parts["train"]), split(parts["validation"])
    refit = SplitData(
        np.vstack([train_s.dense, val_s.dense]),
        None,
        np.concatenate([train_s.y_cat, val_s.y_cat]),
        np.concatenate([train_s.y_cx, val_s.y_cx]),
    )
    head, params = fit_heads(train_s, val_s, refit, refit.dense.shape[1])
    metrics: dict[str, Any] = {"params": params}
    for name, rs in (("test", parts["test"]), ("holdout", holdout)):
        if rs:
            s = split(rs)
            p_cat, p_cx = head.probabilities(s.dense)
            metrics[name] = {
                "n": len(rs),
                "accuracy": float((p_cat.argmax(1) == s.y_cat).mean()),
                "macro_f1": _score(p_cat, s.y_cat, len(CATEGORIES), macro=True),
                "complexity_accuracy": float((p_cx.argmax(1) == s.y_cx).mean()),
            }
    return head.to_arrays(""), metrics

"""Classifier evaluation: accuracy, macro-F1, per-class scores, batch latency, confusion plots."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from router_worker.classify.data import Record
from router_worker.classify.engine import Engine, Prediction
from router_worker.errors import ConfigError
from router_worker.events import CATEGORIES

EVAL_BATCH = 128


def confusion(
    truth: Sequence[str], predicted: Sequence[str], labels: Sequence[str]
) -> npt.NDArray[np.int64]:
    """Confusion matrix, rows = true label, columns = predicted label, in `labels` order."""
    index = {label: i for i, label in enumerate(labels)}
    t = np.fromiter((index[x] for x in truth), dtype=np.int64, count=len(truth))
    p = np.fromiter((index.get(x, -1) for x in predicted), dtype=np.int64, count=len(predicted))
    matrix = np.zeros((len(labels), len(labels)), dtype=np.int64)
    valid = p >= 0
    np.add.at(matrix, (t[valid], p[valid]), 1)
    return matrix


def classification_metrics(
    truth: Sequence[str], predicted: Sequence[str], labels: Sequence[str] = CATEGORIES
) -> dict[str, Any]:
    """accuracy, macro_f1 and per_class {precision, recall, f1, support} (no sklearn needed)."""
    matrix = confusion(truth, predicted, labels)
    tp = np.diag(matrix).astype(np.float64)
    support = matrix.sum(axis=1).astype(np.float64)
    predicted_n = matrix.sum(axis=0).astype(np.float64)
    precision = np.divide(tp, predicted_n, out=np.zeros_like(tp), where=predicted_n > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    present = support > 0
    n = len(truth)
    return {
        "n": n,
        "accuracy": float(tp.sum() / n) if n else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "per_class": {
            label: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, label in enumerate(labels)
        },
    }


def prediction_metrics(
    records: Sequence[Record], predictions: Sequence[Prediction]
) -> dict[str, Any]:
    """Category metrics plus complexity accuracy of `predictions` against `records`."""
    metrics = classification_metrics(
        [r.category for r in records], [p.category for p in predictions]
    )
    hits = sum(r.complexity == p.complexity for r, p in zip(records, predictions, strict=True))
    metrics["complexity_accuracy"] = hits / len(records) if records else 0.0
    return metrics


def timed_classify(
    engine: Engine, texts: Sequence[str], batch_size: int = EVAL_BATCH
) -> tuple[list[Prediction], list[float]]:
    """Predictions for `texts` in batches, and each batch's latency in milliseconds."""
    predictions: list[Prediction] = []
    latencies: list[float] = []
    for start in range(0, len(texts), batch_size):
        batch = list(texts[start : start + batch_size])
        began = time.perf_counter()
        predictions.extend(engine.classify(batch))
        latencies.append((time.perf_counter() - began) * 1000.0)
    return predictions, latencies


def evaluate_engine(
    engine: Engine, records: Sequence[Record], batch_size: int = EVAL_BATCH
) -> dict[str, Any]:
    """The `eval --json` object: quality, throughput and per-batch latency of `engine`."""
    if not records:
        raise ConfigError("nothing to evaluate: the evaluation set is empty")
    texts = [r.prompt for r in records]
    engine.classify(texts[:batch_size])  # warm-up: first-call allocations are not steady state
    predictions, latencies = timed_classify(engine, texts, batch_size)
    metrics = prediction_metrics(records, predictions)
    total_s = sum(latencies) / 1000.0
    metrics.update(
        throughput_per_s=len(texts) / total_s if total_s > 0 else float("inf"),
        latency_ms={
            "p50": float(np.percentile(latencies, 50)),
            "p99": float(np.percentile(latencies, 99)),
        },
        batch_size=batch_size,
        classifier_version=engine.version,
        engine=engine.name,
    )
    metrics["confusion"] = confusion(
        [r.category for r in records], [p.category for p in predictions], CATEGORIES
    ).tolist()
    return metrics


def format_table(metrics: dict[str, Any]) -> str:
    """A readable per-class table and summary lines."""
    lines = [f"{'label':<12}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>9}"]
    for label, row in metrics["per_class"].items():
        lines.append(
            f"{label:<12}{row['precision']:>10.3f}{row['recall']:>10.3f}"
            f"{row['f1']:>10.3f}{row['support']:>9d}"
        )
    lines.append("")
    lines.append(
        f"engine              {metrics.get('engine')}  ({metrics.get('classifier_version')})"
    )
    lines.append(f"n                   {metrics['n']}")
    lines.append(f"accuracy            {metrics['accuracy']:.4f}")
    lines.append(f"macro_f1            {metrics['macro_f1']:.4f}")
    lines.append(f"complexity_accuracy {metrics['complexity_accuracy']:.4f}")
    if "throughput_per_s" in metrics:
        lines.append(f"throughput_per_s    {metrics['throughput_per_s']:.0f}")
        lat = metrics["latency_ms"]
        lines.append(f"latency_ms          p50={lat['p50']:.2f} p99={lat['p99']:.2f} (per batch)")
    return "\n".join(lines)


def plot_confusion(metrics: dict[str, Any], out: Path) -> None:
    """Write the confusion matrix as a PNG; needs the `plot` extra."""
    try:
        import matplotlib  # optional extra

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ConfigError("--plot needs matplotlib: pip install router-worker[plot]") from exc
    matrix = np.asarray(metrics["confusion"])
    fig, ax = plt.subplots(figsize=(7, 6))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(CATEGORIES)), CATEGORIES, rotation=45, ha="right")
    ax.set_yticks(range(len(CATEGORIES)), CATEGORIES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{metrics.get('engine')} {metrics.get('classifier_version')}")
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, str(value), ha="center", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)

"""Classifier CLI commands: build-encoder, train, eval and bench-classifier."""

from __future__ import annotations

import random
import sys
from itertools import cycle, islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import orjson

from router_worker.errors import RouterError

if TYPE_CHECKING:
    from router_worker.classify.data import Record
from router_worker.settings import Settings, get_settings

DEFAULT_CORPUS = Path("data") / "prompts"
DEFAULT_HOLDOUT = Path("data") / "holdout" / "holdout.jsonl"
_SPLIT_WORDS = ("train", "validation", "test", "holdout")


def _fail(exc: RouterError) -> None:
    raise click.ClickException(f"{exc.code}: {exc}") from exc


def _echo_json(obj: Any) -> None:
    click.echo(orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY).decode())


@click.command("build-encoder")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="output directory (default: settings.static_model, models/static-minilm)",
)
@click.option("--pca-dims", type=int, default=256, show_default=True)
def build_encoder(out: Path | None, pca_dims: int) -> None:
    """Distill the MiniLM encoder into static embeddings (needs the ml extra)."""
    from router_worker.classify.cpu import hash_dir
    from router_worker.classify.encoder import build_static_model

    target = out or get_settings().static_model
    try:
        build_static_model(target, pca_dims=pca_dims)
        click.echo(f"static model written to {target} (sha256 {hash_dir(target)[:16]})")
    except RouterError as exc:
        _fail(exc)


@click.command("train")
@click.option(
    "--data",
    "data",
    multiple=True,
    required=True,
    type=click.Path(exists=True, path_type=Path),
    help="jsonl file or directory of them; repeatable",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="artifact root (default: settings.artifact, artifacts/classifier)",
)
@click.option(
    "--holdout",
    type=click.Path(path_type=Path),
    default=DEFAULT_HOLDOUT,
    show_default=True,
    help="evaluated only, never trained or tuned on; skipped when absent",
)
@click.option(
    "--encoder-head/--no-encoder-head",
    default=None,
    help="also fit the full-encoder head (default: when sentence-transformers is installed)",
)
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print meta.json instead of a summary")
def train_command(
    data: tuple[Path, ...],
    out: Path | None,
    holdout: Path,
    encoder_head: bool | None,
    threads: int,
    as_json: bool,
) -> None:
    """Train the classifier heads, evaluate them and publish a new artifact version."""
    from router_worker.classify.train import train

    settings = get_settings()
    try:
        result = train(
            list(data),
            out or settings.artifact,
            settings.static_model,
            holdout=holdout,
            encoder_head=encoder_head,
            threads=threads,
        )
    except RouterError as exc:
        _fail(exc)
        return
    if as_json:
        _echo_json(result.meta.model_dump())
        return
    click.echo(f"artifact {result.meta.version} -> {result.path} (now CURRENT)")
    for name, m in result.meta.metrics.items():
        if isinstance(m, dict) and "macro_f1" in m:
            click.echo(
                f"  {name:<10} n={m['n']:<5} macro_f1={m['macro_f1']:.4f} "
                f"complexity_accuracy={m['complexity_accuracy']:.4f}"
            )
    for name, m in result.meta.metrics.get("encoder", {}).items():
        if isinstance(m, dict) and "macro_f1" in m:
            click.echo(
                f"  encoder/{name:<7} n={m['n']:<5} macro_f1={m['macro_f1']:.4f} "
                f"complexity_accuracy={m['complexity_accuracy']:.4f}"
            )


def _eval_records(data: str) -> list[Record]:
    from router_worker.classify.data import load_records, split_records

    if data == "holdout":
        return load_records([DEFAULT_HOLDOUT])
    if data in _SPLIT_WORDS:
        parts = split_records(load_records([DEFAULT_CORPUS]))
        return next(records for name, records in parts.items() if name == data)
    return load_records([Path(data)])


def _engine_for(settings: Settings, engine: str | None, artifact: Path | None) -> Any:
    from router_worker.classify.factory import load_engine

    if engine is not None:
        settings = settings.model_copy(update={"engine": engine})
    return load_engine(settings, artifact)


@click.command("eval")
@click.option(
    "--data",
    required=True,
    help="jsonl file or directory, or a split name: train, validation, test, holdout",
)
@click.option("--engine", type=click.Choice(["cpu", "vllm", "keyword"]), default=None)
@click.option("--artifact", type=click.Path(path_type=Path), default=None)
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@click.option("--plot", type=click.Path(path_type=Path), default=None, help="confusion PNG")
def eval_command(
    data: str,
    engine: str | None,
    artifact: Path | None,
    batch_size: int,
    as_json: bool,
    plot: Path | None,
) -> None:
    """Evaluate an engine on labelled prompts."""
    from router_worker.classify.evaluate import (
        evaluate_engine,
        format_table,
        plot_confusion,
    )

    try:
        records = _eval_records(data)
        metrics = evaluate_engine(
            _engine_for(get_settings(), engine, artifact), records, batch_size
        )
        if plot is not None:
            plot_confusion(metrics, plot)
    except RouterError as exc:
        _fail(exc)
        return
    if as_json:
        _echo_json(metrics)
    else:
        click.echo(format_table(metrics))


def _bench_texts(n: int) -> list[str]:
    from router_worker.classify.data import load_records

    texts = [r.prompt for r in load_records([DEFAULT_CORPUS])] if DEFAULT_CORPUS.is_dir() else []
    if not texts:
        raise click.ClickException(f"no prompts under {DEFAULT_CORPUS} to benchmark with")
    # Corpus files are sorted by category; a fixed shuffle makes every sample representative.
    random.Random(0).shuffle(texts)
    return list(islice(cycle(texts), n))


@click.command("bench-classifier")
@click.option("--engine", type=click.Choice(["cpu", "vllm", "keyword"]), default="cpu")
@click.option("--artifact", type=click.Path(path_type=Path), default=None)
@click.option("--n", "n", type=int, default=4096, show_default=True, help="texts per batch run")
@click.option("--threads", type=int, default=None, help="default: settings.engine_threads")
@click.option("--raw/--no-raw", default=True, help="also time the raw MiniLM forward pass")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def bench_command(
    engine: str, artifact: Path | None, n: int, threads: int | None, raw: bool, as_json: bool
) -> None:
    """Throughput per batch size vs a per-item loop vs the raw encoder forward pass."""
    from router_worker.classify.bench import bench, rss_mib

    settings = get_settings()
    if threads is not None:
        settings = settings.model_copy(update={"engine_threads": threads})
    texts = _bench_texts(n)
    try:
        before = rss_mib()
        loaded = _engine_for(settings, engine, artifact)
        after = rss_mib()
        result = bench(loaded, texts, threads=settings.engine_threads, raw=raw)
    except RouterError as exc:
        _fail(exc)
        return
    result["rss_mib_before_load"] = before
    result["rss_mib_after_load"] = after
    if as_json:
        _echo_json(result)
        return
    for size, row in result["batch"].items():
        click.echo(
            f"batch {size:>4}: {row['throughput_per_s']:>10.0f}/s  "
            f"p50 {row['latency_ms']['p50']:.2f} ms"
        )
    click.echo(f"per-item loop: {result['per_item_loop']['throughput_per_s']:.0f}/s")
    raw_row = result["raw_encoder_forward"]
    click.echo(
        "raw encoder:   "
        + (
            f"{raw_row['throughput_per_s']:.0f}/s on {raw_row['device']}"
            if raw_row
            else str(result["raw_encoder_forward_reason"])
        )
    )
    click.echo(f"RSS after load: {after:.0f} MiB", err=False)
    sys.stdout.flush()


COMMANDS: list[click.Command] = [build_encoder, train_command, eval_command, bench_command]

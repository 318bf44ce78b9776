"""`router-worker bench`: the end-to-end benchmark, one JSON object."""

from __future__ import annotations

import asyncio
from pathlib import Path

import click
import orjson


@click.command("bench")
@click.option("--requests", "n", default=20000, show_default=True, help="requests per phase")
@click.option("--rate", default=1000.0, show_default=True, help="offered req/s for latency")
@click.option("--engine", type=click.Choice(["keyword", "cpu"]), default="cpu", show_default=True)
@click.option("--bootstrap", default=None, help="use this broker instead of an embedded one")
@click.option("--latency-seconds", default=10.0, show_default=True)
@click.option(
    "--warmup-seconds",
    "warmup_s",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    help="offered load before each latency window, reported apart (warmup_latency_ms)",
)
@click.option(
    "--run-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path(".run/bench"),
    show_default=True,
)
@click.option(
    "--separate-sink/--in-process-sink",
    default=True,
    show_default=True,
    help="run the sink as its own process (production layout) or inside the worker",
)
@click.option(
    "--workers",
    default=1,
    show_default=True,
    help="route worker processes in the one consumer group (scale-out)",
)
@click.option(
    "--partitions",
    type=click.IntRange(min=1),
    default=None,
    help="partitions of every bench topic [default: ROUTER_TOPIC_PARTITIONS when set, else "
    "one per worker; 16 for a soak]",
)
@click.option(
    "--duration",
    "soak_seconds",
    default=0.0,
    show_default=True,
    help="soak: keep the offered load this many seconds, sampling throughput and RSS",
)
@click.option(
    "--plot",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="write a latency histogram PNG (plot extra)",
)
@click.option(
    "--peer/--no-peer",
    default=True,
    show_default=True,
    help="also drain the backlog through Quix Streams when the peers extra is installed",
)
@click.option(
    "--rounds",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="throughput drains (passthrough, then pipeline) repeated in turn; the JSON reports "
    "medians and every round (throughput_rounds)",
)
@click.option("--json", "as_json", is_flag=True, help="print only the JSON object")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="also write the JSON here",
)
def bench_command(
    n: int,
    rate: float,
    engine: str,
    bootstrap: str | None,
    latency_seconds: float,
    warmup_s: float,
    separate_sink: bool,
    workers: int,
    partitions: int | None,
    soak_seconds: float,
    plot: Path | None,
    peer: bool,
    run_dir: Path,
    rounds: int,
    as_json: bool,
    out: Path | None,
) -> None:
    """Passthrough vs pipeline throughput, latency at --rate, sink rows/s, worker RSS."""
    from router_worker.bench import run_bench

    run_dir.mkdir(parents=True, exist_ok=True)
    result = asyncio.run(
        run_bench(
            n,
            rate,
            engine,
            bootstrap,
            run_dir.resolve(),
            latency_seconds,
            separate_sink,
            workers,
            soak_seconds,
            plot,
            peer,
            partitions,
            warmup_s,
            rounds,
        )
    )
    text = orjson.dumps(result, option=orjson.OPT_INDENT_2).decode()
    if out is not None:
        out.write_text(text + "\n")
    click.echo(text)


COMMANDS: list[click.Command] = [bench_command]

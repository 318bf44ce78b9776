"""Classifier lifecycle: replay (shadow), replay-bench, dataset export, promote, rollback."""

from __future__ import annotations

import asyncio
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import orjson

from router_worker.errors import RouterError
from router_worker.settings import Settings, get_settings


def _fail(exc: RouterError) -> None:
    raise click.ClickException(f"{exc.code}: {exc}") from exc


def _echo_json(obj: Any) -> None:
    click.echo(orjson.dumps(obj, option=orjson.OPT_INDENT_2).decode())


def _time_ms(value: str | None) -> int | None:
    """RFC 3339 / ISO 8601 (naive = UTC) or integer epoch milliseconds."""
    if value is None:
        return None
    if value.isdigit():
        return int(value)
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise click.BadParameter(f"not a time: {value!r}") from exc
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return int(parsed.timestamp() * 1000)


def candidate_engine(settings: Settings, artifact: str | None) -> Any:
    """The engine to replay with: `artifact` (directory, or version under settings.artifact),
    else the live one; the keyword tier alone when settings.engine is keyword."""
    from router_worker.classify.factory import load_engine

    if settings.engine == "keyword":
        return None
    path = None
    if artifact is not None:
        path = Path(artifact)
        if not path.exists():
            path = settings.artifact / artifact
    return load_engine(settings, path)


def _progress(stats: Any) -> None:
    rate = stats.replayed / stats.elapsed_s if stats.elapsed_s else 0.0
    click.echo(f"replayed {stats.replayed} ({rate:.0f}/s), compared {stats.compared}, "
               f"model changed {stats.compared - stats.same_model}", err=True)


@click.command("replay")
@click.option("--topic", default="routing.requested.v1", show_default=True,
              help="topic to replay (the deployment's topic prefix is added)")
@click.option("--from-time", default=None, help="RFC 3339 time or epoch ms")
@click.option("--to-time", default=None, help="RFC 3339 time or epoch ms (inclusive)")
@click.option("--from-offset", type=int, default=None, help="first offset of every partition")
@click.option("--to-offset", type=int, default=None, help="end offset (exclusive)")
@click.option("--artifact", default=None, help="candidate artifact dir or version (default: live)")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="report JSON file")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="per-partition offsets file (default: <out>.checkpoint when --out is given)")
@click.option("--resume", is_flag=True, help="continue from the checkpoint")
@click.option("--join/--no-join", default=True, help="compare with routing_events in Postgres")
@click.option("--batch-size", type=int, default=2048, show_default=True)
@click.option("--idle-s", type=float, default=2.0, show_default=True,
              help="stop when nothing new arrived for this long")
def replay_command(topic: str, from_time: str | None, to_time: str | None,
                   from_offset: int | None, to_offset: int | None, artifact: str | None,
                   out: Path | None, checkpoint: Path | None, resume: bool, join: bool,
                   batch_size: int, idle_s: float) -> None:
    """Re-route recorded requests with a candidate classifier in shadow (publishes nothing)."""
    from router_worker.logs import configure_logging
    from router_worker.replay import ReplayRange, replay

    settings = get_settings()
    configure_logging(settings)
    span = ReplayRange(settings.topic(topic), _time_ms(from_time), _time_ms(to_time),
                       from_offset, to_offset)
    if checkpoint is None and out is not None:
        checkpoint = out.with_name(out.name + ".checkpoint")
    try:
        engine = candidate_engine(settings, artifact)
        report = asyncio.run(replay(settings, span, engine, join=join, checkpoint=checkpoint,
                                    resume=resume, batch_size=batch_size, idle_s=idle_s,
                                    progress=_progress))
    except RouterError as exc:
        _fail(exc)
        return
    if out is not None:
        out.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
        click.echo(f"report written to {out}", err=True)
    _echo_json(report)


@click.command("replay-bench")
@click.option("--n", "n", type=int, default=200_000, show_default=True,
              help="synthetic requests to generate into a throwaway topic")
@click.option("--artifact", default=None, help="artifact dir or version (default: live)")
@click.option("--batch-size", type=int, default=2048, show_default=True)
@click.option("--live-requests", type=int, default=20_000, show_default=True,
              help="also route this many requests through a live worker on the same broker, "
              "in the same run, for the replay / live pipeline ratio (0: skip)")
def replay_bench_command(n: int, artifact: str | None, batch_size: int,
                         live_requests: int) -> None:
    """Replay throughput vs the live pipeline and the engine's own rate, and RSS, as JSON."""
    from router_worker.bench import run_bench
    from router_worker.replay_bench import run_replay_bench

    settings = get_settings()
    try:
        result = run_replay_bench(settings, candidate_engine(settings, artifact), n, batch_size)
    except RouterError as exc:
        _fail(exc)
        return
    if live_requests > 0:
        run_dir = Path(".run/bench").resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        live = asyncio.run(run_bench(live_requests, 1000.0, settings.engine,
                                     settings.kafka_bootstrap, run_dir, 0.0))
        live_rate = float(live["pipeline_per_s"] or 0.0)
        result["live_pipeline_per_s"] = live_rate
        result["live_engine"] = settings.engine
        result["ratio_vs_live_pipeline"] = (
            round(result["replayed_per_s"] / live_rate, 3) if live_rate else None
        )
    _echo_json(result)


@click.group("dataset")
def dataset_group() -> None:
    """Training sets from recorded traffic."""


@dataset_group.command("export")
@click.option("--from-postgres", is_flag=True, required=True,
              help="read decisions and outcomes from Postgres (the only source so far)")
@click.option("--since", default=None, help="only decisions at or after this RFC 3339 time")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="jsonl to write")
@click.option("--min-confidence", type=float, default=0.8, show_default=True,
              help="unlabelled decisions need this confidence and a successful outcome")
@click.option("--max-per-class", type=int, default=5000, show_default=True)
@click.option("--from-topic", is_flag=True,
              help="take prompts not stored in Postgres from the requested topic (retention)")
def dataset_export(from_postgres: bool, since: str | None, out: Path, min_confidence: float,
                   max_per_class: int, from_topic: bool) -> None:
    """Export {prompt, category, complexity} lines that `router-worker train --data` accepts."""
    from router_worker.dataset import export

    since_ms = _time_ms(since)
    since_dt = datetime.fromtimestamp(since_ms / 1000, UTC) if since_ms is not None else None
    try:
        stats = export(get_settings(), out, since=since_dt, min_confidence=min_confidence,
                       max_per_class=max_per_class, from_topic=from_topic)
    except RouterError as exc:
        _fail(exc)
        return
    click.echo(f"{stats.written} examples written to {out}", err=True)
    _echo_json(stats.as_dict())


@click.group("classifier")
def classifier_group() -> None:
    """Promote and roll back classifier versions across the fleet."""


def _announce(settings: Settings, action: str, version: str, previous: str | None) -> bool:
    """Publish the live version on Redis (key + history + message); False when unreachable."""
    import redis

    from router_worker.classify.factory import CHANNEL, CURRENT_KEY, HISTORY_KEY

    prefix = settings.redis_prefix
    client = redis.Redis.from_url(settings.redis_url.get_secret_value(), socket_timeout=5)
    message = orjson.dumps({"action": action, "version": version, "previous": previous,
                            "at": datetime.now(UTC).isoformat()})
    try:
        pipe = client.pipeline(transaction=True)
        pipe.set(f"{prefix}{CURRENT_KEY}", version)
        pipe.lpush(f"{prefix}{HISTORY_KEY}", message)
        pipe.ltrim(f"{prefix}{HISTORY_KEY}", 0, 99)
        pipe.publish(f"{prefix}{CHANNEL}", message)
        pipe.execute()
    except redis.RedisError as exc:
        click.echo(f"warning: Redis not updated ({exc}); hosts sharing {settings.artifact} "
                   "still follow CURRENT", err=True)
        return False
    finally:
        client.close()
    return True


@classifier_group.command("promote")
@click.argument("artifact")
@click.option("--root", type=click.Path(path_type=Path), default=None,
              help="artifact root workers load (default: settings.artifact)")
@click.option("--force", is_flag=True, help="promote even if its test macro_f1 is worse")
def promote_command(artifact: str, root: Path | None, force: bool) -> None:
    """Make ARTIFACT (a version directory, or a version under the root) live everywhere."""
    from router_worker.classify.artifacts import promote

    settings = get_settings()
    try:
        done = promote(root or settings.artifact, artifact, force=force)
    except RouterError as exc:
        _fail(exc)
        return
    _announce(settings, "promote", done.version, done.previous)
    click.echo(f"promoted {done.version} (previous: {done.previous})")


@classifier_group.command("rollback")
@click.option("--root", type=click.Path(path_type=Path), default=None)
def rollback_command(root: Path | None) -> None:
    """Return to the version live before the last promotion."""
    from router_worker.classify.artifacts import rollback

    settings = get_settings()
    try:
        done = rollback(root or settings.artifact)
    except RouterError as exc:
        _fail(exc)
        return
    _announce(settings, "rollback", done.version, done.previous)
    click.echo(f"rolled back to {done.version} (was: {done.previous})")


@classifier_group.command("status")
@click.option("--root", type=click.Path(path_type=Path), default=None)
def status_command(root: Path | None) -> None:
    """The live version (file and Redis) and the rollback history."""
    import redis

    from router_worker.classify.artifacts import current_version, previous_versions
    from router_worker.classify.factory import CURRENT_KEY

    settings = get_settings()
    base = root or settings.artifact
    client = redis.Redis.from_url(settings.redis_url.get_secret_value(), socket_timeout=2)
    try:
        remote = client.get(f"{settings.redis_prefix}{CURRENT_KEY}")
    except redis.RedisError:
        remote = None
    finally:
        client.close()
    live = remote.decode() if isinstance(remote, bytes) else remote
    _echo_json({"current": current_version(base), "redis": live,
                "previous": previous_versions(base)})
    sys.stdout.flush()


COMMANDS: list[click.Command] = [replay_command, replay_bench_command, dataset_group,
                                 classifier_group]

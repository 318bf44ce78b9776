"""`router-worker run`: the all-in-one demo (embedded services, worker, example requests)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
import httpx
import orjson

from router_worker.client import Reply, RoutingClient
from router_worker.commands.admin import apply_topics
from router_worker.commands.request import format_reply
from router_worker.embedded import EmbeddedStack, free_port, resolve_stack
from router_worker.settings import Settings
from router_worker.store.migrate import migrate

EXAMPLES = Path("examples") / "requests.jsonl"


def _say(message: str) -> None:
    click.echo(click.style("==> ", fg="cyan", bold=True) + message)


def _example_ids(lines: list[bytes]) -> list[str]:
    """The request_id of each example line, or the key it is published under when unreadable."""
    ids = []
    for number, line in enumerate(lines, start=1):
        try:
            rid = orjson.loads(line).get("request_id")
        except (orjson.JSONDecodeError, AttributeError):
            rid = None
        ids.append(rid if isinstance(rid, str) and rid else f"example-line-{number}")
    return ids


class _Worker:
    """The worker subprocess, logging to the run directory."""

    def __init__(self, env: dict[str, str], run_dir: Path) -> None:
        self.port = free_port()
        self.log_path = run_dir / "worker.log"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "router_worker", "--datadir", str(run_dir / "faust"),
                 "worker", "--web-port", str(self.port), "-l", "warn"],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )

    async def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient() as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise click.ClickException(f"worker exited; see {self.log_path}")
                with contextlib.suppress(httpx.HTTPError):
                    reply = await client.get(f"http://127.0.0.1:{self.port}/readyz", timeout=1)
                    if reply.status_code == 200:
                        return
                await asyncio.sleep(0.2)
        raise click.ClickException(f"worker not ready after {timeout:.0f}s; see {self.log_path}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


async def _publish_examples(settings: Settings, path: Path, timeout: float) -> tuple[int, int]:
    """Publish every example line as-is; print each terminal event; (answered, total)."""
    lines = [line for line in path.read_bytes().splitlines() if line.strip()]
    ids = _example_ids(lines)
    answered = 0
    async with RoutingClient(settings) as client:
        waiters = {rid: client.expect(rid) for rid in ids}
        for rid, line in zip(ids, lines, strict=True):
            await client.publish(request_id=rid, payload=line)
        pending: set[asyncio.Future[Reply]] = set(waiters.values())
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            done, pending = await asyncio.wait(pending, timeout=deadline - time.monotonic(),
                                               return_when=asyncio.FIRST_COMPLETED)
            for future in done:
                click.echo(format_reply(future.result()))
                answered += 1
    return answered, len(ids)


async def _run(run_dir: Path, examples: Path, exit_when_done: bool, timeout: float) -> int:
    plan = await resolve_stack(os.environ, probe=False)
    stack = EmbeddedStack(run_dir, kafka=plan.kafka, redis=plan.redis, postgres=plan.postgres)
    started = time.monotonic()
    urls = await stack.start()
    env = {**os.environ, **urls.env()}
    _say(f"services ready in {time.monotonic() - started:.1f}s (data under {run_dir}/):")
    for name in ("ROUTER_KAFKA_BOOTSTRAP", "ROUTER_REDIS_URL", "ROUTER_DATABASE_URL"):
        kind = "embedded" if name in urls.env() else "configured"
        click.echo(f"    {name}={env.get(name, '(default)')}  [{kind}]")
    settings = Settings.from_env(env)
    worker: _Worker | None = None
    try:
        for line in await apply_topics(settings):
            click.echo(f"    topics: {line}")
        applied = await migrate(settings.database_url.get_secret_value(), settings.database_schema)
        click.echo(f"    db: {'applied ' + ', '.join(applied) if applied else 'up to date'}")
        worker = _Worker(env, run_dir)
        _say(f"worker starting (engine={settings.engine}, log {worker.log_path}) ...")
        await worker.wait_ready(timeout=60)
        _say(f"worker ready; metrics at http://127.0.0.1:{worker.port}/metrics")
        _say(f"publishing {examples} ...")
        answered, total = await _publish_examples(settings, examples, timeout)
        _say(f"{answered}/{total} requests have a terminal event; rows are in "
             f"{settings.database_schema}.routing_events")
        if exit_when_done:
            return 0 if answered == total else 1
        _say("worker keeps running; try in another shell:")
        click.echo("    " + " ".join(f"{k}={v}" for k, v in urls.env().items())
                   + " .venv/bin/router-worker request --prompt 'explain TCP slow start'")
        _say("Ctrl-C to stop everything")
        await asyncio.Event().wait()
        return 0
    finally:
        if worker is not None:
            worker.stop()
        await stack.stop()
        _say("stopped the worker and every service this command started")


@click.command("run")
@click.option("--examples", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=EXAMPLES, show_default=True, help="JSONL file of requests to publish")
@click.option("--run-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path(".run"), show_default=True, help="where embedded services keep data")
@click.option("--exit-when-done", is_flag=True, help="exit 0 once every example has a decision")
@click.option("--timeout", default=120.0, show_default=True, help="seconds to wait for decisions")
def run_command(examples: Path, run_dir: Path, exit_when_done: bool, timeout: float) -> None:
    """Start everything needed (embedded broker/Redis/Postgres), a worker, and a demo."""
    try:
        code = asyncio.run(_run(run_dir.resolve(), examples, exit_when_done, timeout))
    except KeyboardInterrupt:
        code = 0
    sys.exit(code)


COMMANDS: list[click.Command] = [run_command]

"""`router-worker sink`: the Postgres sink as its own process (scale it apart from routing)."""

from __future__ import annotations

import asyncio
import signal

import click
import structlog
from prometheus_client import start_http_server

from router_worker.agents.sink import SinkAgent
from router_worker.logs import configure_logging
from router_worker.metrics import create_metrics
from router_worker.settings import get_settings

log = structlog.get_logger(__name__)


async def _run_sink(web_port: int) -> None:
    settings = get_settings()
    configure_logging(settings)
    metrics = create_metrics()
    if web_port:
        start_http_server(web_port, addr="0.0.0.0", registry=metrics.registry)
    sink = SinkAgent(settings, metrics)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await sink.start()
    log.info("sink_started", group=settings.sink_group, web_port=web_port)
    await stop.wait()
    # Stopping commits nothing new: rows written but not yet committed are re-read and
    # absorbed by the idempotent insert after the next start.
    await sink.stop()
    log.info("sink_stopped", rows=sink.rows_written)


@click.command("sink")
@click.option("--web-port", default=0, show_default=True, help="serve /metrics here (0: off)")
def sink_command(web_port: int) -> None:
    """Run only the Postgres sink (pair with ROUTER_RUN_SINK=false on route workers)."""
    asyncio.run(_run_sink(web_port))


COMMANDS: list[click.Command] = [sink_command]

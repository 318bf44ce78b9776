"""`router-worker request`: publish one prompt and print its decision."""

from __future__ import annotations

import asyncio
import sys

import click
import orjson

from router_worker.client import Reply, RoutingClient
from router_worker.errors import RouterError
from router_worker.settings import get_settings


def format_reply(reply: Reply) -> str:
    """One readable line per terminal event."""
    event = reply.event
    rid = event.get("request_id")
    if reply.status == "failed":
        return f"FAILED  {rid}: {event.get('error_code')} - {event.get('error_detail')}"
    d = event["decision"]
    fallbacks = ", ".join(d.get("fallbacks") or []) or "-"
    return (f"ROUTED  {rid} -> {d['model']} ({d['provider']})  {d['category']}/{d['complexity']} "
            f"conf={d['confidence']:.2f} tier={d['tier']} policy={d['policy']} "
            f"est=${d['estimated_cost_usd']:.5f} fallbacks=[{fallbacks}]")


async def _request(prompt: str, tenant: str, timeout: float) -> Reply:
    async with RoutingClient(get_settings()) as client:
        return await client.route(prompt, tenant=tenant, timeout=timeout)


@click.command("request")
@click.option("--prompt", required=True, help="prompt text to route")
@click.option("--tenant", default="default", show_default=True)
@click.option("--timeout", default=15.0, show_default=True, help="seconds to wait")
@click.option("--json", "as_json", is_flag=True, help="print the event as JSON")
def request_command(prompt: str, tenant: str, timeout: float, as_json: bool) -> None:
    """Publish one routing request and print its decision."""
    try:
        reply = asyncio.run(_request(prompt, tenant, timeout))
    except RouterError as exc:  # timeout, broker unreachable, topics missing
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    if as_json:
        click.echo(orjson.dumps({"status": reply.status, **reply.event},
                                option=orjson.OPT_INDENT_2).decode())
    else:
        click.echo(format_reply(reply))
    sys.exit(0 if reply.status == "completed" else 1)


COMMANDS: list[click.Command] = [request_command]

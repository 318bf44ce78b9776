"""`router-worker models` and `router-worker experiments report`: the live learned state."""

from __future__ import annotations

import asyncio
import time

import click
import redis.asyncio as aioredis

from router_worker.config import RoutingConfig, load_config
from router_worker.enrich import Keys
from router_worker.settings import Settings, get_settings
from router_worker.state.health import state_of
from router_worker.state.perf import parse_perf


async def models_table(settings: Settings, config: RoutingConfig) -> list[str]:
    """One line per tracked series: breaker state, samples, success EWMA, latency EWMA."""
    keys = Keys(settings.redis_prefix)
    client = aioredis.Redis.from_url(settings.redis_url.get_secret_value())
    try:
        pipe = client.pipeline(transaction=False)
        pipe.hgetall(keys.health())
        pipe.hgetall(keys.perf())
        pipe.hgetall(keys.demoted())
        health_raw, perf_raw, demoted_raw = await pipe.execute()
    finally:
        await client.aclose()
    health = {k.decode(): v.decode() for k, v in health_raw.items()}
    demoted = {k.decode(): v.decode() for k, v in demoted_raw.items()}
    stats = parse_perf(perf_raw)
    now = time.time()
    lines = [f"{'model':<34} {'health':<10} {'samples':>8} {'success':>8} {'latency_ms':>11}  "
             "status"]
    names = sorted(set(config.models) | set(stats), key=lambda n: (n.partition("@")[0], n))
    for name in names:
        model = name.partition("@")[0]
        perf = stats.get(name)
        lines.append(
            f"{name:<34} {state_of(health.get(model), now).value:<10} "
            f"{perf.samples if perf else 0:>8} "
            f"{f'{perf.success:.3f}' if perf else '-':>8} "
            f"{f'{perf.latency_ms:.0f}' if perf else '-':>11}  "
            f"{('demoted: ' + demoted[name]) if name in demoted else 'ok'}")
    return lines


async def experiments_report(settings: Settings, config: RoutingConfig) -> list[str]:
    """Per experiment arm: assigned, outcomes, success rate, mean latency and cost."""
    keys = Keys(settings.redis_prefix)
    client = aioredis.Redis.from_url(settings.redis_url.get_secret_value())
    try:
        pipe = client.pipeline(transaction=False)
        for name in config.experiments:
            pipe.hgetall(keys.experiment(name))
        replies = await pipe.execute()
    finally:
        await client.aclose()
    lines = [f"{'experiment':<20} {'arm':<16} {'assigned':>9} {'outcomes':>9} {'success':>8} "
             f"{'latency_ms':>11} {'cost_usd':>10}"]
    for (name, spec), raw in zip(config.experiments.items(), replies, strict=True):
        fields = {k.decode(): float(v) for k, v in raw.items()}
        for arm in spec.arms:
            n = fields.get(f"{arm.name}|outcomes", 0.0)
            means = [f"{fields.get(f'{arm.name}|{m}', 0.0) / n:.4g}" if n else "-"
                     for m in ("successes", "latency_ms", "cost_usd")]
            lines.append(
                f"{name:<20} {arm.name:<16} {int(fields.get(f'{arm.name}|assigned', 0)):>9} "
                f"{int(n):>9} {means[0]:>8} {means[1]:>11} {means[2]:>10}")
    return lines


@click.command("models")
def models_command() -> None:
    """Live model table: breaker state, success and latency EWMAs, demotions."""
    settings = get_settings()
    for line in asyncio.run(models_table(settings, load_config(settings.config))):
        click.echo(line)


@click.group("experiments")
def experiments_group() -> None:
    """A/B experiments declared in the routing config."""


@experiments_group.command("report")
def experiments_report_command() -> None:
    """Per-arm assignments, success rate, mean latency and mean cost."""
    settings = get_settings()
    for line in asyncio.run(experiments_report(settings, load_config(settings.config))):
        click.echo(line)


# `models` replaces Faust's built-in command of that name (add_command overwrites by name).
COMMANDS: list[click.Command] = [models_command, experiments_group]

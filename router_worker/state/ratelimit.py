"""Per-tenant token buckets: one Lua call per tenant and batch, inside the enrichment pipeline."""

from __future__ import annotations

import math

from router_worker.config import TenantSpec


def bucket_size(tenant: TenantSpec) -> tuple[float, int] | None:
    """(rate per second, burst) of a tenant, or None when it is not limited."""
    if tenant.requests_per_s is None:
        return None
    return tenant.requests_per_s, tenant.burst or max(1, math.ceil(tenant.requests_per_s))


def take(
    tokens: float | None, last_ms: float | None, now_ms: float, rate: float, burst: int, n: int,
) -> tuple[int, float, float]:
    """Grant up to `n` requests; returns (granted, tokens left, timestamp). Mirrors the Lua."""
    if tokens is None or last_ms is None:
        tokens, last_ms = float(burst), now_ms
    if now_ms > last_ms:
        tokens = min(float(burst), tokens + (now_ms - last_ms) / 1000 * rate)
        last_ms = now_ms
    granted = min(n, math.floor(tokens))
    return granted, tokens - granted, last_ms


# KEYS[1] = the tenant's bucket hash; ARGV = rate/s, burst, now (ms), requests in this batch.
# Returns how many of them may pass; the rest become `rate_limited` failures.
BUCKET_SCRIPT = """
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local now, n = tonumber(ARGV[3]), tonumber(ARGV[4])
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens, ts = tonumber(b[1]), tonumber(b[2])
if tokens == nil or ts == nil then tokens = burst; ts = now end
if now > ts then
  tokens = math.min(burst, tokens + (now - ts) / 1000 * rate)
  ts = now
end
local granted = math.min(n, math.floor(tokens))
tokens = tokens - granted
redis.call('HSET', KEYS[1], 'tokens', string.format('%.6f', tokens),
           'ts', string.format('%.0f', ts))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 60000)
return granted
"""

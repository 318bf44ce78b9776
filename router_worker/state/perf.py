"""Performance tracker: EWMA of success rate and latency per model (and per category)."""

from __future__ import annotations

from dataclasses import dataclass

from router_worker.config import PerformanceSpec


@dataclass(frozen=True, slots=True)
class PerfStats:
    """One tracked series: how many outcomes, EWMA success rate, EWMA latency."""

    samples: int
    success: float
    latency_ms: float


def ewma(old: float | None, batch_mean: float, n: int, alpha: float) -> float:
    """`n` observations averaging `batch_mean` folded into an EWMA in one step
    (exact when the n observations are equal; the first batch seeds the average)."""
    if old is None:
        return batch_mean
    keep = (1 - alpha) ** n
    return old * keep + batch_mean * (1 - keep)


def demotion(stats: PerfStats, demoted: bool, spec: PerformanceSpec) -> str | None:
    """Why a series is (still) demoted, or None when it is fine.

    A demoted series recovers only once it clears the bar by `hysteresis`, so a model at the
    edge does not flap between first and last place.
    """
    if stats.samples < spec.min_samples:
        return "demoted" if demoted else None
    margin = spec.hysteresis if demoted else 0.0
    if stats.success < min(1.0, spec.min_success_rate + margin):
        return f"success {stats.success:.2f} < {spec.min_success_rate:.2f}"
    if spec.max_latency_ms is not None and stats.latency_ms > spec.max_latency_ms * (1 - margin):
        return f"latency {stats.latency_ms:.0f}ms > {spec.max_latency_ms:.0f}ms"
    return None


# Atomic EWMA update of many series in one call, mirroring `ewma` above.
# KEYS[1] = perf hash; ARGV = alpha, then per series: name, n, success mean, latency mean.
# Returns per series: samples, success, latency (as strings).
PERF_SCRIPT = """
local alpha = tonumber(ARGV[1])
local out = {}
for i = 2, #ARGV, 4 do
  local name, n = ARGV[i], tonumber(ARGV[i + 1])
  local s, l = tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3])
  local old = redis.call('HMGET', KEYS[1], name .. '|n', name .. '|s', name .. '|l')
  local total = (tonumber(old[1]) or 0) + n
  if old[2] then
    local keep = (1 - alpha) ^ n
    s = tonumber(old[2]) * keep + s * (1 - keep)
    l = tonumber(old[3]) * keep + l * (1 - keep)
  end
  redis.call('HSET', KEYS[1], name .. '|n', total, name .. '|s', tostring(s), name .. '|l',
             tostring(l))
  out[#out + 1] = tostring(total); out[#out + 1] = tostring(s); out[#out + 1] = tostring(l)
end
return out
"""


def series_name(model: str, category: str | None = None) -> str:
    """Field prefix of a series in the perf hash: `model` or `model@category`."""
    return model if category is None else f"{model}@{category}"


def parse_perf(raw: dict[bytes, bytes]) -> dict[str, PerfStats]:
    """The perf hash as {series: stats}."""
    fields = {k.decode(): v.decode() for k, v in raw.items()}
    out: dict[str, PerfStats] = {}
    for key in fields:
        if key.endswith("|n"):
            name = key[:-2]
            try:
                out[name] = PerfStats(int(float(fields[key])), float(fields[f"{name}|s"]),
                                      float(fields[f"{name}|l"]))
            except (KeyError, ValueError):
                continue
    return out

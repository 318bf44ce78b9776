"""Model health: a circuit breaker per model, opened by failed outcomes.

The breaker's state is one field per model in the `model_health` hash:
absent = closed, `open:<until epoch s>` = open (half-open once `until` has passed),
`down` = forced down by an operator (never closed by outcomes).
"""

from __future__ import annotations

from enum import StrEnum

from router_worker.config import HealthSpec

FORCED_DOWN = "down"
OPEN_PREFIX = "open:"


class BreakerState(StrEnum):
    """Where a model's circuit breaker stands."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"
    DOWN = "down"


class Transition(StrEnum):
    """What an outcome batch does to a breaker."""

    KEEP = "keep"
    OPEN = "open"
    CLOSE = "close"


def state_of(value: str | None, now: float) -> BreakerState:
    """The breaker state a `model_health` field value means at `now`."""
    if value is None:
        return BreakerState.CLOSED
    if value == FORCED_DOWN:
        return BreakerState.DOWN
    if value.startswith(OPEN_PREFIX):
        try:
            until = float(value[len(OPEN_PREFIX):])
        except ValueError:
            return BreakerState.OPEN
        return BreakerState.OPEN if now < until else BreakerState.HALF_OPEN
    return BreakerState.CLOSED


def open_value(now: float, spec: HealthSpec) -> str:
    """The field value of a breaker opened at `now`."""
    return f"{OPEN_PREFIX}{now + spec.cooldown_s:.3f}"


def transition(
    value: str | None, recent_failures: int, successes: int, failures: int, now: float,
    spec: HealthSpec,
) -> Transition:
    """The breaker's next move given this batch's outcomes for one model.

    closed: `recent_failures` (within the window, this batch included) reaching the threshold
    opens it. open: outcomes of requests decided before it opened change nothing. half-open:
    the probe's failure re-opens it for another cooldown, its success closes it.
    """
    state = state_of(value, now)
    if state is BreakerState.CLOSED:
        return Transition.OPEN if recent_failures >= spec.failures else Transition.KEEP
    if state is BreakerState.HALF_OPEN:
        if failures > 0:
            return Transition.OPEN
        if successes > 0:
            return Transition.CLOSE
    return Transition.KEEP


# Read by the enrichment pipeline: every breaker's state, and an atomic claim of the single
# probe a half-open model lets through (SET NX, so one worker of many gets it).
# KEYS[1] = model_health hash; ARGV = now (s), probe key prefix, probe ttl (ms).
# Returns a flat list: model, "down" | "open" | "probe".
HEALTH_SCRIPT = """
local h = redis.call('HGETALL', KEYS[1])
local now = tonumber(ARGV[1])
local out = {}
for i = 1, #h, 2 do
  local model, value = h[i], h[i + 1]
  if value == 'down' then
    out[#out + 1] = model; out[#out + 1] = 'down'
  elseif string.sub(value, 1, 5) == 'open:' then
    local untl = tonumber(string.sub(value, 6))
    local state = 'open'
    if untl ~= nil and now >= untl then
      if redis.call('SET', ARGV[2] .. model .. ':' .. value, '1', 'NX', 'PX', ARGV[3]) then
        state = 'probe'
      end
    end
    out[#out + 1] = model; out[#out + 1] = state
  end
end
return out
"""

"""Spend windows and budgets: Redis counters per tenant/model/policy and day/week/month."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

DAY_S = 86400
# Counters outlive their window by a margin, so reports can still read the last one.
WINDOW_TTL_S = {"daily": 2 * DAY_S, "weekly": 8 * DAY_S, "monthly": 32 * DAY_S}


def window_ids(now: datetime) -> dict[str, str]:
    """The id of the day, ISO week and month `now` falls in (UTC)."""
    year, week, _ = now.isocalendar()
    return {"daily": now.strftime("d%Y%m%d"), "weekly": f"w{year}-{week:02d}",
            "monthly": now.strftime("m%Y%m")}


class BudgetLevel(StrEnum):
    """Where a tenant stands against its budget."""

    OK = "ok"
    WARNING = "budget_warning"
    EXCEEDED = "budget_exceeded"


@dataclass(frozen=True, slots=True)
class BudgetStatus:
    """Spend against the budget in one window."""

    spend_usd: float
    budget_usd: float
    ratio: float
    level: BudgetLevel


def budget_status(spend: float, budget: float | None, alert_ratio: float) -> BudgetStatus | None:
    """None when the tenant has no budget; a zero budget is exceeded from the start."""
    if budget is None:
        return None
    ratio = spend / budget if budget > 0 else float("inf")
    if ratio >= 1.0:
        level = BudgetLevel.EXCEEDED
    elif ratio >= alert_ratio:
        level = BudgetLevel.WARNING
    else:
        level = BudgetLevel.OK
    return BudgetStatus(spend, budget, ratio, level)

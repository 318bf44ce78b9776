"""Routing configs for tests: the packaged default with a few keys changed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from router_worker.config import RoutingConfig, load_config
from router_worker.settings import DEFAULT_CONFIG

TEST_TENANTS: dict[str, Any] = {
    "spendy": {"daily_budget_usd": 1.0, "on_budget_exceeded": "downgrade"},
    "strict": {"daily_budget_usd": 1.0, "on_budget_exceeded": "fail"},
    "limited": {"requests_per_s": 0.001, "burst": 3},
}
TEST_EXPERIMENT: dict[str, Any] = {
    "tenants": ["lab"], "assign_by": "request",
    "arms": [{"name": "control", "weight": 50, "policy": "normal"},
             {"name": "haiku", "weight": 50, "models": ["claude-haiku-3.5"]}],
}


def write_config(directory: Path, **changes: Any) -> Path:
    """The default config plus the test tenants, an experiment and `changes`, as a file."""
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    raw["tenants"].update(TEST_TENANTS)
    raw["experiments"] = {"lab-exp": TEST_EXPERIMENT}
    raw.update(changes)
    path = directory / "routing.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def config_with(directory: Path, **changes: Any) -> RoutingConfig:
    """`write_config`, loaded."""
    return load_config(write_config(directory, **changes))

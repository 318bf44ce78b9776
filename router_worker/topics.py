"""Topic names and their definitions; `topics/*.yaml` are loaded and applied from here."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from router_worker.errors import ConfigError

REQUESTED = "routing.requested.v1"
COMPLETED = "routing.completed.v1"
FAILED = "routing.failed.v1"
OUTCOME = "routing.outcome.v1"
ALERTS = "routing.alerts.v1"

TOPICS_DIR = Path(__file__).resolve().parent.parent / "topics"


@dataclass(frozen=True)
class TopicSpec:
    """One topic as code: name, partitions, replication and broker config."""

    name: str
    partitions: int
    replication_factor: int = 1
    config: dict[str, str] = field(default_factory=dict)


def _spec_from(raw: dict[str, Any], source: Path, default_partitions: int) -> TopicSpec:
    try:
        return TopicSpec(
            name=str(raw["name"]),
            partitions=int(raw.get("partitions", default_partitions)),
            replication_factor=int(raw.get("replication_factor", 1)),
            config={str(k): str(v) for k, v in (raw.get("config") or {}).items()},
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: bad topic definition {raw!r}: {exc}") from exc


def load_topic_specs(default_partitions: int, directory: Path = TOPICS_DIR) -> list[TopicSpec]:
    """Every topic defined in `directory` (one YAML file per topic)."""
    if not directory.is_dir():
        raise ConfigError(f"topic definitions not found in {directory}")
    specs = []
    for path in sorted(directory.glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        specs.append(_spec_from(raw, path, default_partitions))
    return specs

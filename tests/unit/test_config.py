"""Routing config validation: the shipped default loads; mistakes name the bad key."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from router_worker.config import load_config, parse_config
from router_worker.errors import ConfigError
from router_worker.settings import DEFAULT_CONFIG


@pytest.fixture
def raw() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(DEFAULT_CONFIG.read_text())
    return copy.deepcopy(loaded)


def test_shipped_default_config_is_valid() -> None:
    config = load_config(DEFAULT_CONFIG)
    assert config.version.startswith("cfg-")
    assert set(config.routing) == {"code", "math", "reasoning", "research", "creative", "chat",
                                   "summarize", "ops"}


def test_unknown_key_is_rejected_with_its_path(raw: dict[str, Any]) -> None:
    raw["models"]["gpt-4o-mini"]["cost_per_1k_inptu"] = 0.1
    with pytest.raises(ConfigError, match=r"models\.gpt-4o-mini\.cost_per_1k_inptu"):
        parse_config(raw)


def test_policy_naming_an_unknown_model_is_rejected(raw: dict[str, Any]) -> None:
    raw["policies"]["normal"]["models"].append("gpt-9")
    with pytest.raises(ConfigError, match=r"policies\.normal\.models: unknown model 'gpt-9'"):
        parse_config(raw)


def test_routing_table_must_cover_every_category(raw: dict[str, Any]) -> None:
    del raw["routing"]["ops"]
    with pytest.raises(ConfigError, match=r"routing\.ops: missing"):
        parse_config(raw)


def test_routing_cell_naming_unknown_policy_is_rejected(raw: dict[str, Any]) -> None:
    raw["routing"]["math"]["complex"] = "galaxy-brain"
    with pytest.raises(ConfigError, match=r"routing\.math\.complex: unknown policy"):
        parse_config(raw)


def test_negative_price_is_rejected(raw: dict[str, Any]) -> None:
    raw["models"]["o3"]["cost_per_1k_output"] = -1
    with pytest.raises(ConfigError, match=r"models\.o3\.cost_per_1k_output"):
        parse_config(raw)


def test_missing_default_tenant_is_rejected(raw: dict[str, Any]) -> None:
    del raw["tenants"]["default"]
    with pytest.raises(ConfigError, match=r"tenants\.default: missing"):
        parse_config(raw)


def test_unreadable_or_invalid_yaml_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_config_version_changes_with_content(raw: dict[str, Any], tmp_path: Path) -> None:
    first = tmp_path / "a.yaml"
    first.write_text(yaml.safe_dump(raw))
    raw["models"]["o3"]["cost_per_1k_output"] = 0.5
    second = tmp_path / "b.yaml"
    second.write_text(yaml.safe_dump(raw))
    assert load_config(first).version != load_config(second).version


@pytest.mark.parametrize(("enabled", "learned", "keyword_only"), [
    ("auto", True, False), (True, True, True), (False, False, False),
])
def test_the_decision_cache_is_on_for_a_learned_engine_unless_set(
    raw: dict[str, Any], enabled: object, learned: bool, keyword_only: bool,
) -> None:
    raw["cache"] = {"enabled": enabled}
    cache = parse_config(raw).cache
    assert cache.active(learned_engine=True) is learned
    assert cache.active(learned_engine=False) is keyword_only


def test_the_decision_cache_defaults_to_auto_and_refuses_other_words(
    raw: dict[str, Any],
) -> None:
    assert parse_config(raw).cache.enabled == "auto"
    raw["cache"] = {"enabled": "sometimes"}
    with pytest.raises(ConfigError, match=r"cache\.enabled"):
        parse_config(raw)

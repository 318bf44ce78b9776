"""docs/configuration.md, events.md and metrics.md are generated; this fails when they drift."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

from router_worker.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def _gen_docs() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "scripts" / "gen_docs.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_docs_are_up_to_date() -> None:
    for path, expected in _gen_docs().render_all().items():
        assert path.exists(), f"{path.relative_to(ROOT)} missing: run `make docs`"
        assert path.read_text() == expected, f"{path.relative_to(ROOT)} is stale: run `make docs`"


def test_every_setting_is_described_and_documented() -> None:
    text = (ROOT / "docs" / "configuration.md").read_text()
    for name, field in Settings.model_fields.items():
        assert field.description, f"Settings.{name} needs a description (it is the docs)"
        assert f"`ROUTER_{name.upper()}`" in text


def test_docs_links_resolve() -> None:
    for page in (ROOT / "docs").glob("*.md"):
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{page.name}: broken link {target}"

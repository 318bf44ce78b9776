"""router-worker: a Kafka-native stream processor that routes LLM requests to models."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("router-worker")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

if TYPE_CHECKING:
    import faust

__all__ = ["__version__", "app"]


def __getattr__(name: str) -> Any:
    # `faust -A router_worker worker` looks up `router_worker.app`; building the app lazily keeps
    # `import router_worker.events` (clients, tests, tools) free of Faust start-up cost.
    if name == "app":
        from router_worker.faust_app import get_app

        application: faust.App = get_app()
        return application
    raise AttributeError(name)

"""The peer reference for `router-worker bench`: a Quix Streams passthrough (optional).

`python -m router_worker.bench_peer BOOTSTRAP IN_TOPIC OUT_TOPIC GROUP [STATE_DIR]` runs a
stateless Quix Streams app that copies every record of IN_TOPIC to OUT_TOPIC as raw bytes,
until terminated. Quix creates a state directory even for a stateless app (`state/` in the
working directory unless STATE_DIR says where; the bench puts it in its run directory).
It runs as its own process: Quix's `Application.run` owns its loop and signal handlers. Needs
the `peers` extra (`pip install 'router-worker[peers]'`); the bench reports null without it.
"""

from __future__ import annotations

import importlib.util
import sys

# Librdkafka's group session; the embedded broker holds a JoinGroup for half of it.
_SESSION_TIMEOUT_MS = 6000


def available() -> str | None:
    """The installed Quix Streams version, or None when the package is absent."""
    if importlib.util.find_spec("quixstreams") is None:
        return None
    from importlib.metadata import version

    return version("quixstreams")


def main(argv: list[str]) -> None:
    from quixstreams import Application

    bootstrap, source, sink, group, *state_dir = argv
    app = Application(
        broker_address=bootstrap,
        state_dir=state_dir[0] if state_dir else "state",
        consumer_group=group,
        auto_offset_reset="earliest",
        auto_create_topics=False,
        loglevel="WARNING",
        consumer_extra_config={"session.timeout.ms": _SESSION_TIMEOUT_MS,
                               "heartbeat.interval.ms": 500},
    )
    records = app.dataframe(
        app.topic(source, key_deserializer="bytes", value_deserializer="bytes")
    )
    records.to_topic(app.topic(sink, key_serializer="bytes", value_serializer="bytes"))
    app.run()


if __name__ == "__main__":
    main(sys.argv[1:])

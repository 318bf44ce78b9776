"""The `router-worker` command: the Faust app's CLI plus our own commands."""

from __future__ import annotations

import importlib

import click

# Modules that export COMMANDS; optional ones (heavy extras) are skipped when missing.
_COMMAND_MODULES = (
    "router_worker.commands.admin",
    "router_worker.commands.request",
    "router_worker.commands.run",
    "router_worker.commands.bench",
    "router_worker.commands.sink",
    "router_worker.commands.classifier",
    "router_worker.commands.stats",
    "router_worker.commands.lifecycle",
)


def register_commands(group: click.Group) -> None:
    """Add every command module's COMMANDS to `group` (Faust's root group)."""
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        for command in module.COMMANDS:
            group.add_command(command)


def main() -> None:
    """Entry point of the `router-worker` console script."""
    from faust.cli.faust import cli

    from router_worker.faust_app import get_app

    register_commands(cli)
    get_app().main()

"""Run real worker processes (`python -m router_worker worker`) for integration tests."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import httpx

from router_worker.embedded import free_port


class WorkerProcess:
    """One `router-worker worker` subprocess with its own web port and log file."""

    def __init__(
        self, env: dict[str, str], workdir: Path, name: str = "worker",
        via_faust: bool = False,
    ) -> None:
        self.env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        self.workdir = workdir
        self.name = name
        self.port = free_port()
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        # `faust -A router_worker worker` must work exactly like `router-worker worker`
        self.program = (
            [sys.executable, "-m", "faust", "-A", "router_worker"] if via_faust
            else [sys.executable, "-m", "router_worker"]
        )

    def start(self) -> WorkerProcess:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [*self.program, "--datadir",
                 str(self.workdir / f"{self.name}-data"), "worker", "--web-port", str(self.port),
                 "-l", "warn"],
                env=self.env, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT,
            )
        return self

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Until /readyz answers 200 (the route agent has loaded its engine)."""
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient() as client:
            while time.monotonic() < deadline:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise AssertionError(f"{self.name} exited: {self.tail()}")
                try:
                    reply = await client.get(f"http://127.0.0.1:{self.port}/readyz", timeout=1)
                    if reply.status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.2)
        raise AssertionError(f"{self.name} not ready in {timeout}s: {self.tail()}")

    async def metrics(self) -> str:
        async with httpx.AsyncClient() as client:
            reply = await client.get(f"http://127.0.0.1:{self.port}/metrics", timeout=5)
            return reply.text

    def tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)


async def wait_rows(dsn: str, schema: str, expected: int, timeout: float = 60.0) -> int:
    """Poll routing_events until it holds `expected` rows (or time runs out); returns count."""
    deadline = time.monotonic() + timeout
    conn = await asyncpg.connect(dsn)
    try:
        count = 0
        while time.monotonic() < deadline:
            count = await conn.fetchval(f'SELECT count(*) FROM "{schema}".routing_events')
            if count >= expected:
                # let stragglers (duplicates would be a bug) arrive before the caller asserts
                await asyncio.sleep(0.5)
                return int(await conn.fetchval(
                    f'SELECT count(*) FROM "{schema}".routing_events'))
            await asyncio.sleep(0.2)
        return int(count)
    finally:
        await conn.close()

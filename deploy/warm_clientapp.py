"""A warm ``flwr-clientapp`` per SuperNode: tasks fork from one pre-imported interpreter.

Flower 1.41 runs every message in a new ``flwr-clientapp`` process (SuperNode -> SuperExec ->
``SubprocessExecutor``), and a ClientApp cannot serve a second task in one process
(``run_clientapp`` ends in ``flwr_exit``). Each message therefore paid a fresh interpreter plus
the imports of torch, Opacus, Flower and fedvault: about 4 s of CPU, on every client, every round.

Here a long-lived *warm* process per SuperNode imports all of that once and then waits on a
Unix socket (in a 0700 directory of its own). The SuperNode's environment puts a small shim named
``flwr-clientapp`` first on ``PATH``; SuperExec starts it exactly as it would start Flower's.
The shim (standard library only) hands its arguments, environment, working directory and its
stdin/stdout/stderr descriptors to the warm process (``SCM_RIGHTS``), which forks; the child
restores them and runs Flower's own ``flwr-clientapp`` entry point, so the task runs Flower's
code unchanged, isolated in its own process, and writes to the same log. The shim relays
signals to the child and exits with the child's exit code. When the warm process is not there
(not yet ready, stopped, crashed) the shim ``exec``s the real ``flwr-clientapp``: a task is never
lost, only slower.

Before any fork the warm process imports, shortens Flower's 1 s first retry of a message's objects
(which the SuperNode is usually still fetching when a warm task asks:
:mod:`fedvault.flower_timing`), and takes one training step of a tiny model with
torch limited to one thread (torch initialises its kernels lazily: about half a second a fresh
process would pay in its first round; one thread starts no thread pool, so every child creates
its own). Each child reseeds Python's, NumPy's and torch's default generators, which fork would
otherwise share between tasks.

    python -m fedvault.deploy.warm_clientapp SOCKET   # the warm process (start_warm_clientapp)
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedvault.deploy.processes import (
    PRIVATE_UMASK,
    ManagedProcess,
    ProcessError,
    executable,
    start_process,
    stop,
    wait_for_log,
)
from fedvault.flower_timing import shorten_pull_backoff

log = logging.getLogger(__name__)

READY = "warm ClientApp ready"
SHIM_NAME = "flwr-clientapp"
#: What every task needs, imported once before any fork (the last one for the built-in digits task).
PREIMPORTS = (
    "torch",
    "numpy",
    "opacus",
    "flwr.supernode.cli.flwr_clientapp",
    "fedvault.client.app",
    "sklearn.datasets",
)
_HEADER = struct.Struct("!I")
_MAX_REQUEST = 1 << 20

SHIM = '''#!{python} -S
"""flwr-clientapp for a fedvault SuperNode: runs the task in its warm ClientApp process
(fedvault.deploy.warm_clientapp), or as Flower's own flwr-clientapp when that is not there."""
import json, os, signal, socket, struct, sys

REAL, SOCKET = {real!r}, {socket!r}
argv = [REAL, *sys.argv[1:]]
try:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(SOCKET)
    request = json.dumps({{"argv": argv, "env": dict(os.environ), "cwd": os.getcwd()}}).encode()
    socket.send_fds(conn, [struct.pack("!I", len(request)) + request], [0, 1, 2])
    reply = conn.makefile("r")
    started = reply.readline().split()
    if not started or started[0] != "pid":
        raise OSError("no task started")
except OSError:
    os.execv(REAL, argv)
pid = int(started[1])


def relay(signum, _frame):
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(number, relay)
ended = reply.readline().split()
sys.exit(int(ended[1]) if ended and ended[0] == "exit" else 1)
'''


@dataclass
class WarmClientApp:
    """A running warm process started by :func:`start_warm_clientapp`."""

    process: ManagedProcess
    directory: Path  # 0700: the socket and the shim

    @property
    def bin_dir(self) -> Path:
        """Put this first on the SuperNode's ``PATH``."""
        return self.directory / "bin"

    def wait_ready(self, timeout: float) -> bool:
        """Whether the warm process finished its imports within ``timeout`` s (until then the
        shim falls back to a cold ``flwr-clientapp``)."""
        try:
            wait_for_log(self.process, READY, timeout)
        except ProcessError as err:
            log.warning("warm ClientApp not ready (%s); tasks start cold meanwhile", str(err).splitlines()[0])
            return False
        return True

    def stop(self) -> None:
        """Stop the warm process and the tasks it forked; remove its directory."""
        try:
            stop(self.process)
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)


def start_warm_clientapp(log_path: Path, env: dict[str, str]) -> WarmClientApp:
    """Start the warm process (logging to ``log_path``, with the SuperNode's ``env``) and write
    its shim. The socket lives in a new 0700 directory under the system temp dir (Unix socket paths
    are limited to about 100 bytes)."""
    directory = Path(tempfile.mkdtemp(prefix="fedvault-warm-"))
    socket_path = directory / "clientapp.sock"
    bin_dir = directory / "bin"
    bin_dir.mkdir(mode=0o700)
    shim = bin_dir / SHIM_NAME
    shim.write_text(SHIM.format(python=sys.executable, real=executable(SHIM_NAME), socket=str(socket_path)))
    shim.chmod(0o700)
    try:
        process = start_process(
            [sys.executable, "-m", "fedvault.deploy.warm_clientapp", str(socket_path)],
            name="warm ClientApp",
            log_path=log_path,
            env=env,
            umask=PRIVATE_UMASK,
        )
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return WarmClientApp(process, directory)


# ---- the warm process ----------------------------------------------------------------------


def _receive(conn: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """One request: a length-prefixed JSON object, with the shim's three standard descriptors."""
    data, fds, _, _ = socket.recv_fds(conn, _HEADER.size, 3)
    try:
        while len(data) < _HEADER.size:
            more = conn.recv(_HEADER.size - len(data))
            if not more:
                raise ValueError("connection closed in the header")
            data += more
        (length,) = _HEADER.unpack(data)
        if len(fds) != 3 or length > _MAX_REQUEST:
            raise ValueError(f"bad request ({len(fds)} descriptors, {length} bytes)")
        body = b""
        while len(body) < length:
            more = conn.recv(length - len(body))
            if not more:
                raise ValueError("connection closed in the request")
            body += more
        request = json.loads(body)
        if not (isinstance(request.get("argv"), list) and isinstance(request.get("env"), dict)):
            raise ValueError("request without argv and env")
    except (ValueError, OSError):
        for fd in fds:
            os.close(fd)
        raise
    return request, fds


def _run_task(request: dict[str, Any], fds: list[int]) -> None:
    """In the forked child: become the shim's ``flwr-clientapp`` and run Flower's entry point."""
    code = 1
    try:
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        for number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(number, signal.SIG_DFL)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request.get("cwd") or "/")
        sys.argv = [str(arg) for arg in request["argv"]]
        _reseed()
        from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

        flwr_clientapp()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    except BaseException:  # noqa: BLE001 - the task's own error, reported on its stderr
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(code)


def _warm_up() -> None:
    """One single-threaded SGD step of a tiny model: torch's lazily built kernels (forward, autograd,
    optimizer) are ready in every child; the thread-count setting is restored for the children."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for _ in range(2):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(torch.randn(4, 8)), torch.tensor([0, 1, 0, 1])).backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)


def _reseed() -> None:
    import random

    import numpy as np
    import torch

    random.seed()
    np.random.seed(int.from_bytes(os.urandom(4), "big"))
    torch.seed()


def _exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code  # killed by a signal: the shell's 128 + signal number


def serve(socket_path: Path) -> None:
    """Import once, then fork one task per connection until SIGTERM/SIGINT or its parent dies (its
    tasks are then stopped too); reap and report exits."""
    started = time.perf_counter()
    for name in PREIMPORTS:
        __import__(name)
    shorten_pull_backoff()
    _warm_up()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(socket_path))
    os.chmod(socket_path, 0o600)
    listener.listen(64)
    parent = os.getppid()
    stopping: list[int] = []
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda signum, _frame: stopping.append(signum))
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    tasks: dict[int, tuple[socket.socket, float]] = {}
    _say(f"{READY} (pid {os.getpid()}; imports took {time.perf_counter() - started:.1f} s)")
    try:
        while not stopping:
            for _ in selector.select(timeout=0.2):
                conn, _ = listener.accept()
                try:
                    request, fds = _receive(conn)
                except (ValueError, OSError) as exc:
                    _say(f"refused a request: {exc}")
                    conn.close()
                    continue
                sys.stdout.flush()
                pid = os.fork()
                if pid == 0:
                    selector.close()
                    listener.close()
                    conn.close()
                    _run_task(request, fds)
                for fd in fds:
                    os.close(fd)
                conn.sendall(f"pid {pid}\n".encode())
                tasks[pid] = (conn, time.monotonic())
                _say(f"task pid {pid} started")
            _reap(tasks)
            if os.getppid() != parent:  # the SuperNode's supervisor died without stopping us (SIGKILL)
                _say("parent process gone: stopping")
                break
    finally:
        for pid in tasks:
            _kill(pid)
        listener.close()
        socket_path.unlink(missing_ok=True)


def _say(line: str) -> None:
    """One timestamped line in the warm process' log."""
    now = time.time()
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(now))}.{int(now % 1 * 1000):03d} {line}", flush=True)


def _reap(tasks: dict[int, tuple[socket.socket, float]]) -> None:
    while tasks:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            return
        conn, started = tasks.pop(pid, (None, time.monotonic()))
        code = _exit_code(status)
        _say(f"task pid {pid} exited {code} after {time.monotonic() - started:.2f} s")
        if conn is not None:
            try:
                conn.sendall(f"exit {code}\n".encode())
            except OSError:
                pass  # the shim is gone; its parent (SuperExec) learns the task's end from Flower
            conn.close()


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m fedvault.deploy.warm_clientapp SOCKET")
    serve(Path(sys.argv[1]))

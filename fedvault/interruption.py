"""Clean interruption of a long command: SIGINT or SIGTERM stop it with one line, not pages of tracebacks.

While an engine (Ray, Flower) shuts down after a signal, its threads and workers print the errors of
tasks cut short. :func:`interruptible` turns the first SIGINT/SIGTERM into :class:`Interrupted` in
the main thread and, at that moment, points the process's stderr (file descriptor 2) at a log file,
so those tracebacks are kept there instead of reaching the terminal; :func:`run_interruptible` runs
the work in a thread so that no engine can take the main thread's handlers. The caller then reports what
was kept (:meth:`Interrupted.tell`, on a duplicate of the original stderr) and ends the process
(:meth:`Interrupted.exit`).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import NoReturn, TypeVar

SIGNALS = (signal.SIGINT, signal.SIGTERM)
T = TypeVar("T")


class Interrupted(BaseException):  # like KeyboardInterrupt: an engine's ``except Exception`` lets it through
    """A SIGINT or SIGTERM arrived; ``exit_code`` is the shell's 128 + signal number."""

    def __init__(self, signum: int, terminal: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.exit_code = 128 + signum
        self.terminal = terminal

    def tell(self, line: str) -> None:
        """Write ``line`` to the terminal the process had before the interruption."""
        os.write(self.terminal, (line.rstrip("\n") + "\n").encode())

    def exit(self) -> NoReturn:
        """End the process now with :attr:`exit_code`: an engine's non-daemon threads would keep it alive.
        Safe for what a run kept: every finished round, checkpoint and ledger line is already on disk."""
        sys.stdout.flush()
        os._exit(self.exit_code)


@contextmanager
def interruptible(log_path: Path) -> Iterator[None]:
    """Within the block, SIGINT/SIGTERM raise :class:`Interrupted`; stderr then goes to ``log_path``
    (appended; ``/dev/null`` when its folder does not exist yet). Handlers are restored on exit; stderr
    stays on the log after an interruption, for what the engine prints while it shuts down."""
    terminal = os.dup(2)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the clean-up
        target = log_path if log_path.parent.is_dir() else Path(os.devnull)
        log = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log, 2)
        os.close(log)
        raise Interrupted(signum, terminal)

    previous = {sig: signal.signal(sig, on_signal) for sig in SIGNALS}
    try:
        yield
    except Interrupted:
        raise  # the caller reports on the terminal descriptor
    else:
        os.close(terminal)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_interruptible(work: Callable[[], T], log_path: Path) -> T:
    """``work()`` in a worker thread while the main thread, which receives signals, waits for it.

    Engines started inside ``work`` (Ray) then cannot replace the main thread's signal handlers
    (they install theirs only from the main thread), so :func:`interruptible` keeps the first say.
    ``work``'s result is returned and its exception re-raised here."""
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["value"] = work()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread below
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="fedvault-run", daemon=True)
    with interruptible(log_path):
        thread.start()
        while thread.is_alive():
            thread.join(0.2)
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]

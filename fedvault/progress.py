"""What a run shows while it goes: plain lines anywhere, plus one live status line on a terminal.

Plain lines are the same wherever the output goes: the round lines (stdout) and, every
:data:`WAIT_REPORT_SECONDS` of a wait, a line saying what the server waits for (the ``fedvault``
logger). On a terminal (``live``) the waits are shown instead in one status line at the bottom of
stderr, redrawn every :data:`REFRESH_SECONDS`: the round, the run's elapsed time, the ETA (median of
the finished rounds' seconds x rounds left, minus the current round's time so far) and the wait.
It is cleared before every plain line and when the run ends (:meth:`Progress.running` and
:meth:`Progress.close` stop it in ``finally``), so a pipe or CI log never gets an escape code and
an interrupted run leaves the terminal clean. ``quiet`` prints neither round lines nor waits.
"""

from __future__ import annotations

import logging
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

WAIT_REPORT_SECONDS = 10.0
REFRESH_SECONDS = 0.5
_CLEAR = "\r\x1b[2K"  # carriage return + erase the line
log = logging.getLogger("fedvault")


def is_terminal(stream: TextIO) -> bool:
    """``stream`` is an interactive terminal that understands escape codes."""
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and os.environ.get("TERM", "") != "dumb"


def clock_text(seconds: float) -> str:
    """``m:ss`` or ``h:mm:ss``."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Wait:
    """One wait: call :meth:`update` with how many of what it waits for are in, at every poll."""

    def __init__(self, progress: Progress, describe: Callable[[int, float], str], say_now: bool) -> None:
        self.progress, self.describe = progress, describe
        self.started = progress.clock()
        self.next_say = self.started if say_now else self.started + progress.every

    def update(self, done: int) -> None:
        now = self.progress.clock()
        text = self.describe(done, now - self.started)
        if self.progress.live:
            self.progress.waiting = text
        elif not self.progress.quiet and now >= self.next_say:
            log.info("%s", text)
            self.next_say = now + self.progress.every

    def __enter__(self) -> Wait:
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.waiting = None


class Progress:
    """Round lines, waits and (``live``: by default when stderr is a terminal) the status line.

    Waits log every ``every`` seconds; the live line is redrawn every ``refresh`` seconds.
    ``out`` defaults to ``sys.stdout`` as it is at each write. Without ``status`` the live line draws
    on a duplicate of stderr's descriptor, so it can still be cleared after an interruption pointed
    descriptor 2 at a log (:mod:`fedvault.interruption`).
    """

    def __init__(
        self,
        *,
        quiet: bool = False,
        live: bool | None = None,
        out: TextIO | None = None,
        status: TextIO | None = None,
        every: float = WAIT_REPORT_SECONDS,
        refresh: float = REFRESH_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.quiet, self.every, self.refresh, self.clock = quiet, every, refresh, clock
        self._out = out
        self.live = not quiet and (is_terminal(status or sys.stderr) if live is None else live)
        self._status = status
        self.num_rounds, self.done_round = 0, 0
        self.waiting: str | None = None
        self.round_seconds: list[float] = []
        self.run_started = self.round_started = clock()
        self._drawn = False
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    @property
    def out(self) -> TextIO:
        return self._out or sys.stdout

    # ---- what the run tells it -------------------------------------------------------------

    @contextmanager
    def running(self, num_rounds: int, first_round: int = 1) -> Iterator[Progress]:
        """Rounds ``first_round``..``num_rounds`` are under way; the live line shows while in the block."""
        self.num_rounds, self.done_round = num_rounds, first_round - 1
        self.run_started = self.round_started = self.clock()
        if self.live:
            self._stop.clear()
            self._ticker = threading.Thread(target=self._tick, name="fedvault-progress", daemon=True)
            self._ticker.start()
            for handler in log.handlers:  # the fedvault loggers' lines all pass its handlers
                handler.addFilter(self._before_log)
        try:
            yield self
        finally:
            self.close()

    def line(self, text: str) -> None:
        """Print a plain line on ``out`` (nothing when ``quiet``), the status line out of its way."""
        if self.quiet:
            return
        with self._lock:
            self._clear()
            print(text, file=self.out, flush=True)

    def round_finished(self, server_round: int, seconds: float) -> None:
        """Round ``server_round`` took ``seconds``; round 0 (the initial model's evaluation) is not a round's time."""
        with self._lock:
            self.done_round, self.round_started = server_round, self.clock()
            if server_round > 0:
                self.round_seconds.append(seconds)

    def clients_wait(self, server_round: int, wanted: int, timeout: float) -> Wait:
        """The wait for ``wanted`` clients to connect; its first line comes at once."""
        return Wait(
            self,
            lambda n, s: (
                f"round {server_round}: waiting for {wanted} clients, {n} connected ({s:.0f} s of up to {timeout:g} s)"
            ),
            say_now=True,
        )

    def replies_wait(self, label: str, total: int, timeout: float | None) -> Wait:
        """The wait for ``total`` replies (``label``: ``round 3``, ``round 3 evaluate``)."""
        limit = "no time limit" if timeout is None else f"up to {timeout:g} s"
        setup = "" if self.round_seconds else " (the first round includes the clients' set-up: data, DP)"
        return Wait(self, lambda n, s: f"{label}: {n}/{total} replies after {s:.0f} s, waiting {limit}{setup}", False)

    # ---- the live line ---------------------------------------------------------------------

    def status_text(self) -> str:
        """``round 3/10  elapsed 1:02  ETA 2:40  <what it waits for>``."""
        with self._lock:
            now = self.clock()
            parts = [
                f"round {min(self.done_round + 1, self.num_rounds)}/{self.num_rounds}",
                f"elapsed {clock_text(now - self.run_started)}",
            ]
            left = self.num_rounds - self.done_round
            if self.round_seconds and left > 0:
                eta = statistics.median(self.round_seconds) * left - (now - self.round_started)
                parts.append(f"ETA {clock_text(max(eta, 0.0))}")
            if self.waiting:
                parts.append(self.waiting)
            return "  ".join(parts)

    def draw(self) -> None:
        """Redraw the status line (live only), cut to the terminal's width."""
        if not self.live:
            return
        with self._lock:
            if self._status is None:  # the terminal itself, whatever descriptor 2 is later pointed at
                self._status = os.fdopen(os.dup(sys.stderr.fileno()), "w", encoding="utf-8", errors="replace")
            width = _width(self._status)
            self._status.write(_CLEAR + self.status_text()[: width - 1])
            self._status.flush()
            self._drawn = True

    def close(self) -> None:
        """Stop the live line and clear it (safe to call again)."""
        self._stop.set()
        if self._ticker is not None and self._ticker is not threading.current_thread():
            self._ticker.join()
        self._ticker = None
        for handler in log.handlers:
            handler.removeFilter(self._before_log)
        with self._lock:
            self._clear()

    def _clear(self) -> None:
        if self._drawn and self._status is not None:
            self._status.write(_CLEAR)
            self._status.flush()
            self._drawn = False

    def _before_log(self, record: logging.LogRecord) -> bool:
        """A fedvault log line is about to print: take the status line out of its way."""
        with self._lock:
            self._clear()
        return True

    def _tick(self) -> None:
        while not self._stop.wait(self.refresh):
            self.draw()


def _width(stream: TextIO) -> int:
    """The terminal's columns; 80 when it does not say (a pseudo-terminal may report 0)."""
    try:
        return os.get_terminal_size(stream.fileno()).columns or 80
    except (AttributeError, OSError, ValueError):
        return 80


__all__ = ["REFRESH_SECONDS", "WAIT_REPORT_SECONDS", "Progress", "Wait", "clock_text", "is_terminal"]

"""Showing fedvault's progress: the library only logs to ``logging.getLogger("fedvault")``.

No fedvault module adds a handler or changes a level on import; the application decides what is
shown. The CLI and notebooks call :func:`show_progress`, which attaches one stream handler to the
``fedvault`` logger (idempotently: calling it again only changes the level).
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

LOGGER_NAME = "fedvault"


class _ProgressHandler(logging.StreamHandler):
    """The handler :func:`show_progress` attaches (recognised so that it is attached once).

    Without an explicit stream it writes to whatever ``sys.stderr`` is at each record, so it keeps
    working when a notebook kernel or a test harness replaces ``sys.stderr``.
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__(stream)
        self.follow_stderr = stream is None

    def emit(self, record: logging.LogRecord) -> None:
        if self.follow_stderr:
            self.stream = sys.stderr
        super().emit(record)


def show_progress(level: int | str = logging.INFO, stream: TextIO | None = None) -> logging.Logger:
    """Print fedvault's log lines at ``level`` and above as plain messages on ``stream`` (stderr).

    The ``fedvault`` logger stops propagating to the root logger while the handler is attached, so
    a notebook or an application with its own root handler does not print each line twice.
    """
    logger = logging.getLogger(LOGGER_NAME)
    handler = next((h for h in logger.handlers if isinstance(h, _ProgressHandler)), None)
    if handler is None:
        handler = _ProgressHandler(stream)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    elif stream is not None:
        handler.follow_stderr = False
        handler.setStream(stream)
    logger.setLevel(level)
    logger.propagate = False
    return logger


def hide_progress() -> None:
    """Undo :func:`show_progress`: remove its handler, reset the level, propagate to the root again."""
    logger = logging.getLogger(LOGGER_NAME)
    for handler in [h for h in logger.handlers if isinstance(h, _ProgressHandler)]:
        logger.removeHandler(handler)
    logger.setLevel(logging.NOTSET)
    logger.propagate = True


__all__ = ["LOGGER_NAME", "hide_progress", "show_progress"]

"""A run directory: resolved config, per-round metrics, summary, final model, plots.

Files are written atomically (temp file + rename) or appended one fsync'd line at a time, so a
crash never leaves a half-written file and never loses a finished round.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import tomli_w

CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
MODEL_FILE = "model.pt"


def atomic_write(path: Path, write: Callable[[IO[bytes]], None], mode: int = 0o644) -> None:
    """Write ``path`` through a temp file in the same folder, then rename it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (POSIX: fsync the directory itself)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def default_run_dir(task: str, root: str | Path = "runs") -> Path:
    """``runs/<YYYYmmdd-HHMMSS>-<task>``, with a suffix if that name is taken."""
    stem = f"{time.strftime('%Y%m%d-%H%M%S')}-{task.replace(':', '_').replace('/', '_')}"
    path = Path(root) / stem
    suffix = 1
    while path.exists():
        suffix += 1
        path = Path(root) / f"{stem}-{suffix}"
    return path


class RunDirectory:
    """Reads and writes the files of one run."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def create(self, flat_config: dict[str, Any]) -> RunDirectory:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path / CONFIG_FILE, lambda fh: fh.write(tomli_w.dumps(_nest(flat_config)).encode()))
        return self

    def append_round(self, record: dict[str, Any]) -> None:
        with open(self.path / METRICS_FILE, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def rounds(self) -> list[dict[str, Any]]:
        path = self.path / METRICS_FILE
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write(self.path / SUMMARY_FILE, lambda fh: fh.write(json.dumps(summary, indent=2, sort_keys=True).encode()))

    def summary(self) -> dict[str, Any]:
        return json.loads((self.path / SUMMARY_FILE).read_text(encoding="utf-8"))

    def save_model(self, state_dict: dict) -> None:
        import torch

        atomic_write(self.path / MODEL_FILE, lambda fh: torch.save(state_dict, fh))


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1}`` -> ``{"a": {"b": 1}}`` so the TOML reads as tables."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested

"""A run directory: resolved config, per-round metrics, summary, final model, plots.

Files are written through :mod:`fedvault.atomic`, so a crash never leaves a half-written file
and never loses a finished round.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import tomli_w

from fedvault.atomic import append_line, atomic_write
from fedvault.errors import FedvaultError

CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
MODEL_FILE = "model.pt"
IDENTITY_DIR = "identity"  # a simulation's server identity key pair (fedvault.server.sealing)


def default_run_dir(task: str, root: str | Path = "runs") -> Path:
    """``runs/<YYYYmmdd-HHMMSS>-<task>``, with a suffix if that name is taken."""
    stem = f"{time.strftime('%Y%m%d-%H%M%S')}-{task.replace(':', '_').replace('/', '_')}"
    path = Path(root) / stem
    suffix = 1
    while path.exists():
        suffix += 1
        path = Path(root) / f"{stem}-{suffix}"
    return path


class RunDirectoryError(FedvaultError, ValueError):
    """A run directory that cannot be used as asked (it holds another run, or no run to resume)."""


def claim_run_dir(path: str | Path, *, resume: bool, overwrite: bool = False) -> Path | None:
    """Make ``path`` safe for a run; returns where an overwritten run was moved, else None.

    A directory that already holds files is refused (nothing of a finished run is ever mixed with
    another run) unless ``resume`` continues the run in it, or ``overwrite`` first moves it aside to
    ``<name>.replaced-<YYYYmmdd-HHMMSS>`` (nothing is deleted). Resuming needs its ``config.toml``.
    """
    path = Path(path)
    if resume:
        if not (path / CONFIG_FILE).is_file():
            raise RunDirectoryError(f"resume: {path} holds no run to continue (no {CONFIG_FILE})")
        return None
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return None
    if not overwrite:
        raise RunDirectoryError(
            f"{path} already holds a run: continue it with --set resume=true, choose a new --out, "
            "or pass --overwrite to move the old run aside"
        )
    aside = path.with_name(f"{path.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    suffix = 1
    while aside.exists():
        suffix += 1
        aside = path.with_name(f"{path.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{suffix}")
    path.rename(aside)
    return aside


class RunDirectory:
    """Reads and writes the files of one run."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def create(self, flat_config: dict[str, Any]) -> RunDirectory:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path / CONFIG_FILE, lambda fh: fh.write(tomli_w.dumps(_nest(flat_config)).encode()))
        return self

    def append_round(self, record: dict[str, Any]) -> None:
        append_line(self.path / METRICS_FILE, json.dumps(record, sort_keys=True))

    def rounds(self) -> list[dict[str, Any]]:
        """The per-round records ([] before the first); a line that is not a JSON record raises naming it."""
        path = self.path / METRICS_FILE
        if not path.exists():
            return []
        records = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise RunDirectoryError(f"{path} line {number} is not JSON: {exc.msg}") from None
            if not isinstance(record, dict) or not isinstance(record.get("round"), int):
                raise RunDirectoryError(f"{path} line {number} is not a round record (no integer 'round')")
            records.append(record)
        return records

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write(
            self.path / SUMMARY_FILE, lambda fh: fh.write(json.dumps(summary, indent=2, sort_keys=True).encode())
        )

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

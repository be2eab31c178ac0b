"""Checkpoint files of a run: ``<run-dir>/checkpoints/round-NNNN.npz``, one per finished round.

Format (version 1): one NumPy ``.npz`` archive (a ZIP file; every member carries a CRC-32 that
``np.load`` checks when it reads it), loaded with ``allow_pickle=False``:

* ``arrays/<name>``  the global model arrays, in model order;
* ``state/<name>``   the strategy state (:func:`fedvault.strategies.state.strategy_state`);
* ``meta``           a 0-d string array holding JSON: format version, round, the names of the
  arrays and state entries in order, the RNG state, the ledger position and ``extra``.

Writes are atomic: the archive goes to a temp file in the same folder, is fsync'd, renamed into
place, and the folder is fsync'd, so a crash leaves either the previous set of checkpoints or the
new one, never a half-written ``round-*.npz``. The newest ``keep`` (default 3) are kept.

A damaged newest checkpoint is an error naming the file, not a silent fall-back to the previous
one: resuming from an older round re-runs rounds whose privacy spend is already in the ledger, so
that choice is left to the user (move the damaged file away to resume from the one before).
"""

from __future__ import annotations

import json
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedvault.atomic import atomic_write, fsync_dir
from fedvault.errors import FedvaultError

CHECKPOINT_DIR = "checkpoints"
FORMAT_VERSION = 1
DEFAULT_KEEP = 3
_ARRAYS, _STATE, _META = "arrays/", "state/", "meta"
_NAME = re.compile(r"^round-(\d{4,})\.npz$")


class CheckpointError(FedvaultError, RuntimeError):
    """A checkpoint cannot be written, or the newest one cannot be read."""


@dataclass
class Checkpoint:
    """Everything a resumed run needs from the last finished round."""

    round: int  # last finished round (0: only the initial model was evaluated)
    arrays: dict[str, np.ndarray]  # global model arrays, in model order
    strategy_state: dict[str, Any]  # npz-friendly (fedvault.strategies.state.strategy_state)
    rng_state: dict[str, Any]  # JSON-able RNG state (e.g. random.getstate() as lists)
    ledger_entries: int  # privacy-ledger entries the run had when this round finished
    extra: dict[str, Any] = field(default_factory=dict)  # JSON-able extras


def checkpoint_path(run_dir: str | Path, server_round: int) -> Path:
    """``<run_dir>/checkpoints/round-NNNN.npz``."""
    return Path(run_dir) / CHECKPOINT_DIR / f"round-{server_round:04d}.npz"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoint files of ``run_dir`` as ``(round, path)``, oldest first."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def save_checkpoint(run_dir: str | Path, ckpt: Checkpoint, keep: int = DEFAULT_KEEP) -> Path:
    """Write ``ckpt`` atomically as ``checkpoints/round-NNNN.npz``; keep the newest ``keep``.

    Raises :class:`CheckpointError` if a field cannot be stored without pickling (object
    arrays, non-JSON ``rng_state``/``extra``) or ``keep`` < 1.
    """
    if keep < 1:
        raise CheckpointError(f"checkpoint keep must be >= 1, got {keep}")
    if ckpt.round < 0:
        raise CheckpointError(f"checkpoint round must be >= 0, got {ckpt.round}")
    members = {**_members(_ARRAYS, ckpt.arrays, "arrays"), **_members(_STATE, ckpt.strategy_state, "strategy_state")}
    meta = {
        "format": FORMAT_VERSION,
        "round": int(ckpt.round),
        "arrays": list(ckpt.arrays),
        "state": list(ckpt.strategy_state),
        "rng_state": ckpt.rng_state,
        "ledger_entries": int(ckpt.ledger_entries),
        "extra": ckpt.extra,
    }
    try:
        members[_META] = np.array(json.dumps(meta, sort_keys=True, allow_nan=False))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint of round {ckpt.round}: rng_state/extra not JSON-able ({err})") from None
    path = checkpoint_path(run_dir, ckpt.round)
    path.parent.mkdir(parents=True, exist_ok=True)
    # allow_pickle given explicitly so no member name can bind it; _members already refused object arrays
    atomic_write(path, lambda fh: np.savez(fh, allow_pickle=False, **members))
    fsync_dir(path.parent)
    for _, old in list_checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read one checkpoint file; :class:`CheckpointError` naming it if it is damaged."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            meta = json.loads(str(archive[_META]))
            if meta.get("format") != FORMAT_VERSION:
                raise CheckpointError(f"checkpoint {path}: unknown format {meta.get('format')!r}")
            return Checkpoint(
                round=int(meta["round"]),
                arrays={name: archive[_ARRAYS + name] for name in meta["arrays"]},
                strategy_state={name: archive[_STATE + name] for name in meta["state"]},
                rng_state=meta["rng_state"],
                ledger_entries=int(meta["ledger_entries"]),
                extra=meta["extra"],
            )
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"checkpoint {path} is damaged or incomplete ({type(err).__name__}: {err})") from None


def load_latest_checkpoint(run_dir: str | Path) -> Checkpoint | None:
    """The newest checkpoint of ``run_dir``, or None if it has none.

    A damaged newest file raises :class:`CheckpointError` naming it (and the previous file, if
    any, to fall back to by moving the damaged one away); see the module docstring for why.
    """
    found = list_checkpoints(run_dir)
    if not found:
        return None
    try:
        return load_checkpoint(found[-1][1])
    except CheckpointError as err:
        if len(found) > 1:
            raise CheckpointError(f"{err}; move it away to resume from {found[-2][1].name} instead") from None
        raise


def _members(prefix: str, values: dict[str, Any], what: str) -> dict[str, np.ndarray]:
    """``{prefix + name: array}``, refusing anything np.load could only read back by unpickling."""
    out = {}
    for name, value in values.items():
        array = np.asarray(value)
        if array.dtype.hasobject:
            raise CheckpointError(f"checkpoint {what}[{name!r}] is an object array (not storable without pickle)")
        out[prefix + name] = array
    return out

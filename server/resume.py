"""Checkpoint after every finished round and resume from the last one (Flower has no resume,
flwr issue #599).

A checkpoint holds the global arrays, the round loop's ``state_dict()`` (the strategy's state, e.g.
FedAdam moments or SCAFFOLD's control variate, including a wrapper's own such as client-level DP's
clip norm; the clients known to be out of budget; a grid wrapper's state, e.g. the clock's adaptive
deadline), the last finished round, Python's RNG state
(Flower's node sampling uses it) and the privacy ledger position. It is written after the round's
metrics line, so a crash between the two re-runs that round; on resume the metrics file is cut
back to the checkpoint's round (the ledger is never cut: a spend that happened stays recorded).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import IO

import numpy as np
from flwr.app import ArrayRecord

from fedvault.atomic import atomic_write
from fedvault.errors import ConfigError
from fedvault.privacy.ledger import LEDGER_FILENAME, read_ledger
from fedvault.rundir import METRICS_FILE, RunDirectory
from fedvault.server.anchoring import ANCHOR_KEY
from fedvault.server.checkpoint import Checkpoint, load_latest_checkpoint, save_checkpoint
from fedvault.server.rounds import RoundLoop
from fedvault.strategies.arrays import to_ndarrays, to_record


def _ledger_entries(run_dir: Path) -> int:
    path = run_dir / LEDGER_FILENAME
    return len(read_ledger(path).entries) if path.exists() else 0


def checkpoint_round(
    run_dir: Path, loop: RoundLoop, server_round: int, arrays: ArrayRecord, ledger_anchor: dict | None = None
) -> None:
    """Write the checkpoint of a finished round (atomically, by the checkpoint module), with the
    round's signed ledger anchor when there is one (:mod:`fedvault.server.anchoring`)."""
    rng = random.getstate()
    state = loop.state_dict()
    save_checkpoint(
        run_dir,
        Checkpoint(
            round=server_round,
            arrays=to_ndarrays(arrays),
            strategy_state=state["strategy"],
            rng_state={"python": [rng[0], list(rng[1]), rng[2]]},
            ledger_entries=_ledger_entries(run_dir),
            extra={
                "exhausted": state["exhausted"],
                "grid": state["grid"],
                **({ANCHOR_KEY: ledger_anchor} if ledger_anchor else {}),
            },
        ),
    )


def restore(run_dir: RunDirectory, loop: RoundLoop, like: ArrayRecord) -> tuple[ArrayRecord, int]:
    """Load the latest checkpoint into ``loop``; returns (global arrays, first round to run)."""
    ckpt = load_latest_checkpoint(run_dir.path)
    if ckpt is None:
        raise ConfigError(f"resume: no checkpoint in {run_dir.path} (nothing finished yet; start a new run)")
    loop.load_state_dict(
        {"strategy": ckpt.strategy_state, "exhausted": ckpt.extra.get("exhausted", []), "grid": ckpt.extra.get("grid")}
    )
    version, internal, gauss = ckpt.rng_state["python"]
    random.setstate((version, tuple(internal), gauss))
    kept = [r for r in run_dir.rounds() if r["round"] <= ckpt.round]
    lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept).encode()

    def write(fh: IO[bytes]) -> None:
        fh.write(lines)

    atomic_write(run_dir.path / METRICS_FILE, write)
    arrays = to_record({k: np.asarray(v) for k, v in ckpt.arrays.items()}, like=to_ndarrays(like))
    return arrays, ckpt.round + 1

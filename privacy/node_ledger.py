"""A client's node-local privacy ledger in SQLite, so a restarted client continues its epsilon.

Flower ClientApps are ephemeral and keep no state across a node restart (flwr issue #2216):
an in-memory accountant would start again from zero and under-count. This ledger stores each
DP event keyed by ``(run_key, client_id, round)`` in a SQLite file on the node; the client
derives epsilon from :meth:`NodeLedger.events` and records a spend with :meth:`NodeLedger.record`,
committed (``synchronous=FULL``) BEFORE it releases the update.

Several processes may share the file: WAL journal mode, a busy timeout, and ``BEGIN IMMEDIATE``
transactions that take the write lock before reading. Recording is idempotent per round: the
identical event again is a no-op (returns False), a different event for a recorded round raises
:class:`NodeLedgerConflictError` so a spend is never silently replaced. The caller must not
release a second, freshly noised update for a round that was already recorded. WAL needs a
local file system (not NFS).
"""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path

from fedvault.errors import FedvaultError
from fedvault.privacy.events import DPEvent
from fedvault.privacy.ledger import canonical_json

_SCHEMA = """
CREATE TABLE IF NOT EXISTS dp_events (
    run_key     TEXT    NOT NULL,
    client_id   TEXT    NOT NULL,
    round       INTEGER NOT NULL,
    event       TEXT    NOT NULL,
    recorded_at TEXT    NOT NULL,
    PRIMARY KEY (run_key, client_id, round)
)
"""


class NodeLedgerError(FedvaultError, RuntimeError):
    """The node ledger file cannot be used, or a record call is invalid."""


class NodeLedgerConflictError(NodeLedgerError):
    """A different event is already recorded for this (run_key, client_id, round)."""


class NodeLedger:
    """DP events of the clients on one node, in the SQLite file ``path`` (created if missing)."""

    def __init__(self, path: str | Path, busy_timeout_s: float = 30.0) -> None:
        self._path = Path(path)
        self._timeout = busy_timeout_s
        self._path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as con:
            try:
                con.execute("PRAGMA journal_mode=WAL")
                con.execute(_SCHEMA)
            except sqlite3.Error as exc:
                raise NodeLedgerError(f"cannot initialise node privacy ledger {self._path}: {exc}") from None

    @property
    def path(self) -> Path:
        return self._path

    def _connect(self) -> closing[sqlite3.Connection]:
        try:
            con = sqlite3.connect(self._path, timeout=self._timeout, isolation_level=None)
            con.execute("PRAGMA synchronous=FULL")
        except sqlite3.Error as exc:
            raise NodeLedgerError(f"cannot open node privacy ledger {self._path}: {exc}") from None
        return closing(con)

    def record(self, run_key: str, client_id: str, event: DPEvent) -> bool:
        """Commit ``event`` for ``(run_key, client_id, event.round)``; False if already recorded as is."""
        for name, value in (("run_key", run_key), ("client_id", client_id)):
            if not isinstance(value, str) or not value:
                raise NodeLedgerError(f"node ledger {name} must be a non-empty string, got {value!r}")
        if not isinstance(event, DPEvent):
            raise NodeLedgerError(f"node ledger records DPEvent, got {type(event).__name__}")
        if event.party != client_id:
            raise NodeLedgerError(f"event party {event.party!r} does not match client_id {client_id!r}")
        key = (run_key, client_id, event.round)
        with self._connect() as con:
            try:
                con.execute("BEGIN IMMEDIATE")
                row = con.execute(
                    "SELECT event FROM dp_events WHERE run_key = ? AND client_id = ? AND round = ?", key
                ).fetchone()
                if row is None:
                    con.execute(
                        "INSERT INTO dp_events VALUES (?, ?, ?, ?, ?)",
                        (*key, canonical_json(event.to_dict()).decode(), datetime.now(UTC).isoformat()),
                    )
                con.execute("COMMIT")
            except sqlite3.Error as exc:
                if con.in_transaction:
                    con.execute("ROLLBACK")
                raise NodeLedgerError(f"cannot record in node privacy ledger {self._path}: {exc}") from None
        if row is not None and DPEvent.from_dict(json.loads(row[0])) != event:
            raise NodeLedgerConflictError(
                f"node ledger {self._path}: {client_id} round {event.round} of run {run_key!r} is already "
                f"recorded with a different event ({row[0]}); refusing to replace a spend"
            )
        return row is None

    def events(self, run_key: str, client_id: str) -> list[DPEvent]:
        """Every event recorded for ``(run_key, client_id)``, in round order."""
        with self._connect() as con:
            try:
                rows = con.execute(
                    "SELECT event FROM dp_events WHERE run_key = ? AND client_id = ? ORDER BY round",
                    (run_key, client_id),
                ).fetchall()
            except sqlite3.Error as exc:
                raise NodeLedgerError(f"cannot read node privacy ledger {self._path}: {exc}") from None
        return [DPEvent.from_dict(json.loads(event)) for (event,) in rows]

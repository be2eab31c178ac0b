"""A client's node-local privacy ledger in SQLite, so a restarted client continues its epsilon.

Flower ClientApps are ephemeral and keep no state across a node restart (flwr issue #2216):
an in-memory accountant would start again from zero and under-count. This ledger stores each
DP event keyed by ``(run_key, client_id, round)`` in a SQLite file on the node; the client
derives epsilon from :meth:`NodeLedger.events` and records a spend with :meth:`NodeLedger.record`,
committed (``synchronous=FULL``) BEFORE it releases the update.

Removed rows are detected: the rows of one ``(run_key, client_id)`` form a hash chain (row
``seq`` n holds ``hash = SHA-256(canonical JSON {run_key, client_id, round, seq, event,
prev_hash})`` and the previous row's hash, 64 zeros for the first), and table ``heads`` holds
their count and last hash, updated in the same transaction. Deleting, editing or reordering rows
breaks the chain or the count; :meth:`events` (and so every budget check) raises
:class:`NodeLedgerTamperedError` naming what, and the client refuses to train on it. Limit: no
secret is involved, so whoever can write the file can rewrite a client's rows and head
consistently, or delete the whole file (the client then starts from zero); the server's run
ledger still holds every spend it received, and ``fedvault audit --node-ledger`` shows the gap.

Several processes may share the file: WAL journal mode, a busy timeout, and ``BEGIN IMMEDIATE``
transactions that take the write lock before reading. Recording is idempotent per round: the
identical event again is a no-op (returns False), a different event for a recorded round raises
:class:`NodeLedgerConflictError` so a spend is never silently replaced. The caller must not
release a second, freshly noised update for a round that was already recorded. WAL needs a
local file system (not NFS).

Table ``receipts`` keeps the server's signed receipts for this node's spends
(:mod:`fedvault.privacy.receipts`), one per run-ledger entry, for ``fedvault audit --node-ledger``.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path

from fedvault.errors import FedvaultError
from fedvault.privacy.events import DPEvent, DPEventError
from fedvault.privacy.ledger import GENESIS_HASH, canonical_json

_SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS dp_events (
    run_key     TEXT    NOT NULL,
    client_id   TEXT    NOT NULL,
    round       INTEGER NOT NULL,
    seq         INTEGER NOT NULL,
    event       TEXT    NOT NULL,
    recorded_at TEXT    NOT NULL,
    prev_hash   TEXT    NOT NULL,
    hash        TEXT    NOT NULL,
    PRIMARY KEY (run_key, client_id, round),
    UNIQUE (run_key, client_id, seq)
)""",
    """
CREATE TABLE IF NOT EXISTS heads (
    run_key   TEXT    NOT NULL,
    client_id TEXT    NOT NULL,
    count     INTEGER NOT NULL,
    head      TEXT    NOT NULL,
    PRIMARY KEY (run_key, client_id)
)""",
    """
CREATE TABLE IF NOT EXISTS receipts (
    run_key   TEXT    NOT NULL,
    client_id TEXT    NOT NULL,
    seq       INTEGER NOT NULL,
    receipt   TEXT    NOT NULL,
    PRIMARY KEY (run_key, client_id, seq)
)""",
)


class NodeLedgerError(FedvaultError, RuntimeError):
    """The node ledger file cannot be used, or a record call is invalid."""


class NodeLedgerConflictError(NodeLedgerError):
    """A different event is already recorded for this (run_key, client_id, round)."""


class NodeLedgerTamperedError(NodeLedgerError):
    """A client's rows fail their hash chain or their count: rows were removed, edited or reordered."""


def row_hash(run_key: str, client_id: str, round: int, seq: int, event: str, prev_hash: str) -> str:
    """SHA-256 hex of the canonical JSON of one row's chained fields."""
    body = {"run_key": run_key, "client_id": client_id, "round": round, "seq": seq, "event": event}
    return hashlib.sha256(canonical_json({**body, "prev_hash": prev_hash})).hexdigest()


class NodeLedger:
    """DP events of the clients on one node, in the SQLite file ``path`` (created if missing, unless not ``create``)."""

    def __init__(self, path: str | Path, busy_timeout_s: float = 30.0, *, create: bool = True) -> None:
        self._path = Path(path)
        self._timeout = busy_timeout_s
        if not create and not self._path.is_file():
            raise NodeLedgerError(f"no node privacy ledger at {self._path}")
        self._path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + busy_timeout_s
        while True:
            try:
                columns = self._initialise()
                break
            except sqlite3.OperationalError as exc:
                # Switching a new file to WAL while another process does the same can fail with
                # "database is locked" at once, without SQLite's busy handler: retry within the timeout.
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise NodeLedgerError(f"cannot initialise node privacy ledger {self._path}: {exc}") from None
                time.sleep(0.05)
            except sqlite3.Error as exc:
                raise NodeLedgerError(f"cannot initialise node privacy ledger {self._path}: {exc}") from None
        if "hash" not in columns:
            raise NodeLedgerError(
                f"node privacy ledger {self._path} was written by an older fedvault (no hash chain); "
                "move it away to start a new one"
            )

    def _initialise(self) -> set[str]:
        """WAL mode and the tables (one ``BEGIN IMMEDIATE`` transaction); the dp_events columns."""
        with self._connect() as con:
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("BEGIN IMMEDIATE")
            try:
                for statement in _SCHEMA:
                    con.execute(statement)
                con.execute("COMMIT")
            finally:
                if con.in_transaction:
                    con.execute("ROLLBACK")
            return {row[1] for row in con.execute("PRAGMA table_info(dp_events)")}

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

    def _verified(self, con: sqlite3.Connection, run_key: str, client_id: str) -> list[tuple[int, str, str]]:
        """``(round, event json, hash)`` of the client's rows in seq order, once chain and count check out."""
        who = f"node privacy ledger {self._path}: {client_id} of run {run_key!r}"
        rows = con.execute(
            "SELECT round, seq, event, prev_hash, hash FROM dp_events WHERE run_key = ? AND client_id = ? ORDER BY seq",
            (run_key, client_id),
        ).fetchall()
        head = con.execute(
            "SELECT count, head FROM heads WHERE run_key = ? AND client_id = ?", (run_key, client_id)
        ).fetchone()
        prev = GENESIS_HASH
        for expected_seq, (rnd, seq, event, prev_hash, digest) in enumerate(rows, start=1):
            if seq != expected_seq:
                raise NodeLedgerTamperedError(f"{who}: row seq {expected_seq} is missing (rows removed)")
            if prev_hash != prev or row_hash(run_key, client_id, rnd, seq, event, prev_hash) != digest:
                raise NodeLedgerTamperedError(f"{who}: row seq {seq} (round {rnd}) fails its hash chain (edited)")
            prev = digest
        count, last = head if head is not None else (0, GENESIS_HASH)
        if count != len(rows) or last != prev:
            raise NodeLedgerTamperedError(
                f"{who}: {len(rows)} rows, but its head records {count} (rows removed from the end, or the head edited)"
            )
        return [(rnd, event, digest) for rnd, _, event, _, digest in rows]

    def record(self, run_key: str, client_id: str, event: DPEvent) -> bool:
        """Commit ``event`` for ``(run_key, client_id, event.round)``; False if already recorded as is."""
        for name, value in (("run_key", run_key), ("client_id", client_id)):
            if not isinstance(value, str) or not value:
                raise NodeLedgerError(f"node ledger {name} must be a non-empty string, got {value!r}")
        if not isinstance(event, DPEvent):
            raise NodeLedgerError(f"node ledger records DPEvent, got {type(event).__name__}")
        if event.party != client_id:
            raise NodeLedgerError(f"event party {event.party!r} does not match client_id {client_id!r}")
        text = canonical_json(event.to_dict()).decode()
        with self._connect() as con:
            try:
                con.execute("BEGIN IMMEDIATE")
                rows = self._verified(con, run_key, client_id)
                existing = next((stored for rnd, stored, _ in rows if rnd == event.round), None)
                if existing is None:
                    seq, prev = len(rows) + 1, rows[-1][2] if rows else GENESIS_HASH
                    digest = row_hash(run_key, client_id, event.round, seq, text, prev)
                    con.execute(
                        "INSERT INTO dp_events VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (run_key, client_id, event.round, seq, text, datetime.now(UTC).isoformat(), prev, digest),
                    )
                    con.execute("INSERT OR REPLACE INTO heads VALUES (?, ?, ?, ?)", (run_key, client_id, seq, digest))
                con.execute("COMMIT")
            except (sqlite3.Error, NodeLedgerError) as exc:
                if con.in_transaction:
                    con.execute("ROLLBACK")
                if isinstance(exc, NodeLedgerError):
                    raise
                raise NodeLedgerError(f"cannot record in node privacy ledger {self._path}: {exc}") from None
        if existing is not None and DPEvent.from_dict(json.loads(existing)) != event:
            raise NodeLedgerConflictError(
                f"node ledger {self._path}: {client_id} round {event.round} of run {run_key!r} is already "
                f"recorded with a different event ({existing}); refusing to replace a spend"
            )
        return existing is None

    def events(self, run_key: str, client_id: str) -> list[DPEvent]:
        """Every event recorded for ``(run_key, client_id)``, in the order recorded, once their chain verifies.

        Raises :class:`NodeLedgerTamperedError` if rows were removed, edited or reordered."""
        with self._connect() as con:
            try:
                rows = self._verified(con, run_key, client_id)
            except sqlite3.Error as exc:
                raise NodeLedgerError(f"cannot read node privacy ledger {self._path}: {exc}") from None
        try:
            return [DPEvent.from_dict(json.loads(event)) for _, event, _ in rows]
        except (DPEventError, json.JSONDecodeError) as exc:
            raise NodeLedgerTamperedError(f"node privacy ledger {self._path}: unreadable event ({exc})") from None

    def keep_receipts(self, run_key: str, client_id: str, receipts: list[tuple[int, str]]) -> int:
        """Store ``(run-ledger seq, receipt json)`` pairs (one per seq; a repeat is ignored); how many were new."""
        with self._connect() as con:
            try:
                before = con.total_changes
                con.executemany(
                    "INSERT OR IGNORE INTO receipts VALUES (?, ?, ?, ?)",
                    [(run_key, client_id, seq, text) for seq, text in receipts],
                )
                return con.total_changes - before
            except sqlite3.Error as exc:
                raise NodeLedgerError(f"cannot store receipts in node privacy ledger {self._path}: {exc}") from None

    def receipts(self, run_key: str, client_id: str) -> list[str]:
        """The receipts kept for ``(run_key, client_id)``, in run-ledger order."""
        with self._connect() as con:
            try:
                rows = con.execute(
                    "SELECT receipt FROM receipts WHERE run_key = ? AND client_id = ? ORDER BY seq",
                    (run_key, client_id),
                ).fetchall()
            except sqlite3.Error as exc:
                raise NodeLedgerError(f"cannot read node privacy ledger {self._path}: {exc}") from None
        return [text for (text,) in rows]

    def clients(self, run_key: str) -> list[str]:
        """The client ids with rows or a head for ``run_key`` (a head without rows: all its rows removed)."""
        with self._connect() as con:
            try:
                found = con.execute(
                    "SELECT client_id FROM dp_events WHERE run_key = ? "
                    "UNION SELECT client_id FROM heads WHERE run_key = ?",
                    (run_key, run_key),
                ).fetchall()
            except sqlite3.Error as exc:
                raise NodeLedgerError(f"cannot read node privacy ledger {self._path}: {exc}") from None
        return sorted(client for (client,) in found)

"""The run's privacy ledger: an append-only, hash-chained JSON Lines file of DP events.

Line ``n`` (1-based) holds entry ``seq = n``: ``{"seq", "timestamp", "event", "prev_hash",
"hash"}`` where ``hash = SHA-256(canonical JSON of the entry without "hash")`` (keys sorted, no
whitespace, ASCII) and ``prev_hash`` is the previous entry's hash, 64 zeros for the first
(a hash chain / linked timestamping, Haber & Stornetta, J. Cryptology 1991). Editing, deleting,
inserting or reordering an entry breaks a seq, a hash or a link at or after it; :func:`verify`
names the first line where that shows. Removing whole entries from the END cannot be detected
from the file alone: anchor the head hash elsewhere (e.g. the run summary) for that.

Appends are durable: one ``write`` of one line, ``flush`` and ``fsync``, under an exclusive
``flock`` (POSIX), after checking that nobody else appended since. Nothing is rewritten in
place; the only other change ever made is cutting off a final partial line left by a crash
mid-write, and only on request (``recover_truncated_tail=True``), after saving it aside.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedvault.atomic import fsync_dir
from fedvault.errors import FedvaultError
from fedvault.privacy.events import DPEvent, DPEventError

LEDGER_FILENAME = "privacy_ledger.jsonl"
GENESIS_HASH = "0" * 64
_KEYS = {"seq", "timestamp", "event", "prev_hash", "hash"}


class LedgerError(FedvaultError, RuntimeError):
    """The privacy ledger cannot be read or appended to."""


class LedgerTamperedError(LedgerError):
    """An entry was edited, deleted, inserted or reordered; names the first bad line and seq."""

    def __init__(self, path: Path, line: int, reason: str) -> None:
        super().__init__(f"privacy ledger {path} tampered at line {line} (seq {line}): {reason}")
        self.line = line
        self.seq = line
        self.reason = reason


class LedgerTruncatedError(LedgerError):
    """The final line is incomplete: a crash mid-write, not an edit of a complete entry."""

    def __init__(self, path: Path, line: int) -> None:
        super().__init__(
            f"privacy ledger {path} ends with a truncated line {line} (crash mid-write); "
            f"the {line - 1} entries before it verify"
        )
        self.line = line


@dataclass(frozen=True)
class LedgerEntry:
    """One verified ledger line."""

    seq: int
    timestamp: str
    event: DPEvent
    prev_hash: str
    hash: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "timestamp": self.timestamp,
            "event": self.event.to_dict(),
            "prev_hash": self.prev_hash,
            "hash": self.hash,
        }


@dataclass(frozen=True)
class LedgerContents:
    """Verified entries, and the line number of a truncated final line (None if complete)."""

    entries: list[LedgerEntry]
    truncated_line: int | None
    complete_bytes: int


def canonical_json(value: Any) -> bytes:
    """Deterministic JSON bytes: sorted keys, no whitespace, ASCII, no NaN/inf."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def entry_hash(body: dict[str, Any]) -> str:
    """SHA-256 hex of the canonical JSON of an entry without its ``hash`` key."""
    return hashlib.sha256(canonical_json(body)).hexdigest()


def _parse_line(path: Path, number: int, raw: bytes, prev_hash: str) -> LedgerEntry:
    def bad(reason: str) -> LedgerTamperedError:
        return LedgerTamperedError(path, number, reason)

    try:
        record = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(f"unparsable line ({exc})") from None
    if not isinstance(record, dict) or record.keys() != _KEYS:
        raise bad(f"malformed entry: expected keys {sorted(_KEYS)}")
    seq = record["seq"]
    if seq != number or isinstance(seq, bool):
        raise bad(f"expected seq {number}, found seq {seq!r} (entry deleted, inserted or reordered)")
    body = {key: value for key, value in record.items() if key != "hash"}
    try:
        digest = entry_hash(body)
    except ValueError:  # NaN or infinity, which the writer never emits
        raise bad("non-finite number in entry") from None
    if digest != record["hash"]:
        raise bad("hash mismatch (entry edited)")
    if record["prev_hash"] != prev_hash:
        raise bad("broken chain: prev_hash is not the previous entry's hash (entry inserted or one before it replaced)")
    try:
        event = DPEvent.from_dict(record["event"])
    except DPEventError as exc:
        raise bad(f"invalid event ({exc})") from None
    if not isinstance(record["timestamp"], str):
        raise bad("timestamp is not a string")
    return LedgerEntry(seq, record["timestamp"], event, record["prev_hash"], record["hash"])


def read_ledger(path: str | Path) -> LedgerContents:
    """Read and verify every complete line; a truncated final line is reported, not raised.

    Raises :class:`LedgerTamperedError` for the first inconsistent line; a missing file is a
    :class:`LedgerError`; an empty file is a valid empty ledger.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise LedgerError(f"cannot read privacy ledger {path}: {exc.strerror or exc}") from None
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    entries: list[LedgerEntry] = []
    prev_hash = GENESIS_HASH
    for number, raw in enumerate(lines, start=1):
        entry = _parse_line(path, number, raw, prev_hash)
        entries.append(entry)
        prev_hash = entry.hash
    truncated = len(lines) + 1 if tail else None
    return LedgerContents(entries, truncated, len(data) - len(tail))


def verify(path: str | Path) -> None:
    """Raise :class:`LedgerTamperedError` or :class:`LedgerTruncatedError` unless the ledger is intact."""
    contents = read_ledger(path)
    if contents.truncated_line is not None:
        raise LedgerTruncatedError(Path(path), contents.truncated_line)


def events_by_party(entries: Iterable[LedgerEntry]) -> dict[str, list[DPEvent]]:
    """Group the entries' events by party, in ledger order."""
    grouped: dict[str, list[DPEvent]] = defaultdict(list)
    for entry in entries:
        grouped[entry.event.party].append(entry.event)
    return dict(grouped)


class Ledger:
    """Appender for one ledger file; safe with several appenders (flock + re-sync)."""

    def __init__(self, path: str | Path, *, recover_truncated_tail: bool = False) -> None:
        """Open (creating it and its directory if needed) and verify the ledger at ``path``.

        A truncated final line raises :class:`LedgerTruncatedError` unless
        ``recover_truncated_tail``: then that partial line is saved to ``<path>.partial`` and cut off.
        """
        self._path = Path(path)
        self._path.parent.mkdir(parents=True, exist_ok=True)
        created = not self._path.exists()
        with open(self._path, "ab") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            if created:
                fsync_dir(self._path.parent)
            self._sync(recover_truncated_tail)

    @property
    def path(self) -> Path:
        return self._path

    def _sync(self, recover_truncated_tail: bool = False) -> None:
        """Load the head (seq, hash, size) from the file; caller holds the lock."""
        contents = read_ledger(self._path)
        if contents.truncated_line is not None:
            if not recover_truncated_tail:
                raise LedgerTruncatedError(self._path, contents.truncated_line)
            partial = self._path.with_name(self._path.name + ".partial")
            with open(partial, "ab") as aside, open(self._path, "rb") as source:
                source.seek(contents.complete_bytes)
                aside.write(source.read() + b"\n")
                aside.flush()
                os.fsync(aside.fileno())
            os.truncate(self._path, contents.complete_bytes)
        self._seq = len(contents.entries)
        self._head = contents.entries[-1].hash if contents.entries else GENESIS_HASH
        self._size = contents.complete_bytes

    def append(self, event: DPEvent) -> LedgerEntry:
        """Durably append one event (write, flush, fsync) and return its entry."""
        if not isinstance(event, DPEvent):
            raise LedgerError(f"only DPEvent can be appended to {self._path}, got {type(event).__name__}")
        with open(self._path, "ab") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            if os.fstat(handle.fileno()).st_size != self._size:
                self._sync()
            seq = self._seq + 1
            timestamp = datetime.now(UTC).isoformat(timespec="microseconds")
            prev_hash = self._head
            body = {"seq": seq, "timestamp": timestamp, "event": event.to_dict(), "prev_hash": prev_hash}
            digest = entry_hash(body)
            line = canonical_json({**body, "hash": digest}) + b"\n"
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
            self._seq, self._head, self._size = seq, digest, self._size + len(line)
        return LedgerEntry(seq, timestamp, event, prev_hash, digest)

    def entries(self) -> list[LedgerEntry]:
        """All entries, re-read and verified from disk."""
        return read_ledger(self._path).entries

"""The run's privacy ledger: an append-only, hash-chained JSON Lines file of DP spends.

Line ``n`` (1-based) holds entry ``seq = n`` with ``"seq"``, ``"timestamp"``, ``"prev_hash"``,
``"hash"`` and the entry's own keys, one of three kinds:

* header (only at seq 1): ``"header": {"format": 2, "run", "target_delta", "epsilon_cap",
  "client_level_epsilon_cap"}``, written from the run config when the ledger is created, so delta
  and every cap are part of what is chained and signed (:class:`LedgerHeader`);
* spend: ``"event"`` (a :class:`~fedvault.privacy.events.DPEvent`), ``"node"`` (the Flower node id
  the reply came from, ``metadata.src_node_id``, authenticated by Flower; null for the server's
  own client-level events), ``"status"`` (``"kept"``: passed validation or released by the server;
  ``"dropped"``: received and paid for, but not aggregated; ``"late"``: arrived after its round's
  timeout, paid for, never aggregated) and ``"reason"`` (why it was dropped or when it arrived);
* unread: ``"unread": {"node", "round", "reason"}``, a reply received but not readable (a sealed
  reply that failed to open): its spend, if any, is known only to the client's own ledger;
* canary: ``"canary": {"mechanism", "seed", "canaries", ...}``, an empirical audit's canaries,
  only in an audit's own ledger (``empirical_audit.ledger.jsonl``), never in a run's.

``hash = SHA-256(canonical JSON of the entry without "hash")`` (keys sorted, no whitespace,
ASCII) and ``prev_hash`` is the previous entry's hash, 64 zeros for the first (a hash chain /
linked timestamping, Haber & Stornetta, J. Cryptology 1991). Editing, deleting, inserting or
reordering an entry breaks a seq, a hash or a link at or after it; :func:`verify` names the first
line where that shows. Dropping entries from the END, appending, or rewriting the whole chain
consistently cannot be seen from the file alone: the server signs the head after every round
(:mod:`fedvault.privacy.anchors`) and the audit checks the file against those signatures.

Appends are durable: one ``write`` of one line, ``flush`` and ``fsync``, under an exclusive
``flock`` (POSIX), after checking that nobody else appended since. Nothing is rewritten in
place; the only other change ever made is cutting off a final partial line left by a crash
mid-write, and only on request (``recover_truncated_tail=True``), after saving it aside.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedvault.atomic import fsync_dir
from fedvault.errors import FedvaultError
from fedvault.privacy.events import DPEvent, DPEventError

LEDGER_FILENAME = "privacy_ledger.jsonl"
GENESIS_HASH = "0" * 64
HEADER_FORMAT = 2
STATUSES = ("kept", "dropped", "late")
_COMMON = {"seq", "timestamp", "prev_hash", "hash"}
_KINDS = {
    "header": _COMMON | {"header"},
    "spend": _COMMON | {"event", "node", "status", "reason"},
    "unread": _COMMON | {"unread"},
    "canary": _COMMON | {"canary"},
}


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


def _optional_cap(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise LedgerError(f"ledger header {name} must be a number > 0 or null, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class LedgerHeader:
    """What the ledger's spends are audited against: the run's identity, delta and caps (None = no cap)."""

    run: str
    target_delta: float
    epsilon_cap: float | None  # each client's sample-level cap (privacy.target-epsilon)
    client_level_epsilon_cap: float | None  # the server's client-level cap

    def __post_init__(self) -> None:
        if not isinstance(self.run, str) or not self.run:
            raise LedgerError(f"ledger header run must be a non-empty string, got {self.run!r}")
        delta = self.target_delta
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
            raise LedgerError(f"ledger header target_delta must be in (0, 1), got {delta!r}")
        object.__setattr__(self, "target_delta", float(delta))
        object.__setattr__(self, "epsilon_cap", _optional_cap("epsilon_cap", self.epsilon_cap))
        cap = _optional_cap("client_level_epsilon_cap", self.client_level_epsilon_cap)
        object.__setattr__(self, "client_level_epsilon_cap", cap)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": HEADER_FORMAT,
            "run": self.run,
            "target_delta": self.target_delta,
            "epsilon_cap": self.epsilon_cap,
            "client_level_epsilon_cap": self.client_level_epsilon_cap,
        }

    @classmethod
    def from_dict(cls, data: Any) -> LedgerHeader:
        expected = {"format", "run", "target_delta", "epsilon_cap", "client_level_epsilon_cap"}
        if not isinstance(data, dict) or data.keys() != expected:
            raise LedgerError(f"ledger header must have exactly the keys {sorted(expected)}")
        if data["format"] != HEADER_FORMAT:
            raise LedgerError(f"ledger header format {data['format']!r} is not {HEADER_FORMAT}")
        return cls(data["run"], data["target_delta"], data["epsilon_cap"], data["client_level_epsilon_cap"])

    def differences(self, other: LedgerHeader) -> list[str]:
        """``"name: mine != other's"`` for delta and each cap that differs (the run is checked by the anchors)."""
        return [
            f"{name}: {getattr(self, name)!r} != {getattr(other, name)!r}"
            for name in ("target_delta", "epsilon_cap", "client_level_epsilon_cap")
            if getattr(self, name) != getattr(other, name)
        ]


@dataclass(frozen=True)
class Unread:
    """A reply the server received but could not read (e.g. a sealed reply that failed to open)."""

    node: int
    round: int
    reason: str


@dataclass(frozen=True)
class LedgerEntry:
    """One verified ledger line of kind "header", "spend", "unread" or "canary"; the other kinds' fields are None."""

    seq: int
    timestamp: str
    kind: str
    prev_hash: str
    hash: str
    header: LedgerHeader | None = None
    event: DPEvent | None = None
    node: int | None = None
    status: str | None = None
    reason: str | None = None
    unread: Unread | None = None
    canary: dict[str, Any] | None = None

    def body(self) -> dict[str, Any]:
        """The line's keys without ``hash`` (what the hash is computed over)."""
        body: dict[str, Any] = {"seq": self.seq, "timestamp": self.timestamp, "prev_hash": self.prev_hash}
        if self.header is not None:
            body["header"] = self.header.to_dict()
        elif self.canary is not None:
            body["canary"] = self.canary
        elif self.unread is not None:
            body["unread"] = {"node": self.unread.node, "round": self.unread.round, "reason": self.unread.reason}
        else:
            assert self.event is not None
            body.update(event=self.event.to_dict(), node=self.node, status=self.status, reason=self.reason)
        return body

    def to_dict(self) -> dict[str, Any]:
        return {**self.body(), "hash": self.hash}


@dataclass(frozen=True)
class LedgerContents:
    """Verified entries, and the line number of a truncated final line (None if complete)."""

    entries: list[LedgerEntry]
    truncated_line: int | None
    complete_bytes: int

    @property
    def header(self) -> LedgerHeader | None:
        return self.entries[0].header if self.entries else None

    @property
    def head_hash(self) -> str:
        return self.entries[-1].hash if self.entries else GENESIS_HASH


def canonical_json(value: Any) -> bytes:
    """Deterministic JSON bytes: sorted keys, no whitespace, ASCII, no NaN/inf."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def entry_hash(body: dict[str, Any]) -> str:
    """SHA-256 hex of the canonical JSON of an entry without its ``hash`` key."""
    return hashlib.sha256(canonical_json(body)).hexdigest()


def _node(value: Any, allow_none: bool) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"node must be a non-negative integer{' or null' if allow_none else ''}, got {value!r}")
    return value


def _entry_from(record: dict[str, Any], kind: str) -> LedgerEntry:
    """Build (and validate the kind's fields of) an entry; ValueError/LedgerError/DPEventError name what."""
    common = (record["seq"], record["timestamp"], kind, record["prev_hash"], record["hash"])
    if kind == "header":
        return LedgerEntry(*common, header=LedgerHeader.from_dict(record["header"]))
    if kind == "canary":
        canary = record["canary"]
        if not isinstance(canary, dict) or not {"mechanism", "seed", "canaries"} <= canary.keys():
            raise ValueError("canary must hold at least mechanism, seed and canaries")
        return LedgerEntry(*common, canary=canary)
    if kind == "unread":
        data = record["unread"]
        if not isinstance(data, dict) or data.keys() != {"node", "round", "reason"}:
            raise ValueError("unread must have exactly the keys node, round, reason")
        if not isinstance(data["round"], int) or not isinstance(data["reason"], str):
            raise ValueError("unread round must be an integer and reason a string")
        return LedgerEntry(*common, unread=Unread(_node(data["node"], False) or 0, data["round"], data["reason"]))
    if record["status"] not in STATUSES:
        raise ValueError(f"status must be one of {', '.join(STATUSES)}, got {record['status']!r}")
    if record["reason"] is not None and not isinstance(record["reason"], str):
        raise ValueError(f"reason must be a string or null, got {record['reason']!r}")
    return LedgerEntry(
        *common,
        event=DPEvent.from_dict(record["event"]),
        node=_node(record["node"], True),
        status=record["status"],
        reason=record["reason"],
    )


def _parse_line(path: Path, number: int, raw: bytes, prev_hash: str) -> LedgerEntry:
    def bad(reason: str) -> LedgerTamperedError:
        return LedgerTamperedError(path, number, reason)

    try:
        record = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(f"unparsable line ({exc})") from None
    kind = next((k for k, keys in _KINDS.items() if isinstance(record, dict) and record.keys() == keys), None)
    if kind is None:
        raise bad("malformed entry: not a header, spend, unread or canary entry (wrong keys)")
    seq = record["seq"]
    if seq != number or isinstance(seq, bool):
        raise bad(f"expected seq {number}, found seq {seq!r} (entry deleted, inserted or reordered)")
    if kind == "header" and number != 1:
        raise bad("a header entry after line 1 (only the first entry may be the header)")
    body = {key: value for key, value in record.items() if key != "hash"}
    try:
        digest = entry_hash(body)
    except ValueError:  # NaN or infinity, which the writer never emits
        raise bad("non-finite number in entry") from None
    if digest != record["hash"]:
        raise bad("hash mismatch (entry edited)")
    if record["prev_hash"] != prev_hash:
        raise bad("broken chain: prev_hash is not the previous entry's hash (entry inserted or one before it replaced)")
    if not isinstance(record["timestamp"], str):
        raise bad("timestamp is not a string")
    try:
        return _entry_from(record, kind)
    except (DPEventError, LedgerError, ValueError) as exc:
        raise bad(f"invalid {kind} entry ({exc})") from None


def read_ledger(path: str | Path) -> LedgerContents:
    """Read and verify every complete line; a truncated final line is reported, not raised.

    Raises :class:`LedgerTamperedError` for the first inconsistent line; a missing file is a
    :class:`LedgerError`; an empty file is a valid empty ledger (the audit's anchors tell an
    emptied one from a new one).
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


def spends(entries: Iterable[LedgerEntry]) -> list[LedgerEntry]:
    """The spend entries, in ledger order."""
    return [entry for entry in entries if entry.event is not None]


def events_by_party(entries: Iterable[LedgerEntry]) -> dict[str, list[DPEvent]]:
    """Group the spend entries' events by party, in ledger order."""
    grouped: dict[str, list[DPEvent]] = defaultdict(list)
    for entry in spends(entries):
        assert entry.event is not None
        grouped[entry.event.party].append(entry.event)
    return dict(grouped)


class Ledger:
    """Appender for one ledger file; safe with several appenders (flock + re-sync)."""

    def __init__(
        self, path: str | Path, *, header: LedgerHeader | None = None, recover_truncated_tail: bool = False
    ) -> None:
        """Open (creating it and its directory if needed) and verify the ledger at ``path``.

        ``header`` is written as entry 1 of a new (empty) ledger; an existing ledger's header must
        equal it, else :class:`LedgerError` naming the fields (a resumed run whose config changed
        delta or a cap). A truncated final line raises :class:`LedgerTruncatedError` unless
        ``recover_truncated_tail``: then that partial line is saved to ``<path>.partial`` and cut off.
        """
        self._path = Path(path)
        self._listeners: list[Callable[[LedgerEntry], None]] = []
        self._path.parent.mkdir(parents=True, exist_ok=True)
        created = not self._path.exists()
        with open(self._path, "ab") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            if created:
                fsync_dir(self._path.parent)
            contents = self._sync(recover_truncated_tail)
            if header is not None and not contents.entries:
                self._write(handle, {"header": header.to_dict()})
            elif header is not None and (contents.header is None or contents.header.differences(header)):
                found = contents.header
                what = "; ".join(found.differences(header)) if found else "it has no header entry"
                raise LedgerError(f"privacy ledger {self._path} was written for another config ({what})")

    @property
    def path(self) -> Path:
        return self._path

    def _sync(self, recover_truncated_tail: bool = False) -> LedgerContents:
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
        self._head = contents.head_hash
        self._size = contents.complete_bytes
        return contents

    def _write(self, handle: Any, fields: dict[str, Any]) -> LedgerEntry:
        """Append one entry with ``fields`` at the head (write, flush, fsync); caller holds the lock."""
        body = {
            "seq": self._seq + 1,
            "timestamp": datetime.now(UTC).isoformat(timespec="microseconds"),
            "prev_hash": self._head,
            **fields,
        }
        digest = entry_hash(body)
        kind = next(k for k, keys in _KINDS.items() if keys == body.keys() | {"hash"})
        entry = _entry_from({**body, "hash": digest}, kind)
        line = canonical_json({**body, "hash": digest}) + b"\n"
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())
        self._seq, self._head, self._size = entry.seq, digest, self._size + len(line)
        return entry

    def subscribe(self, listener: Callable[[LedgerEntry], None]) -> None:
        """Call ``listener`` with every entry this appender writes, once it is durable."""
        self._listeners.append(listener)

    def _append(self, fields: dict[str, Any]) -> LedgerEntry:
        with open(self._path, "ab") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            if os.fstat(handle.fileno()).st_size != self._size:
                self._sync()
            entry = self._write(handle, fields)
        for listener in self._listeners:
            listener(entry)
        return entry

    def append(
        self, event: DPEvent, *, node: int | None = None, status: str = "kept", reason: str | None = None
    ) -> LedgerEntry:
        """Durably append one spend: ``event``, paid by the reply of Flower node ``node`` (None: the server)."""
        if not isinstance(event, DPEvent):
            raise LedgerError(f"only DPEvent can be appended to {self._path}, got {type(event).__name__}")
        try:
            _node(node, True)
        except ValueError as exc:
            raise LedgerError(f"spend in {self._path}: {exc}") from None
        if status not in STATUSES:
            raise LedgerError(f"spend status must be one of {', '.join(STATUSES)}, got {status!r}")
        return self._append({"event": event.to_dict(), "node": node, "status": status, "reason": reason})

    def append_unread(self, node: int, server_round: int, reason: str) -> LedgerEntry:
        """Durably note a reply of ``node`` in ``server_round`` that could not be read, and why."""
        return self._append({"unread": {"node": int(node), "round": int(server_round), "reason": str(reason)}})

    def append_canary(self, canary: dict[str, Any]) -> LedgerEntry:
        """Durably record an empirical audit's canaries (mechanism, seed, count, ...) in an audit's ledger."""
        return self._append({"canary": dict(canary)})

    def head(self) -> tuple[int, str]:
        """``(entries, head hash)`` as on disk now (re-read and verified)."""
        contents = read_ledger(self._path)
        return len(contents.entries), contents.head_hash

    def entries(self) -> list[LedgerEntry]:
        """All entries, re-read and verified from disk."""
        return read_ledger(self._path).entries

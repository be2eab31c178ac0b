"""The run's hash-chained ledger file and the client's SQLite node ledger (real files, real processes)."""

from __future__ import annotations

import json
import multiprocessing
import sqlite3
from pathlib import Path

import pytest
from waits import seconds

from fedvault.privacy.events import DPEvent
from fedvault.privacy.ledger import (
    GENESIS_HASH,
    LEDGER_FILENAME,
    Ledger,
    LedgerTamperedError,
    LedgerTruncatedError,
    entry_hash,
    events_by_party,
    read_ledger,
    verify,
)
from fedvault.privacy.node_ledger import NodeLedger, NodeLedgerConflictError, NodeLedgerError


def event(rnd: int, party: str = "client-1", z: float = 1.1) -> DPEvent:
    return DPEvent("sample", z, 0.01, 50, "poisson", rnd, party)


def filled_ledger(tmp_path: Path, n: int = 6) -> tuple[Path, list[bytes]]:
    path = tmp_path / LEDGER_FILENAME
    ledger = Ledger(path)
    for rnd in range(1, n + 1):
        ledger.append(event(rnd, party=f"client-{rnd % 2}"))
    ledger.append(DPEvent("client", 1.0, 0.1, 1, "poisson", n, "server"))
    return path, path.read_bytes().splitlines(keepends=True)


def write_lines(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(lines))


def test_round_trip_and_chain(tmp_path):
    path, lines = filled_ledger(tmp_path)
    verify(path)
    entries = Ledger(path).entries()
    assert [e.seq for e in entries] == list(range(1, len(lines) + 1))
    assert entries[0].prev_hash == GENESIS_HASH
    for before, after in zip(entries, entries[1:]):
        assert after.prev_hash == before.hash
    for entry, line in zip(entries, lines):
        raw = json.loads(line)
        assert raw == entry.to_dict()
        assert entry_hash({k: v for k, v in raw.items() if k != "hash"}) == raw["hash"]
    grouped = events_by_party(entries)
    assert sorted(grouped) == ["client-0", "client-1", "server"]
    assert [e.round for e in grouped["client-1"]] == [1, 3, 5]
    assert grouped["client-1"][0] == event(1)


def test_reopened_ledger_continues_the_chain(tmp_path):
    path, lines = filled_ledger(tmp_path, n=2)
    entry = Ledger(path).append(event(3))
    assert entry.seq == len(lines) + 1
    assert entry.prev_hash == json.loads(lines[-1])["hash"]
    verify(path)


def test_two_appenders_on_one_file_stay_chained(tmp_path):
    path = tmp_path / LEDGER_FILENAME
    first, second = Ledger(path), Ledger(path)
    for rnd in range(1, 5):
        first.append(event(rnd, "client-1"))
        second.append(event(rnd, "client-2"))
    verify(path)
    assert [e.seq for e in read_ledger(path).entries] == list(range(1, 9))


def tampered_at(path: Path) -> LedgerTamperedError:
    with pytest.raises(LedgerTamperedError) as info:
        verify(path)
    return info.value


def test_edited_entry_is_named(tmp_path):
    path, lines = filled_ledger(tmp_path)
    record = json.loads(lines[2])
    record["event"]["noise_multiplier"] = 5.0  # claim more noise than was used
    lines[2] = json.dumps(record).encode() + b"\n"
    write_lines(path, lines)
    error = tampered_at(path)
    assert (error.seq, error.line) == (3, 3)
    assert "hash mismatch" in str(error)


def test_edited_and_rehashed_entry_breaks_the_next_link(tmp_path):
    path, lines = filled_ledger(tmp_path)
    record = json.loads(lines[2])
    record["event"]["steps"] = 1
    record["hash"] = entry_hash({k: v for k, v in record.items() if k != "hash"})
    lines[2] = json.dumps(record).encode() + b"\n"
    write_lines(path, lines)
    error = tampered_at(path)
    assert error.seq == 4
    assert "broken chain" in error.reason


def test_deleted_entry_is_named(tmp_path):
    path, lines = filled_ledger(tmp_path)
    write_lines(path, lines[:3] + lines[4:])
    error = tampered_at(path)
    assert error.seq == 4
    assert "expected seq 4, found seq 5" in error.reason


def test_reordered_entries_are_named(tmp_path):
    path, lines = filled_ledger(tmp_path)
    lines[1], lines[2] = lines[2], lines[1]
    write_lines(path, lines)
    error = tampered_at(path)
    assert error.seq == 2
    assert "expected seq 2, found seq 3" in error.reason


def test_inserted_entries_are_named(tmp_path):
    path, lines = filled_ledger(tmp_path)
    write_lines(path, lines[:3] + [lines[1]] + lines[3:])  # a replayed copy of entry 2
    assert tampered_at(path).seq == 4
    # a forged entry that fits the chain at position 4 shows at the displaced entry after it
    prev = json.loads(lines[2])
    spend = {"event": event(9).to_dict(), "node": None, "status": "kept", "reason": None}
    body = {"seq": 4, "timestamp": prev["timestamp"], **spend, "prev_hash": prev["hash"]}
    forged = json.dumps({**body, "hash": entry_hash(body)}).encode() + b"\n"
    write_lines(path, lines[:3] + [forged] + lines[3:])
    error = tampered_at(path)
    assert error.seq == 5
    assert "expected seq 5, found seq 4" in error.reason


def test_unparsable_line_is_tampering(tmp_path):
    path, lines = filled_ledger(tmp_path)
    lines[1] = b"{not json\n"
    write_lines(path, lines)
    error = tampered_at(path)
    assert error.seq == 2 and "unparsable" in error.reason


def test_truncated_final_line_is_distinct_from_tampering(tmp_path):
    path, lines = filled_ledger(tmp_path)
    write_lines(path, lines[:-1] + [lines[-1][: len(lines[-1]) // 2]])  # crash mid-write
    with pytest.raises(LedgerTruncatedError) as info:
        verify(path)
    assert not isinstance(info.value, LedgerTamperedError)
    assert info.value.line == len(lines)
    contents = read_ledger(path)
    assert len(contents.entries) == len(lines) - 1 and contents.truncated_line == len(lines)
    with pytest.raises(LedgerTruncatedError):
        Ledger(path)


def test_recovery_sets_the_partial_line_aside_and_continues(tmp_path):
    path, lines = filled_ledger(tmp_path)
    partial = lines[-1][:40]
    write_lines(path, lines[:-1] + [partial])
    ledger = Ledger(path, recover_truncated_tail=True)
    assert (tmp_path / (LEDGER_FILENAME + ".partial")).read_bytes() == partial + b"\n"
    entry = ledger.append(event(99))
    assert entry.seq == len(lines)
    verify(path)
    assert path.read_bytes().startswith(b"".join(lines[:-1]))


def test_node_ledger_survives_a_restarted_client(tmp_path):
    db = tmp_path / "node" / "privacy.sqlite"
    first = NodeLedger(db)
    for rnd in (1, 2, 3):
        assert first.record("run-a", "client-1", event(rnd))
    del first
    restarted = NodeLedger(db)  # a new process would see the same file
    assert restarted.events("run-a", "client-1") == [event(1), event(2), event(3)]
    assert restarted.record("run-a", "client-1", event(4))
    assert [e.round for e in restarted.events("run-a", "client-1")] == [1, 2, 3, 4]
    assert restarted.events("run-b", "client-1") == []
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_node_ledger_same_round_twice_neither_doubles_nor_replaces(tmp_path):
    ledger = NodeLedger(tmp_path / "privacy.sqlite")
    assert ledger.record("run-a", "client-1", event(1))
    assert not ledger.record("run-a", "client-1", event(1))
    with pytest.raises(NodeLedgerConflictError, match="round 1.*different event"):
        ledger.record("run-a", "client-1", event(1, z=0.5))
    assert ledger.events("run-a", "client-1") == [event(1)]
    with pytest.raises(NodeLedgerError, match="does not match client_id"):
        ledger.record("run-a", "client-2", event(2))


def _writer(db: str, worker: int, rounds: int, start: multiprocessing.synchronize.Barrier) -> None:
    ledger = NodeLedger(db)
    for rnd in range(1, rounds + 1):
        start.wait(timeout=seconds(60))  # both processes write each round at the same time, even on a busy machine
        ledger.record("run-a", f"client-{worker}", event(rnd, f"client-{worker}"))
        ledger.record("run-a", "client-shared", event(rnd, "client-shared"))  # both write the same spend


def test_node_ledger_concurrent_writers_lose_nothing(tmp_path):
    db = str(tmp_path / "privacy.sqlite")
    NodeLedger(db)
    rounds = 60
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(2)
    workers = [ctx.Process(target=_writer, args=(db, w, rounds, start)) for w in (1, 2)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(timeout=seconds(120))
        assert process.exitcode == 0
    ledger = NodeLedger(db)
    expected = list(range(1, rounds + 1))
    for client in ("client-1", "client-2", "client-shared"):
        assert [e.round for e in ledger.events("run-a", client)] == expected
    with sqlite3.connect(db) as con:  # the writers really overlapped: their rows interleave round by round
        order = [
            c
            for (c,) in con.execute("SELECT client_id FROM dp_events WHERE client_id != 'client-shared' ORDER BY rowid")
        ]
    assert order != sorted(order)


def _open_at_once(path: str, barrier) -> None:
    barrier.wait()
    NodeLedger(path)


def test_processes_creating_one_new_node_ledger_at_once_all_open_it(tmp_path):
    """SQLite can answer "database is locked" at once to a second process switching a new file to WAL;
    before the retry, 13 of 240 such openings failed here (40 trials of 6 processes)."""
    ctx = multiprocessing.get_context("spawn")
    for trial in range(8):
        barrier = ctx.Barrier(4)
        path = str(tmp_path / f"ledger-{trial}.sqlite")
        procs = [ctx.Process(target=_open_at_once, args=(path, barrier)) for _ in range(4)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(timeout=seconds(60))
        assert [proc.exitcode for proc in procs] == [0, 0, 0, 0]

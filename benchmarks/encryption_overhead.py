"""Cost of sealing client updates: seal+open throughput of 1, 10 and 100 MB updates, and the time
sealing adds to a simulated round, measured in one run.

Section "sealing":

* ``cipher``: AES-128-GCM alone on 1 MiB records, ``encrypt_into``/``decrypt_into`` preallocated
  buffers: the ceiling sealing can approach.
* ``cipher-fresh``: the same into output buffers allocated for each message (as sealing and opening
  must: the caller keeps what they return). Fresh memory costs a page fault per 4 KiB, as much as
  the cipher; fedvault's parties keep freed buffers for reuse (:mod:`fedvault.memory`), and so
  does this benchmark's process (``allocator`` in the results says whether that took effect).
* ``arrays``: :func:`fedvault.security.sealing.seal_arrays` + ``open_arrays`` (HPKE key wrap,
  framing, chunked AEAD, fresh output buffers: what a message really costs).
* ``flower``: :func:`fedvault.security.envelope.seal_reply` + ``open_reply`` on a ``RecordDict``
  (adds building Flower ``Array`` objects from the opened bytes).

Each update is a model-like dict of float32 arrays (4 weight matrices + 4 biases). Every
repetition runs every (suite, level) on every size, interleaved, so load hits them alike;
reported: median seconds to seal and to open, and MB/s = size / (seal + open), MB = 10**6 bytes.

Section "round_time": ``fedvault simulate`` (mnist1d, 10 clients, DP off) with ``sealing.mode``
off and on, in interleaved pairs; reported: mean steady seconds per round (round 1, which holds
the engine's start-up, excluded) and the percentage sealing adds (signing every instruction,
verifying it on the client, sealing every reply, opening it on the server).

To add a section, write a ``measure_*`` function that returns a JSON-able dict plus a
``*_markdown`` renderer, and list both in ``SECTIONS``.

    python benchmarks/encryption_overhead.py [--sizes 1 10 100] [--reps 7] [--rounds 16] [--pairs 3]
        [--only sealing|round_time ...]   (a section not measured keeps its figures from the last results)

Writes benchmarks/results/encryption_overhead.json and .md (atomically).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import cryptography
import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from sweep import RESULTS, base_settings, simulate, write_results

from fedvault.memory import keep_freed_buffers
from fedvault.security.envelope import announced, content_digest, open_reply, seal_reply, signed_for, verify_instruction
from fedvault.security.identity import IdentityPin, InstructionBinding, announce_run_key, fingerprint
from fedvault.security.sealing import (
    CHUNK_SIZE,
    DEFAULT_SUITE,
    HYBRID_SUITE,
    SealContext,
    generate_run_key,
    open_arrays,
    seal_arrays,
)
from fedvault.tasks import load_task

MB = 10**6
TARGETS = {"arrays": 0.8, "flower": 0.6}  # seal+open of the largest update, default suite, share of the cipher's
CONTEXT = SealContext(run_id=1, round=1, node_id=1, kind="train")

Timer = Callable[[], tuple[float, float]]  # one repetition -> (seal seconds, open seconds)


def model_update(size_mb: int) -> dict[str, np.ndarray]:
    """~``size_mb`` MB of random float32 in 4 weight matrices and 4 small biases."""
    rng = np.random.default_rng(size_mb)
    per_layer = size_mb * MB // 4 // 4
    update = {}
    for layer in range(4):
        update[f"layer{layer}.weight"] = rng.standard_normal(per_layer, dtype=np.float32)
        update[f"layer{layer}.bias"] = rng.standard_normal(256, dtype=np.float32)
    return update


def cipher_timer(update: dict[str, np.ndarray], fresh: bool = False) -> Timer:
    """AES-128-GCM on 1 MiB records of the concatenated update, into preallocated output buffers
    (or, ``fresh``, buffers allocated in each repetition)."""
    plain = np.concatenate([a.reshape(-1).view(np.uint8) for a in update.values()])
    records = range(0, len(plain), CHUNK_SIZE)
    sealed = np.empty(len(plain) + 16 * len(records), dtype=np.uint8)
    opened = np.empty_like(plain)
    aead = AESGCM(os.urandom(16))

    def run() -> tuple[float, float]:
        nonlocal sealed, opened
        start = time.perf_counter()
        if fresh:
            sealed = np.empty_like(sealed)
        for i, offset in enumerate(records):
            size = min(CHUNK_SIZE, len(plain) - offset)
            out = sealed[offset + 16 * i : offset + 16 * i + size + 16]
            aead.encrypt_into(i.to_bytes(12, "big"), plain[offset : offset + size], None, out)
        middle = time.perf_counter()
        if fresh:
            opened = np.empty_like(opened)
        for i, offset in enumerate(records):
            size = min(CHUNK_SIZE, len(plain) - offset)
            record = sealed[offset + 16 * i : offset + 16 * i + size + 16]
            aead.decrypt_into(i.to_bytes(12, "big"), record, None, opened[offset : offset + size])
        return middle - start, time.perf_counter() - middle

    return run


def arrays_timer(update: dict[str, np.ndarray], suite: str) -> Timer:
    run_key = generate_run_key(suite)

    def run() -> tuple[float, float]:
        start = time.perf_counter()
        sealed = seal_arrays(update, run_key.public, CONTEXT)
        middle = time.perf_counter()
        open_arrays(sealed, run_key, CONTEXT)
        return middle - start, time.perf_counter() - middle

    return run


def flower_timer(update: dict[str, np.ndarray], suite: str) -> Timer:
    run_key = generate_run_key(suite)
    arrays = ArrayRecord()
    for name, value in update.items():
        arrays[name] = Array(value)
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 1000})})
    binding = dataclasses.asdict(CONTEXT)  # run_id, round, node_id, kind, instruction

    def run() -> tuple[float, float]:
        start = time.perf_counter()
        sealed = seal_reply(content, run_key.public, **binding)
        middle = time.perf_counter()
        open_reply(sealed, run_key, **binding)
        return middle - start, time.perf_counter() - middle

    return run


def measure_sealing(sizes: list[int], reps: int) -> dict:
    """Section "sealing": one row per (size, suite, level), medians over interleaved reps."""
    allocator = keep_freed_buffers()  # as fedvault's server and clients do
    cases: dict[tuple[int, str, str], Timer] = {}
    update_bytes = {}
    for size in sizes:
        update = model_update(size)
        update_bytes[size] = sum(a.nbytes for a in update.values())
        cases[(size, "aes-128-gcm", "cipher")] = cipher_timer(update)
        cases[(size, "aes-128-gcm", "cipher-fresh")] = cipher_timer(update, fresh=True)
        for suite in (DEFAULT_SUITE, HYBRID_SUITE):
            cases[(size, suite, "arrays")] = arrays_timer(update, suite)
            cases[(size, suite, "flower")] = flower_timer(update, suite)
    for timer in cases.values():  # warm-up: first-touch page faults, imports, key schedules
        timer()
    times: dict[tuple[int, str, str], list[tuple[float, float]]] = {key: [] for key in cases}
    for _ in range(reps):
        for key, timer in cases.items():
            times[key].append(timer())
    rows = []
    for (size, suite, level), samples in times.items():
        seal_s = statistics.median(s for s, _ in samples)
        open_s = statistics.median(o for _, o in samples)
        total = [s + o for s, o in samples]
        nbytes = update_bytes[size]
        rows.append(
            {
                "size_mb": size,
                "bytes": nbytes,
                "suite": suite,
                "level": level,
                "seal_ms": 1000 * seal_s,
                "open_ms": 1000 * open_s,
                "seal_open_mb_s": nbytes / MB / statistics.median(total),
                "seal_open_mb_s_min_max": [nbytes / MB / max(total), nbytes / MB / min(total)],
            }
        )
    largest = max(sizes)
    row = {(r["size_mb"], r["suite"], r["level"]): r for r in rows}
    cipher = row[(largest, "aes-128-gcm", "cipher")]["seal_open_mb_s"]

    def share(level: str, suite: str = DEFAULT_SUITE) -> float:
        return row[(largest, suite, level)]["seal_open_mb_s"] / cipher

    return {
        "reps": reps,
        "chunk_bytes": CHUNK_SIZE,
        "allocator": "freed buffers kept for reuse (fedvault.memory)" if allocator else "system default",
        "rows": rows,
        "summary": {
            "size_mb": largest,
            "cipher_mb_s": cipher,
            "fresh_output_share": share("cipher-fresh", "aes-128-gcm"),
            "levels": {
                level: {
                    "share_of_cipher": share(level),
                    "share_of_cipher_fresh": share(level) / share("cipher-fresh", "aes-128-gcm"),
                    "target": target,
                    "target_met": share(level) >= target,
                }
                for level, target in TARGETS.items()
            },
        },
    }


def sealing_markdown(section: dict) -> list[str]:
    s = section["summary"]
    lines = [
        "## Seal + open throughput",
        "",
        f"Median of {section['reps']} interleaved repetitions; {section['chunk_bytes'] // 2**20} MiB records; "
        f"allocator: {section['allocator']}; "
        "MB/s = update size / (seal + open), MB = 10^6 bytes (min-max over repetitions in brackets).",
        "",
        "| update | suite | level | seal ms | open ms | seal+open MB/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in section["rows"]:
        low, high = r["seal_open_mb_s_min_max"]
        lines.append(
            f"| {r['size_mb']} MB | {r['suite']} | {r['level']} | {r['seal_ms']:.2f} | {r['open_ms']:.2f} | "
            f"{r['seal_open_mb_s']:,.0f} [{low:,.0f}-{high:,.0f}] |"
        )
    lines += [
        "",
        f"{s['size_mb']} MB, default suite ({DEFAULT_SUITE}), seal+open as a share of the bare cipher's "
        f"{s['cipher_mb_s']:,.0f} MB/s:",
    ]
    for level, result in s["levels"].items():
        verdict = "met" if result["target_met"] else "NOT met"
        lines.append(
            f"- {level}: {result['share_of_cipher']:.0%} (target >= {result['target']:.0%}: {verdict}); "
            f"{result['share_of_cipher_fresh']:.0%} of the cipher into fresh buffers"
        )
    lines += [
        f"- the cipher itself into fresh output buffers: {s['fresh_output_share']:.0%} (the first touch of new "
        "memory, which any seal or open that returns new buffers pays)",
        "",
    ]
    return lines


def sealing_work_per_round(clients: int, reps: int = 20) -> dict:
    """Seconds of sealing work in one mnist1d round, timed directly with fedvault's own calls: the
    server signs the instruction once, each client verifies it and seals its reply, the server
    opens every reply. The clients' work is summed: an upper bound on what it adds to wall time
    when simulated clients run in parallel."""
    torch.manual_seed(0)
    arrays = ArrayRecord(load_task("mnist1d").build_model().state_dict())
    identity = Ed25519PrivateKey.generate()
    pin = IdentityPin.from_fingerprint(fingerprint(identity.public_key()))
    run_key, announcement = announce_run_key(identity, 1, DEFAULT_SUITE)
    instruction = RecordDict({"arrays": arrays, "config": ConfigRecord({"lr": 0.05, "server-round": 1})})
    reply = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 400, "train_loss": 1.0})})
    address = {"run_id": 1, "round": 1, "kind": "train"}

    def one_round() -> float:
        start = time.perf_counter()
        unsigned = announced(instruction, announcement)
        digest = content_digest(unsigned)  # once per round; each node gets its own statement
        for node in range(1, clients + 1):
            signed = signed_for(unsigned, digest, identity, InstructionBinding(1, 1, "train", node))
            verified = verify_instruction(signed, pin=pin, node_id=node, **address)
            binding = {**address, "node_id": node, "instruction": verified.digest}
            open_reply(seal_reply(reply, verified.recipient, **binding), run_key, **binding)
        return time.perf_counter() - start

    one_round()
    return {"model_bytes": arrays.count_bytes(), "seconds": statistics.median(one_round() for _ in range(reps))}


def measure_round_time(rounds: int, pairs: int) -> dict:
    """Mean steady seconds per round of ``fedvault simulate`` with sealing off and on (runs
    interleaved; every round after the first of every run counts), and the sealing work of one such
    round timed directly. A mean, not a median: Flower's 0.1 s polls round each round time to a
    step, and averaging many rounds whose work falls anywhere within a step recovers the difference."""
    clients = 10
    base = [*base_settings("mnist1d", clients, rounds), "privacy.sample-level=false"]
    runs: dict[str, list[list[float]]] = {"off": [], "on": []}
    for _ in range(pairs):
        for mode in ("off", "on"):
            runs[mode].append(simulate(base + [f"sealing.mode={mode}"])["round_seconds"][1:])
    off, on = (statistics.fmean(t for run in runs[mode] for t in run) for mode in ("off", "on"))
    work = sealing_work_per_round(clients)
    return {
        "setup": " ".join(base),
        "runs": runs,
        "off": off,
        "on": on,
        "added_percent": 100 * (on / off - 1),
        "work": work,
        "work_percent": 100 * work["seconds"] / off,
    }


def round_time_markdown(section: dict) -> list[str]:
    work = section["work"]
    samples = {mode: sum(len(run) for run in section["runs"][mode]) for mode in ("off", "on")}
    return [
        "## Round time in simulation, sealing off vs on",
        "",
        f"`{section['setup']}`; mean steady seconds per round over interleaved runs "
        f"({samples['off']} rounds off, {samples['on']} on; round 1 of each run, the engine's start-up, left out).",
        "",
        "| sealing | s/round |",
        "|---|---|",
        f"| off | {section['off']:.3f} |",
        f"| on | {section['on']:.3f} |",
        "",
        f"Added by sealing, wall clock: **{section['added_percent']:+.1f} %** (target <= 3 %). Flower's round loop "
        "polls every 0.1 s, so single round times come in steps; the mean over many rounds is what can show a "
        "smaller difference.",
        "",
        f"Sealing work of one such round timed directly (sign once, then per client: verify, seal a "
        f"{work['model_bytes'] / 1e3:.1f} kB reply, open it): {1000 * work['seconds']:.1f} ms = "
        f"**{section['work_percent']:.2f} %** of the sealing-off round.",
        "",
    ]


# Each section: (name, measure(args) -> dict, markdown(dict) -> lines). Add new ones here.
SECTIONS = [
    ("sealing", lambda args: measure_sealing(args.sizes, args.reps), sealing_markdown),
    ("round_time", lambda args: measure_round_time(args.rounds, args.pairs), round_time_markdown),
]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 10, 100], help="update sizes in MB")
    parser.add_argument("--reps", type=int, default=7, help="interleaved repetitions per case")
    parser.add_argument("--rounds", type=int, default=16, help="rounds per simulation (round-time section)")
    parser.add_argument("--pairs", type=int, default=3, help="off/on simulation pairs (round-time section)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for encryption_overhead.json and .md")
    names = [name for name, _, _ in SECTIONS]
    parser.add_argument(
        "--only", choices=names, nargs="+", default=names, help="measure these sections; keep the others' last results"
    )
    args = parser.parse_args(argv)
    previous = args.out / "encryption_overhead.json"
    kept = json.loads(previous.read_text()) if set(args.only) != set(names) and previous.exists() else {}
    report = {
        "environment": {
            "cpu": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "cryptography": cryptography.__version__,
            "numpy": np.__version__,
        },
        **{name: measure(args) if name in args.only else kept[name] for name, measure, _ in SECTIONS},
    }
    env = report["environment"]
    lines = ["# Encryption overhead", "", f"CPU {env['cpu']}; cryptography {env['cryptography']}.", ""]
    for name, _, markdown in SECTIONS:
        lines += markdown(report[name])
    text = "\n".join(lines)
    write_results("encryption_overhead", report, text, out=args.out)
    print(text)
    return report


if __name__ == "__main__":
    main()

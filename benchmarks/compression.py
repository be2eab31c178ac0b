"""Update compression: bytes per round and final accuracy per codec (H2), codec throughput (H3).

    python benchmarks/compression.py [--task mnist1d] [--clients 10] [--rounds 10] [--mb 100]
                                     [--codecs fp32 int8 ...] [--name compression]

H2 runs one real simulation per codec (fp32 = ``compression.codec = none``, fp16, int8, int4,
top-k 1 % with error feedback, random rotation + 8- or 4-bit stochastic quantisation), DP off,
client evaluation off, so ``bytes_received`` is the train replies alone. Targets: int8 <= 26 % of
fp32's bytes within 0.5 accuracy points, top-k 1 % + EF <= 5 % within 2 points. H3 times encode +
decode of ``--mb`` MB of float32 per codec on one core (numpy, one torch thread); target >= 500
MB/s for int8. Writes benchmarks/results/<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from sweep import base_settings, simulate, write_results

from fedvault.compression import make_codec
from fedvault.config import CompressionConfig

#: label -> compression settings (CompressionConfig fields)
CODECS: dict[str, dict] = {
    "fp32": {"codec": "none"},
    "fp16": {"codec": "fp16"},
    "int8": {"codec": "int8"},
    "int4": {"codec": "int4"},
    "topk 1% + EF": {"codec": "topk"},
    "rotation 8-bit": {"codec": "rotation", "bits": 8},
    "rotation 4-bit": {"codec": "rotation", "bits": 4},
}
TARGETS = {"int8": (0.26, 0.5), "topk 1% + EF": (0.05, 2.0)}  # (bytes vs fp32, accuracy points lost)


def bytes_and_accuracy(args: argparse.Namespace) -> dict[str, dict]:
    """H2: per codec, mean bytes received per round and final accuracy of one short simulation."""
    base = [
        *base_settings(args.task, args.clients, args.rounds),
        "privacy.sample-level=false",
        "compression.top-k-fraction=0.01",
    ]
    rows = {}
    for label in args.codecs:
        summary = simulate([*base, *(f"compression.{key}={value}" for key, value in CODECS[label].items())])
        received = summary["bytes_received_per_round"]
        rows[label] = {"bytes_per_round": sum(received) / len(received), "final_accuracy": summary["final_accuracy"]}
        print(
            f"H2 {label:<13} {rows[label]['bytes_per_round']:>12.0f} B/round  accuracy {summary['final_accuracy']:.4f}"
        )
    fp32 = rows["fp32"]
    for row in rows.values():
        row["bytes_vs_fp32"] = row["bytes_per_round"] / fp32["bytes_per_round"]
        row["accuracy_points_lost"] = 100 * (fp32["final_accuracy"] - row["final_accuracy"])
    return rows


def throughput(mb: int, repeats: int = 3) -> dict[str, dict]:
    """H3: MB/s of encode + decode (best of ``repeats``) of ``mb`` MB of float32, one core."""
    torch.set_num_threads(1)
    values = np.random.default_rng(0).standard_normal(mb * 2**20 // 4).astype(np.float32)
    delta = {"w": values}
    rows = {}
    for label, settings in CODECS.items():
        if settings["codec"] == "none":
            continue
        codec = make_codec(CompressionConfig(**settings))
        assert codec is not None
        best_encode = best_decode = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            payload = codec.encode(delta)
            middle = time.perf_counter()
            codec.decode(payload, delta)
            best_encode, best_decode = min(best_encode, middle - start), min(best_decode, time.perf_counter() - middle)
        rows[label] = {
            "encode_mb_s": mb / best_encode,
            "decode_mb_s": mb / best_decode,
            "encode_decode_mb_s": mb / (best_encode + best_decode),
        }
        print(f"H3 {label:<13} encode+decode {rows[label]['encode_decode_mb_s']:>8.0f} MB/s")
    return rows


def to_markdown(h2: dict, h3: dict, args: argparse.Namespace) -> str:
    lines = [
        "# Update compression",
        "",
        f"H2: {args.task}, {args.clients} clients, {args.rounds} rounds, DP off, client evaluation off; bytes are "
        "what the server received per round (train replies, as `bytes_received` in metrics.jsonl).",
        "",
        "| codec | bytes/round | vs fp32 | final accuracy | points lost | target |",
        "|---|---|---|---|---|---|",
    ]
    for label, row in h2.items():
        target = TARGETS.get(label)
        verdict = ""
        if target:
            # accuracy is a count of test examples: compare points up to float rounding
            met = row["bytes_vs_fp32"] <= target[0] and row["accuracy_points_lost"] <= target[1] + 1e-9
            verdict = f"<= {target[0]:.0%} within {target[1]} pts: {'met' if met else 'MISSED'}"
        lines.append(
            f"| {label} | {row['bytes_per_round']:.0f} | {row['bytes_vs_fp32']:.1%} | {row['final_accuracy']:.4f} "
            f"| {row['accuracy_points_lost']:+.2f} | {verdict} |"
        )
    if not h3:
        return "\n".join(lines)
    lines += [
        "",
        f"H3: encode + decode of {args.mb} MB of float32 (one array), best of 3, one core "
        "(target >= 500 MB/s for int8).",
        "",
        "| codec | encode MB/s | decode MB/s | encode+decode MB/s |",
        "|---|---|---|---|",
    ]
    for label, row in h3.items():
        lines.append(
            f"| {label} | {row['encode_mb_s']:.0f} | {row['decode_mb_s']:.0f} | {row['encode_decode_mb_s']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="mnist1d")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--mb", type=int, default=100, help="MB of float32 for the throughput test (0: skip H3)")
    parser.add_argument("--codecs", nargs="+", choices=list(CODECS), default=list(CODECS), help="H2 runs (fp32 first)")
    parser.add_argument("--name", default="compression", help="results file name in benchmarks/results/")
    args = parser.parse_args()
    if args.codecs[0] != "fp32":
        parser.error("--codecs must start with fp32, the baseline")
    h3 = throughput(args.mb) if args.mb else {}
    h2 = bytes_and_accuracy(args)
    data = {"settings": vars(args), "targets": TARGETS, "h2": h2, "h3": h3}
    markdown = to_markdown(h2, h3, args)
    print(markdown)
    write_results(args.name, data, markdown)


if __name__ == "__main__":
    main()

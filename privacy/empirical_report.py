"""``fedvault audit RUN --empirical``: the run's DP mechanism audited with canaries in a separate run.

The canaries never enter the run's model: the audit trains a fresh model with the run's own
mechanism and parameters and throws it away. Sample-level DP: fedvault's ``PrivateTrainer`` at the
run's (target epsilon, delta), clip norm, learning rate, momentum and epochs x rounds, with
gradient canaries added to the clipped sum before the noise and scored over every step (white-box),
audited in one run (Steinke, Nasr and Jagielski, NeurIPS 2023). Client-level DP: fedvault's
DP-FedAvg aggregator at the run's epsilon, rounds, sampling rate q and clip norm on a model of the
task's size, with canary clients (Andrew et al., ICLR 2024; an estimate, not a bound). Results go
to ``RUN/empirical_audit.json``; before anything is reported, each audit's canaries (mechanism, seed,
count, claim, result) are appended to the audit runs' own hash-chained ledger,
``RUN/empirical_audit.ledger.jsonl`` (never to the run's ledger, whose final signed anchor would
make any later entry read as an appended forgery).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedvault.atomic import atomic_write
from fedvault.config import RunConfig
from fedvault.privacy.empirical_audit import audit_dp_fedavg, audit_dp_sgd_white_box
from fedvault.privacy.ledger import Ledger, LedgerHeader
from fedvault.tasks import load_task

EMPIRICAL_FILE = "empirical_audit.json"
CANARY_LEDGER = "empirical_audit.ledger.jsonl"
AUDIT_BATCH = 256  # the logical batch of the audit run when the run's batch-size is 0 (auto)


def empirical_audit_of_run(run_dir: Path, cfg: RunConfig, canaries: int) -> list[dict[str, Any]]:
    """Audit each DP mechanism ``cfg`` enables; write and return one result dict per mechanism."""
    p = cfg.privacy
    results = []
    if p.sample_level:
        audit = audit_dp_sgd_white_box(
            cfg.task,
            target_epsilon=p.target_epsilon,
            delta=p.target_delta,
            num_canaries=canaries,
            epochs=cfg.local_epochs * cfg.num_server_rounds,
            batch_size=cfg.batch_size or AUDIT_BATCH,
            learning_rate=cfg.learning_rate,
            momentum=cfg.momentum,
            max_grad_norm=p.max_grad_norm,
        )
        results.append({"mechanism": "dp-sgd", "audited": audit.measured, **audit.to_dict()})
    if p.client_level:
        size = sum(t.numel() for t in load_task(cfg.task).build_model().state_dict().values())
        estimate = audit_dp_fedavg(
            target_epsilon=p.client_level_target_epsilon,
            delta=p.target_delta,
            rounds=cfg.num_server_rounds,
            canary_clients=canaries,
            dim=size,
            sample_rate=cfg.fraction_train,
            clip_norm=p.client_clip_norm,
        )
        results.append({"mechanism": "dp-fedavg", "audited": estimate.measured, **estimate.to_dict()})
    ledger = Ledger(
        run_dir / CANARY_LEDGER, header=LedgerHeader(f"{run_dir.name}:empirical-audit", p.target_delta, None, None)
    )
    for r in results:
        entry = ledger.append_canary(
            {k: r[k] for k in ("mechanism", "seed", "canaries", "claimed_epsilon", "audited", "flagged")}
        )
        r["ledger_entry"] = f"{CANARY_LEDGER} entry {entry.seq}"
    text = (json.dumps(results, indent=2) + "\n").encode()
    atomic_write(run_dir / EMPIRICAL_FILE, lambda handle: handle.write(text))
    return results


def bound_kind(result: dict[str, Any]) -> str:
    """What the audited number is: a 95 % lower bound (DP-SGD) or a one-shot estimate (DP-FedAvg)."""
    return "lower bound (95 %)" if result["mechanism"] == "dp-sgd" else "one-shot estimate"


def verdict(result: dict[str, Any]) -> str:
    return "CLAIM EXCEEDED" if result["flagged"] else "consistent with the claim"


def render_empirical(results: list[dict[str, Any]]) -> str:
    """One line per mechanism: claim, audited value, canaries, seed, and whether the claim was refuted."""
    lines = ["empirical audit (a separate run with canaries; the run's model holds none):"]
    for r in results:
        lines.append(
            f"  {r['mechanism']}: claimed epsilon {r['claimed_epsilon']:g}, audited {bound_kind(r)} {r['audited']:.3f} "
            f"with {r['canaries']} canaries (seed {r['seed']}, {r['ledger_entry']}): {verdict(r)}"
        )
    return "\n".join(lines) + "\n"

"""The privacy audit of a run directory (behind ``fedvault audit RUN_DIR``).

1. Verifies the run's hash-chained ledger (:mod:`fedvault.privacy.ledger`; an inconsistent line
   raises :class:`~fedvault.privacy.ledger.LedgerTamperedError`) and takes delta and the caps
   from its header entry, not from the config: a config that says otherwise is flagged.
2. Checks the ledger against the server's signed anchors (:mod:`fedvault.privacy.anchors`):
   truncation, emptying, consistent rewrites and appends after the final anchor are tampering;
   entries after the last anchor of a run that did not finish are unverified.
3. Reconciles who paid (:mod:`fedvault.privacy.reconcile`): node ids vs party names, and, given
   the clients' SQLite ledgers, every spend they hold (added when the run ledger lacks it).
4. Replays each party's events: for every client its sample-level epsilon (DP-SGD) and for the
   ``server`` party the run's client-level epsilon (DP-FedAvg), by PLD (the claim), PRV and RDP
   (cross-checks); ``remaining = cap - PLD epsilon``; a party above its cap is flagged.

Spends the server received but did not aggregate (dropped by validation) count like the others.
Outputs: a text table, JSON, CSV and a PNG of cumulative PLD epsilon after each round per party.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fedvault.atomic import atomic_write
from fedvault.errors import FedvaultError
from fedvault.privacy.accountants import METHODS, cumulative_epsilons, epsilon
from fedvault.privacy.anchors import TrustedKey, check_anchors
from fedvault.privacy.events import DPEvent
from fedvault.privacy.findings import Finding
from fedvault.privacy.ledger import LEDGER_FILENAME, LedgerHeader, read_ledger, spends
from fedvault.privacy.reconcile import identity_findings, merge_node_ledgers

SERVER_PARTY = "server"


class AuditError(FedvaultError, ValueError):
    """The run directory cannot be audited (no ledger, no header and no config to fall back on)."""


@dataclass(frozen=True)
class PartyAudit:
    """One privacy unit's spend. ``kind`` "sample" = a client's DP-SGD, "client" = client-level."""

    party: str
    kind: str
    rounds: list[int]
    epsilon_pld: float
    epsilon_prv: float
    epsilon_rdp: float
    delta: float
    cap: float | None
    remaining: float | None
    exceeded: bool
    nodes: list[int] = field(default_factory=list)  # Flower node ids its spends came from
    dropped_rounds: list[int] = field(default_factory=list)  # received and paid for, not aggregated
    node_ledger_rounds: list[int] = field(default_factory=list)  # only in the clients' own ledgers
    mechanism: str = ""  # noise multiplier(s), sample rate(s) and total steps of its events

    @property
    def status(self) -> str:
        """``EXCEEDED`` when the claim (PLD) is above the cap; a cross-check above it is named too."""
        if self.exceeded:
            return "EXCEEDED"
        above = [name for name, value in (("PRV", self.epsilon_prv), ("RDP", self.epsilon_rdp)) if self._over(value)]
        return f"ok ({' and '.join(above)} above cap)" if above else "ok"

    def _over(self, value: float) -> bool:
        return self.cap is not None and value > self.cap


@dataclass(frozen=True)
class AuditReport:
    """Integrity of the ledger, per-party spend, and per-round cumulative PLD epsilon curves."""

    run_dir: str
    ledger_path: str
    entries: int
    head_hash: str
    integrity: str
    delta: float
    parties: list[PartyAudit]
    curves: dict[str, list[tuple[int, float]]]
    run: str = ""
    anchored_entries: int = 0
    key_source: str = "none"
    node_ledgers: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)

    @property
    def exceeded(self) -> list[str]:
        """Parties whose PLD epsilon is above their cap."""
        return [p.party for p in self.parties if p.exceeded]

    @property
    def tampered(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "tampered"]

    @property
    def unverified(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "unverified"]


def _natural_key(party: str) -> tuple:
    """Clients in numeric order (client-2 before client-10), the server last."""
    parts = tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", party))
    return (party == SERVER_PARTY, tuple((isinstance(t, str), t) for t in parts))


def audit_run(
    run_dir: str | Path,
    *,
    trusted: TrustedKey | None,
    anchors: Sequence[tuple[str, Any]] = (),
    config_header: LedgerHeader | None = None,
    node_ledgers: Sequence[str | Path] = (),
) -> AuditReport:
    """Verify ``RUN_DIR/privacy_ledger.jsonl`` and account every party's events at the ledger's delta.

    ``anchors`` are ``(where, stored anchor)`` pairs (anchors file, checkpoints, summary), checked
    against ``trusted``; ``config_header`` is what the run's config says (flagged where it differs
    from the ledger's header, and used only if the ledger has none); ``node_ledgers`` are clients'
    SQLite ledgers to merge. A tampered line raises
    :class:`~fedvault.privacy.ledger.LedgerTamperedError`; every other problem is a finding.
    """
    run_dir = Path(run_dir)
    path = run_dir / LEDGER_FILENAME
    if not path.is_file():
        raise AuditError(f"no privacy ledger at {path}: was differential privacy enabled for this run?")
    contents = read_ledger(path)
    findings: list[Finding] = []
    integrity = "ok"
    if contents.truncated_line is not None:
        integrity = (
            f"truncated final line {contents.truncated_line} (crash mid-write); "
            f"{len(contents.entries)} complete entries verified and audited"
        )
    header = contents.header
    if header is None:
        findings.append(
            Finding("tampered", "no-header", f"{path} has no header entry (delta and caps are not in the ledger)")
        )
        header = config_header
        if header is None:
            raise AuditError(f"{path} has no header entry and no config to take delta and caps from")
    elif config_header is not None and (diff := header.differences(config_header)):
        findings.append(
            Finding(
                "tampered",
                "config-differs",
                f"the run's config differs from the ledger's header ({'; '.join(diff)}; ledger's first); "
                "audited with the ledger's values",
            )
        )
    check = check_anchors(contents.entries, header.run, anchors, trusted)
    findings += check.findings
    paid = spends(contents.entries)
    findings += identity_findings(paid)
    fingerprint = trusted.fingerprint if trusted is not None else None
    extra, merged = merge_node_ledgers(contents.entries, header.run, [Path(p) for p in node_ledgers], fingerprint)
    findings += merged
    findings += [
        Finding(
            "unverified",
            "unread-reply",
            f"node {e.unread.node} round {e.unread.round}: reply received but unreadable ({e.unread.reason}); "
            "its spend is only in that client's ledger",
        )
        for e in contents.entries
        if e.unread is not None
    ]
    if findings and integrity == "ok":
        integrity = "PROBLEMS" if any(f.severity == "tampered" for f in findings) else "unverified entries"
    histories: dict[str, list[DPEvent]] = defaultdict(list)
    nodes: dict[str, set[int]] = defaultdict(set)
    dropped: dict[str, list[int]] = defaultdict(list)
    for entry in paid:
        assert entry.event is not None
        histories[entry.event.party].append(entry.event)
        if entry.node is not None:
            nodes[entry.event.party].add(entry.node)
        if entry.status in ("dropped", "late"):
            dropped[entry.event.party].append(entry.event.round)
    for event in extra:
        histories[event.party].append(event)
    delta = header.target_delta
    parties = []
    for party in sorted(histories, key=_natural_key):
        events = histories[party]
        kind = events[0].kind
        values = {method: epsilon(events, delta, method) for method in METHODS}
        cap = header.client_level_epsilon_cap if kind == "client" else header.epsilon_cap
        parties.append(
            PartyAudit(
                party=party,
                kind=kind,
                rounds=sorted({e.round for e in events}),
                epsilon_pld=values["pld"],
                epsilon_prv=values["prv"],
                epsilon_rdp=values["rdp"],
                delta=delta,
                cap=cap,
                remaining=None if cap is None else cap - values["pld"],
                exceeded=cap is not None and values["pld"] > cap,
                nodes=sorted(nodes[party]),
                dropped_rounds=sorted(dropped[party]),
                node_ledger_rounds=sorted(e.round for e in extra if e.party == party),
                mechanism=describe_mechanism(events),
            )
        )
    return AuditReport(
        run_dir=str(run_dir),
        ledger_path=str(path),
        entries=len(contents.entries),
        head_hash=contents.head_hash,
        integrity=integrity,
        delta=delta,
        parties=parties,
        curves=cumulative_epsilons(dict(histories), delta),
        run=header.run,
        anchored_entries=check.anchored,
        key_source=trusted.source if trusted else "none",
        node_ledgers=[str(p) for p in node_ledgers],
        findings=findings,
    )


def describe_mechanism(events: list[DPEvent]) -> str:
    """``z=1.1 q=0.05 steps=120``: the distinct noise multipliers and sample rates, and the total steps."""

    def distinct(values: list[float]) -> str:
        return "/".join(f"{v:.4g}" for v in sorted(set(values)))

    return (
        f"z={distinct([e.noise_multiplier for e in events])} q={distinct([e.sample_rate for e in events])} "
        f"steps={sum(e.steps for e in events)}"
    )


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


PARTY_COLUMNS = (
    "party",
    "kind",
    "rounds",
    "nodes",
    "dropped",
    "eps PLD",
    "eps PRV",
    "eps RDP",
    "delta",
    "cap",
    "remaining",
    "mechanism",
    "status",
)


def party_rows(report: AuditReport) -> list[tuple[str, ...]]:
    """One row of display strings per party, in :data:`PARTY_COLUMNS` order."""
    return [
        (
            p.party,
            p.kind,
            str(len(p.rounds)),
            ",".join(map(str, p.nodes)) or "-",
            str(len(p.dropped_rounds)),
            _fmt(p.epsilon_pld),
            _fmt(p.epsilon_prv),
            _fmt(p.epsilon_rdp),
            f"{p.delta:g}",
            _fmt(p.cap),
            _fmt(p.remaining),
            p.mechanism,
            p.status,
        )
        for p in report.parties
    ]


def ledger_verdict(report: AuditReport) -> str:
    """The ledger's verdict, the first that applies: tampered, cap exceeded, unverified, verified."""
    if report.tampered:
        return "tampered"
    if report.exceeded:
        return "cap exceeded"
    return "unverified" if report.unverified else "verified"


def render_table(report: AuditReport) -> str:
    """Human-readable report: ledger integrity and anchors, one row per party, the findings and exceeded caps."""
    header = PARTY_COLUMNS
    rows = party_rows(report)
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        f"privacy audit of {report.run_dir} (run {report.run!r})",
        f"ledger: {report.ledger_path}, {report.entries} entries, head {report.head_hash[:16]}…, "
        f"integrity {report.integrity}",
        f"anchors: {report.anchored_entries} of {report.entries} entries signed; key: {report.key_source}",
        *([f"node ledgers merged: {', '.join(report.node_ledgers)}"] if report.node_ledgers else []),
        "",
        "  ".join(h.ljust(w) for h, w in zip(header, widths)),
        "  ".join("-" * w for w in widths),
        *("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows),
        "",
        "epsilon claims are backed by PLD (dp-accounting); PRV (Opacus) and RDP are cross-checks.",
        "dropped = rounds whose reply was received (in time or late) and paid for but not aggregated "
        "(counted in epsilon).",
    ]
    lines += [f"{f.severity.upper()} [{f.code}]: {f.message}" for f in report.findings]
    if report.exceeded:
        lines.append(f"CAP EXCEEDED by: {', '.join(report.exceeded)}")
    return "\n".join(lines) + "\n"


def _json_safe(value: Any) -> Any:
    """Non-finite floats become the strings "inf"/"nan" so the output is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def to_json(report: AuditReport) -> str:
    """The whole report (including curves and the exceeded list) as indented strict JSON."""
    data = asdict(report)
    data["exceeded"] = report.exceeded
    data["tampered"] = bool(report.tampered)
    for row, party in zip(data["parties"], report.parties):
        row["status"] = party.status
    return json.dumps(_json_safe(data), indent=2, allow_nan=False) + "\n"


def to_csv(report: AuditReport) -> str:
    """One CSV row per party; ``rounds`` is space-separated; empty cells for no cap."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    columns = [
        "party",
        "kind",
        "rounds",
        "num_rounds",
        "epsilon_pld",
        "epsilon_prv",
        "epsilon_rdp",
        "delta",
        "cap",
        "remaining",
        "exceeded",
        "nodes",
        "dropped_rounds",
        "node_ledger_rounds",
        "mechanism",
        "status",
    ]
    writer.writerow(columns)
    for p in report.parties:
        writer.writerow(
            [
                p.party,
                p.kind,
                " ".join(map(str, p.rounds)),
                len(p.rounds),
                repr(p.epsilon_pld),
                repr(p.epsilon_prv),
                repr(p.epsilon_rdp),
                repr(p.delta),
                "" if p.cap is None else repr(p.cap),
                "" if p.remaining is None else repr(p.remaining),
                str(p.exceeded).lower(),
                " ".join(map(str, p.nodes)),
                " ".join(map(str, p.dropped_rounds)),
                " ".join(map(str, p.node_ledger_rounds)),
                p.mechanism,
                p.status,
            ]
        )
    return out.getvalue()


def epsilon_figure(report: AuditReport, title: str | None = None) -> Figure:
    """Cumulative PLD epsilon after each round per party, with the caps; ``title`` defaults to the run's name."""
    figure = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for party in sorted(report.curves, key=_natural_key):
        rounds, values = zip(*report.curves[party])
        style: dict[str, Any] = {"color": "black", "linewidth": 2.5} if party == SERVER_PARTY else {}
        axes.plot(rounds, values, marker="o", markersize=3, label=party, **style)
    caps = {(p.kind, p.cap) for p in report.parties if p.cap is not None}
    for kind, cap in sorted(caps):
        axes.axhline(
            cap,
            linestyle="--",
            color="red" if kind == "sample" else "black",
            linewidth=1,
            label=f"cap ({'client' if kind == 'sample' else 'client-level'}) {cap:g}",
        )
    axes.set_xlabel("round")
    axes.set_ylabel(f"cumulative epsilon (PLD, delta={report.delta:g})")
    axes.set_title(title or f"privacy spent: {Path(report.run_dir).name}", fontsize="medium")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(True, alpha=0.3)
    if report.curves:
        axes.legend(
            fontsize="small", ncol=2 if len(report.curves) > 12 else 1, loc="upper left", bbox_to_anchor=(1.01, 1.0)
        )
    return figure


def plot_epsilon(report: AuditReport, path: str | Path) -> Path:
    """Write :func:`epsilon_figure` as a PNG (atomically) and return its path."""
    path = Path(path)
    figure = epsilon_figure(report)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda handle: figure.savefig(handle, format="png", bbox_inches="tight"))
    return path

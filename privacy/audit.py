"""The privacy audit of a run directory (behind ``fedvault audit RUN_DIR``).

Verifies the run's hash-chained ledger, then replays each party's events: for every client its
sample-level epsilon (DP-SGD; cap ``privacy.target-epsilon``) and for the ``server`` party the
run's client-level epsilon (DP-FedAvg; cap ``privacy.client-level-target-epsilon``), both at
``privacy.target-delta``, by PLD (the claim), PRV and RDP (cross-checks). ``remaining = cap -
PLD epsilon``; a party whose PLD epsilon is above its cap is flagged. Outputs: a text table,
JSON, CSV and a PNG of cumulative PLD epsilon after each round, one line per party.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fedvault.atomic import atomic_write
from fedvault.errors import FedvaultError
from fedvault.privacy.accountants import METHODS, cumulative_epsilons, epsilon
from fedvault.privacy.ledger import GENESIS_HASH, LEDGER_FILENAME, events_by_party, read_ledger

SERVER_PARTY = "server"


class AuditError(FedvaultError, ValueError):
    """The run directory cannot be audited (no ledger, bad caps or delta)."""


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

    @property
    def exceeded(self) -> list[str]:
        """Parties whose PLD epsilon is above their cap."""
        return [p.party for p in self.parties if p.exceeded]


def _natural_key(party: str) -> tuple:
    """Clients in numeric order (client-2 before client-10), the server last."""
    parts = tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", party))
    return (party == SERVER_PARTY, tuple((isinstance(t, str), t) for t in parts))


def _check_cap(name: str, cap: float | None) -> None:
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap > 0):
        raise AuditError(f"audit {name} must be a number > 0 or None, got {cap!r}")


def audit_run(
    run_dir: str | Path, delta: float, epsilon_cap: float | None = None, client_level_epsilon_cap: float | None = None
) -> AuditReport:
    """Verify ``RUN_DIR/privacy_ledger.jsonl`` and account every party's events at ``delta``.

    ``epsilon_cap`` caps each client's sample-level epsilon (config ``privacy.target-epsilon``),
    ``client_level_epsilon_cap`` the server's client-level epsilon
    (``privacy.client-level-target-epsilon``); None means no cap. A tampered ledger raises
    :class:`~fedvault.privacy.ledger.LedgerTamperedError`; a truncated final line (crash
    mid-write) is reported in ``integrity`` and the complete entries are audited.
    """
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
        raise AuditError(f"audit delta (privacy.target-delta) must be in (0, 1), got {delta!r}")
    _check_cap("epsilon_cap", epsilon_cap)
    _check_cap("client_level_epsilon_cap", client_level_epsilon_cap)
    run_dir = Path(run_dir)
    path = run_dir / LEDGER_FILENAME
    if not path.is_file():
        raise AuditError(f"no privacy ledger at {path}: was differential privacy enabled for this run?")
    contents = read_ledger(path)
    integrity = "ok"
    if contents.truncated_line is not None:
        integrity = (
            f"truncated final line {contents.truncated_line} (crash mid-write); "
            f"{len(contents.entries)} complete entries verified and audited"
        )
    histories = events_by_party(contents.entries)
    parties = []
    for party in sorted(histories, key=_natural_key):
        events = histories[party]
        kind = events[0].kind
        values = {method: epsilon(events, delta, method) for method in METHODS}
        cap = client_level_epsilon_cap if kind == "client" else epsilon_cap
        parties.append(
            PartyAudit(
                party=party,
                kind=kind,
                rounds=sorted({e.round for e in events}),
                epsilon_pld=values["pld"],
                epsilon_prv=values["prv"],
                epsilon_rdp=values["rdp"],
                delta=float(delta),
                cap=None if cap is None else float(cap),
                remaining=None if cap is None else cap - values["pld"],
                exceeded=cap is not None and values["pld"] > cap,
            )
        )
    return AuditReport(
        run_dir=str(run_dir),
        ledger_path=str(path),
        entries=len(contents.entries),
        head_hash=contents.entries[-1].hash if contents.entries else GENESIS_HASH,
        integrity=integrity,
        delta=float(delta),
        parties=parties,
        curves=cumulative_epsilons(histories, delta),
    )


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def render_table(report: AuditReport) -> str:
    """Human-readable report: ledger integrity, one row per party, and the exceeded caps."""
    header = ("party", "kind", "rounds", "eps PLD", "eps PRV", "eps RDP", "delta", "cap", "remaining", "status")
    rows = [
        (
            p.party,
            p.kind,
            str(len(p.rounds)),
            _fmt(p.epsilon_pld),
            _fmt(p.epsilon_prv),
            _fmt(p.epsilon_rdp),
            f"{p.delta:g}",
            _fmt(p.cap),
            _fmt(p.remaining),
            "EXCEEDED" if p.exceeded else "ok",
        )
        for p in report.parties
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        f"privacy audit of {report.run_dir}",
        f"ledger: {report.ledger_path}, {report.entries} entries, head {report.head_hash[:16]}…, "
        f"integrity {report.integrity}",
        "",
        "  ".join(h.ljust(w) for h, w in zip(header, widths)),
        "  ".join("-" * w for w in widths),
        *("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows),
        "",
        "epsilon claims are backed by PLD (dp-accounting); PRV (Opacus) and RDP are cross-checks.",
    ]
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
            ]
        )
    return out.getvalue()


def plot_epsilon(report: AuditReport, path: str | Path) -> Path:
    """Write a PNG of cumulative PLD epsilon after each round per party (atomically) and return its path."""
    path = Path(path)
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
    axes.set_title(f"privacy spent: {Path(report.run_dir).name}")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(True, alpha=0.3)
    if report.curves:
        axes.legend(
            fontsize="small", ncol=2 if len(report.curves) > 12 else 1, loc="upper left", bbox_to_anchor=(1.01, 1.0)
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda handle: figure.savefig(handle, format="png", bbox_inches="tight"))
    return path

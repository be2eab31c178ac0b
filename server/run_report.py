"""``fedvault report RUN_DIR``: one self-contained HTML page of a run, to hand to a reviewer.

Sections: the run's config (``config.toml``, grouped by table); accuracy and loss per round
(``metrics.jsonl``); the privacy audit of :func:`fedvault.server.run_audit.audit` (the ledger's
verdict, findings, caps exceeded, epsilon per party and per round); the empirical audit when
``empirical_audit.json`` exists; and the system: seconds, bytes and clients per round, with the
totals of ``summary.json``. Figures are PNGs inlined as ``data:`` URIs and the CSS is inline, so
the page loads nothing (it opens offline, or as a mail attachment); every value goes through
:func:`html.escape`. ``config.toml`` and ``metrics.jsonl`` are required (a missing or damaged one
raises, naming it); the summary, the ledger and the empirical audit are parts the page notes as
missing or unreadable.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from fedvault.atomic import atomic_write
from fedvault.config import RunConfig
from fedvault.plots import CLIENT_COUNTS, client_count, metric_figures, png_bytes, run_title, system_figures
from fedvault.privacy.audit import PARTY_COLUMNS, AuditError, AuditReport, epsilon_figure, ledger_verdict, party_rows
from fedvault.privacy.empirical_report import CANARY_LEDGER, EMPIRICAL_FILE, bound_kind, verdict
from fedvault.privacy.ledger import LEDGER_FILENAME, LedgerError, LedgerTamperedError, read_ledger
from fedvault.rundir import CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, RunDirectory, RunDirectoryError
from fedvault.server.run_audit import audit

REPORT_FILE = "report.html"
NO_DP = "no DP"
AUDIT_FAILED = "audit failed"

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font: 15px/1.45 system-ui, sans-serif; color: #222; margin: 2em auto; max-width: 1100px; padding: 0 1em; }}
h1 {{ font-size: 1.6em; margin-bottom: 0.2em; }}
h2 {{ border-bottom: 2px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }}
table {{ border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }}
th {{ background: #f3f3f3; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
.groups {{ display: flex; flex-wrap: wrap; gap: 0 2em; align-items: flex-start; }}
figure {{ display: inline-block; margin: 0.5em 1em 0.5em 0; max-width: 48%; vertical-align: top; }}
figure.wide {{ max-width: 100%; }}
img {{ max-width: 100%; border: 1px solid #eee; }}
.verdict {{ display: inline-block; padding: 0.2em 0.7em; border-radius: 0.3em; font-weight: bold; color: #fff; }}
.verified, .no-dp {{ background: #2e7d32; }}
.unverified {{ background: #ef6c00; }}
.tampered, .cap-exceeded, .audit-failed {{ background: #c62828; }}
.note {{ color: #555; font-style: italic; }}
code {{ background: #f3f3f3; padding: 0 0.3em; }}
</style>
</head>
<body>
{body}
</body>
</html>
"""


class ReportError(RunDirectoryError):
    """RUN_DIR lacks a file the page cannot do without (config.toml, metrics.jsonl)."""


@dataclass(frozen=True)
class RunReport:
    """The page written, the ledger's verdict (or ``no DP`` / ``audit failed``) and whether the
    empirical audit measured more than the claim: ``fedvault report`` exits as ``fedvault audit``."""

    path: Path
    verdict: str
    refuted: bool


def write_report(run_dir: str | Path, out: str | Path | None = None, *, server_key: str | None = None) -> RunReport:
    """Write the HTML page of ``run_dir`` to ``out`` (default ``RUN_DIR/report.html``), atomically."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise ReportError(f"{run_dir} is not a run directory (no {CONFIG_FILE})")
    cfg = RunConfig.from_sources(run_dir / CONFIG_FILE)
    rounds = RunDirectory(run_dir).rounds()
    if not rounds:
        raise ReportError(f"{run_dir / METRICS_FILE} is missing or empty: the run finished no round")
    title = run_title(cfg)
    privacy, privacy_verdict = _privacy_section(run_dir, cfg, title, server_key)
    empirical, refuted = _empirical_section(run_dir, privacy_verdict)
    body = [
        f"<h1>fedvault run {_e(run_dir.name)}</h1>\n<p>{_e(title)}</p>",
        _summary_section(run_dir, rounds),
        _config_section(cfg),
        _section("Training", *map(_figure, metric_figures(rounds, title).values())),
        privacy,
        empirical,
        _system_section(rounds, title),
    ]
    page = PAGE.format(title=_e(f"fedvault report: {run_dir.name}"), body="\n".join(body)).encode()
    path = Path(out) if out else run_dir / REPORT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda handle: handle.write(page))
    return RunReport(path, privacy_verdict, refuted)


def _e(value: Any) -> str:
    """A value as escaped display text: floats to 4 significant digits, ints with thousands separators."""
    if isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, int):
        text = f"{value:,}"
    elif isinstance(value, float):
        text = f"{value:.4g}"
    else:
        text = "-" if value is None else str(value)
    return html.escape(text)


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]], caption: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(map(_cell, row)) + "</tr>\n" for row in rows)
    title = f"<caption>{_e(caption)}</caption>" if caption else ""
    return f"<table>{title}<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody></table>"


def _cell(value: Any) -> str:
    """A table cell; numbers (not booleans) right-aligned."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return f'<td class="num">{_e(value)}</td>' if number else f"<td>{_e(value)}</td>"


def _figure(fig: Figure, css: str = "") -> str:
    """An inline PNG (data: URI) whose alt text is the figure's title."""
    alt = " ".join(ax.get_title().replace("\n", " ") for ax in fig.axes)
    data = base64.b64encode(png_bytes(fig)).decode("ascii")
    return f'<figure class="{css}"><img alt="{_e(alt)}" src="data:image/png;base64,{data}"></figure>'


def _section(title: str, *parts: str) -> str:
    return f"<section>\n<h2>{_e(title)}</h2>\n" + "\n".join(parts) + "\n</section>"


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


def _badge(verdict_text: str) -> str:
    return f'<span class="verdict {verdict_text.replace(" ", "-").lower()}">{_e(verdict_text)}</span>'


SUMMARY_FACTS = {
    "rounds": "rounds finished",
    "initial_accuracy": "accuracy before training",
    "final_accuracy": "final accuracy",
    "best_accuracy": "best accuracy",
    "wall_seconds": "wall time (s)",
    "total_seconds": "seconds in rounds",
    "first_round_seconds": "first round (s, start-up included)",
    "steady_seconds_per_round": "seconds per later round",
    "bytes_sent": "bytes sent (total)",
    "bytes_received": "bytes received (total)",
    "stopped": "stopped early",
}


def _summary_section(run_dir: Path, rounds: list[dict[str, Any]]) -> str:
    """summary.json's facts; without it (a run that did not finish), the totals of metrics.jsonl and a note."""
    path = run_dir / SUMMARY_FILE
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(summary, dict):
            raise ValueError("not a JSON object")
        note = ""
    except (OSError, ValueError) as exc:
        trained = [r for r in rounds if r["round"] > 0]
        summary = {
            "rounds": len(trained),
            "total_seconds": sum(r.get("seconds", 0.0) for r in rounds),
            "bytes_sent": sum(r.get("bytes_sent", 0) for r in trained),
            "bytes_received": sum(r.get("bytes_received", 0) for r in trained),
        }
        reason = "missing (the run did not finish)" if isinstance(exc, FileNotFoundError) else f"unreadable ({exc})"
        note = _note(f"{path} is {reason}: totals from {METRICS_FILE}.")
    rows = [(label, summary[key]) for key, label in SUMMARY_FACTS.items() if key in summary]
    return _section("Summary", note + _table(("", "value"), rows))


def _config_section(cfg: RunConfig) -> str:
    """config.toml as one table per TOML table; the top-level keys are "run"."""
    groups: dict[str, list[tuple[str, Any]]] = {}
    for key, value in cfg.to_flat().items():
        group, _, leaf = key.rpartition(".")
        groups.setdefault(group or "run", []).append((leaf, value))
    tables = "".join(_table((group, "value"), rows) for group, rows in groups.items())
    return _section(f"Config ({CONFIG_FILE})", f'<div class="groups">{tables}</div>')


def _privacy_section(run_dir: Path, cfg: RunConfig, title: str, server_key: str | None) -> tuple[str, str]:
    """(section, verdict): the run's ledger audited, or why there is nothing to audit."""
    p = cfg.privacy
    if not (p.sample_level or p.client_level or (run_dir / LEDGER_FILENAME).exists()):
        text = "No differential privacy in this run (privacy.sample-level and privacy.client-level are off): "
        return _section("Privacy", _badge(NO_DP), _note(text + "no privacy budget was spent or recorded.")), NO_DP
    try:
        report = audit(run_dir, server_key=server_key)
    except (LedgerError, AuditError) as exc:
        failed = "tampered" if isinstance(exc, LedgerTamperedError) else AUDIT_FAILED
        return _section("Privacy", _badge(failed), f"<p>{_e(exc)}</p>"), failed
    found = ledger_verdict(report)
    parts = [f"<p>Ledger verdict: {_badge(found)}</p>", _ledger_facts(report)]
    if report.findings:
        parts.append(
            _table(("severity", "code", "finding"), [(f.severity, f.code, f.message) for f in report.findings])
        )
    if report.exceeded:
        parts.append(f"<p><strong>Cap exceeded by: {_e(', '.join(report.exceeded))}</strong></p>")
    parts.append(_table(PARTY_COLUMNS, party_rows(report), "epsilon per party (PLD backs the claim)"))
    if report.curves:
        parts.append(_figure(epsilon_figure(report, f"privacy spent: {run_dir.name}\n{title}"), "wide"))
    return _section("Privacy", *parts), found


def _ledger_facts(report: AuditReport) -> str:
    rows = [
        ("ledger", report.ledger_path),
        ("entries", report.entries),
        ("head hash", report.head_hash),
        ("integrity", report.integrity),
        ("anchors", f"{report.anchored_entries} of {report.entries} entries signed"),
        ("anchor key", report.key_source),
        ("delta", f"{report.delta:g}"),
    ]
    return _table(("", "value"), rows)


EMPIRICAL_COLUMNS = ("mechanism", "claimed epsilon", "audited", "what", "canaries", "seed", "ledger entry", "verdict")


def _empirical_section(run_dir: Path, privacy_verdict: str) -> tuple[str, bool]:
    """(section, refuted): empirical_audit.json as a table, with the check of its canary ledger's chain."""
    path = run_dir / EMPIRICAL_FILE
    if privacy_verdict == NO_DP:
        return _section("Empirical audit", _note("Not applicable: the run used no DP.")), False
    if not path.exists():
        command = f"<code>fedvault audit {_e(run_dir)} --empirical</code>"
        return _section("Empirical audit", f"<p>Not run. Run it with {command} (a separate training run).</p>"), False
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
        rows = [
            (
                r["mechanism"],
                r["claimed_epsilon"],
                r["audited"],
                bound_kind(r),
                r["canaries"],
                str(r["seed"]),  # an identifier to copy, not a quantity
                r["ledger_entry"],
                verdict(r),
            )
            for r in results
        ]
    except (OSError, ValueError, TypeError, KeyError) as exc:
        return _section("Empirical audit", _note(f"{path} is unreadable: {exc!r}")), False
    try:
        canaries = read_ledger(run_dir / CANARY_LEDGER)
        chain = f"{run_dir / CANARY_LEDGER}: {len(canaries.entries)} entries, hash chain verified"
    except LedgerError as exc:
        chain = str(exc)
    table = _table(EMPIRICAL_COLUMNS, rows, "a separate run with canaries; the run's model holds none")
    return _section("Empirical audit", table, f"<p>Canary ledger: {_e(chain)}</p>"), any(r["flagged"] for r in results)


ROUND_COLUMNS = ("round", "accuracy", "loss", "seconds", "bytes sent", "bytes received", *CLIENT_COUNTS.values())


def _round_row(r: dict[str, Any]) -> tuple[Any, ...]:
    central = r.get("central", {})
    return (
        r["round"],
        central.get("accuracy"),
        central.get("loss"),
        r.get("seconds"),
        r.get("bytes_sent"),
        r.get("bytes_received"),
        *(client_count(r, key) for key in CLIENT_COUNTS),
    )


def _system_section(rounds: list[dict[str, Any]], title: str) -> str:
    """Seconds, traffic and clients per round: figures, the per-round table, and every drop with its reason."""
    events = [
        (r["round"], kind, item.get("node"), item.get("reason"))
        for r in rounds
        for kind in ("dropped", "late")
        for item in r.get(kind, [])
    ]
    events += [(r["round"], "lost", None, r["lost"]) for r in rounds if "lost" in r]
    parts = [*map(_figure, system_figures(rounds, title).values()), _table(ROUND_COLUMNS, map(_round_row, rounds))]
    if events:
        parts.append(_table(("round", "what", "node", "reason"), events, "replies not aggregated"))
    return _section("System", *parts)

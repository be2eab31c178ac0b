"""`fedvault report RUN_DIR`: one self-contained HTML page, checked as HTML and in a headless browser.

The page of a real simulated run (the session's run, copied) is opened in Debian's chromium: its
figures must decode there and its screenshot must show something; unit-level runs written with
fedvault's own run-directory and ledger writers cover the no-DP page, damaged files and the
empirical audit's section.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image
from waits import seconds

from fedvault.cli import main
from fedvault.config import RunConfig
from fedvault.privacy.empirical_report import CANARY_LEDGER, EMPIRICAL_FILE
from fedvault.privacy.ledger import LEDGER_FILENAME, Ledger, LedgerHeader
from fedvault.rundir import METRICS_FILE, SUMMARY_FILE, RunDirectory
from fedvault.server.run_report import REPORT_FILE, ReportError, write_report

URL_ATTRIBUTES = {"src", "href", "srcset", "poster", "data", "action", "formaction", "background"}
FETCHING_TAGS = {"link", "script", "iframe", "object", "embed", "base", "frame"}


class Page(HTMLParser):
    """The tags, attributes, image sources and table count of an HTML page."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def images(self) -> list[str]:
        return [attrs["src"] or "" for tag, attrs in self.tags if tag == "img"]

    def count(self, name: str) -> int:
        return sum(tag == name for tag, _ in self.tags)


def decoded_png(src: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix), src[:60]
    image = Image.open(io.BytesIO(base64.b64decode(src[len(prefix) :], validate=True)))
    assert image.format == "PNG"
    image.load()
    return image


def assert_self_contained(text: str) -> None:
    """Nothing on the page can fetch anything: no URL but data:, no fetching tags, no CSS url()/@import."""
    page = Page(text)
    assert not [tag for tag, _ in page.tags if tag in FETCHING_TAGS]
    for tag, attrs in page.tags:
        for name, value in attrs.items():
            if name in URL_ATTRIBUTES:
                assert (value or "").startswith("data:"), f"<{tag} {name}={value!r}>"
    assert not re.search(r"https?://|//cdn|url\(|@import", text, re.I)


def unit_run(tmp_path: Path, *overrides: str, rounds: int = 2) -> Path:
    """A run directory written by fedvault's own writers: config, a record per round, the summary."""
    path = tmp_path / "unit-run"
    cfg = RunConfig.from_sources(None, ["task=digits", "num-clients=3", *overrides])
    run = RunDirectory(path).create(cfg.to_flat())
    run.append_round({"round": 0, "central": {"accuracy": 0.1, "loss": 2.3}, "seconds": 0.5})
    for n in range(1, rounds + 1):
        run.append_round(
            {
                "round": n,
                "central": {"accuracy": 0.1 + 0.3 * n, "loss": 2.3 / (n + 1)},
                "train": {"train_loss": 2.0 / n},
                "clients_sampled": 3,
                "replies_ok": 2,
                "dropped": [{"node": 17, "reason": "update norm 9.5 > max-update-norm 5"}],
                "late": [],
                "failed_nodes": [],
                "budget_exhausted": 0,
                "bytes_sent": 3000 * n,
                "bytes_received": 2000 * n,
                "seconds": 1.5 * n,
            }
        )
    run.write_summary({"rounds": rounds, "final_accuracy": 0.1 + 0.3 * rounds, "bytes_sent": 9000, "stopped": None})
    return path


@pytest.fixture
def no_dp_run(tmp_path):
    return unit_run(tmp_path, "privacy.sample-level=false")


def test_a_run_without_dp_renders_every_section_and_says_no_dp(no_dp_run):
    written = write_report(no_dp_run)
    text = written.path.read_text(encoding="utf-8")
    assert written.path == no_dp_run / REPORT_FILE and written.verdict == "no DP" and not written.refuted
    for heading in ("Summary", "Config (config.toml)", "Training", "Privacy", "Empirical audit", "System"):
        assert f"<h2>{heading}</h2>" in text
    assert "No differential privacy in this run" in text and "Not applicable: the run used no DP" in text
    page = Page(text)
    assert len(page.images()) == 5  # accuracy, loss, seconds, traffic, clients
    assert all(decoded_png(src).width > 300 for src in page.images())
    assert "update norm 9.5 &gt; max-update-norm 5" in text  # the drop's reason, escaped
    assert "<td>sample-level</td><td>false</td>" in text and "<th>privacy</th>" in text


def test_the_page_references_nothing_outside_itself(no_dp_run):
    assert_self_contained(write_report(no_dp_run).path.read_text(encoding="utf-8"))


def test_values_are_escaped(tmp_path):
    run = unit_run(tmp_path, "privacy.sample-level=false", 'tracking.experiment="<script>alert(1)</script>"')
    text = write_report(run).path.read_text(encoding="utf-8")
    assert "<script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text


def test_a_missing_summary_is_a_note_and_totals_come_from_the_metrics(no_dp_run):
    (no_dp_run / SUMMARY_FILE).write_text("{not json")
    text = write_report(no_dp_run).path.read_text(encoding="utf-8")
    assert f"{no_dp_run / SUMMARY_FILE} is unreadable" in text and "totals from metrics.jsonl" in text
    assert '<td>bytes sent (total)</td><td class="num">9,000</td>' in text  # 3000 + 6000 from the two rounds


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (lambda run: (run / "config.toml").unlink(), "no config.toml"),
        (lambda run: (run / "config.toml").write_text("task = [unclosed"), "config.toml is not valid TOML"),
        (lambda run: (run / METRICS_FILE).write_text('{"round": 0}\n{"round": 1, trunc\n'), "metrics.jsonl line 2"),
        (lambda run: (run / METRICS_FILE).unlink(), "metrics.jsonl is missing or empty"),
    ],
)
def test_a_required_file_missing_or_damaged_is_one_line_naming_it_and_exit_2(no_dp_run, capsys, damage, named):
    damage(no_dp_run)
    assert main(["report", str(no_dp_run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("fedvault report: error: ") and named in err
    assert not (no_dp_run / REPORT_FILE).exists()


def test_report_error_is_a_fedvault_error_for_python_callers(tmp_path):
    with pytest.raises(ReportError, match="not a run directory"):
        write_report(tmp_path)


def test_empirical_audit_results_and_their_canary_ledger_are_shown_and_checked(tmp_path):
    run = unit_run(tmp_path)
    result = {
        "mechanism": "dp-sgd",
        "seed": 123456789,
        "canaries": 200,
        "claimed_epsilon": 8.0,
        "audited": 1.234,
        "flagged": False,
    }
    ledger = Ledger(run / CANARY_LEDGER, header=LedgerHeader(f"{run.name}:empirical-audit", 1e-5, None, None))
    entry = ledger.append_canary(result)
    (run / EMPIRICAL_FILE).write_text(json.dumps([{**result, "ledger_entry": f"{CANARY_LEDGER} entry {entry.seq}"}]))
    section = empirical_section(write_report(run).path)
    assert "<td>123456789</td>" in section and "1.234" in section and "lower bound (95 %)" in section
    assert "consistent with the claim" in section and "hash chain verified" in section

    lines = (run / CANARY_LEDGER).read_text().splitlines()
    (run / CANARY_LEDGER).write_text("\n".join([*lines[:-1], lines[-1].replace("1.234", "0.5")]) + "\n")
    assert "tampered at line" in empirical_section(write_report(run).path)

    refuted = write_empirical_result(run, flagged=True)
    assert refuted.refuted and "CLAIM EXCEEDED" in empirical_section(refuted.path)
    (run / EMPIRICAL_FILE).write_text("[{}]")
    assert "is unreadable" in empirical_section(write_report(run).path)


def test_a_dp_run_without_its_ledger_says_so_and_exits_2(tmp_path, capsys):
    run = unit_run(tmp_path)  # DP-SGD on (the default), but no privacy ledger
    assert main(["report", str(run)]) == 2
    text = (run / REPORT_FILE).read_text(encoding="utf-8")
    assert '<span class="verdict audit-failed">audit failed</span>' in text and "no privacy ledger at" in text
    assert "(privacy: audit failed)" in capsys.readouterr().out


def write_empirical_result(run: Path, flagged: bool):
    """empirical_audit.json as `fedvault audit --empirical` writes it, then the page."""
    result = {"mechanism": "dp-sgd", "seed": 1, "canaries": 200, "claimed_epsilon": 8.0, "audited": 9.0}
    (run / EMPIRICAL_FILE).write_text(json.dumps([{**result, "flagged": flagged, "ledger_entry": "entry 1"}]))
    return write_report(run)


def empirical_section(page: Path) -> str:
    text = page.read_text(encoding="utf-8")
    return text.split("<h2>Empirical audit</h2>", 1)[1].split("</section>", 1)[0]


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        if path := shutil.which(name):
            return path
    pytest.skip("chromium not installed: apt-get install chromium (the browser checks of the report need it)")


def browse(page: Path, *flags: str) -> subprocess.CompletedProcess:
    browser = [chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1200,3000"]
    return subprocess.run(
        [*browser, *flags, page.as_uri()], capture_output=True, text=True, timeout=seconds(120), check=True
    )


@pytest.fixture
def simulated_copy(simulated_run, tmp_path):
    """A copy of the session's simulated run without the empirical audit another test may have added."""
    run = tmp_path / "run"
    shutil.copytree(simulated_run[0], run)
    for name in (EMPIRICAL_FILE, CANARY_LEDGER):
        (run / name).unlink(missing_ok=True)
    return run


@pytest.mark.integration
def test_the_page_of_a_real_run_renders_in_chromium(simulated_copy, tmp_path):
    page = tmp_path / "out" / "page.html"
    assert main(["report", str(simulated_copy), "--out", str(page)]) == 0
    text = page.read_text(encoding="utf-8")
    assert_self_contained(text)
    assert '<span class="verdict verified">verified</span>' in text
    assert "digits, 5 clients (dirichlet), fedavg, DP-SGD eps 8, delta 1e-05" in text  # the run's settings
    assert f"<code>fedvault audit {simulated_copy} --empirical</code>" in text
    assert not (simulated_copy / REPORT_FILE).exists()  # --out was honoured

    # The test's copy of the page reports, from inside the browser, how wide each image decoded.
    probe = page.with_name("probe.html")
    script = (
        '<script>window.addEventListener("load", () => document.body.setAttribute("data-image-widths", '
        '[...document.images].map(i => i.naturalWidth).join(",")));</script>'
    )
    probe.write_text(text.replace("</body>", script + "</body>"), encoding="utf-8")
    dom = browse(probe, "--dump-dom").stdout
    widths = re.search(r'data-image-widths="([\d,]*)"', dom)
    assert widths, dom[-2000:]
    images = Page(text).images()
    assert len(images) == 6  # accuracy, loss, epsilon, seconds, traffic, clients
    assert [int(w) for w in widths.group(1).split(",")] == [decoded_png(src).width for src in images]
    assert all(int(w) > 300 for w in widths.group(1).split(","))
    assert Page(dom).count("table") >= 10 and "client-4" in dom  # config groups, privacy, rounds

    shot = tmp_path / "page.png"
    browse(page, f"--screenshot={shot}")
    image = Image.open(shot)
    assert image.format == "PNG" and image.width >= 1200 and image.height >= 3000
    colours = image.convert("RGB").getcolors(maxcolors=1_000_000)
    assert colours is None or len(colours) > 50  # text, tables and plots, not a blank page


@pytest.mark.integration
def test_a_tampered_ledger_shows_on_the_page_and_exits_2(simulated_copy, capsys):
    ledger = simulated_copy / LEDGER_FILENAME
    lines = ledger.read_text().splitlines()
    entry = json.loads(lines[3])
    entry["event"]["noise_multiplier"] *= 2
    ledger.write_text(
        "\n".join([*lines[:3], json.dumps(entry, sort_keys=True, separators=(",", ":")), *lines[4:]]) + "\n"
    )
    assert main(["report", str(simulated_copy)]) == 2
    text = (simulated_copy / REPORT_FILE).read_text(encoding="utf-8")
    assert '<span class="verdict tampered">tampered</span>' in text and "tampered at line 4" in text
    assert "(privacy: tampered)" in capsys.readouterr().out


@pytest.mark.integration
def test_an_empirical_audit_that_refutes_the_claim_exits_1(simulated_copy):
    write_empirical_result(simulated_copy, flagged=True)
    assert main(["report", str(simulated_copy)]) == 1  # as `fedvault audit --empirical`

"""README's "From Python" snippet runs as written: a small private simulation, then its audit."""

import logging
import os
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def from_python_snippet() -> str:
    """The first python code block in README's "## From Python" section."""
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## From Python\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert blocks, "README's From Python section has no python code block"
    return blocks[0]


def test_snippet_is_the_front_door():
    code = from_python_snippet()
    assert "from fedvault import" in code and "simulate(" in code and "audit(result.path)" in code


@pytest.mark.integration
def test_from_python_snippet_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the run directory defaults to ./runs/<time>-<task>
    import fedvault.simulations.harness  # noqa: F401 - scikit-learn sets KMP_* variables when imported; simulate must not

    environ, flwr_level = dict(os.environ), logging.getLogger("flwr").level
    namespace: dict = {}
    exec(compile(from_python_snippet(), str(README), "exec"), namespace)

    result, report, config = namespace["result"], namespace["report"], namespace["config"]
    assert result.path.resolve().parent == tmp_path / "runs" and (result.path / "summary.json").is_file()
    assert result.summary["rounds"] == 2 and [r["round"] for r in result.rounds] == [0, 1, 2]
    assert 0.0 <= result.final_accuracy <= 1.0 and result.stopped is None
    assert result.config == config.with_options(run_dir=str(result.path))

    assert report.integrity == "ok" and not report.exceeded
    assert sorted(p.party for p in report.parties) == ["client-0", "client-1", "client-2"]
    for party in report.parties:
        assert party.rounds == [1, 2] and party.cap == 8.0 and 0 < party.epsilon_pld <= 8.0

    out = capsys.readouterr().out
    assert f"final accuracy {result.final_accuracy:.3f} after 2 rounds" in out
    assert f"max epsilon {max(p.epsilon_pld for p in report.parties):.2f} (cap 8.0)" in out
    assert dict(os.environ) == environ and logging.getLogger("flwr").level == flwr_level

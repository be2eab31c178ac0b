"""README's config table is the code's: every key, type, default and meaning, generated."""

from pathlib import Path

from fedvault.cli_config import README_TABLE_MARKER, reference_markdown
from fedvault.config import reference

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_config_table_matches_the_code():
    text = README.read_text(encoding="utf-8")
    assert README_TABLE_MARKER in text, "README lost its config-table marker"
    table = text.split(README_TABLE_MARKER + "\n", 1)[1].split("\n\n", 1)[0]
    assert table == reference_markdown(), "README's config table is stale: run `python -m fedvault.cli_config`"
    for key, *_ in reference():
        assert f"| `{key}` |" in table
    assert "| `sealing.mode` |" in table

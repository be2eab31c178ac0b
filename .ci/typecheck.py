"""Type-check the fedvault package with mypy.

The subpackages live in top-level folders mapped into one namespace by setuptools' package-dir
(pyproject.toml), which mypy cannot follow through an editable install. This builds the import
tree the wheel would have, out of symlinks in a temporary folder, and runs mypy on it.

    python .ci/typecheck.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    with tempfile.TemporaryDirectory(prefix="fedvault-types-") as tmp:
        core = Path(tmp) / "fedvault"  # a real folder: subpackage links must not land inside the repository
        core.mkdir()
        for entry in (REPO / setuptools["package-dir"]["fedvault"]).iterdir():
            (core / entry.name).symlink_to(entry)
        for package, folder in setuptools["package-dir"].items():
            if package != "fedvault":
                (core / package.removeprefix("fedvault.")).symlink_to(REPO / folder, target_is_directory=True)
        command = [sys.executable, "-m", "mypy", "--config-file", str(REPO / "pyproject.toml"), "-p", "fedvault"]
        return subprocess.call(command, cwd=tmp)


if __name__ == "__main__":
    sys.exit(main())

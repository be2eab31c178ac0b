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
        root = Path(tmp)
        for package, folder in sorted(setuptools["package-dir"].items(), key=lambda item: item[0].count(".")):
            target = root.joinpath(*package.split("."))
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(REPO / folder, target_is_directory=True)
        command = [sys.executable, "-m", "mypy", "--config-file", str(REPO / "pyproject.toml"), "-p", "fedvault"]
        return subprocess.call(command, cwd=root)


if __name__ == "__main__":
    sys.exit(main())

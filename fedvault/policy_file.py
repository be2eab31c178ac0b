"""A party's local policy file: a flat TOML table read on its own machine, never from the run.

The client's and the server's security policies (:mod:`fedvault.client.policy`,
:mod:`fedvault.server.sealing`) come from node config or such a file, so whoever stores or edits
the run config (the SuperLink and its database) cannot weaken them.
"""

from __future__ import annotations

import tomllib
from collections.abc import Collection
from pathlib import Path
from typing import Any

from fedvault.errors import ConfigError


def read_policy_file(path: str | Path, keys: Collection[str], what: str) -> dict[str, Any]:
    """The file's keys; ConfigError naming the file for a missing file, bad TOML or an unknown key."""
    path = Path(path).expanduser()
    try:
        values = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"{what} policy file {path}: cannot read it ({err.strerror})") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{what} policy file {path}: not valid TOML ({err})") from None
    unknown = sorted(set(values) - set(keys))
    if unknown:
        raise ConfigError(f"{what} policy file {path}: unknown key(s) {unknown} (known: {sorted(keys)})")
    return values

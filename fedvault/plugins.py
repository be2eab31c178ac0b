"""Resolve a plug-in named ``package.module:attr`` or registered in an entry point group, and decide
whether a run may name it at all.

Importing ``module:attr`` runs that module's code, so a run config that could name any module
would run its author's code on every party (issue #16, W5). Each party decides with its own
:class:`PluginPolicy`: a name without ``:`` (a built-in, or an entry point of an installed
distribution) is always allowed, and so is ``module:attr`` when it is the value of an entry point
in the plug-in's group (installed by the party itself); any other ``module:attr`` only when it is
on the party's allow-list. The check reads only names and installed metadata: nothing is imported
before it passes.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from fedvault.errors import ConfigError, FedvaultError

#: ``package.module:attr``: dotted Python identifiers, one colon, one attribute name.
SPEC_PATTERN = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")


class PluginError(LookupError):
    """The name resolves to nothing importable; the message says what failed."""


class PluginRefused(FedvaultError, PermissionError):
    """A run names a ``module:attr`` plug-in the receiving party does not allow; nothing was imported."""


@dataclass(frozen=True)
class PluginPolicy:
    """Which ``module:attr`` plug-ins a run config may name on this party (module docstring).

    ``allowed`` holds exact ``module:attr`` names. ``anything`` is for a simulation only, where
    the one user who writes the config also runs every party: nothing arrives from anyone else.
    """

    allowed: frozenset[str] = frozenset()
    anything: bool = False

    @classmethod
    def simulation(cls) -> PluginPolicy:
        """Every plug-in: the config's author runs the server and every client on this machine."""
        return cls(anything=True)

    @classmethod
    def from_value(cls, value: Any, where: str) -> PluginPolicy:
        """An ``allow-plugins`` value: a list of ``module:attr`` or one comma-separated string
        (node config values are scalars); ConfigError naming ``where`` for anything else."""
        if isinstance(value, str):
            items: Iterable[Any] = value.split(",")
        elif isinstance(value, list | tuple | frozenset | set):
            items = value
        else:
            raise ConfigError(f"{where}: {value!r} is not a list of 'module:attr' names")
        allowed = set()
        for item in items:
            spec = str(item).strip() if isinstance(item, str) else item
            if spec == "":
                continue
            if not isinstance(spec, str) or not SPEC_PATTERN.fullmatch(spec):
                raise ConfigError(
                    f"{where}: {spec!r} is not 'package.module:attr' (built-ins and installed entry points "
                    "need no allowing)"
                )
            allowed.add(spec)
        return cls(frozenset(allowed))

    def permits(self, spec: str, group: str) -> bool:
        """Whether a run may name ``spec`` from entry point group ``group`` here (imports nothing)."""
        if self.anything or ":" not in spec or spec in self.allowed:
            return True
        return any(ep.value == spec for ep in entry_points(group=group))

    def check(self, kind: str, spec: str, group: str, side: str, how: str) -> None:
        """:class:`PluginRefused` in one line naming the plug-in, the side and ``how`` to allow it."""
        if not self.permits(spec, group):
            raise PluginRefused(
                f"{side} policy refuses {kind} {_shown(spec)}: a run may name only built-in {kind}s, entry "
                f"points in group '{group}' and plug-ins the {side} allows; nothing was imported "
                f"(to allow it: {how})"
            )


def entry_point_names(group: str) -> list[str]:
    """Names registered in an entry point group, sorted."""
    return sorted({ep.name for ep in entry_points(group=group)})


def load_plugin(spec: str, group: str) -> Any:
    """The object named by ``module:attr`` or by entry point ``spec`` in ``group``."""
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise PluginError(f"cannot import module '{module_name}' for '{spec}': {exc}") from None
        try:
            return getattr(module, attr)
        except AttributeError:
            raise PluginError(f"module '{module_name}' has no attribute '{attr}' (from '{spec}')") from None
    matches = [ep for ep in entry_points(group=group) if ep.name == spec]
    if not matches:
        raise PluginError(f"no entry point '{spec}' in group '{group}'")
    try:
        return matches[0].load()
    except Exception as exc:  # noqa: BLE001 - an entry point's module may fail in any way on import
        raise PluginError(f"entry point '{spec}' in group '{group}' failed to load: {exc}") from None


def _shown(spec: str) -> str:
    """``spec`` quoted for one log line: newlines escaped, at most 200 characters."""
    return repr(spec[:200]) + ("..." if len(spec) > 200 else "")

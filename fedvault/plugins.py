"""Resolve a plug-in named ``package.module:attr`` or registered in an entry point group."""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any


class PluginError(LookupError):
    """The name resolves to nothing importable; the message says what failed."""


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

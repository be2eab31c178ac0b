"""The ServerApp's plug-in allow-list (issue #16, W5): which ``module:attr`` tasks and strategies a
run config may make the server import.

Deployed (``fedvault server``, ``flwr run``), the list is ``allow-plugins`` in the server's own
policy file (``$FEDVAULT_SERVER_POLICY``, a TOML list; ``fedvault server --allow-plugin SPEC``
writes it), never the run config the SuperLink stores. Built-in tasks and strategies and installed
entry points (groups ``fedvault.tasks``, ``fedvault.strategies``) are always allowed
(:class:`fedvault.plugins.PluginPolicy`). In a simulation (a ServerApp built with its config baked
in, ``fedvault simulate``) the config's author runs every party, so its plug-ins are allowed.
"""

from __future__ import annotations

import os

from fedvault.config import RunConfig
from fedvault.plugins import PluginPolicy
from fedvault.policy_file import read_policy_file
from fedvault.server.sealing import SERVER_POLICY_ENV, SERVER_POLICY_KEYS
from fedvault.strategies.registry import ENTRY_POINT_GROUP as STRATEGY_GROUP
from fedvault.tasks import TASK_GROUP

#: How the server's operator allows a plug-in (said in every refusal).
ALLOW_PLUGIN_HOW = (
    f"fedvault server --allow-plugin SPEC, or 'allow-plugins' in the server policy file ${SERVER_POLICY_ENV}"
)


def server_plugin_policy(deployed: bool) -> PluginPolicy:
    """Simulation: every plug-in. Deployed: ``allow-plugins`` of ``$FEDVAULT_SERVER_POLICY`` (none without it)."""
    return plugin_policy_file(os.environ.get(SERVER_POLICY_ENV)) if deployed else PluginPolicy.simulation()


def plugin_policy_file(path: str | None) -> PluginPolicy:
    """The ``allow-plugins`` of server policy file ``path`` (empty for None); ConfigError naming the file."""
    values = read_policy_file(path, SERVER_POLICY_KEYS, "server") if path else {}
    return PluginPolicy.from_value(values.get("allow-plugins", []), f"server policy {path} 'allow-plugins'")


def check_run_plugins(cfg: RunConfig, policy: PluginPolicy) -> None:
    """:class:`~fedvault.plugins.PluginRefused` (one line) unless ``policy`` allows the run's task and
    strategy; reads only their names, so a refused plug-in is never imported."""
    policy.check("task", cfg.task, TASK_GROUP, "server", ALLOW_PLUGIN_HOW)
    policy.check("strategy", cfg.strategy.name, STRATEGY_GROUP, "server", ALLOW_PLUGIN_HOW)

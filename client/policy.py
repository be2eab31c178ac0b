"""The client's own security policy: what it requires of every instruction, whatever the run says.

A deployed client reads its policy from its node config (``fedvault client`` passes it to its
SuperNode) or from a local TOML file with the same keys (node config ``policy-file``, else the
environment variable ``FEDVAULT_CLIENT_POLICY``; node config wins). Never from the run config:
the SuperLink stores the run config and can edit it. Keys:

``server-identity``   the pinned server identity: SHA-256 fingerprint, or an ``identity.pub`` path
``sealing``           ``"on"`` (default): every instruction must be signed by the pinned identity
                      for this run, round, node and message type, and every reply is sealed;
                      ``"off"``: an insecure local experiment (no pin allowed with it)
``sealing-suites``    comma-separated HPKE suites the client accepts (default: all of ``SUITES``)
``dp-required``       refuse to train unless the run uses sample-level DP-SGD
``dp-max-epsilon``    the client's epsilon cap for a run (implies ``dp-required``); the client
                      calibrates its noise and enforces its budget with min(run's, this)
``dp-delta``          the client's delta; min(run's, this) is used
``answered-rounds``   directory for the record of answered rounds (survives a restart)
``allow-plugins``     ``module:attr`` tasks a run may name here (a TOML list, or comma-separated in
                      node config); built-in tasks and installed ``fedvault.tasks`` entry points
                      need no allowing. Any other ``module:attr`` is refused before it is imported
                      (reply status ``policy-refused``): importing it would run the run author's code

A replayed or duplicated instruction is refused: :class:`AnsweredRounds` keeps the highest round
answered per run and message type in Flower's ``context.state`` (kept by the SuperNode for the
life of its process) and, when ``answered-rounds`` names a directory, in ``run-<id>.json`` there
(written atomically before training; it survives a SuperNode restart, context state does not).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context

from fedvault.atomic import atomic_write
from fedvault.config import RunConfig
from fedvault.errors import ConfigError, FedvaultError
from fedvault.plugins import PluginPolicy, PluginRefused
from fedvault.policy_file import read_policy_file
from fedvault.protocol import POLICY_REFUSED, config_int
from fedvault.security.identity import IdentityPin
from fedvault.security.sealing import SUITES
from fedvault.tasks import TASK_GROUP

log = logging.getLogger("fedvault")

CLIENT_POLICY_ENV = "FEDVAULT_CLIENT_POLICY"
POLICY_KEYS = frozenset(
    {
        "server-identity",
        "sealing",
        "sealing-suites",
        "dp-required",
        "dp-max-epsilon",
        "dp-delta",
        "answered-rounds",
        "allow-plugins",
    }
)
ANSWERED_STATE = "fedvault.answered-rounds"
#: How a client's operator allows a plug-in (said in every refusal).
ALLOW_PLUGIN_HOW = "fedvault client --allow-plugin SPEC, or 'allow-plugins' in this node's policy file"


class ClientPolicyError(FedvaultError, ValueError):
    """An instruction breaks this client's policy (unsealed, replayed) or the policy is not set."""


class PolicyRefused(Exception):
    """The run asks for what this client's policy refuses (less privacy than its DP floor, a task it
    does not allow): nothing is trained, the reply says why (status ``policy-refused``)."""

    status = POLICY_REFUSED


@dataclass(frozen=True)
class DPFloor:
    """The least DP this client trains with: the run may ask for more noise, never for less."""

    required: bool = False
    max_epsilon: float = 0.0  # 0: no cap of the client's own
    delta: float = 0.0  # 0: the run's delta

    def apply(self, cfg: RunConfig) -> RunConfig:
        """``cfg`` with min(run, client) epsilon and delta; :class:`PolicyRefused` if DP is off but required."""
        privacy = cfg.privacy
        if not privacy.sample_level:
            if self.required:
                raise PolicyRefused(
                    "this client requires sample-level DP (node config dp-required / dp-max-epsilon) and the "
                    "run asks privacy.sample-level = false: nothing was trained"
                )
            return cfg
        epsilon = min(privacy.target_epsilon, self.max_epsilon) if self.max_epsilon else privacy.target_epsilon
        delta = min(privacy.target_delta, self.delta) if self.delta else privacy.target_delta
        if (epsilon, delta) == (privacy.target_epsilon, privacy.target_delta):
            return cfg
        log.info(
            "client DP floor: run asks epsilon %g delta %g, training with epsilon %g delta %g",
            privacy.target_epsilon,
            privacy.target_delta,
            epsilon,
            delta,
        )
        tighter = dataclasses.replace(privacy, target_epsilon=epsilon, target_delta=delta)
        return dataclasses.replace(cfg, privacy=tighter)


@dataclass(frozen=True)
class ClientPolicy:
    """What this client requires; built from node config (deployment) or by the simulation harness."""

    sealing: bool = True
    pin: IdentityPin | None = None
    suites: frozenset[str] = frozenset(SUITES)
    dp: DPFloor = field(default_factory=DPFloor)
    answered_dir: Path | None = None
    #: Refuse a round at or below one already answered. Off only in a simulation, where one process
    #: runs every party and no relay can replay (a ServerApp may then run several trainings in one run).
    refuse_replays: bool = True
    #: The ``module:attr`` tasks a run may name (W5); the simulation harness allows its user's own.
    plugins: PluginPolicy = field(default_factory=PluginPolicy)

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> ClientPolicy:
        """Keys from ``policy-file`` / ``$FEDVAULT_CLIENT_POLICY``, then node config (module docstring)."""
        values: dict[str, Any] = {}
        file = node_config.get("policy-file") or os.environ.get(CLIENT_POLICY_ENV)
        if file:
            values.update(read_policy_file(str(file), POLICY_KEYS, "client"))
        values.update({key: value for key, value in node_config.items() if key in POLICY_KEYS})
        return cls.from_values(values)

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> ClientPolicy:
        sealing = _switch(values.get("sealing", "on"), "sealing")
        identity = str(values.get("server-identity", "") or "")
        if identity and not sealing:
            raise ConfigError("client policy: 'server-identity' is pinned but 'sealing' is off: choose one")
        pin = None
        if identity:
            pin = (
                IdentityPin.from_public_key_file(identity)
                if Path(identity).is_file()
                else IdentityPin.from_fingerprint(identity)
            )
        suites = frozenset(
            s.strip() for s in str(values.get("sealing-suites", ",".join(SUITES))).split(",") if s.strip()
        )
        unknown = sorted(suites - set(SUITES))
        if unknown or not suites:
            raise ConfigError(f"client policy 'sealing-suites': {unknown or 'empty'} (known: {', '.join(SUITES)})")
        max_epsilon = _number(values.get("dp-max-epsilon", 0.0), "dp-max-epsilon")
        delta = _number(values.get("dp-delta", 0.0), "dp-delta")
        if delta >= 1:
            raise ConfigError(f"client policy 'dp-delta': {delta} must be < 1")
        required = _switch(values.get("dp-required", False), "dp-required") or max_epsilon > 0
        answered = str(values.get("answered-rounds", "") or "")
        plugins = PluginPolicy.from_value(values.get("allow-plugins", ()), "client policy 'allow-plugins'")
        return cls(
            sealing,
            pin,
            suites,
            DPFloor(required, max_epsilon, delta),
            Path(answered) if answered else None,
            plugins=plugins,
        )

    def check_plugins(self, cfg: RunConfig) -> None:
        """:class:`PolicyRefused` (one line, logged) when the run names a ``module:attr`` task this
        client does not allow; called before the task is loaded, so nothing of it is imported."""
        try:
            self.plugins.check("task", cfg.task, TASK_GROUP, "client", ALLOW_PLUGIN_HOW)
        except PluginRefused as exc:
            log.warning("%s", exc)
            raise PolicyRefused(str(exc)) from None

    def require_pin(self) -> IdentityPin:
        """The pin a sealed instruction is checked against; ClientPolicyError when none is set."""
        if self.pin is None:
            raise ClientPolicyError(
                "client policy: sealing is on but this node pins no server identity (node config "
                "'server-identity': the fingerprint `fedvault keys init` printed, or identity.pub); "
                "the run config cannot set it"
            )
        return self.pin


class AnsweredRounds:
    """The highest round this node answered, per run and message type (see the module docstring)."""

    def __init__(self, policy: ClientPolicy, context: Context) -> None:
        self.run_id, self.state = context.run_id, context.state
        self.record = f"{ANSWERED_STATE}.run-{context.run_id}"  # a run series shares context.state across runs
        self.file = None if policy.answered_dir is None else policy.answered_dir / f"run-{context.run_id}.json"

    def claim(self, kind: str, server_round: int) -> None:
        """Record ``server_round`` as answered for ``kind``; ClientPolicyError if it is not above the last one."""
        answered = self._read()
        last = answered.get(kind)
        if last is not None and server_round <= last:
            raise ClientPolicyError(
                f"refusing a {kind} instruction for round {server_round} of run {self.run_id}: this node already "
                f"answered {kind} round {last} (a replayed or duplicated instruction)"
            )
        answered[kind] = server_round
        self.state[self.record] = ConfigRecord(dict(answered))
        if self.file is not None:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            data = json.dumps(answered, sort_keys=True).encode()
            atomic_write(self.file, lambda fh: fh.write(data), 0o600)

    def _read(self) -> dict[str, int]:
        answered: dict[str, int] = {}
        record = self.state.get(self.record)
        if isinstance(record, ConfigRecord):
            answered.update({key: config_int(record, key, 0) for key in record})
        if self.file is not None and self.file.exists():
            try:
                stored = json.loads(self.file.read_text())
            except (OSError, ValueError) as err:
                raise ClientPolicyError(f"answered-rounds file {self.file} is unreadable ({err}): refusing") from None
            for key, value in stored.items():
                answered[key] = max(int(value), answered.get(key, int(value)))
        return answered


def _switch(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("on", "true", "1", "yes"):
        return True
    if text in ("off", "false", "0", "no"):
        return False
    raise ConfigError(f"client policy {key!r}: {value!r} is not on/off")


def _number(value: Any, key: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"client policy {key!r}: {value!r} is not a number") from None
    if number < 0:
        raise ConfigError(f"client policy {key!r}: {value!r} must be >= 0")
    return number

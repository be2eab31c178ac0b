"""Run configuration: one flat namespace of hyphenated keys, shared by every entry point.

The same keys work in a TOML file, in ``fedvault simulate --set key=value``, and in Flower's
``[tool.flwr.app.config]`` / ``flwr run --run-config``. A TOML table ``[privacy]`` with key
``target-epsilon`` is the key ``privacy.target-epsilon``; dataclass sections below mirror that.
Every key is declared once here with its type, default, constraint and help text; unknown keys
and invalid values raise :class:`~fedvault.errors.ConfigError` naming the key and the value, however
the config is built: ``RunConfig(num_clients=0)`` fails the same way as ``--set num-clients=0``.

From Python, :meth:`RunConfig.create` takes every key as a keyword: a top-level key by its field
name (``num-clients`` -> ``num_clients``), a section key as ``<section>_<field>``
(``privacy.target-epsilon`` -> ``privacy_target_epsilon``); ``strategy`` is short for
``strategy_name`` and ``strategy_params={"proximal-mu": 0.1}`` sets ``strategy.<param>`` keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, ClassVar, get_type_hints

from fedvault.errors import ConfigError

Check = tuple[Callable[[Any], bool], str]
STRATEGY_PREFIX = "strategy."
#: Built-in strategies client-level DP cannot wrap: DP-FedAvg releases one noised mean of the clipped
#: updates, and these aggregate something else (fedvault.server.client_level_dp checks plug-ins when built).
NOT_CLIENT_LEVEL = {
    "scaffold": "needs every client's control-variate update",
    "fednova": "needs every client's step count",
    "fedmedian": "is a robust aggregator over the individual updates",
    "fedtrimmedavg": "is a robust aggregator over the individual updates",
    "krum": "is a robust aggregator over the individual updates",
    "multikrum": "is a robust aggregator over the individual updates",
    "bulyan": "is a robust aggregator over the individual updates",
    "qfedavg": "weights each client by its own loss",
}


def option(default: Any, help: str, check: Check | None = None, choices: tuple = ()) -> Any:
    """Declare a config key: default, help text, and an optional (predicate, rule) check."""
    return field(default=default, metadata={"help": help, "check": check, "choices": choices})


POSITIVE: Check = (lambda v: v >= 1, "must be >= 1")
NON_NEGATIVE: Check = (lambda v: v >= 0, "must be >= 0")
FRACTION: Check = (lambda v: 0.0 <= v <= 1.0, "must be between 0 and 1")
OPEN_FRACTION: Check = (lambda v: 0.0 <= v < 1.0, "must be >= 0 and < 1")
GREATER_THAN_ZERO: Check = (lambda v: v > 0, "must be > 0")


class _Validated:
    """A config section that checks its keys on construction, with the checks ``from_flat`` runs."""

    SECTION: ClassVar[str] = ""  # the section's key prefix ("privacy"); "" for RunConfig itself

    def __post_init__(self) -> None:
        prefix = self.SECTION + "." if self.SECTION else ""
        for name, key, spec in _leaves(type(self)):
            # frozen dataclass: store the coerced value (an int given for a float key becomes a float)
            object.__setattr__(self, name, _coerce(prefix + key, getattr(self, name), spec))


@dataclass(frozen=True)
class StrategyConfig(_Validated):
    """``strategy.name`` plus free ``strategy.<param>`` keys checked by the strategy registry."""

    SECTION: ClassVar[str] = "strategy"

    name: str = option("fedavg", "aggregation strategy: see `fedvault strategies` (built-ins, module:Class, plug-ins)")


@dataclass(frozen=True)
class PrivacyConfig(_Validated):
    """Sample-level DP-SGD in clients and client-level DP-FedAvg on the server."""

    SECTION: ClassVar[str] = "privacy"

    sample_level: bool = option(
        True, "clients train with Opacus DP-SGD (per-client (epsilon, delta) for the whole run)"
    )
    target_epsilon: float = option(
        8.0, "per-client epsilon cap for the whole run; the noise is calibrated to it", GREATER_THAN_ZERO
    )
    target_delta: float = option(
        1e-5, "delta for every (epsilon, delta) claim", (lambda v: 0 < v < 1, "must be > 0 and < 1")
    )
    max_grad_norm: float = option(1.0, "per-sample clipping norm for DP-SGD", GREATER_THAN_ZERO)
    max_physical_batch_size: int = option(
        0,
        "split each logical DP-SGD batch into physical batches of at most this many examples (Opacus' "
        "BatchMemoryManager: same privacy, bounded memory); 0 = no split",
        NON_NEGATIVE,
    )
    grad_sample_mode: str = option(
        "auto",
        "per-sample gradients: auto (times hooks, functorch, ew, and ghost and bk for tasks on the built-in "
        "loop; keeps the fastest), Opacus' hooks, functorch, ghost (the task must use settings.criterion) or "
        "ew, or bk (book-keeping clipping: one backward pass; Linear/Conv layers; uses settings.criterion)",
        choices=("auto", "hooks", "functorch", "ghost", "ew", "bk"),
    )
    secure_mode: bool = option(
        False,
        "Opacus' secure mode: sampling and noise from a CSPRNG (needs torchcsprng); off = torch generators "
        "seeded from secrets",
    )
    client_level: bool = option(
        False, "server-side DP-FedAvg: clip each update, noise the sum, Poisson-sample clients with q = fraction-train"
    )
    client_noise_multiplier: float = option(
        1.0, "noise multiplier z for client-level DP (std z*C on the sum)", GREATER_THAN_ZERO
    )
    client_clip_norm: float = option(
        1.0, "update clipping norm C for client-level DP (initial norm when adaptive)", GREATER_THAN_ZERO
    )
    adaptive_clipping: bool = option(False, "adapt C to the target quantile of update norms (Andrew et al. 2021)")
    target_quantile: float = option(
        0.5, "quantile of update norms adaptive clipping tracks", (lambda v: 0 < v < 1, "must be > 0 and < 1")
    )
    client_level_target_epsilon: float = option(10.0, "the server's epsilon cap for client-level DP", GREATER_THAN_ZERO)
    node_ledger: str = option("", "client ledger SQLite file; empty = <run-dir>/node-ledger.sqlite (or ~/.fedvault/)")


@dataclass(frozen=True)
class ValidationConfig(_Validated):
    """Checks every update passes before aggregation."""

    SECTION: ClassVar[str] = "validation"

    max_update_norm: float = option(
        0.0, "drop updates whose L2 norm (reply - global) exceeds this; 0 = off", NON_NEGATIVE
    )
    max_payload_mb: float = option(512.0, "drop replies whose arrays exceed this many MiB; 0 = off", NON_NEGATIVE)


@dataclass(frozen=True)
class AttackConfig(_Validated):
    """Simulated malicious clients (robustness experiments)."""

    SECTION: ClassVar[str] = "attack"

    kind: str = option("none", "what attackers do", choices=("none", "sign-flip", "scale", "gaussian", "label-flip"))
    fraction: float = option(0.0, "fraction of clients that attack", FRACTION)
    scale: float = option(10.0, "strength of sign-flip / scale / gaussian attacks", GREATER_THAN_ZERO)


@dataclass(frozen=True)
class SealingConfig(_Validated):
    """End-to-end sealed replies and signed instructions (see docs/threat_model.md).

    These keys are the simulation's (``fedvault simulate``: one operator runs every party). Deployed,
    each party's policy is its own: a client's from its node config (:mod:`fedvault.client.policy`),
    the ServerApp's from its local file (:mod:`fedvault.server.sealing`); the run config cannot
    switch sealing off or choose the suite, and no client takes its pin from it."""

    SECTION: ClassVar[str] = "sealing"

    mode: str = option(
        "auto",
        "fedvault simulate: on or off (auto = off); deployed, each party's own policy decides (README, Sealed updates)",
        choices=("auto", "on", "off"),
    )
    suite: str = option(
        "x25519",
        "HPKE suite in simulation: x25519 (X25519+HKDF-SHA256+AES-128-GCM) or the mlkem768-x25519 hybrid",
        choices=("x25519", "mlkem768-x25519"),
    )
    identity_key: str = option(
        "", "server: Ed25519 identity key (fedvault keys init); empty = a fresh one in the run dir"
    )

    def enabled(self, deployed: bool) -> bool:
        """What the run config asks: ``auto`` seals deployed and not in ``fedvault simulate`` (only a
        simulation follows it; deployed parties follow their local policies)."""
        return self.mode == "on" or (self.mode == "auto" and deployed)


@dataclass(frozen=True)
class CompressionConfig(_Validated):
    """How a client compresses its update (the delta against the global model; fedvault.compression)."""

    SECTION: ClassVar[str] = "compression"

    codec: str = option(
        "none",
        "update codec: none, fp16, bf16, int8 / int4 (blockwise absmax), topk (top-k with error feedback), "
        "rotation (random rotation + stochastic quantisation to compression.bits)",
        choices=("none", "fp16", "bf16", "int8", "int4", "topk", "rotation"),
    )
    bits: int = option(8, "bits per value for rotation", (lambda v: 1 <= v <= 16, "must be between 1 and 16"))
    block_size: int = option(256, "values per float32 scale for int8 / int4", POSITIVE)
    top_k_fraction: float = option(
        0.01,
        "share of the update's values topk sends (the largest magnitudes)",
        (lambda v: 0 < v <= 1, "must be > 0 and <= 1"),
    )


@dataclass(frozen=True)
class FederationConfig(_Validated):
    """What kind of devices a simulation's clients are (fedvault.profiles), and how a round treats the slow."""

    SECTION: ClassVar[str] = "federation"

    profiles: str = option(
        "",
        "client profiles of a simulation as NAME:FRACTION,... (built-ins: datacenter-gpu, datacenter-cpu, "
        "edge-laptop, edge-phone, edge-iot) or a preset: mixed (20 % data-center, 80 % edge), datacenter, edge; "
        "each client then keeps a virtual clock; empty = every client alike, rounds timed on the wall clock",
    )
    profile_file: str = option("", "TOML file of user-defined profiles, one table each (see README)")
    deadline: float = option(
        0.0,
        "seconds a round waits for train replies (virtual with profiles, else wall clock): a later reply is "
        "dropped, its privacy spend recorded; 0 = wait for all (up to round-timeout)",
        NON_NEGATIVE,
    )
    deadline_quantile: float = option(
        0.0,
        "adaptive deadline: each round's deadline is this quantile of the client times of the round before "
        "(federation.deadline, if any, is round 1's); 0 = a fixed deadline",
        FRACTION,
    )
    over_select: float = option(
        0.0,
        "over-selection: sample (1 + this) x the clients fraction-train asks for and aggregate the first that "
        "many to finish; the slower ones are dropped, their spend recorded; 0 = off",
        NON_NEGATIVE,
    )
    fedbuff_buffer: int = option(
        0,
        "buffered asynchronous aggregation (FedBuff): step the model as soon as this many updates have finished "
        "on the round clock, staleness-weighted; 0 = off (synchronous rounds)",
        NON_NEGATIVE,
    )
    fedbuff_concurrency: int = option(
        0,
        "FedBuff: clients training at once (each round starts new ones in the free slots); 0 = 2 x the buffer",
        NON_NEGATIVE,
    )
    price_per_kwh: float = option(0.0, "energy price for the run's cost figure (currency per kWh)", NON_NEGATIVE)
    price_per_gb: float = option(0.0, "traffic price for the run's cost figure (currency per GB moved)", NON_NEGATIVE)


#: Experiment trackers ``tracking.backends`` may name (fedvault.server.tracking writes to them).
TRACKERS = ("tensorboard", "mlflow")


def _tracker_names(value: str) -> tuple[str, ...]:
    """``"none"`` -> (); ``"tensorboard,mlflow"`` -> ("tensorboard", "mlflow")."""
    return () if value.strip() == "none" else tuple(name.strip() for name in value.split(","))


def _valid_trackers(value: str) -> bool:
    names = _tracker_names(value)
    return all(name in TRACKERS for name in names) and len(set(names)) == len(names)


@dataclass(frozen=True)
class TrackingConfig(_Validated):
    """Per-round metrics, privacy spend and system figures also sent to TensorBoard and/or MLflow."""

    SECTION: ClassVar[str] = "tracking"

    backends: str = option(
        "none",
        "also log each round to: none, tensorboard, mlflow, or both as 'tensorboard,mlflow' "
        "(pip install 'fedvault[tracking]')",
        (_valid_trackers, "must be none, or tensorboard and/or mlflow separated by a comma, each once"),
    )
    dir: str = option("", "TensorBoard log directory; empty = <run-dir>/tensorboard")
    uri: str = option("", "MLflow tracking URI; empty = sqlite:///<run-dir>/mlflow.db")
    experiment: str = option("", "MLflow experiment name; empty = the task")

    @property
    def trackers(self) -> tuple[str, ...]:
        """The trackers named, in the order given (empty for none)."""
        return _tracker_names(self.backends)


def _valid_ray_address(value: str) -> bool:
    if value in ("", "auto"):
        return True
    host, _, port = value.rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) < 65536


@dataclass(frozen=True)
class SimulationConfig(_Validated):
    """Where ``fedvault simulate`` runs Flower's Simulation Engine."""

    SECTION: ClassVar[str] = "simulation"

    ray_address: str = option(
        "",
        "attach to a running Ray cluster: its head's HOST:PORT (`ray start --head --port PORT` there, "
        "`ray start --address HOST:PORT` on the other machines), or auto (RAY_ADDRESS, else a cluster "
        "started on this machine); empty = start Ray in this process",
        (_valid_ray_address, "must be empty, auto, or HOST:PORT"),
    )


@dataclass(frozen=True)
class RunConfig(_Validated):
    """Everything a run needs; see README.md for the reference table."""

    task: str = option(
        "mnist1d-large",
        "built-in task (mnist1d-large, mnist1d, digits, fashion-mnist, fashion-mnist-scatter), "
        "a 'module:attr' path, or a name in the entry point group fedvault.tasks",
    )
    num_clients: int = option(4, "number of clients (simulated SuperNodes)", POSITIVE)
    num_server_rounds: int = option(6, "federated rounds", POSITIVE)
    fraction_train: float = option(
        1.0, "fraction of clients sampled to train each round", (lambda v: 0 < v <= 1, "must be > 0 and <= 1")
    )
    fraction_evaluate: float = option(
        0.5,
        "fraction of clients sampled to evaluate on their local test split (0 = none; none under DP: withheld)",
        FRACTION,
    )
    local_epochs: int = option(5, "local epochs per round", POSITIVE)
    batch_size: int = option(
        0,
        "local (logical) batch size; 0 = auto: 10*sqrt(N) for a client holding N examples (16..4096), logged",
        NON_NEGATIVE,
    )
    learning_rate: float = option(2.0, "local SGD learning rate (of round 1 under lr-schedule)", GREATER_THAN_ZERO)
    lr_schedule: str = option(
        "constant",
        "learning rate across rounds: constant, or cosine (lr * (1 + cos(pi (r - 1) / R)) / 2 in round r of R)",
        choices=("constant", "cosine"),
    )
    momentum: float = option(0.9, "local SGD momentum", OPEN_FRACTION)
    seed: int = option(42, "seed for partitioning, model initialisation and client sampling", NON_NEGATIVE)
    partitioner: str = option(
        "iid", "how the training set is split across clients", choices=("iid", "dirichlet", "shards")
    )
    dirichlet_alpha: float = option(
        0.5, "Dirichlet concentration for partitioner=dirichlet (smaller = more label skew)", GREATER_THAN_ZERO
    )
    shards_per_client: int = option(2, "label-sorted shards per client for partitioner=shards", POSITIVE)
    test_fraction: float = option(
        0.2, "share of each client's partition held out for its local test split", OPEN_FRACTION
    )
    client_cpus: float = option(
        1.0,
        "CPUs reserved per simulated client (Ray); concurrency = cores / this (small models train faster "
        "as parallel single-threaded clients than one at a time)",
        GREATER_THAN_ZERO,
    )
    client_gpus: float = option(
        -1.0,
        "GPUs per simulated client; -1 = auto (share the GPU when CUDA is present, else 0)",
        (lambda v: v == -1.0 or v >= 0, "must be -1 (auto) or >= 0"),
    )
    device: str = option(
        "auto", "where clients train: auto (CUDA when present), cpu, cuda", choices=("auto", "cpu", "cuda")
    )
    amp: bool = option(True, "mixed precision (float16 autocast) when training on CUDA")
    run_dir: str = option("", "run directory; empty = runs/<time>-<task>")
    round_timeout: float = option(
        600.0, "seconds the server waits in a round for clients to connect, then for their replies", GREATER_THAN_ZERO
    )
    min_replies: int = option(1, "a round with fewer successful train replies fails", POSITIVE)
    resume: bool = option(False, "continue the run in run-dir from its latest checkpoint")
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    sealing: SealingConfig = field(default_factory=SealingConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    strategy_params: tuple = field(default=(), metadata={"free": STRATEGY_PREFIX})  # ((param, value), ...)

    # ---- construction -------------------------------------------------------------------

    def __post_init__(self) -> None:
        """Check every key (sections check their own), the strategy parameters, then cross-key rules."""
        super().__post_init__()
        for name, key, section in _sections(type(self)):
            value = getattr(self, name)
            if not isinstance(value, section):
                raise ConfigError(f"invalid value for '{key}': {value!r} (expected {section.__name__})")
        object.__setattr__(self, "strategy_params", _strategy_params(self.strategy_params))
        self.validate()

    @classmethod
    def create(cls, **options: Any) -> RunConfig:
        """Defaults plus keyword ``options`` with Python names (see the module docstring).

        ``RunConfig.create(task="digits", num_clients=4, privacy_target_epsilon=3.0, strategy="fedprox",
        strategy_params={"proximal-mu": 0.1})``; an unknown keyword raises ConfigError with close matches.
        """
        return cls().with_options(**options)

    def with_options(self, **options: Any) -> RunConfig:
        """A copy with keyword ``options`` applied, named as in :meth:`create`.

        ``strategy_params`` is merged into the current strategy parameters (as ``--set strategy.<param>``).
        """
        flat = self.to_flat()
        origins: dict[str, str] = {}
        names = keywords()
        for name, value in options.items():
            if name == "strategy_params":
                if not isinstance(value, Mapping):
                    raise ConfigError(
                        f"invalid value for keyword 'strategy_params': {value!r} (expected a mapping {{param: value}})"
                    )
                for param, param_value in value.items():
                    key = STRATEGY_PREFIX + _key(str(param))
                    if key in names.values():
                        raise ConfigError(f"strategy_params cannot set '{key}'; use the keyword 'strategy'")
                    flat[key], origins[key] = param_value, "from keyword strategy_params"
                continue
            if name not in names:
                hints = difflib.get_close_matches(name, [*names, "strategy_params"], n=3, cutoff=0.5)
                suggestion = f"; close matches: {', '.join(hints)}" if hints else ""
                raise ConfigError(
                    f"unknown config keyword '{name}' (keywords are keys with '_' for '-' and '.', "
                    f"e.g. privacy_target_epsilon){suggestion}"
                )
            flat[names[name]], origins[names[name]] = value, f"from keyword {name}"
        return type(self).from_flat(flat, origins)

    @classmethod
    def from_sources(
        cls, file: str | Path | None = None, overrides: Sequence[str] = (), run_config: Mapping[str, Any] | None = None
    ) -> RunConfig:
        """Defaults <- TOML file <- Flower run_config <- ``key=value`` overrides, then validate."""
        values: dict[str, Any] = {}
        origins: dict[str, str] = {}
        if file is not None:
            from_file = _flatten(_read_toml(Path(file)))
            values.update(from_file)
            origins.update(dict.fromkeys(from_file, f"in {file}"))
        if run_config:
            values.update(run_config)
            origins.update(dict.fromkeys(run_config, "in the Flower run config"))
        for item in overrides:
            key, sep, raw = item.partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"--set expects key=value, got '{item}'")
            values[key.strip()] = _parse_literal(raw.strip())
            origins[key.strip()] = "from --set"
        return cls.from_flat(values, origins)

    @classmethod
    def from_flat(cls, values: Mapping[str, Any], origins: Mapping[str, str] | None = None) -> RunConfig:
        """Build from a flat ``{"key": value}`` mapping (Flower's run_config shape)."""
        known = dict(_schema(cls))
        nested: dict[str, Any] = {}
        free: dict[str, Any] = {}
        for key, value in values.items():
            where = f" ({origins[key]})" if origins and key in origins else ""
            if key.startswith(STRATEGY_PREFIX) and key not in known:
                free[key[len(STRATEGY_PREFIX) :]] = value  # checked against the strategy by its registry
                continue
            if key not in known:
                hint = difflib.get_close_matches(key, known, n=1)
                suggestion = f"; did you mean '{hint[0]}'?" if hint else ""
                raise ConfigError(f"unknown config key '{key}'{where}{suggestion}")
            try:
                nested[key] = _coerce(key, value, known[key])
            except ConfigError as exc:
                raise ConfigError(f"{exc}{where}") from None
        return _build(cls, nested, prefix="", strategy_params=tuple(sorted(free.items())))

    # ---- output ---------------------------------------------------------------------------

    def to_flat(self) -> dict[str, Any]:
        """The flat ``{"key": value}`` form (usable as Flower run_config)."""
        flat = dict(_items(self, prefix=""))
        flat.update({STRATEGY_PREFIX + k: v for k, v in self.strategy_params})
        return flat

    def validate(self) -> None:
        """Cross-key checks that a single key's constraint cannot express (run on construction)."""
        if self.fraction_train * self.num_clients < 1 - 1e-9:
            raise ConfigError(
                f"invalid value for 'fraction-train': {self.fraction_train} samples no client out of "
                f"num-clients={self.num_clients}"
            )
        refused = NOT_CLIENT_LEVEL.get(self.strategy.name.lower())
        if self.privacy.client_level and refused:
            raise ConfigError(
                f"invalid value for 'strategy.name': '{self.strategy.name}' (client-level DP replaces the aggregate "
                f"with one noised DP-FedAvg mean, and {self.strategy.name} {refused}; use fedavg, fedprox, fedavgm, "
                "fedadam, fedyogi or fedadagrad, or privacy.client-level = false)"
            )
        if self.privacy.client_level and self.federation.over_select > 0:
            raise ConfigError(
                f"invalid value for 'federation.over-select': {self.federation.over_select} (client-level DP's "
                "accountant assumes each client is sampled with probability fraction-train and every sampled update "
                "counted; use federation.deadline, or privacy.client-level = false)"
            )
        f = self.federation
        if f.fedbuff_buffer and (self.privacy.client_level or f.deadline or f.deadline_quantile or f.over_select):
            raise ConfigError(
                f"invalid value for 'federation.fedbuff-buffer': {f.fedbuff_buffer} (FedBuff steps asynchronously: "
                "it takes no deadline or over-selection, and client-level DP's accountant needs synchronous rounds)"
            )
        if f.fedbuff_buffer and not f.profiles:
            raise ConfigError(
                f"invalid value for 'federation.fedbuff-buffer': {f.fedbuff_buffer} (FedBuff orders updates by when "
                "they finish on the virtual round clock: set federation.profiles)"
            )
        if f.fedbuff_concurrency and f.fedbuff_concurrency < f.fedbuff_buffer:
            raise ConfigError(
                f"invalid value for 'federation.fedbuff-concurrency': {f.fedbuff_concurrency} (fewer clients training "
                f"than federation.fedbuff-buffer = {f.fedbuff_buffer} updates a step waits for)"
            )
        if self.federation.profiles and not self.federation.profile_file:
            from fedvault.profiles import BUILTIN_PROFILES, parse_mix

            parse_mix(self.federation.profiles, BUILTIN_PROFILES)  # a profile file is read when the run starts
        if self.privacy.sample_level and self.strategy.name.lower() == "qfedavg":
            raise ConfigError(
                "invalid value for 'strategy.name': 'qfedavg' (it weights each client by its train loss, which a "
                "DP-SGD client withholds: no epsilon covers it; use another strategy or privacy.sample-level = false)"
            )


def reference() -> Iterator[tuple[str, str, Any, str]]:
    """(key, type name, default, help) for every key: the README's config reference."""
    for key, spec in _schema(RunConfig):
        listed = all(choice in spec.help for choice in spec.choices)
        choices = "" if listed else f" (one of: {', '.join(spec.choices)})"
        yield key, spec.type.__name__, spec.default, spec.help + choices


@cache
def keywords() -> dict[str, str]:
    """Python keyword -> config key for :meth:`RunConfig.create`: ``num_clients`` -> ``num-clients``,
    ``privacy_target_epsilon`` -> ``privacy.target-epsilon``, and ``strategy`` -> ``strategy.name``."""
    names = {key.replace(".", "_").replace("-", "_"): key for key, _ in _schema(RunConfig)}
    names["strategy"] = STRATEGY_PREFIX + "name"
    return names


# ---- schema plumbing ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    type: type
    default: Any
    help: str
    check: Check | None
    choices: tuple


def _key(name: str) -> str:
    return name.replace("_", "-")


_LEAVES: dict[type, tuple[tuple[str, str, _Spec], ...]] = {}
_SECTIONS: dict[type, tuple[tuple[str, str, type], ...]] = {}


def _leaves(cls: type) -> tuple[tuple[str, str, _Spec], ...]:
    """(field name, key without section prefix, spec) for the plain keys ``cls`` declares itself."""
    if cls not in _LEAVES:
        _LEAVES[cls] = _read_leaves(cls)
    return _LEAVES[cls]


def _sections(cls: type) -> tuple[tuple[str, str, type], ...]:
    """(field name, key, section class) for the nested sections of ``cls``."""
    if cls not in _SECTIONS:
        hints = get_type_hints(cls)
        fields = dataclasses.fields(cls)
        _SECTIONS[cls] = tuple(
            (f.name, _key(f.name), hints[f.name]) for f in fields if dataclasses.is_dataclass(hints[f.name])
        )
    return _SECTIONS[cls]


def _read_leaves(cls: type) -> tuple[tuple[str, str, _Spec], ...]:
    hints = get_type_hints(cls)
    return tuple(
        (
            f.name,
            _key(f.name),
            _Spec(hints[f.name], f.default, f.metadata["help"], f.metadata["check"], f.metadata["choices"]),
        )
        for f in dataclasses.fields(cls)
        if "free" not in f.metadata and not dataclasses.is_dataclass(hints[f.name])
    )


def _schema(cls: type, prefix: str = "") -> Iterator[tuple[str, _Spec]]:
    for _, key, spec in _leaves(cls):
        yield prefix + key, spec
    for _, key, section in _sections(cls):
        yield from _schema(section, prefix=prefix + key + ".")


def _build(cls: type, values: dict[str, Any], prefix: str, **extra: Any) -> Any:
    kwargs = {name: values[prefix + key] for name, key, _ in _leaves(cls) if prefix + key in values}
    for name, key, section in _sections(cls):
        kwargs[name] = _build(section, values, prefix + key + ".")
    return cls(**kwargs, **extra)


def _items(obj: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    for name, key, _ in _leaves(type(obj)):
        yield prefix + key, getattr(obj, name)
    for name, key, _ in _sections(type(obj)):
        yield from _items(getattr(obj, name), prefix + key + ".")


_SCALARS = (bool, int, float, str)


def _strategy_params(params: Any) -> tuple[tuple[str, Any], ...]:
    """``strategy.<param>`` pairs, sorted, names hyphenated; a mapping or pairs of (name, scalar)."""
    try:
        pairs = list(params.items() if isinstance(params, Mapping) else params)
        named = {}
        for name, value in pairs:
            key = _key(name) if isinstance(name, str) else None
            if not key or not isinstance(value, _SCALARS) or key in named:
                raise ValueError
            named[key] = value
    except (TypeError, ValueError):
        raise ConfigError(
            f"invalid value for 'strategy_params': {params!r} (expected distinct (param, scalar) "
            "pairs or a mapping {param: scalar})"
        ) from None
    return tuple(sorted(named.items()))


def _coerce(key: str, value: Any, spec: _Spec) -> Any:
    expected = spec.type
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if expected is str and isinstance(value, _SCALARS):
        value = str(value)
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ConfigError(f"invalid value for '{key}': {value!r} (expected {expected.__name__})")
    if spec.choices and value not in spec.choices:
        raise ConfigError(f"invalid value for '{key}': {value!r} (choose one of {', '.join(spec.choices)})")
    if spec.check is not None:
        predicate, rule = spec.check
        if not predicate(value):
            raise ConfigError(f"invalid value for '{key}': {value!r} ({rule})")
    return value


def _parse_literal(raw: str) -> Any:
    """Parse ``--set`` values as TOML literals (1, 0.5, true, "x"); anything else is a string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, prefix + key + "."))
        else:
            flat[prefix + key] = value
    return flat

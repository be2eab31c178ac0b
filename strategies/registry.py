"""Name a strategy in a config and build it: built-ins, ``module:Class`` and entry-point plug-ins.

A config names the strategy (``strategy.name = "fedadam"``, case-insensitive) and its
constructor arguments with hyphens (``strategy.eta-l = 0.05`` -> ``eta_l=0.05``). Parameters are
checked against the constructor's signature and type hints before anything is built; classes
whose ``__init__`` forwards ``**kwargs`` also accept their base classes' parameters. Values in
``common`` (run-wide settings such as ``fraction-train``) go only to strategies that accept them.

Names resolve in this order: ``package.module:Class``; a built-in (Flower's Message-API
strategies plus fedvault's SCAFFOLD and FedNova); an entry point in group ``fedvault.strategies``.
"""

from __future__ import annotations

import inspect
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from flwr.serverapp import strategy as flwr_strategies
from flwr.serverapp.strategy import Strategy

from fedvault.errors import FedvaultError
from fedvault.plugins import PluginError, load_plugin
from fedvault.strategies.fednova import FedNova
from fedvault.strategies.scaffold import Scaffold

ENTRY_POINT_GROUP = "fedvault.strategies"
CONFIG_PREFIX = "strategy."
_FLOWER_NAMES = (
    "FedAvg",
    "FedAvgM",
    "FedProx",
    "FedAdagrad",
    "FedAdam",
    "FedYogi",
    "FedMedian",
    "FedTrimmedAvg",
    "Krum",
    "MultiKrum",
    "Bulyan",
    "QFedAvg",
)
_SCALARS = (bool, int, float, str)
REQUIRED = inspect.Parameter.empty


class StrategyError(FedvaultError, ValueError):
    """A strategy cannot be found, loaded, or built from the given parameters."""


@dataclass(frozen=True)
class StrategyParam:
    """One constructor argument a config can set."""

    name: str  # hyphenated, as written in a config
    default: Any  # REQUIRED when the constructor has no default
    types: tuple[type, ...] | None  # accepted value types; None = any scalar (no type hint)

    @property
    def attr(self) -> str:
        return self.name.replace("-", "_")

    @property
    def type_name(self) -> str:
        return " | ".join(t.__name__ for t in self.types) if self.types else "any"


@dataclass(frozen=True)
class StrategyInfo:
    """What ``fedvault strategies`` prints for one strategy."""

    name: str
    source: str
    params: tuple[StrategyParam, ...]
    doc: str


@dataclass(frozen=True)
class _Signature:
    params: dict[str, StrategyParam]  # keyed by attribute name (underscores)
    unsettable: dict[str, str]  # attribute name -> type that a config cannot express
    open: bool  # accepts **kwargs that reach no named parameter


def builtin_strategies() -> dict[str, type[Strategy]]:
    """Built-in strategies by lowercase name."""
    found: dict[str, type[Strategy]] = {name.lower(): getattr(flwr_strategies, name) for name in _FLOWER_NAMES}
    found.update(scaffold=Scaffold, fednova=FedNova)
    return found


def build_strategy(
    name: str, params: Mapping[str, Any] | None = None, common: Mapping[str, Any] | None = None
) -> Strategy:
    """Build strategy ``name`` with ``params`` (all must be accepted) and ``common`` (where accepted)."""
    factory, _ = resolve_strategy(name)
    signature = _signature(factory, name)
    kwargs: dict[str, Any] = {}
    for key, value in (common or {}).items():
        attr = _attr(key)
        if attr in signature.params:
            kwargs[attr] = _check_value(name, signature.params[attr], value)
    for key, value in (params or {}).items():
        attr = _attr(key)
        if attr in signature.params:
            kwargs[attr] = _check_value(name, signature.params[attr], value)
        elif attr in signature.unsettable:
            raise StrategyError(
                f"strategy '{name}': parameter '{_key(attr)}' takes {signature.unsettable[attr]}, "
                "which a config cannot set"
            )
        elif signature.open and isinstance(value, _SCALARS):
            kwargs[attr] = value
        else:
            valid = ", ".join(sorted(p.name for p in signature.params.values())) or "none"
            raise StrategyError(f"strategy '{name}' has no parameter '{_key(attr)}' (valid: {valid})")
    missing = [p.name for attr, p in signature.params.items() if p.default is REQUIRED and attr not in kwargs]
    if missing:
        raise StrategyError(f"strategy '{name}' needs parameter(s) {', '.join(missing)} (set strategy.<param>)")
    try:
        strategy = factory(**kwargs)
    except Exception as exc:  # noqa: BLE001 - a plug-in constructor may reject values in any way
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StrategyError(f"strategy '{name}' rejected its parameters {_key_dict(kwargs)}: {reason}") from None
    if not isinstance(strategy, Strategy):
        raise StrategyError(
            f"strategy '{name}' built a {type(strategy).__name__}, not a flwr.serverapp.strategy.Strategy"
        )
    return strategy


def resolve_strategy(name: str) -> tuple[Callable[..., Any], str]:
    """``(class or factory, source)`` for ``name``; fails with :class:`StrategyError`."""
    if ":" in name:
        try:
            found = load_plugin(name, ENTRY_POINT_GROUP)
        except PluginError as exc:
            raise StrategyError(f"strategy '{name}': {exc}") from None
        return _require_strategy_factory(found, name), name
    builtins = builtin_strategies()
    if name.lower() in builtins:
        cls = builtins[name.lower()]
        return cls, f"{cls.__module__}.{cls.__qualname__}"
    plugins = {ep.name.lower(): ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    if name.lower() in plugins:
        ep = plugins[name.lower()]
        try:
            found = load_plugin(ep.name, ENTRY_POINT_GROUP)
        except PluginError as exc:
            raise StrategyError(f"strategy '{name}': {exc}") from None
        return _require_strategy_factory(found, name), f"entry point {ep.value}"
    known = ", ".join(sorted(builtins) + sorted(plugins))
    raise StrategyError(
        f"unknown strategy '{name}' (choose one of {known}, give 'package.module:Class', "
        f"or register it in entry point group '{ENTRY_POINT_GROUP}')"
    )


def list_strategies() -> list[StrategyInfo]:
    """Built-ins, then entry-point plug-ins (a plug-in that fails to load says why in ``doc``)."""
    infos = [_info(name, cls, f"{cls.__module__}.{cls.__qualname__}") for name, cls in builtin_strategies().items()]
    builtins = {info.name for info in infos}
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name.lower()):
        source = f"entry point {ep.value}"
        if ep.name.lower() in builtins:
            infos.append(
                StrategyInfo(ep.name, source, (), f"shadowed by built-in '{ep.name.lower()}'; name it as '{ep.value}'")
            )
            continue
        try:
            factory, _ = resolve_strategy(ep.name)
            infos.append(_info(ep.name, factory, source))
        except StrategyError as exc:
            infos.append(StrategyInfo(ep.name, source, (), f"cannot load: {exc}"))
    return infos


#: Constructor arguments fedvault sets from the run config (where a strategy accepts them), and from what.
RUN_SETTINGS = {
    "fraction-train": "fraction-train x (1 + federation.over-select), at most 1",
    "fraction-evaluate": "fraction-evaluate",
    "min-train-nodes": "that fraction x num-clients",
    "min-evaluate-nodes": "fraction-evaluate x num-clients",
    "min-available-nodes": "num-clients",
    "num-clients": "num-clients",
    "client-learning-rate": "learning-rate",
}
#: Flower's record-key arguments: fedvault's apps use Flower's default keys, so they are not for a config.
RECORD_KEYS = frozenset({"weighted-by-key", "arrayrecord-key", "configrecord-key"})


def _default(param: StrategyParam) -> str:
    return "REQUIRED" if param.default is REQUIRED else repr(param.default)


def _own_params(info: StrategyInfo) -> list[StrategyParam]:
    """The parameters a config sets with ``strategy.<param>`` (not run-wide settings, not record keys)."""
    return [p for p in info.params if p.name not in RUN_SETTINGS and p.name not in RECORD_KEYS]


def format_strategies(infos: list[StrategyInfo]) -> str:
    """A short table: one line per strategy with its own ``strategy.<param>`` defaults."""
    width = max((len(info.name) for info in infos), default=0)
    lines = [
        f"{info.name.ljust(width)}  {info.doc}"
        + "".join(f"\n{' ' * width}    strategy.{p.name} = {_default(p)}" for p in _own_params(info))
        for info in infos
    ]
    lines.append("\ndetails, with the settings fedvault passes from the run config: fedvault strategies NAME")
    return "\n".join(lines)


def format_strategy(info: StrategyInfo) -> str:
    """One strategy in full: source, doc, every parameter with its default and where its value comes from."""
    lines = [f"{info.name}  ({info.source})", f"    {info.doc}"]
    for p in info.params:
        if p.name in RUN_SETTINGS:
            lines.append(f"    {p.name}: set from the run config ({RUN_SETTINGS[p.name]})  [{p.type_name}]")
        elif p.name in RECORD_KEYS:
            lines.append(f"    {p.name}: Flower's default {_default(p)} (the record key fedvault's apps use)")
        else:
            lines.append(f"    strategy.{p.name} = {_default(p)}  [{p.type_name}]")
    return "\n".join(lines)


# ---- signature inspection --------------------------------------------------------------------


def _require_strategy_factory(found: Any, name: str) -> Callable[..., Any]:
    if isinstance(found, type) and not issubclass(found, Strategy):
        raise StrategyError(
            f"strategy '{name}' is class {found.__qualname__}, not a subclass of flwr.serverapp.strategy.Strategy"
        )
    if not callable(found):
        raise StrategyError(f"strategy '{name}' is a {type(found).__name__}, not a Strategy class or factory")
    return found


def _info(name: str, factory: Callable[..., Any], source: str) -> StrategyInfo:
    doc = next((line.strip() for line in (inspect.getdoc(factory) or "").splitlines() if line.strip()), "")
    return StrategyInfo(name, source, tuple(_signature(factory, name).params.values()), doc)


def _signature(factory: Callable[..., Any], name: str) -> _Signature:
    """Named parameters of ``factory``, following ``**kwargs`` up the class hierarchy."""
    if isinstance(factory, type):
        functions = [cls.__dict__["__init__"] for cls in factory.__mro__ if "__init__" in cls.__dict__]
    else:
        functions = [factory]
    params: dict[str, StrategyParam] = {}
    unsettable: dict[str, str] = {}
    open_kwargs = True
    for function in functions:
        if function is object.__init__:
            open_kwargs = False
            break
        try:
            hints = typing.get_type_hints(function)
            signature = inspect.signature(function)
        except (TypeError, ValueError, NameError) as exc:
            raise StrategyError(f"strategy '{name}': cannot read its constructor signature: {exc}") from None
        for param in signature.parameters.values():
            if param.name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            if param.name in params or param.name in unsettable:
                continue
            accepted = _scalar_types(hints.get(param.name, REQUIRED))
            if accepted == ():
                unsettable[param.name] = _type_label(hints[param.name])
            else:
                params[param.name] = StrategyParam(_key(param.name), param.default, accepted)
        open_kwargs = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
        if not open_kwargs:
            break
    return _Signature(params, unsettable, open_kwargs)


def _scalar_types(hint: Any) -> tuple[type, ...] | None:
    """Scalar types a hint accepts: None = unannotated (any scalar); () = not a scalar type."""
    if hint is REQUIRED or hint is Any:
        return None
    members = (
        typing.get_args(hint)
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
        else (hint,)
    )
    return tuple(t for t in members if t in _SCALARS)


def _type_label(hint: Any) -> str:
    """A hint as written in code, without module paths (``Callable[..., X] | None``)."""
    return getattr(hint, "__name__", None) or re.sub(r"\b(?:\w+\.)+(\w+)", r"\1", str(hint))


def _check_value(name: str, param: StrategyParam, value: Any) -> Any:
    """``value`` if it fits ``param`` (an int widens to float), else :class:`StrategyError`."""
    accepted = param.types or _SCALARS
    if isinstance(value, int) and not isinstance(value, bool) and int not in accepted and float in accepted:
        return float(value)
    fits = bool in accepted if isinstance(value, bool) else isinstance(value, accepted)
    if not fits:
        raise StrategyError(
            f"strategy '{name}': parameter '{param.name}' got {value!r} ({type(value).__name__}), "
            f"expected {param.type_name}"
        )
    return value


def _attr(key: str) -> str:
    return key.replace("-", "_")


def _key(attr: str) -> str:
    return attr.replace("_", "-")


def _key_dict(kwargs: Mapping[str, Any]) -> str:
    return "{" + ", ".join(f"{_key(k)}={v!r}" for k, v in kwargs.items()) + "}"

"""Save and restore a strategy's server-side state, so a resumed run aggregates as if never stopped.

The state is a flat ``{name: ndarray | int | float | str}`` dict that ``np.savez`` stores and
``np.load(..., allow_pickle=False)`` reads back (no pickles). ``"strategy"`` names the class, so
state is never loaded into a different strategy. What each strategy keeps between rounds
(read from the flwr 1.41 sources):

- any strategy with ``state_dict()`` / ``load_state_dict()`` (fedvault's SCAFFOLD: control
  variate ``c``; plug-ins that keep state should implement these two methods);
- FedAvgM: ``current_arrays`` (the previous global model) and ``momentum_vector``;
- FedAdam, FedYogi, FedAdagrad (FedOpt): first and second moments ``m_t`` and ``v_t`` (plus
  ``current_arrays``, which ``configure_train`` resets every round);
- everything else, including QFedAvg (its ``current_arrays`` is reset by every
  ``configure_train``) and FedNova: no state beyond hyper-parameters, which come from the config.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import FedAvgM
from flwr.serverapp.strategy.fedopt import FedOpt

from fedvault.errors import FedvaultError
from fedvault.strategies.arrays import pack, to_ndarrays, unpack

StrategyState = dict[str, Any]
CLASS_KEY = "strategy"


class StrategyStateError(FedvaultError, ValueError):
    """Saved state does not belong to this strategy or is malformed."""


def strategy_state(strategy: object) -> StrategyState:
    """The strategy's state as a flat, npz-friendly dict."""
    state: StrategyState = {CLASS_KEY: _class_name(strategy)}
    own_state_dict = getattr(strategy, "state_dict", None)
    if callable(own_state_dict):
        own = own_state_dict()
        if CLASS_KEY in own:
            raise StrategyStateError(f"{_class_name(strategy)}.state_dict() may not use the reserved key '{CLASS_KEY}'")
        state.update(own)
    elif isinstance(strategy, FedOpt):
        state.update(pack("current", strategy.current_arrays))
        state.update(pack("m_t", strategy.m_t))
        state.update(pack("v_t", strategy.v_t))
    elif isinstance(strategy, FedAvgM):
        if strategy.current_arrays is not None:
            state.update(pack("current", to_ndarrays(strategy.current_arrays)))
        if strategy.momentum_vector is not None:
            state.update(pack("momentum", {str(i): a for i, a in enumerate(strategy.momentum_vector)}))
    _check_npz_friendly(state, strategy)
    return state


def load_strategy_state(strategy: object, state: Mapping[str, Any]) -> None:
    """Restore what :func:`strategy_state` returned into a strategy of the same class."""
    saved = str(np.asarray(state.get(CLASS_KEY, "")))
    if saved != _class_name(strategy):
        raise StrategyStateError(f"saved strategy state is for '{saved or 'unknown'}', not '{_class_name(strategy)}'")
    own = {key: value for key, value in state.items() if key != CLASS_KEY}
    own_load_state_dict = getattr(strategy, "load_state_dict", None)
    if callable(own_load_state_dict):
        own_load_state_dict(own)
    elif isinstance(strategy, FedOpt):
        strategy.current_arrays = unpack(own, "current")
        strategy.m_t = unpack(own, "m_t")
        strategy.v_t = unpack(own, "v_t")
    elif isinstance(strategy, FedAvgM):
        current = unpack(own, "current")
        strategy.current_arrays = None if current is None else ArrayRecord({k: Array(v) for k, v in current.items()})
        momentum = unpack(own, "momentum")
        strategy.momentum_vector = None if momentum is None else [momentum[str(i)] for i in range(len(momentum))]


def _class_name(strategy: object) -> str:
    cls = type(strategy)
    return f"{cls.__module__}.{cls.__qualname__}"


def _check_npz_friendly(state: StrategyState, strategy: object) -> None:
    for key, value in state.items():
        if isinstance(value, bool | int | float | str):
            continue
        if not isinstance(value, np.ndarray) or value.dtype.hasobject:
            raise StrategyStateError(
                f"{_class_name(strategy)} state '{key}' is a {type(value).__name__}; "
                "expected a numeric ndarray or a scalar"
            )

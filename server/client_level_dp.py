"""Client-level DP as a strategy wrapper: DP-FedAvg (McMahan et al., ICLR 2018, arXiv 1710.06963).

``ClientLevelDP(strategy, ...)`` wraps a strategy as Flower's ``DifferentialPrivacyServerSideFixedClipping``
does, with what the accountant's claim needs:

* ``configure_train`` checks the server's budget before the round (``RunStopped`` when it would be
  passed), lets the wrapped strategy build the round's instruction (its config keys, e.g. FedProx's
  ``proximal-mu``, and its per-round state, e.g. FedOpt's current arrays) and sends it to a Poisson
  sample of the eligible nodes: each is included independently with probability q = fraction-train,
  drawn from ``secrets`` (what amplification by sampling assumes; the wrapped strategy's own
  fixed-size sample is not used);
* ``aggregate_train`` clips each update to C, sums with uniform weights, adds N(0, (zC)^2) and divides
  by the fixed expected count qN (:class:`fedvault.privacy.client_level.DPFedAvgAggregator`; adaptive
  clipping after Andrew et al., NeurIPS 2021, arXiv 1905.03871), appends the round's DP event to the
  run ledger, and only then hands the noised mean to the wrapped strategy as its sole reply (weight 1).
  The wrapped strategy's weighted mean of that one reply is the release itself, and a server optimizer
  (FedAvgM's momentum, FedAdam/FedYogi/FedAdagrad's moments) takes its pseudo-gradient from it:
  post-processing, so no further privacy cost;
* nothing else from the clients: their train metrics are not returned, and the run directory keeps
  no client statistics or participation (:func:`fedvault.privacy.release.client_level_round_record`);
* everything else (evaluation, summary) is the wrapped strategy's.

Strategies whose aggregate needs the individual updates (SCAFFOLD, FedNova, robust aggregators,
QFedAvg) cannot be wrapped: client-level DP releases only the noised sum.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedYogi, Strategy

from fedvault.config import RunConfig
from fedvault.errors import ConfigError, FedvaultError
from fedvault.privacy.budget import Budget, projected_epsilon
from fedvault.privacy.client_level import DPFedAvgAggregator
from fedvault.privacy.events import SERVER_PARTY, DPEvent
from fedvault.privacy.ledger import Ledger, events_by_party
from fedvault.privacy.sampling import poisson_sample
from fedvault.protocol import ARRAYS, CONFIG, METRICS, NUM_EXAMPLES
from fedvault.server.rounds import RunStopped, StrategyWrapper
from fedvault.strategies.arrays import to_ndarrays, to_record
from fedvault.strategies.state import load_strategy_state, strategy_state

log = logging.getLogger("fedvault")

#: Strategies whose ``aggregate_train`` is a weighted mean of the replies, optionally followed by a
#: server-optimizer step on it; a subclass qualifies when it keeps one of these ``aggregate_train``.
WRAPPABLE = (FedAvg, FedAvgM, FedAdam, FedYogi, FedAdagrad)
_INNER, _DP = "inner/", "client-dp/"


def check_wrappable(strategy: Strategy) -> None:
    """Raise :class:`ConfigError` naming ``strategy`` unless its aggregation is a weighted mean."""
    aggregate = type(strategy).aggregate_train
    if not any(aggregate is cls.aggregate_train for cls in WRAPPABLE):
        names = ", ".join(cls.__name__ for cls in WRAPPABLE)
        raise ConfigError(
            f"client-level DP cannot wrap strategy {type(strategy).__qualname__}: its aggregate_train is not a "
            f"weighted mean, and DP-FedAvg releases only the noised mean of the clipped updates (use one of "
            f"{names} or a subclass keeping its aggregate_train, or privacy.client-level = false)"
        )


class ClientLevelDP(StrategyWrapper):
    """DP-FedAvg around a weighted-mean strategy: Poisson selection, clip + noise, ledger before release."""

    def __init__(
        self, strategy: Strategy, *, aggregator: DPFedAvgAggregator, sample_rate: float, budget: Budget, ledger: Ledger
    ) -> None:
        check_wrappable(strategy)
        super().__init__(strategy)
        self.aggregator, self.ledger = aggregator, ledger
        self.sample_rate, self.budget = sample_rate, budget
        self._current: ArrayRecord | None = None

    @classmethod
    def from_config(cls, strategy: Strategy, cfg: RunConfig, ledger: Ledger) -> ClientLevelDP:
        """The wrapper ``cfg.privacy`` describes, with q = fraction-train and N = num-clients."""
        p = cfg.privacy
        aggregator = DPFedAvgAggregator(
            noise_multiplier=p.client_noise_multiplier,
            clip_norm=p.client_clip_norm,
            expected_clients=cfg.fraction_train * cfg.num_clients,
            adaptive=p.adaptive_clipping,
            target_quantile=p.target_quantile,
        )
        return cls(
            strategy,
            aggregator=aggregator,
            sample_rate=cfg.fraction_train,
            budget=Budget(p.client_level_target_epsilon, p.target_delta),
            ledger=ledger,
        )

    def __repr__(self) -> str:
        return f"ClientLevelDP({self.strategy!r})"

    # ---- train -----------------------------------------------------------------------------

    def event(self, server_round: int) -> DPEvent:
        """The DP event of round ``server_round`` (one Poisson-sampled Gaussian mechanism, party "server")."""
        return DPEvent.dp_fedavg(
            noise_multiplier=self.aggregator.noise_multiplier, sample_rate=self.sample_rate, round=server_round
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Check the budget, then send the wrapped strategy's instruction to a Poisson sample of ``grid``."""
        history = events_by_party(self.ledger.entries()).get(SERVER_PARTY, [])
        projected = projected_epsilon(history, self.event(server_round), self.budget)
        if projected > self.budget.epsilon:
            raise RunStopped(
                f"client-level privacy budget: round {server_round} would spend epsilon {projected:.3f} "
                f"> cap {self.budget.epsilon:.3f} (privacy.client-level-target-epsilon); "
                f"stopping after round {server_round - 1}"
            )
        content = self._instruction(server_round, arrays, config, grid)
        eligible = sorted(grid.get_node_ids())
        sample = poisson_sample(eligible, self.sample_rate)
        log.info(
            "round %d: client-level DP sampled %d of %d clients (Poisson, q=%g)",
            server_round,
            len(sample),
            len(eligible),
            self.sample_rate,
        )
        self._current = arrays
        return [Message(content, dst_node_id=node, message_type=MessageType.TRAIN) for node in sample]

    def _instruction(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> RecordDict:
        """The one content the wrapped strategy addresses to its own sample (its node choice is discarded)."""
        contents = {id(m.content): m.content for m in self.strategy.configure_train(server_round, arrays, config, grid)}
        if len(contents) > 1:
            raise FedvaultError(
                f"client-level DP: {type(self.strategy).__qualname__}.configure_train built a different instruction "
                "per node; DP-FedAvg sends one instruction to its Poisson sample"
            )
        if not contents:  # the wrapped strategy sampled nobody: the plain instruction
            return RecordDict({ARRAYS: arrays, CONFIG: config})
        return next(iter(contents.values()))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Clip, sum, noise, divide by qN; record the event; then let the wrapped strategy step on the release."""
        if self._current is None:
            raise FedvaultError("client-level DP: aggregate_train before configure_train")
        replies = [r for r in replies if not r.has_error()]
        key = getattr(self.strategy, "arrayrecord_key", ARRAYS)
        reference = to_ndarrays(self._current)
        updates = [to_ndarrays(r.content.array_records[key]) for r in replies]
        released = self.aggregator.aggregate(list(reference.values()), [[u[k] for k in reference] for u in updates])
        event = DPEvent.dp_fedavg(
            noise_multiplier=released.noise_multiplier, sample_rate=self.sample_rate, round=server_round
        )
        self.ledger.append(event)  # durable before the noised model leaves this method
        mean = to_record(dict(zip(reference, released.arrays)), like=reference)
        new_arrays, _ = self.strategy.aggregate_train(server_round, [self._sole_reply(key, mean)])
        return new_arrays, None  # the clients' own statistics are not covered: withheld (fedvault.privacy.release)

    def _sole_reply(self, key: str, mean: ArrayRecord) -> Message:
        """The release as one reply of weight 1: the wrapped strategy's weighted mean of it is ``mean`` exactly."""
        weight = getattr(self.strategy, "weighted_by_key", NUM_EXAMPLES)
        content = RecordDict({key: mean, METRICS: MetricRecord({weight: 1})})
        return Message(content, dst_node_id=0, message_type=MessageType.TRAIN)

    def summary(self) -> None:
        log.info(
            "client-level DP: z=%g, C=%g, q=%g",
            self.aggregator.noise_multiplier,
            self.aggregator.clip_norm,
            self.sample_rate,
        )
        self.strategy.summary()

    # ---- state -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The wrapped strategy's state under ``inner/`` and the aggregator's (clip norm) under ``client-dp/``."""
        state = {_INNER + k: v for k, v in strategy_state(self.strategy).items()}
        state.update({_DP + k: v for k, v in self.aggregator.state_dict().items()})
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_strategy_state(self.strategy, {k[len(_INNER) :]: v for k, v in state.items() if k.startswith(_INNER)})
        self.aggregator.load_state_dict(
            {k[len(_DP) :]: np.asarray(v).item() for k, v in state.items() if k.startswith(_DP)}
        )

"""Client-level DP on the server: DP-FedAvg (McMahan et al., ICLR 2018, arXiv 1710.06963).

Each round every eligible client is included independently with probability q = fraction-train,
drawn from ``secrets`` (true Poisson sampling: what the accountant's amplification assumes,
unlike Flower's fixed-size ``random.sample``). Updates are clipped to C, summed, noised with
N(0, (zC)^2) and divided by the fixed expected count qN; adaptive clipping follows Andrew et al.
(NeurIPS 2021). The server's budget is checked before a round and the round's event is appended
to the run ledger before the new global model is released.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from flwr.app import ArrayRecord, Message

from fedvault.config import RunConfig
from fedvault.privacy.budget import Budget, projected_epsilon
from fedvault.privacy.client_level import DPFedAvgAggregator
from fedvault.privacy.events import DPEvent
from fedvault.privacy.sampling import poisson_sample
from fedvault.strategies.arrays import to_ndarrays, to_record

SERVER_PARTY = "server"


class ClientLevelDP:
    """Poisson selection, DP-FedAvg aggregation and the server's DP events for one run."""

    def __init__(self, cfg: RunConfig) -> None:
        p = cfg.privacy
        self.q = cfg.fraction_train
        self.budget = Budget(p.client_level_target_epsilon, p.target_delta)
        self.aggregator = DPFedAvgAggregator(
            noise_multiplier=p.client_noise_multiplier, clip_norm=p.client_clip_norm,
            expected_clients=self.q * cfg.num_clients, adaptive=p.adaptive_clipping,
            target_quantile=p.target_quantile,
        )
        self.noise_multiplier = p.client_noise_multiplier

    def sample(self, node_ids: Iterable[int]) -> list[int]:
        return poisson_sample(sorted(node_ids), self.q)

    def planned_event(self, server_round: int) -> DPEvent:
        return DPEvent(kind="client", noise_multiplier=self.noise_multiplier, sample_rate=self.q, steps=1,
                       sampling="poisson", round=server_round, party=SERVER_PARTY)

    def refusal(self, history: Sequence[DPEvent], server_round: int) -> str | None:
        """Why round ``server_round`` may not run (server budget), or None."""
        projected = projected_epsilon(history, self.planned_event(server_round), self.budget)
        if projected > self.budget.epsilon:
            return (f"client-level privacy budget: round {server_round} would spend epsilon {projected:.3f} "
                    f"> cap {self.budget.epsilon:.3f} (privacy.client-level-target-epsilon)")
        return None

    def aggregate(self, arrays: ArrayRecord, replies: Sequence[Message], server_round: int) -> tuple[ArrayRecord, DPEvent]:
        """The noised new global model and the event to record before releasing it."""
        reference = to_ndarrays(arrays)
        keys = list(reference)
        clients = [[to_ndarrays(r.content["arrays"])[k] for k in keys] for r in replies]
        released = self.aggregator.aggregate([reference[k] for k in keys], clients)
        event = DPEvent(kind="client", noise_multiplier=released.noise_multiplier, sample_rate=self.q, steps=1,
                        sampling="poisson", round=server_round, party=SERVER_PARTY)
        return to_record(dict(zip(keys, released.arrays)), like=reference), event

"""The round's clock, and the straggler policies that use it: a grid wrapper.

:class:`ClockedGrid` knows, for every train reply of a round, how long its client took: the
virtual clock a simulated client's profile gives (:mod:`fedvault.profiles`: download, compute,
upload), or, for a client without one (every deployed client), the wall time from the push of its
instruction to the pull of its reply. From those times it applies

* a **deadline** (``federation.deadline``): a reply that took longer is dropped; an adaptive one
  (``federation.deadline-quantile`` = q) is, from round 2 on, the q-quantile of the times of the round
  before (kept in the checkpoint, so a resumed run goes on with the same deadline);
* **over-selection** (``federation.over-select`` = o; the strategy sampled (1 + o) x as many): of the
  replies in time, the first ``ceil(sampled / (1 + o))`` to finish are aggregated, the rest dropped
  (Bonawitz et al., "Towards Federated Learning at Scale: System Design", MLSys 2019, select 130 %).

A dropped reply is handed to the round loop through ``take_rejected``, which records its privacy
spend in the run ledger before anything is aggregated: a client that trained and missed the cut
paid all the same. ``round_report`` gives the loop the round's clock fields for ``metrics.jsonl``:
the round's wall time as the server would see it (the deadline, or the round timeout, when a sampled
client never answers in time: a simulated client that is offline or fails counts as no answer),
the slowest client, who missed the deadline, was over-selected, offline or failed, and the clients'
energy (profile power x busy time).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Message, MessageType
from flwr.serverapp import Grid

from fedvault.protocol import CLOCK, FAILED, OFFLINE, config_float, reply_status
from fedvault.server.rounds import GridWrapper

VIRTUAL, WALL = "virtual", "wall"
log = logging.getLogger("fedvault")


@dataclass(frozen=True)
class ClientTime:
    """One train reply's timing: seconds its client took, by which clock, and its busy energy."""

    reply: Message
    seconds: float
    clock: str
    profile: str = ""
    energy_joules: float = 0.0

    @property
    def node(self) -> int:
        return self.reply.metadata.src_node_id

    @classmethod
    def of(cls, reply: Message, pushed_at: float, pulled_at: float, virtual: bool) -> ClientTime:
        """The reply's virtual clock when ``virtual`` and it carries a well-formed one, else the wall time."""
        record = reply.content.config_records.get(CLOCK) if virtual and not reply.has_error() else None
        if record is not None:
            try:
                busy = sum(config_float(record, key, 0.0) for key in ("download-s", "compute-s", "upload-s"))
                return cls(
                    reply, busy, VIRTUAL, str(record.get("profile", "")), config_float(record, "power-w", 0.0) * busy
                )
            except (TypeError, ValueError) as exc:
                log.warning(
                    "node %d: malformed %s record (%s): timed on the wall clock", reply.metadata.src_node_id, CLOCK, exc
                )
        return cls(reply, pulled_at - pushed_at, WALL)


Timed = list[ClientTime]


class ClockedGrid(GridWrapper):
    """A Grid that times each train reply and drops those the deadline or over-selection leave out."""

    def __init__(
        self,
        grid: Grid,
        round_timeout: float,
        deadline: float = 0.0,
        over_select: float = 0.0,
        virtual: bool = False,
        deadline_quantile: float = 0.0,
        round_clock: Callable[[], float] | None = None,
    ) -> None:
        """``virtual``: take a reply's virtual clock (a simulation, whose clients the config's author runs);
        never in deployment, where a client could claim any time it likes. ``round_clock``: what the
        round's time is instead, asked once the round has aggregated (FedBuff's step)."""
        super().__init__(grid)
        self.round_timeout = round_timeout
        self.deadline = deadline
        self.over_select = over_select
        self.virtual = virtual
        self.deadline_quantile = deadline_quantile
        self.round_clock = round_clock
        self._pushed: dict[str, float] = {}  # this round's train instruction id -> when it was pushed
        self._times: list[ClientTime] = []
        self._report: dict[str, Any] = {}

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        ids = list(self._grid.push_messages(messages))
        now = time.monotonic()
        for message, message_id in zip(messages, ids):
            if message.metadata.message_type == MessageType.TRAIN:
                self._pushed[message_id] = now
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self._grid.pull_messages(message_ids))
        now = time.monotonic()
        for reply in replies:
            pushed_at = self._pushed.get(reply.metadata.reply_to_message_id)
            if pushed_at is not None:  # a reply to this round's training (a late one is the loop's)
                self._times.append(ClientTime.of(reply, pushed_at, now, self.virtual))
        return replies

    def take_rejected(self) -> list[tuple[Message, str]]:
        """The round's train replies the deadline or over-selection drop (with why), after those an inner
        grid could not turn into an update; closes the round's clock (:meth:`round_report`)."""
        inner = getattr(self._grid, "take_rejected", None)
        rejected: list[tuple[Message, str]] = list(inner()) if callable(inner) else []
        unusable = {id(reply) for reply, _ in rejected}
        status = {id(t.reply): reply_status(t.reply) for t in self._times}
        gone = [t for t in self._times if status[id(t.reply)] in (OFFLINE, FAILED)]
        timed = sorted(
            (t for t in self._times if status[id(t.reply)] is None and id(t.reply) not in unusable),
            key=lambda t: (t.seconds, t.node),
        )
        missed = [t for t in timed if self.deadline and t.seconds > self.deadline]
        in_time = [t for t in timed if t not in missed]
        keep = math.ceil(len(self._pushed) / (1 + self.over_select)) if self.over_select else len(in_time)
        over = in_time[keep:]
        rejected += [
            (t.reply, f"missed the deadline: {t.seconds:.3g} s > {self.deadline:g} s ({t.clock} clock)") for t in missed
        ]
        rejected += [(t.reply, f"over-selected: finished after the first {keep} ({t.seconds:.3g} s)") for t in over]
        self._report = self._clock_fields(keep, in_time, missed, over, gone)
        if self.deadline_quantile and timed:
            self.deadline = float(np.quantile([t.seconds for t in timed], self.deadline_quantile))
        self._pushed, self._times = {}, []
        return rejected

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs: the deadline the next round uses (adaptive, it moves)."""
        return {"deadline": self.deadline}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.deadline = float(state["deadline"])

    def round_report(self) -> dict[str, Any]:
        """The last round's clock fields for its metrics line (and forget them)."""
        report, self._report = self._report, {}
        if self.round_clock is not None and report:
            report["round_clock_seconds"] = self.round_clock()
        return report

    def _clock_fields(
        self,
        keep: int,
        in_time: list[ClientTime],
        missed: list[ClientTime],
        over: list[ClientTime],
        gone: list[ClientTime],
    ) -> dict[str, Any]:
        """The round's wall time as its server sees it, who was slowest, dropped, offline or failed, and energy."""
        unanswered = len(self._pushed) - len(self._times)  # a refusal (budget spent, ...) answers at once
        kept = in_time[:keep]
        if self.over_select and kept and len(kept) == keep:
            seconds = kept[-1].seconds  # the round ends when the k-th finishes
        elif missed or gone or unanswered:
            seconds = self.deadline or self.round_timeout  # someone never answers in time: the server waits
        else:
            seconds = max((t.seconds for t in kept), default=0.0)
        everyone = in_time + missed + gone
        slowest = max(in_time + missed, key=lambda t: t.seconds, default=None)
        fields: dict[str, Any] = {
            "clock": VIRTUAL if any(t.clock == VIRTUAL for t in everyone) else WALL,
            "round_clock_seconds": seconds,
            "deadline": self.deadline or None,
            "missed_deadline": sorted(t.node for t in missed),
            "over_selected": sorted(t.node for t in over),
            "offline": sorted(t.node for t in gone if reply_status(t.reply) == OFFLINE),
            "failed_after_training": sorted(t.node for t in gone if reply_status(t.reply) == FAILED),
        }
        if slowest is not None:
            fields["slowest_client"] = {"node": slowest.node, "seconds": slowest.seconds, "profile": slowest.profile}
        if fields["clock"] == VIRTUAL:
            fields["energy_joules"] = sum(t.energy_joules for t in everyone)
        return fields

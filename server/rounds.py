"""The server's round loop: Flower's ``Strategy.start`` made observable, private and robust.

One round is the sequence configure -> exchange -> set aside ``budget-exhausted`` replies ->
validate -> record the clients' DP events -> aggregate -> evaluate -> record. Features wrap the
pieces instead of branching here: client-level DP wraps the strategy
(:class:`fedvault.server.client_level_dp.ClientLevelDP`), sealing and update compression wrap the
grid (:class:`fedvault.server.sealing.SealedGrid`, :class:`fedvault.server.compression.DecodingGrid`:
``take_dropped``, ``take_rejected``, ``payload_bytes`` and ``round_report`` are how a grid reports to
the loop; :class:`fedvault.server.clock.ClockedGrid` times replies and drops stragglers that way).
Around the strategy's hooks the loop

1. waits up to the round timeout for the strategy's minimum of connected clients, then lets it
   sample only connected clients with privacy budget left (an exhausted client is never sampled
   again; a client that left does not stall the run);
2. stamps ``server-round`` into every instruction, whatever the strategy (a sealing grid signs
   them after that, when they are sent);
3. sets aside ``budget-exhausted``, ``ledger-invalid`` and ``policy-refused`` refusals (those
   clients are not sampled again) and records every other refusal (``round-already-spent``) as a
   drop with its status and reason, then validates every update before aggregation (bad ones
   are dropped with a logged reason and counted, with those the grid could not open or decode);
4. appends to the run's hash-chained ledger, before aggregating, the DP event of EVERY reply it
   received, kept or dropped, under the node id Flower authenticated (``metadata.src_node_id``):
   a dropped reply was paid for all the same. A reply the grid could not open is noted as
   unread (its spend, if any, is only in the client's ledger);
5. completes a round with the replies that came back before the timeout (the others are recorded
   in ``failed_nodes``) and fails it with one clear line when fewer than ``min_replies`` survive
   (a strategy that sampled nobody, as a Poisson sample under client-level DP may, gets its round);
   train instructions left unanswered stay awaited: a reply that arrives in a later round (or by
   :meth:`RoundLoop.collect_late` at the end) is recorded in the ledger as ``late``, paid for and
   never aggregated (Flower's own ``send_and_receive`` would discard it). A round a resumed run
   re-runs, whose clients already paid for it before the interruption (``round-already-spent``,
   each reporting its spend, recorded once), is closed as lost when too few updates remain: the
   model is unchanged and the run goes on;
6. hands ``on_round`` a record (metrics, timing, bytes, failures, drops) after every round.

``state_dict()`` is what a restart needs: the strategy's state (a wrapper's includes its own) and
the clients known to be out of budget.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=E0611
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore.run import Run

from fedvault.errors import FedvaultError
from fedvault.privacy.events import DPEvent, DPEventError
from fedvault.privacy.ledger import Ledger, canonical_json, spends
from fedvault.progress import Progress
from fedvault.protocol import (
    BUDGET_EXHAUSTED,
    LEDGER_INVALID,
    POLICY_REFUSED,
    ROUND_ALREADY_SPENT,
    STATUS,
    read_dp_event,
    read_server_round,
    reply_status,
    stamp_server_round,
)
from fedvault.strategies.arrays import to_ndarrays, to_record
from fedvault.strategies.state import load_strategy_state, strategy_state
from fedvault.strategies.validation import ValidationRules, filter_replies

CentralEvaluate = Callable[[int, ArrayRecord], MetricRecord]
RoundRecord = dict[str, Any]
log = logging.getLogger("fedvault")


class RunStopped(FedvaultError, RuntimeError):
    """The run cannot go on (budgets spent, too few replies); finished rounds are kept."""


class GridWrapper(Grid):
    """A Grid that hands every call to the grid it wraps; a feature's wrapper overrides what it changes."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid

    def set_run(self, run: Run) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Run:
        return self._grid.run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:
        return self._grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Through this wrapper's own push and pull, so a wrapper overriding those is never bypassed."""
        return exchange(self, list(messages), timeout)[0]

    def __getattr__(self, name: str) -> Any:  # what only the wrapped grid has (e.g. SealedGrid.take_dropped)
        if name == "_grid":
            raise AttributeError(name)
        return getattr(self._grid, name)


def forwarded(name: str) -> property:
    """The wrapped strategy's attribute ``name``, read and written through (the round loop caps minimums)."""
    return property(lambda self: getattr(self.strategy, name), lambda self, value: setattr(self.strategy, name, value))


class StrategyWrapper(Strategy):
    """A Strategy around ``strategy``: evaluation, the sampling minimums and the summary are the wrapped
    strategy's; a feature's wrapper overrides training (client-level DP, FedBuff)."""

    min_available_nodes = forwarded("min_available_nodes")
    min_train_nodes = forwarded("min_train_nodes")
    min_evaluate_nodes = forwarded("min_evaluate_nodes")

    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.strategy.summary()


class EligibleGrid(GridWrapper):
    """A Grid whose ``get_node_ids`` is this round's eligible nodes (a snapshot), so any strategy
    samples only those, and a node dropping out mid-sampling cannot make it wait forever."""

    def __init__(self, grid: Grid, node_ids: list[int]) -> None:
        super().__init__(grid)
        self._node_ids = list(node_ids)

    def get_node_ids(self) -> list[int]:
        return list(self._node_ids)

    def get_nodes(self) -> Iterable[NodeInfo]:
        return [node for node in self._grid.get_nodes() if node.node_id in self._node_ids]


def exchange(
    grid: Grid,
    messages: list[Message],
    timeout: float | None,
    poll_seconds: float = 0.1,
    report: Callable[[int], None] = lambda replies: None,
) -> tuple[list[Message], list[Message]]:
    """Push ``messages`` and pull replies until all are answered or ``timeout`` seconds pass (None:
    no limit); the replies, and the messages left unanswered (their ids set by the push).
    ``report(replies so far)`` is called at every poll (:meth:`fedvault.progress.Wait.update`)."""
    ids = set(grid.push_messages(messages))
    deadline = None if timeout is None else time.monotonic() + timeout
    replies: list[Message] = []
    while ids:
        got = list(grid.pull_messages(ids))
        replies += got
        ids -= {reply.metadata.reply_to_message_id for reply in got}
        report(len(replies))
        if not ids or (deadline is not None and time.monotonic() >= deadline):
            break
        time.sleep(poll_seconds)
    return replies, [m for m in messages if m.metadata.message_id in ids]


SAMPLING_MINIMUMS = ("min_available_nodes", "min_train_nodes", "min_evaluate_nodes")


@contextmanager
def minimums_at_most(strategy: Strategy, available: int) -> Iterator[None]:
    """Temporarily cap the strategy's sampling minimums at ``available`` nodes (Flower's
    ``sample_nodes`` would otherwise wait forever for nodes that left)."""
    saved = {
        name: getattr(strategy, name)
        for name in SAMPLING_MINIMUMS
        if isinstance(getattr(strategy, name, None), int) and getattr(strategy, name) > available
    }
    for name in saved:
        setattr(strategy, name, available)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(strategy, name, value)


@dataclass
class RoundLoop:
    """Runs rounds of train (+ client evaluate) + centralized evaluate."""

    strategy: Strategy
    grid: Grid
    central_evaluate: CentralEvaluate
    on_round: Callable[[RoundRecord, ArrayRecord], None]
    timeout: float
    rules: ValidationRules
    min_replies: int = 1
    client_evaluate: bool = True
    ledger: Ledger | None = None
    exhausted: set[int] = field(default_factory=set)
    poll_seconds: float = 1.0
    pull_seconds: float = 0.1
    #: Train instructions not answered in their round: message id -> (node, round), awaited still.
    outstanding: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: Where waits and the live status go (:mod:`fedvault.progress`).
    progress: Progress = field(default_factory=Progress)

    def run(
        self, arrays: ArrayRecord, num_rounds: int, round_config: Callable[[int], ConfigRecord], first_round: int = 1
    ) -> ArrayRecord:
        """Rounds ``first_round``..``num_rounds``; ``round_config(r)`` is round r's train config."""
        if first_round == 1:
            start = time.perf_counter()
            self.on_round(
                {"round": 0, "central": dict(self.central_evaluate(0, arrays)), "seconds": time.perf_counter() - start},
                arrays,
            )
        for server_round in range(first_round, num_rounds + 1):
            arrays = self._round(server_round, arrays, round_config(server_round))
        return arrays

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs from the loop: strategy state (npz-friendly), the exhausted clients,
        and a wrapping grid's own state (JSON-able; e.g. the clock's adaptive deadline)."""
        grid_state = getattr(self.grid, "state_dict", None)
        return {
            "strategy": strategy_state(self.strategy),
            "exhausted": sorted(self.exhausted),
            "grid": dict(grid_state()) if callable(grid_state) else {},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_strategy_state(self.strategy, state["strategy"])
        self.exhausted = {int(node) for node in state["exhausted"]}
        load_grid_state = getattr(self.grid, "load_state_dict", None)
        if state.get("grid") and callable(load_grid_state):
            load_grid_state(state["grid"])

    # ---- one round -------------------------------------------------------------------------

    def _round(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord) -> ArrayRecord:
        start = time.perf_counter()
        record: RoundRecord = {"round": server_round, "train_config": dict(config)}
        eligible = self._eligible_grid(server_round)
        with minimums_at_most(self.strategy, len(eligible.get_node_ids())):
            sent = self._instruct(self.strategy.configure_train(server_round, arrays, config, eligible), server_round)
        replies, unopened = self._exchange(sent, f"round {server_round}", await_late=True)
        late = self._pull_late(server_round)
        unopened += self._taken_dropped()
        answered = {id(r) for r in replies}
        undecoded = [(r, why) for r, why in self._taken_rejected() if id(r) in answered]  # a late one: in late
        undecodable = {id(r) for r, _ in undecoded}
        received, replies = replies, [r for r in replies if id(r) not in undecodable]  # dropped, not validated

        status = [reply_status(r) for r in replies]
        exhausted = [r for r, s in zip(replies, status) if s == BUDGET_EXHAUSTED]
        barred = [r for r, s in zip(replies, status) if s in (LEDGER_INVALID, POLICY_REFUSED)]  # not retried
        self.exhausted.update(r.metadata.src_node_id for r in exhausted + barred)
        # every other refusal (round-already-spent, ...) is dropped as what it is, never validated as an update
        refused = [r for r, s in zip(replies, status) if s not in (None, BUDGET_EXHAUSTED)]
        others = [r for r, s in zip(replies, status) if s is None]
        kept, rejected = filter_replies(others, arrays, self.rules)
        kept_ids = {id(r) for r in kept}
        dropped_replies = [r for r in others if id(r) not in kept_ids]  # filter_replies keeps the order
        paid_before = [r for r, s in zip(replies, status) if s == ROUND_ALREADY_SPENT]
        paying = [r for r in refused if read_dp_event(r) is not None]  # e.g. round-already-spent, failed
        lost = self._lost(server_round, len(kept), len(paid_before))
        kept, unreadable = self._record_spends(
            server_round,
            [(r, "dropped" if lost else "kept", lost) for r in kept]
            + [(r, "dropped", why) for r, (_, why) in zip(dropped_replies, rejected)]
            + [(r, "dropped", why) for r, why in undecoded]
            + [(r, "dropped", _refusal_reason(r)) for r in self._not_in_ledger(paying)]
            + late,
            unopened,
        )
        kept.sort(key=lambda r: r.metadata.src_node_id)  # arrival order must not change the float sums
        rejected += [(r.metadata.src_node_id, why) for r, why in undecoded]
        dropped = unopened + rejected + unreadable + [(r.metadata.src_node_id, _refusal_reason(r)) for r in refused]
        if lost:  # closed without an update: the model stays as it was, the run goes on
            log.warning("%s", lost)
            record["lost"] = lost
            train_metrics: dict[str, Any] = {}
        elif len(kept) < self.min_replies and sent:  # an empty Poisson sample is a round (noise alone)
            raise RunStopped(
                f"round {server_round}: {len(kept)} usable updates < min-replies={self.min_replies} "
                f"({len(sent)} sampled, {len(_failed(sent, received))} unanswered by the round timeout, "
                f"{len(exhausted)} budget-exhausted, {len(dropped)} dropped"
                + (f"; first drop: node {dropped[0][0]}: {dropped[0][1]}" if dropped else "")
                + ")"
            )
        else:
            arrays, train_metrics = self._aggregate(server_round, arrays, kept)

        record.update(
            train=train_metrics,
            clients_sampled=len(sent),
            replies_ok=len(kept),
            failed_nodes=sorted(_failed(sent, received)),
            budget_exhausted=len(exhausted),
            dropped=[{"node": node, "reason": reason} for node, reason in dropped],
            late=[{"node": r.metadata.src_node_id, "reason": why} for r, _, why in late],
            **self._grid_report(),
        )
        bytes_sent, bytes_received = self._payload_bytes(sent), self._payload_bytes(received)
        if self.client_evaluate:
            with minimums_at_most(self.strategy, len(eligible.get_node_ids())):
                sent_eval = self._instruct(
                    self.strategy.configure_evaluate(server_round, arrays, ConfigRecord(), eligible), server_round
                )
            eval_replies, _ = self._exchange(sent_eval, f"round {server_round} evaluate")
            for reply in [r for r in eval_replies if reply_status(r) is not None]:  # no metrics to average
                log.info(
                    "round %d: evaluate of node %d %s", server_round, reply.metadata.src_node_id, _refusal_reason(reply)
                )
            eval_replies = [r for r in eval_replies if reply_status(r) is None]
            record["evaluate"] = dict(self.strategy.aggregate_evaluate(server_round, eval_replies) or {})
            bytes_sent += self._payload_bytes(sent_eval)
            bytes_received += self._payload_bytes(eval_replies)
        record["central"] = dict(self.central_evaluate(server_round, arrays))
        record["bytes_sent"], record["bytes_received"] = bytes_sent, bytes_received
        record["seconds"] = time.perf_counter() - start
        self.on_round(record, arrays)
        return arrays

    def _instruct(self, messages: Iterable[Message], server_round: int) -> list[Message]:
        """Stamp ``server-round`` into every instruction, whatever the strategy (before any signing)."""
        return [stamp_server_round(message, server_round) for message in messages]

    def _exchange(
        self, sent: list[Message], label: str, await_late: bool = False
    ) -> tuple[list[Message], list[tuple[int, str]]]:
        """Send, wait (up to the timeout, saying so); the replies, and ``(node, reason)`` of those the grid
        dropped. With ``await_late`` the unanswered instructions stay awaited (:meth:`_pull_late`)."""
        with self.progress.replies_wait(label, len(sent), self.timeout) as wait:
            replies, unanswered = exchange(self.grid, sent, self.timeout, self.pull_seconds, wait.update)
        if await_late:
            self.outstanding.update(
                {m.metadata.message_id: (m.metadata.dst_node_id, read_server_round(m.content)) for m in unanswered}
            )
        return replies, self._taken_dropped()

    def _taken_dropped(self) -> list[tuple[int, str]]:
        take_dropped = getattr(self.grid, "take_dropped", None)  # a wrapping grid that drops replies says so
        return list(take_dropped()) if callable(take_dropped) else []

    def _taken_rejected(self) -> list[tuple[Message, str]]:
        """``(reply, reason)`` of replies a wrapping grid returned but could not turn into an update (e.g. a
        payload that does not decode): dropped like an invalid update, their spends recorded."""
        take_rejected = getattr(self.grid, "take_rejected", None)
        return list(take_rejected()) if callable(take_rejected) else []

    def _payload_bytes(self, messages: list[Message]) -> int:
        """What ``messages`` carried: a wrapping grid that changes replies' size counts them itself."""
        count = getattr(self.grid, "payload_bytes", None)
        return int(count(messages)) if callable(count) else payload_bytes(messages)

    def _grid_report(self) -> dict[str, Any]:
        """A wrapping grid's own fields for the round's record (e.g. its clock), if it keeps any."""
        report = getattr(self.grid, "round_report", None)
        return dict(report()) if callable(report) else {}

    def _pull_late(self, server_round: int) -> list[tuple[Message, str, str | None]]:
        """Replies to earlier rounds' train instructions that came in since, as ``(reply, "late", reason)``."""
        if not self.outstanding:
            return []
        late: list[tuple[Message, str, str | None]] = []
        for reply in self.grid.pull_messages(list(self.outstanding)):
            node, sent_round = self.outstanding.pop(reply.metadata.reply_to_message_id, (0, 0))
            log.info(
                "round %d: late reply of node %d to round %d recorded, not aggregated", server_round, node, sent_round
            )
            late.append(
                (reply, "late", f"reply to round {sent_round} arrived after its timeout (by round {server_round})")
            )
        return late

    def collect_late(self, server_round: int) -> None:
        """At the end of the run: record the spends of late replies that came in after the last round."""
        late = self._pull_late(server_round)
        self._record_spends(server_round, late, self._taken_dropped())

    def _eligible_grid(self, server_round: int) -> EligibleGrid:
        """Wait up to the round timeout for the strategy's ``min_available_nodes``; then go on with
        the connected clients that have privacy budget left, or stop if fewer than ``min_replies``."""
        wanted = getattr(self.strategy, "min_available_nodes", 1)
        connected = list(self.grid.get_node_ids())
        if len(connected) < wanted:
            deadline = time.monotonic() + self.timeout
            with self.progress.clients_wait(server_round, wanted, self.timeout) as wait:
                while len(connected) < wanted and time.monotonic() < deadline:
                    wait.update(len(connected))
                    time.sleep(self.poll_seconds)
                    connected = list(self.grid.get_node_ids())
            if len(connected) < wanted:
                log.warning(
                    "round %d: only %d of %d clients connected after %g s; sampling among them",
                    server_round,
                    len(connected),
                    wanted,
                    self.timeout,
                )
        eligible = [node for node in connected if node not in self.exhausted]
        if len(eligible) < self.min_replies:
            raise RunStopped(
                f"round {server_round}: {len(eligible)} of {len(connected)} connected clients can train "
                f"({len(self.exhausted)} out of privacy budget) < min-replies={self.min_replies}; "
                f"stopping after round {server_round - 1}"
            )
        return EligibleGrid(self.grid, eligible)

    def _aggregate(self, server_round: int, arrays: ArrayRecord, kept: list[Message]) -> tuple[ArrayRecord, dict]:
        new_arrays, metrics = self.strategy.aggregate_train(server_round, kept)
        if new_arrays is None:
            return arrays, dict(metrics or {})
        # Keep the model's dtypes: some strategies (FedOpt family) compute in float64.
        return to_record(to_ndarrays(new_arrays), like=to_ndarrays(arrays)), dict(metrics or {})

    # ---- privacy ledger --------------------------------------------------------------------

    def _record_spends(
        self, server_round: int, received: list[tuple[Message, str, str | None]], unopened: list[tuple[int, str]]
    ) -> tuple[list[Message], list[tuple[int, str]]]:
        """Append the spend of every received ``(reply, status, reason)`` (kept, dropped, late) and note
        the unopened ones.

        Returns the kept replies whose DP event is readable, and ``(node, reason)`` for the kept ones
        whose event is malformed (dropped: their spend is unknown, so noted as unread)."""
        usable: list[Message] = []
        unreadable: list[tuple[int, str]] = []
        for reply, status, reason in received:
            node = reply.metadata.src_node_id
            fields = read_dp_event(reply) if not reply.has_error() else None
            try:
                event = DPEvent.from_dict(fields) if fields is not None else None
            except DPEventError as exc:
                why = f"malformed dp-event: {exc}"
                self._ledger_for(why).append_unread(node, server_round, why)
                if status == "kept":
                    unreadable.append((node, why))
                continue
            if event is not None:
                self._ledger_for(str(event)).append(event, node=node, status=status, reason=reason)
            if status == "kept":
                usable.append(reply)
        if self.ledger is not None:
            for node, reason in unopened:
                self.ledger.append_unread(node, server_round, reason)
        return usable, unreadable

    def _lost(self, server_round: int, usable: int, paid_before: int) -> str | None:
        """Why the round is lost, or None: too few usable updates only because clients already paid
        for this round before an interruption (a resumed run re-runs the round it was in)."""
        if usable >= self.min_replies or usable + paid_before < self.min_replies:
            return None
        return (
            f"round {server_round} lost: {paid_before} sampled clients paid for it before an interruption "
            f"and their updates never arrived ({usable} usable < min-replies={self.min_replies}); "
            "the model is unchanged"
        )

    def _not_in_ledger(self, paying: list[Message]) -> list[Message]:
        """The refusals carrying a spend (``round-already-spent``: paid before an interruption; ``failed``:
        a simulated client that failed after training) whose spend the run ledger does not hold yet; one
        it holds is not recorded twice."""
        if not paying or self.ledger is None:
            return paying
        held = {canonical_json(entry.event.to_dict()) for entry in spends(self.ledger.entries()) if entry.event}
        return [r for r in paying if _reported_spend(r) not in held]

    def _ledger_for(self, what: str) -> Ledger:
        if self.ledger is None:
            raise RunStopped(f"a DP event arrived ({what}) but this run has no privacy ledger")
        return self.ledger


def _reported_spend(reply: Message) -> bytes | None:
    """The canonical form of the DP event a reply carries (None: none, or malformed)."""
    fields = read_dp_event(reply)
    try:
        return canonical_json(DPEvent.from_dict(fields).to_dict()) if fields is not None else None
    except DPEventError:
        return None


def _refusal_reason(reply: Message) -> str:
    """``refused (status): reason`` of a refusing reply."""
    record = reply.content.config_records[STATUS]
    return f"refused ({record.get(STATUS)!r}): {record.get('reason', '')!r}"


def payload_bytes(messages: Iterable[Message]) -> int:
    """Bytes of the arrays carried by ``messages`` (what dominates traffic)."""
    return sum(rec.count_bytes() for msg in messages if msg.has_content() for rec in msg.content.array_records.values())


def _failed(sent: list[Message], replies: list[Message]) -> set[int]:
    """Nodes that replied with an error or did not reply before the timeout."""
    ok = {r.metadata.src_node_id for r in replies if not r.has_error()}
    return {m.metadata.dst_node_id for m in sent} - ok

"""The wire protocol between fedvault's ServerApp and ClientApp: every key, status and reader.

Messages are Flower ``RecordDict``s under Flower's usual keys, so stock Flower strategies and apps
interoperate with fedvault's when fedvault extras are off:

instruction (server -> client)
    ``"arrays"``  ArrayRecord  the global model
    ``"config"``  ConfigRecord ``"server-round"`` (set by fedvault's round loop in every
                  instruction, whatever the strategy), ``"lr"``, ``"local-epochs"``,
                  ``"momentum"``, plus strategy keys (FedProx's ``"proximal-mu"``, FedNova's
                  ``"fednova"``)
    ``"fedvault.receipts"`` ConfigRecord ``{"receipts": [json, ...], "seqs": [int, ...]}``: the
                  server's signed receipts for this node's spends in the run ledger
                  (:mod:`fedvault.privacy.receipts`), on the next instruction to the node and on
                  a final ``query`` message; outside the instruction signature's digest, since
                  each receipt carries its own signature
reply (client -> server)
    ``"arrays"``   ArrayRecord  the trained model (train replies)
    ``"metrics"``  MetricRecord ``"num-examples"`` and the metric names below
    ``"dp-event"`` ConfigRecord the DP spend of this reply, already in the client's ledger
                   (:class:`fedvault.privacy.events.DPEvent` fields)
    ``"status"``   ConfigRecord ``{"status": BUDGET_EXHAUSTED | ROUND_ALREADY_SPENT |
                   LEDGER_INVALID | POLICY_REFUSED, "reason": str}`` when the client refused to train

Strategy records (SCAFFOLD's ``"scaffold.*"``, FedNova's ``"fednova.*"`` metrics) are defined
next to both halves of their strategy in :mod:`fedvault.strategies`; sealing's ``"fedvault.*"``
records in :mod:`fedvault.security.envelope`; update compression's ``"fedvault.compressed"`` ArrayRecord
and ``"fedvault.compression"`` ConfigRecord, which replace ``"arrays"`` in a compressed reply, in
:mod:`fedvault.compression`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fedvault.config import RunConfig

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
NUM_EXAMPLES = "num-examples"
DP_EVENT = "dp-event"
STATUS = "status"
RECEIPTS = "fedvault.receipts"

SERVER_ROUND = "server-round"
LEARNING_RATE = "lr"
LOCAL_EPOCHS = "local-epochs"
MOMENTUM = "momentum"

#: Status values of a refusing client's reply.
BUDGET_EXHAUSTED = "budget-exhausted"  # training this round would pass the client's epsilon cap
ROUND_ALREADY_SPENT = "round-already-spent"  # this round was already trained and paid for
LEDGER_INVALID = "ledger-invalid"  # the client's own privacy ledger fails its check: it cannot know its spend
POLICY_REFUSED = "policy-refused"  # the client's own policy refuses the run (less DP than its floor, a task it bars)
#: A simulated client's profile (fedvault.profiles) made it miss the round: what a real server sees as no answer.
OFFLINE = "offline"  # not online this round: nothing trained, nothing spent
FAILED = "failed"  # failed after training: the reply carries the spend it made
CLOCK = "fedvault.clock"  # a simulated client's virtual clock for its round (fedvault.client.simulated_device)

#: Metric names in replies.
TRAIN_LOSS = "train_loss"
TRAIN_STEPS = "train_steps"
TRAIN_SECONDS = "train_seconds"
TRAIN_BATCH_SIZE = "train_batch_size"  # the logical batch the client used (batch-size 0 = auto)
DP_EPSILON = "dp_epsilon"
EVAL_LOSS = "eval_loss"
EVAL_ACCURACY = "eval_accuracy"
RECEIPTS_KEPT = "receipts_kept"  # a query reply: how many new receipts the client stored


@dataclass(frozen=True)
class RoundConfig:
    """What a train instruction asks of the client this round; a missing key takes the client's default."""

    server_round: int
    learning_rate: float
    local_epochs: int
    momentum: float


def train_config(learning_rate: float, local_epochs: int, momentum: float) -> ConfigRecord:
    """The round config the server sends with every train instruction (``server-round`` is added per round)."""
    return ConfigRecord({LEARNING_RATE: learning_rate, LOCAL_EPOCHS: local_epochs, MOMENTUM: momentum})


def record_scalar(value: object, key: str) -> int | float | str | bytes:
    """A config or metric record value that ``int()``/``float()`` can take; TypeError for a list or other type."""
    if not isinstance(value, int | float | str | bytes):
        raise TypeError(f"record value {key!r} must be a scalar, got {type(value).__name__}: {value!r}")
    return value


def config_int(config: Mapping[str, object], key: str, default: int) -> int:
    """``int(config[key])``, ``default`` when the key is missing; TypeError if the value is not a scalar."""
    return int(record_scalar(config.get(key, default), key))


def config_float(config: Mapping[str, object], key: str, default: float) -> float:
    """``float(config[key])``, ``default`` when the key is missing; TypeError if the value is not a scalar."""
    return float(record_scalar(config.get(key, default), key))


def read_round_config(content: RecordDict, defaults: RoundConfig) -> RoundConfig:
    """The instruction's round config, each missing key from ``defaults``."""
    config = content.config_records.get(CONFIG, ConfigRecord())
    return RoundConfig(
        server_round=config_int(config, SERVER_ROUND, defaults.server_round),
        learning_rate=config_float(config, LEARNING_RATE, defaults.learning_rate),
        local_epochs=config_int(config, LOCAL_EPOCHS, defaults.local_epochs),
        momentum=config_float(config, MOMENTUM, defaults.momentum),
    )


def read_server_round(content: RecordDict) -> int:
    """The instruction's ``server-round`` (0 when a non-fedvault server sent none)."""
    return config_int(content.config_records.get(CONFIG, ConfigRecord()), SERVER_ROUND, 0)


def stamp_server_round(message: Message, server_round: int) -> Message:
    """Set ``server-round`` in the instruction's config record (creating it when a strategy sent none)."""
    content = message.content
    if CONFIG not in content.config_records:
        content[CONFIG] = ConfigRecord()
    content.config_records[CONFIG][SERVER_ROUND] = server_round
    return message


def refusal(status: str, reason: str, paid: Any = None) -> RecordDict:
    """The reply of a client that refused to train: no arrays, zero examples, the status and why;
    with ``paid`` (a DP event), the spend it already made for this round as its ``"dp-event"``."""
    content = RecordDict(
        {METRICS: MetricRecord({NUM_EXAMPLES: 0}), STATUS: ConfigRecord({STATUS: status, "reason": reason})}
    )
    if paid is not None:
        content[DP_EVENT] = dp_event_record(paid)
    return content


def with_receipts(content: RecordDict, receipts: list[tuple[int, str]]) -> RecordDict:
    """``content`` plus ``(run-ledger seq, receipt json)`` pairs (a new RecordDict; the records are shared)."""
    out = RecordDict(dict(content.items()))
    out[RECEIPTS] = ConfigRecord({"seqs": [seq for seq, _ in receipts], "receipts": [text for _, text in receipts]})
    return out


def read_receipts(content: RecordDict) -> list[tuple[int, str]]:
    """The instruction's ``(seq, receipt json)`` pairs (empty when it carries none); TypeError if malformed."""
    record = content.config_records.get(RECEIPTS)
    if record is None:
        return []
    seqs, texts = record.get("seqs", []), record.get("receipts", [])
    if not isinstance(seqs, list) or not isinstance(texts, list) or len(seqs) != len(texts):
        raise TypeError(f"{RECEIPTS!r} must hold two lists of equal length, 'seqs' and 'receipts'")
    return [(int(record_scalar(seq, "seqs")), str(text)) for seq, text in zip(seqs, texts)]


def reply_status(reply: Message) -> str | None:
    """The refusal status of a reply, or None for an ordinary (or error) reply."""
    if reply.has_error() or STATUS not in reply.content.config_records:
        return None
    return str(reply.content.config_records[STATUS].get(STATUS))


def dp_event_record(event: Any) -> ConfigRecord:
    """A DP event (anything with ``to_dict()``) as the reply's ``"dp-event"`` record."""
    return ConfigRecord(event.to_dict())


def read_dp_event(reply: Message) -> Mapping[str, Any] | None:
    """The reply's ``"dp-event"`` fields, or None when it carries none (validate with ``DPEvent.from_dict``)."""
    record = reply.content.config_records.get(DP_EVENT)
    return dict(record) if record is not None else None


def run_key(cfg: RunConfig, run_id: int) -> str:
    """The run both ledgers are keyed by (a node ledger's ``run_key``, the run ledger header's ``run``):
    the run directory's name when there is one (stable across restarts and resumes), else the Flower run."""
    return Path(cfg.run_dir).name if cfg.run_dir else f"flower-run-{run_id}"

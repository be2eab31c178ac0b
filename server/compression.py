"""Server side of update compression: a grid wrapper that decodes compressed replies.

:class:`DecodingGrid` wraps the run's grid outside the sealing one, so a reply is opened, then
decoded, then validated and aggregated like any other: the round loop never sees compression.
It remembers the global arrays of the train instructions it last pushed (per message id) and
rebuilds a compressed reply's model as ``global + decode(payload)`` (:mod:`fedvault.compression`),
before the server's validation and before client-level DP clips the update. A payload that does
not decode (another codec, a missing or mis-shaped field, a NaN scale, an index out of range,
truncated bytes) is returned as it came and named by ``take_rejected()`` with a reason naming the
node and the field; the loop records it as a dropped update (its DP event still recorded).
``payload_bytes`` counts a decoded reply at its encoded size, so ``bytes_received`` is what
crossed the wire. A late reply (to an earlier round's instruction) is never aggregated: it comes
back undecoded and the loop records its spend as late.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import ArrayRecord, Message, MessageType
from flwr.serverapp import Grid

from fedvault.compression import Codec, PayloadError, encoded_bytes, from_records, is_compressed
from fedvault.protocol import ARRAYS
from fedvault.server.rounds import GridWrapper, payload_bytes
from fedvault.strategies.arrays import NDArrays, to_ndarrays, to_record

log = logging.getLogger("fedvault")


class DecodingGrid(GridWrapper):
    """A Grid whose replies come back with their compressed update decoded against what was sent."""

    def __init__(self, grid: Grid, codec: Codec) -> None:
        super().__init__(grid)
        self.codec = codec
        self._sent: dict[str, NDArrays] = {}  # id of a train instruction of the latest push -> its global arrays
        self._encoded: dict[str, int] = {}  # instruction id of a decoded reply -> bytes of its compressed records
        self._rejected: list[tuple[Message, str]] = []

    def take_rejected(self) -> list[tuple[Message, str]]:
        """``(reply, reason)`` of the replies returned undecoded since the last call (and forget them): the
        loop drops them (unread, validation would drop them too: they carry no ``"arrays"``)."""
        rejected, self._rejected = self._rejected, []
        return rejected

    def payload_bytes(self, messages: Iterable[Message]) -> int:
        """Array bytes of ``messages``, a decoded reply counted at its encoded size."""
        messages = list(messages)  # a reply is known by the instruction it answers (an instruction by none)
        encoded = [m for m in messages if m.metadata.reply_to_message_id in self._encoded]
        plain = [m for m in messages if m.metadata.reply_to_message_id not in self._encoded]
        return sum(self._encoded.pop(m.metadata.reply_to_message_id) for m in encoded) + payload_bytes(plain)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        references = [self._reference(m) for m in messages]  # before an inner grid signs the content
        ids = list(self._grid.push_messages(messages))
        converted: dict[int, NDArrays] = {}  # strategies share one record across nodes: convert it once
        if any(record is not None for record in references):  # a new round: earlier references are let go
            self._sent = {}
        for msg, record in zip(messages, references):
            if record is not None:
                self._sent[msg.metadata.message_id] = converted.setdefault(id(record), to_ndarrays(record))
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = []
        for reply in self._grid.pull_messages(message_ids):
            like = self._sent.pop(reply.metadata.reply_to_message_id, None)
            if not reply.has_error() and is_compressed(reply.content) and (reason := self._decode(reply, like)):
                log.warning("dropped reply of node %d: %s", reply.metadata.src_node_id, reason)
                self._rejected.append((reply, reason))
            replies.append(reply)
        return replies

    @staticmethod
    def _reference(msg: Message) -> ArrayRecord | None:
        if msg.metadata.message_type != MessageType.TRAIN or ARRAYS not in msg.content.array_records:
            return None
        return msg.content.array_records[ARRAYS]

    def _decode(self, reply: Message, like: NDArrays | None) -> str | None:
        """Replace the reply's payload by its rebuilt ``"arrays"`` (in place); None, or why it cannot be."""
        node = reply.metadata.src_node_id
        if like is None:
            return f"compression: node {node}'s compressed reply answers no train instruction of this round"
        size = encoded_bytes(reply.content)
        try:
            payload, rest = from_records(reply.content, self.codec)
            delta = self.codec.decode(payload, like)
        except PayloadError as exc:
            return f"compression: node {node}'s {self.codec.name} payload rejected: {exc}"
        rest[ARRAYS] = to_record({key: like[key] + delta[key] for key in like}, like=like)
        reply.content = rest
        self._encoded[reply.metadata.reply_to_message_id] = size
        return None

"""Server side of sealed updates: a per-run KEM key announced under the server's Ed25519 identity,
every instruction signed, every reply opened before validation and aggregation.

:class:`SealedGrid` wraps the run's Grid (as ``EligibleGrid`` does) so the round loop never sees
sealing: it signs each instruction when it is sent, under the ``server-round`` the loop stamped
into it, and opens each reply under the round and kind (message type) of the instruction it
answers. A reply that fails to open is dropped with a logged reason; ``take_dropped()`` hands
those ``(node, reason)`` pairs to the loop for the round's record.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from fedvault.config import RunConfig
from fedvault.protocol import read_server_round
from fedvault.rundir import IDENTITY_DIR
from fedvault.security.envelope import open_reply, sign_instruction
from fedvault.security.identity import announce_run_key, generate_identity, load_identity
from fedvault.security.sealing import SealingError
from fedvault.server.rounds import GridWrapper

log = logging.getLogger("fedvault")


def server_identity_path(cfg: RunConfig, run_dir: Path) -> Path:
    """``sealing.identity-key``, or (simulation) a fresh identity made once in the run directory."""
    if cfg.sealing.identity_key:
        return Path(cfg.sealing.identity_key)
    files = run_dir / IDENTITY_DIR
    if not (files / "identity.key").exists():
        generate_identity(files)
    return files / "identity.key"


class ServerSealing:
    """Signs what the server sends and opens what clients return, for one run."""

    def __init__(self, identity_key: Path, run_id: int, suite: str) -> None:
        self.identity = load_identity(identity_key)
        self.run_id = run_id
        self.run_key, self.announcement = announce_run_key(self.identity, run_id, suite)

    def sign(self, messages: list[Message], server_round: int) -> list[Message]:
        """Sign each distinct content once (strategies share one content across nodes)."""
        signed: dict[int, RecordDict] = {}
        for msg in messages:
            key = id(msg.content)
            if key not in signed:
                signed[key] = sign_instruction(
                    msg.content, self.identity, self.announcement, run_id=self.run_id, round=server_round
                )
            msg.content = signed[key]
        return messages

    def open(self, replies: list[Message], server_round: int, kind: str) -> tuple[list[Message], list[tuple[int, str]]]:
        """Opened replies, and ``(node, reason)`` for those that fail (tampered, replayed, unsealed)."""
        opened, dropped = [], []
        for reply in replies:
            if reply.has_error():
                opened.append(reply)
                continue
            node = reply.metadata.src_node_id
            try:
                reply.content = open_reply(
                    reply.content, self.run_key, run_id=self.run_id, round=server_round, node_id=node, kind=kind
                )
                opened.append(reply)
            except SealingError as exc:
                log.warning("round %d: dropped reply of node %d: %s", server_round, node, exc)
                dropped.append((node, f"sealing: {exc}"))
        return opened, dropped


class SealedGrid(GridWrapper):
    """A Grid that signs every instruction it sends and opens every reply it returns."""

    def __init__(self, grid: Grid, sealing: ServerSealing) -> None:
        super().__init__(grid)
        self.sealing = sealing
        self._sent: dict[str, tuple[int, str]] = {}  # instruction id -> (server round, kind)
        self._dropped: list[tuple[int, str]] = []

    def take_dropped(self) -> list[tuple[int, str]]:
        """``(node, reason)`` of the replies dropped since the last call (and forget them)."""
        dropped, self._dropped = self._dropped, []
        return dropped

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        sent = self._sign(messages)
        replies = list(self._grid.send_and_receive(sent, timeout=timeout))
        self._remember(sent)
        opened = self._open(replies)
        for msg in sent:  # replies that did not come back in time are not awaited any longer
            self._sent.pop(msg.metadata.message_id, None)
        return opened

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        sent = self._sign(messages)
        ids = list(self._grid.push_messages(sent))
        self._remember(sent)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._open(list(self._grid.pull_messages(message_ids)))

    def _sign(self, messages: Iterable[Message]) -> list[Message]:
        """Sign each instruction under the ``server-round`` stamped into it (in place)."""
        messages = list(messages)
        by_round: dict[int, list[Message]] = {}
        for msg in messages:
            by_round.setdefault(read_server_round(msg.content), []).append(msg)
        for server_round, group in by_round.items():
            self.sealing.sign(group, server_round)
        return messages

    def _remember(self, sent: list[Message]) -> None:
        for msg in sent:  # the wrapped grid set each message id while pushing
            self._sent[msg.metadata.message_id] = (read_server_round(msg.content), msg.metadata.message_type)

    def _open(self, replies: list[Message]) -> list[Message]:
        opened = []
        for reply in replies:
            instruction = self._sent.pop(reply.metadata.reply_to_message_id, None)
            if reply.has_error():
                opened.append(reply)
            elif instruction is None:
                reason = "sealing: the reply answers no instruction this server sent"
                log.warning("dropped reply of node %d: %s", reply.metadata.src_node_id, reason)
                self._dropped.append((reply.metadata.src_node_id, reason))
            else:
                ok, dropped = self.sealing.open([reply], *instruction)
                opened += ok
                self._dropped += dropped
        return opened

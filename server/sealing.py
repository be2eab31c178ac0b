"""Server side of sealed updates: a per-run KEM key announced under the server's Ed25519 identity,
every instruction signed, every reply opened before validation and aggregation.

:class:`SealedGrid` wraps the run's Grid (as ``EligibleGrid`` does) so the round loop never sees
sealing: it signs each instruction when it is sent, for its destination node and message type,
under the ``server-round`` the loop stamped into it, and opens each reply under the round, kind
and instruction digest of the instruction it answers. A reply that fails to open is dropped with
a logged reason; ``take_dropped()`` hands those ``(node, reason)`` pairs to the loop for the
round's record.

The server's sealing policy is its own (:class:`ServerSealingPolicy`): deployed, it comes from
the local TOML file named by ``$FEDVAULT_SERVER_POLICY`` (keys ``mode``, ``suite``,
``identity-key``) with sealing on by default, never from the run config the SuperLink stores.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from fedvault.config import RunConfig
from fedvault.errors import ConfigError
from fedvault.policy_file import read_policy_file
from fedvault.protocol import read_server_round
from fedvault.rundir import IDENTITY_DIR
from fedvault.security.envelope import announced, content_digest, open_reply, signed_for, signed_instruction_digest
from fedvault.security.identity import InstructionBinding, announce_run_key, generate_identity, load_identity
from fedvault.security.sealing import DEFAULT_SUITE, SUITES, SealingError
from fedvault.server.rounds import GridWrapper

log = logging.getLogger("fedvault")


SERVER_POLICY_ENV = "FEDVAULT_SERVER_POLICY"
SERVER_POLICY_KEYS = frozenset({"mode", "suite", "identity-key", "allow-plugins"})  # allow-plugins: server/plugins.py


@dataclass(frozen=True)
class ServerSealingPolicy:
    """Whether the ServerApp seals, with which suite and identity key: the server's own choice."""

    enabled: bool
    suite: str
    identity_key: str  # "": a fresh identity made once in the run directory (simulation)

    @classmethod
    def local(cls, cfg: RunConfig, deployed: bool) -> ServerSealingPolicy:
        """Simulation: ``cfg`` (one operator, one machine). Deployed: ``$FEDVAULT_SERVER_POLICY``,
        sealing on and x25519 by default; the run config's ``sealing.mode`` and ``sealing.suite``
        are ignored (logged when they differ). ``identity-key`` falls back to the run config's
        ``sealing.identity-key``, which ``fedvault server`` sets to its local key: a changed path can
        only make the server sign with a key clients do not pin, and they refuse it."""
        if not deployed:
            return cls(cfg.sealing.enabled(deployed=False), cfg.sealing.suite, cfg.sealing.identity_key)
        path = os.environ.get(SERVER_POLICY_ENV)
        values = read_policy_file(path, SERVER_POLICY_KEYS, "server") if path else {}
        mode = str(values.get("mode", "on"))
        suite = str(values.get("suite", DEFAULT_SUITE))
        if mode not in ("on", "off") or suite not in SUITES:
            raise ConfigError(f"server policy {path}: mode must be on/off and suite one of {', '.join(SUITES)}")
        policy = cls(mode == "on", suite, str(values.get("identity-key", cfg.sealing.identity_key)))
        asked = (cfg.sealing.enabled(deployed=True), cfg.sealing.suite)
        if asked != (policy.enabled, policy.suite):
            log.warning(
                "run config asks sealing %s with suite %s; ignored: the server's sealing policy is local "
                "(%s=%s): sealing %s, suite %s",
                "on" if asked[0] else "off",
                asked[1],
                SERVER_POLICY_ENV,
                path or "unset",
                "on" if policy.enabled else "off",
                policy.suite,
            )
        return policy

    def identity_path(self, run_dir: Path) -> Path:
        """``identity_key``, or a fresh identity made once in the run directory."""
        if self.identity_key:
            return Path(self.identity_key)
        files = run_dir / IDENTITY_DIR
        if not (files / "identity.key").exists():
            generate_identity(files)
        return files / "identity.key"


def server_identity_path(cfg: RunConfig, run_dir: Path, deployed: bool = False) -> Path:
    """The identity key of the server's local sealing policy (:meth:`ServerSealingPolicy.identity_path`)."""
    return ServerSealingPolicy.local(cfg, deployed).identity_path(run_dir)


class ServerSealing:
    """Signs what the server sends and opens what clients return, for one run."""

    def __init__(self, identity_key: Path, run_id: int, suite: str) -> None:
        self.identity = load_identity(identity_key)
        self.run_id = run_id
        self.run_key, self.announcement = announce_run_key(self.identity, run_id, suite)

    def sign(self, messages: list[Message], server_round: int) -> list[Message]:
        """Sign each message for its node and type; each distinct content is digested once
        (strategies share one content across nodes)."""
        digested: dict[int, tuple[RecordDict, bytes]] = {}
        for msg in messages:
            key = id(msg.content)
            if key not in digested:
                unsigned = announced(msg.content, self.announcement)
                digested[key] = unsigned, content_digest(unsigned)
            unsigned, digest = digested[key]
            binding = InstructionBinding(self.run_id, server_round, msg.metadata.message_type, msg.metadata.dst_node_id)
            msg.content = signed_for(unsigned, digest, self.identity, binding)
        return messages

    def open(
        self, replies: list[Message], server_round: int, kind: str, instruction: bytes
    ) -> tuple[list[Message], list[tuple[int, str]]]:
        """Opened replies to the instruction with digest ``instruction``, and ``(node, reason)``
        for those that fail (tampered, replayed, unsealed)."""
        opened, dropped = [], []
        for reply in replies:
            if reply.has_error():
                opened.append(reply)
                continue
            node = reply.metadata.src_node_id
            try:
                reply.content = open_reply(
                    reply.content,
                    self.run_key,
                    run_id=self.run_id,
                    round=server_round,
                    node_id=node,
                    kind=kind,
                    instruction=instruction,
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
        # instruction id -> (server round, kind, digest), until answered (a late reply still opens)
        self._sent: dict[str, tuple[int, str, bytes]] = {}
        self._dropped: list[tuple[int, str]] = []

    def take_dropped(self) -> list[tuple[int, str]]:
        """``(node, reason)`` of the replies dropped since the last call (and forget them)."""
        dropped, self._dropped = self._dropped, []
        return dropped

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
            self._sent[msg.metadata.message_id] = (
                read_server_round(msg.content),
                msg.metadata.message_type,
                signed_instruction_digest(msg.content),
            )

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

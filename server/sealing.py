"""Server side of sealed updates: a per-run KEM key announced under the server's Ed25519 identity,
every instruction signed, every reply opened before validation and aggregation."""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Message

from fedvault.config import RunConfig
from fedvault.security.envelope import open_reply, sign_instruction
from fedvault.security.identity import announce_run_key, generate_identity, load_identity
from fedvault.security.sealing import SealingError

log = logging.getLogger("fedvault")
IDENTITY_DIR = "identity"


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
        signed: dict[int, object] = {}
        for msg in messages:
            key = id(msg.content)
            if key not in signed:
                signed[key] = sign_instruction(msg.content, self.identity, self.announcement,
                                               run_id=self.run_id, round=server_round)
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
                reply.content = open_reply(reply.content, self.run_key, run_id=self.run_id, round=server_round,
                                           node_id=node, kind=kind)
                opened.append(reply)
            except SealingError as exc:
                log.warning("round %d: dropped reply of node %d: %s", server_round, node, exc)
                dropped.append((node, f"sealing: {exc}"))
        return opened, dropped

"""Client side of sealed updates: verify the pinned server's signature on every instruction,
seal every reply to the run key it announced (``fedvault.security.envelope``)."""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context, Message, RecordDict

from fedvault.config import RunConfig
from fedvault.errors import ConfigError
from fedvault.protocol import read_server_round
from fedvault.security.envelope import seal_reply, verify_instruction
from fedvault.security.identity import IdentityPin
from fedvault.security.sealing import RunPublicKey


def pinned_identity(cfg: RunConfig, node_config: dict) -> IdentityPin:
    """Node config ``server-identity`` or ``sealing.server-identity``: a fingerprint or an identity.pub path."""
    value = str(node_config.get("server-identity") or cfg.sealing.server_identity)
    if not value:
        raise ConfigError(
            "sealing is on but no server identity is pinned (node config 'server-identity' or "
            "'sealing.server-identity': the fingerprint `fedvault keys init` printed)"
        )
    return IdentityPin.from_public_key_file(value) if Path(value).is_file() else IdentityPin.from_fingerprint(value)


class ClientSealing:
    """Verifies one instruction and seals its reply."""

    def __init__(self, cfg: RunConfig, msg: Message, context: Context) -> None:
        self.run_id, self.round, self.node = context.run_id, read_server_round(msg.content), msg.metadata.dst_node_id
        self.recipient: RunPublicKey = verify_instruction(
            msg.content, pin=pinned_identity(cfg, context.node_config), run_id=self.run_id, round=self.round
        )

    def seal(self, content: RecordDict, kind: str) -> RecordDict:
        return seal_reply(content, self.recipient, run_id=self.run_id, round=self.round, node_id=self.node, kind=kind)

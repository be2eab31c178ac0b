"""Client side of sealed updates, under the client's own policy (:mod:`fedvault.client.policy`).

For each instruction: verify the pinned server's signature for this run, round, node (Flower's
``context.node_id``, the id this SuperNode registered under) and handler (``"train"`` /
``"evaluate"``) and the announced suite against the allow-list; refuse a round at or below one
already answered; seal the reply to the announced run key, naming the instruction's digest
(``fedvault.security.envelope``). A policy with sealing on refuses an unsigned instruction
whatever the run config says.
"""

from __future__ import annotations

from flwr.app import Context, Message, RecordDict

from fedvault.client.policy import AnsweredRounds, ClientPolicy
from fedvault.protocol import read_server_round
from fedvault.security.envelope import VerifiedInstruction, seal_reply, verify_instruction


class ClientSealing:
    """Checks one instruction against the policy (raises before anything is trained) and seals its reply."""

    def __init__(self, policy: ClientPolicy, msg: Message, context: Context, kind: str) -> None:
        self.run_id, self.round, self.node, self.kind = (
            context.run_id,
            read_server_round(msg.content),
            context.node_id,
            kind,
        )
        self.verified: VerifiedInstruction | None = None
        if policy.sealing:
            self.verified = verify_instruction(
                msg.content,
                pin=policy.require_pin(),
                run_id=self.run_id,
                round=self.round,
                kind=kind,
                node_id=self.node,
                suites=policy.suites,
            )
        if policy.refuse_replays:
            AnsweredRounds(policy, context).claim(kind, self.round)

    def reply(self, msg: Message, content: RecordDict) -> Message:
        """The reply to ``msg``: sealed when the policy seals."""
        if self.verified is not None:
            content = seal_reply(
                content,
                self.verified.recipient,
                run_id=self.run_id,
                round=self.round,
                node_id=self.node,
                kind=self.kind,
                instruction=self.verified.digest,
            )
        return Message(content, reply_to=msg)

"""Sealing through the apps' own code: server signs, client verifies and seals, server opens.
Real Flower Messages; tampering, replay across rounds/nodes and a wrong pin are all refused.
``SealedGrid`` does the same around any Grid, so the round loop never sees sealing."""

import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from strategy_helpers import InstantGrid

from fedvault.client.app import build_client_app
from fedvault.client.policy import ClientPolicy
from fedvault.config import RunConfig
from fedvault.protocol import ARRAYS, CONFIG, METRICS, NUM_EXAMPLES, stamp_server_round, train_config
from fedvault.security.envelope import SEAL_RECORD, SEALED_RECORD, SIGNATURE_RECORD, signed_instruction_digest
from fedvault.security.identity import IdentityError, IdentityPin, generate_identity
from fedvault.server.rounds import RoundLoop
from fedvault.server.sealing import SealedGrid, ServerSealing
from fedvault.strategies.validation import ValidationRules
from fedvault.tasks import load_task

RUN_ID = 1  # the flower_task_identity fixture's run id


@pytest.fixture
def setup(tmp_path, flower_task_identity):
    files = generate_identity(tmp_path / "identity")
    cfg = RunConfig.from_flat(
        {
            "task": "digits",
            "num-clients": 4,
            "batch-size": 32,
            "learning-rate": 0.05,
            "privacy.sample-level": False,
            "sealing.mode": "on",
        }
    )
    return cfg, ServerSealing(files.private_key, RUN_ID, "x25519"), ClientPolicy(pin=IdentityPin(files.fingerprint))


def _app(setup):
    cfg, _, policy = setup
    return build_client_app(cfg, policy)


def _instruction(server: ServerSealing, server_round: int, node: int = 7) -> Message:
    torch.manual_seed(0)
    content = RecordDict(
        {
            "arrays": ArrayRecord(load_task("digits").build_model().state_dict()),
            "config": ConfigRecord({"server-round": server_round}),
        }
    )
    return server.sign([Message(content, dst_node_id=node, message_type=MessageType.TRAIN)], server_round)[0]


def _context(node: int = 7) -> Context:
    return Context(
        run_id=RUN_ID,
        node_id=node,
        node_config={"partition-id": 0, "num-partitions": 4},
        state=RecordDict(),
        run_config={},
    )


def _as_received(reply: Message, node: int = 7) -> Message:
    """What the server pulls: the reply content, from ``node``."""
    received = Message(reply.content, dst_node_id=0, message_type=MessageType.TRAIN)
    received.metadata.__dict__["_src_node_id"] = node
    return received


def test_round_trip_opens_to_flower_keys(setup):
    _, server, _ = setup
    instruction = _instruction(server, 1)
    reply = _app(setup)(instruction, _context())
    assert set(reply.content) == {"fedvault.seal", "fedvault.sealed"}  # nothing readable in transit
    opened, dropped = server.open([_as_received(reply)], 1, "train", signed_instruction_digest(instruction.content))
    assert dropped == [] and opened[0].content["metrics"]["num-examples"] > 0
    assert set(opened[0].content["arrays"].keys()) == set(load_task("digits").build_model().state_dict())


def test_replayed_in_another_round_or_moved_to_another_node_is_dropped(setup):
    _, server, _ = setup
    instruction = _instruction(server, 1)
    digest = signed_instruction_digest(instruction.content)
    reply = _app(setup)(instruction, _context())
    _, dropped = server.open([_as_received(reply)], 2, "train", digest)
    assert dropped and "round" in dropped[0][1]
    reply = _app(setup)(_instruction(server, 1), _context())
    _, dropped = server.open([_as_received(reply, node=8)], 1, "train", digest)
    assert dropped and dropped[0][0] == 8 and "node" in dropped[0][1]


def test_reply_to_another_instruction_is_dropped(setup):
    _, server, _ = setup
    first, second = _instruction(server, 1), _instruction(server, 1)  # same round, node and kind
    reply = _app(setup)(first, _context())
    _, dropped = server.open([_as_received(reply)], 1, "train", signed_instruction_digest(second.content))
    assert dropped and "instruction" in dropped[0][1]


def test_flipped_byte_is_dropped(setup):
    _, server, _ = setup
    instruction = _instruction(server, 1)
    reply = _app(setup)(instruction, _context())
    _flip_a_byte(reply.content)
    _, dropped = server.open([_as_received(reply)], 1, "train", signed_instruction_digest(instruction.content))
    assert dropped and "chunk 0" in dropped[0][1]


def test_client_refuses_a_model_from_another_server(setup, tmp_path):
    impostor = ServerSealing(generate_identity(tmp_path / "other").private_key, RUN_ID, "x25519")
    with pytest.raises(IdentityError):
        _app(setup)(_instruction(impostor, 1), _context())


def test_client_refuses_a_tampered_model(setup):
    _, server, _ = setup
    msg = _instruction(server, 1)
    arrays = msg.content["arrays"]
    first = next(iter(arrays.keys()))
    arrays[first] = type(arrays[first])(arrays[first].numpy() + 1.0)
    with pytest.raises(IdentityError):
        _app(setup)(msg, _context())


# ---- SealedGrid ---------------------------------------------------------------------------------


def _flip_a_byte(content: RecordDict) -> None:
    chunk = content[SEALED_RECORD]["chunk-0"]
    data = bytearray(chunk.data)
    data[len(data) // 2] ^= 1
    content[SEALED_RECORD]["chunk-0"] = Array(dtype=chunk.dtype, shape=chunk.shape, stype=chunk.stype, data=bytes(data))


class Loopback(InstantGrid):
    """Hands each instruction to the real ClientApp of its node in this process (a transport, not an engine)."""

    def __init__(self, app, nodes: list[int], tamper: set[int] = frozenset()) -> None:
        super().__init__(nodes)
        self.app, self.tamper = app, tamper
        self.contexts = {node: _context(node) for node in nodes}
        for i, context in enumerate(self.contexts.values()):
            context.node_config["partition-id"] = i
        self.in_transit: list[RecordDict] = []  # what the transport saw of each reply

    def answer(self, msg):
        reply = self.app(msg, self.contexts[msg.metadata.dst_node_id])
        if msg.metadata.dst_node_id in self.tamper:
            _flip_a_byte(reply.content)
        self.in_transit.append(reply.content)
        return reply


def _unsigned(server_round: int, nodes: list[int]) -> list[Message]:
    torch.manual_seed(0)
    content = RecordDict({ARRAYS: ArrayRecord(load_task("digits").build_model().state_dict()), CONFIG: ConfigRecord()})
    return [
        stamp_server_round(Message(content, dst_node_id=node, message_type=MessageType.TRAIN), server_round)
        for node in nodes
    ]


def test_sealed_grid_signs_under_the_stamped_round_and_opens_every_reply(setup):
    _, server, _ = setup
    transport = Loopback(_app(setup), [7, 8])
    grid = SealedGrid(transport, server)
    sent = _unsigned(3, [7, 8])
    replies = list(grid.send_and_receive(sent, timeout=5))
    assert all(SIGNATURE_RECORD in m.content for m in sent)  # the client verified it for round 3, else no reply
    assert all(set(content) == {SEAL_RECORD, SEALED_RECORD} for content in transport.in_transit)
    assert sorted(r.metadata.src_node_id for r in replies) == [7, 8] and grid.take_dropped() == []
    assert all(r.content[METRICS][NUM_EXAMPLES] > 0 and ARRAYS in r.content for r in replies)
    assert grid.get_node_ids() == [7, 8]


def test_sealed_grid_push_and_pull_open_too(setup):
    _, server, _ = setup
    grid = SealedGrid(Loopback(_app(setup), [7, 8], tamper={7}), server)
    ids = list(grid.push_messages(_unsigned(2, [7, 8])))
    replies = list(grid.pull_messages(ids))
    assert [r.metadata.src_node_id for r in replies] == [8] and ARRAYS in replies[0].content
    ((node, reason),) = grid.take_dropped()
    assert node == 7 and reason.startswith("sealing: ") and "chunk 0" in reason
    assert grid.take_dropped() == []


def test_round_loop_over_a_sealed_grid_records_the_drop_reason(setup):
    """The loop stamps, the grid signs and opens; a tampered reply is dropped and named in the record."""
    _, server, _ = setup
    records = []
    torch.manual_seed(0)
    arrays = ArrayRecord(load_task("digits").build_model().state_dict())
    loop = RoundLoop(
        strategy=FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=2, min_train_nodes=2),
        grid=SealedGrid(Loopback(_app(setup), [7, 8], tamper={8}), server),
        central_evaluate=lambda server_round, arrays: MetricRecord({}),
        on_round=lambda record, arrays: records.append(record),
        timeout=5,
        rules=ValidationRules(),
        client_evaluate=False,
    )
    loop.run(arrays, 1, lambda _round: train_config(0.05, 1, 0.0))
    record = records[-1]
    assert record["clients_sampled"] == 2 and record["replies_ok"] == 1 and record["failed_nodes"] == [8]
    (dropped,) = record["dropped"]
    assert dropped["node"] == 8 and dropped["reason"].startswith("sealing: ") and "chunk 0" in dropped["reason"]

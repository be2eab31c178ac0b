"""Sealing through the apps' own code: server signs, client verifies and seals, server opens.
Real Flower Messages; tampering, replay across rounds/nodes and a wrong pin are all refused."""

import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from fedvault.client.app import build_client_app
from fedvault.config import RunConfig
from fedvault.security.identity import IdentityError, generate_identity
from fedvault.server.sealing import ServerSealing
from fedvault.tasks import load_task

RUN_ID = 1  # the flower_task_identity fixture's run id


@pytest.fixture
def setup(tmp_path, flower_task_identity):
    files = generate_identity(tmp_path / "identity")
    cfg = RunConfig.from_flat({"task": "digits", "num-clients": 4, "privacy.sample-level": False,
                               "sealing.mode": "on", "sealing.server-identity": files.fingerprint})
    return cfg, ServerSealing(files.private_key, RUN_ID, "x25519")


def _instruction(server: ServerSealing, server_round: int, node: int = 7) -> Message:
    torch.manual_seed(0)
    content = RecordDict({"arrays": ArrayRecord(load_task("digits").build_model().state_dict()),
                          "config": ConfigRecord({"server-round": server_round})})
    return server.sign([Message(content, dst_node_id=node, message_type=MessageType.TRAIN)], server_round)[0]


def _context(node: int = 7) -> Context:
    return Context(run_id=RUN_ID, node_id=node, node_config={"partition-id": 0, "num-partitions": 4},
                   state=RecordDict(), run_config={})


def _as_received(reply: Message, node: int = 7) -> Message:
    """What the server pulls: the reply content, from ``node``."""
    received = Message(reply.content, dst_node_id=0, message_type=MessageType.TRAIN)
    received.metadata.__dict__["_src_node_id"] = node
    return received


def test_round_trip_opens_to_flower_keys(setup):
    cfg, server = setup
    reply = build_client_app(cfg)(_instruction(server, 1), _context())
    assert set(reply.content) == {"fedvault.seal", "fedvault.sealed"}  # nothing readable in transit
    opened, dropped = server.open([_as_received(reply)], 1, "train")
    assert dropped == [] and opened[0].content["metrics"]["num-examples"] > 0
    assert set(opened[0].content["arrays"].keys()) == set(load_task("digits").build_model().state_dict())


def test_replayed_in_another_round_or_moved_to_another_node_is_dropped(setup):
    cfg, server = setup
    reply = build_client_app(cfg)(_instruction(server, 1), _context())
    _, dropped = server.open([_as_received(reply)], 2, "train")
    assert dropped and "round" in dropped[0][1]
    reply = build_client_app(cfg)(_instruction(server, 1), _context())
    _, dropped = server.open([_as_received(reply, node=8)], 1, "train")
    assert dropped and dropped[0][0] == 8 and "node" in dropped[0][1]


def test_flipped_byte_is_dropped(setup):
    cfg, server = setup
    reply = build_client_app(cfg)(_instruction(server, 1), _context())
    chunk = reply.content["fedvault.sealed"]["chunk-0"]
    data = bytearray(chunk.data)
    data[len(data) // 2] ^= 1
    reply.content["fedvault.sealed"]["chunk-0"] = Array(dtype=chunk.dtype, shape=chunk.shape, stype=chunk.stype, data=bytes(data))
    _, dropped = server.open([_as_received(reply)], 1, "train")
    assert dropped and "chunk 0" in dropped[0][1]


def test_client_refuses_a_model_from_another_server(setup, tmp_path):
    cfg, _ = setup
    impostor = ServerSealing(generate_identity(tmp_path / "other").private_key, RUN_ID, "x25519")
    with pytest.raises(IdentityError):
        build_client_app(cfg)(_instruction(impostor, 1), _context())


def test_client_refuses_a_tampered_model(setup):
    cfg, server = setup
    msg = _instruction(server, 1)
    arrays = msg.content["arrays"]
    first = next(iter(arrays.keys()))
    arrays[first] = type(arrays[first])(arrays[first].numpy() + 1.0)
    with pytest.raises(IdentityError):
        build_client_app(cfg)(msg, _context())

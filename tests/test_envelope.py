"""Sealed replies and signed instructions as Flower records, through Flower's own wire encoding."""

from __future__ import annotations

import os

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

from fedvault.security.envelope import (
    RUN_KEY_RECORD,
    SEAL_RECORD,
    SEALED_RECORD,
    SIGNATURE_RECORD,
    content_digest,
    open_reply,
    seal_reply,
    sign_instruction,
    verify_instruction,
)
from fedvault.security.identity import (
    IdentityError,
    IdentityPin,
    InstructionBinding,
    announce_run_key,
    fingerprint,
    sign_statement,
)
from fedvault.security.sealing import HYBRID_SUITE, MIN_CHUNK_SIZE, SealContext, SealingError, seal_frames

RUN, ROUND, NODE = 2**63 + 3, 4, 991
INSTRUCTION = bytes(range(32))  # the digest of the instruction a reply answers
BINDING = dict(run_id=RUN, round=ROUND, node_id=NODE, kind="train", instruction=INSTRUCTION)
ADDRESS = dict(run_id=RUN, round=ROUND, kind="train", node_id=NODE)  # what a client expects of an instruction


def over_the_wire(content: RecordDict) -> RecordDict:
    """What the other side receives: Flower's deflate/inflate of every nested object."""
    objects = get_all_nested_objects(content)
    contents = {object_id: obj.deflate() for object_id, obj in objects.items()}
    return inflate_object_from_contents(content.object_id, contents)


@pytest.fixture(scope="module")
def server():
    identity = Ed25519PrivateKey.generate()
    run_key, announcement = announce_run_key(identity, RUN)
    return identity, run_key, announcement, IdentityPin(fingerprint(identity.public_key()))


def reply_content() -> RecordDict:
    rng = np.random.default_rng(1)
    arrays = ArrayRecord()
    arrays["fc.weight"] = Array(rng.standard_normal((64, 40)).astype(np.float32))
    arrays["fc.bias"] = Array(np.zeros(64, dtype=np.float32))
    arrays["steps"] = Array(np.array(17, dtype=np.int64))
    arrays["empty"] = Array(np.zeros((0, 3), dtype=np.float64))
    return RecordDict(
        {
            "arrays": arrays,
            "metrics": MetricRecord({"train_loss": 0.125, "num-examples": 4321, "hist": [3, 1, 2]}),
            "dp-events": ConfigRecord(
                {
                    "event": b"\x00\xffraw",
                    "sigma": 1.1,
                    "poisson": True,
                    "tags": ["a", "b"],
                    "blobs": [b"x", b""],
                    "steps": 250,
                    "none": [],
                }
            ),
            "no-arrays": ArrayRecord(),
        }
    )


@pytest.fixture(scope="module")
def sealed_reply(server):
    _, run_key, _, _ = server
    return seal_reply(reply_content(), run_key.public, chunk_size=MIN_CHUNK_SIZE, **BINDING)


def _reject(content: RecordDict, run_key, **change) -> SealingError:
    with pytest.raises(SealingError) as info:
        open_reply(content, run_key, **(BINDING | change))
    return info.value


def _copy(content: RecordDict) -> RecordDict:
    """A deep copy made through Flower's own encoding, safe to tamper with."""
    return over_the_wire(content)


def _flip(data: bytes, index: int) -> bytes:
    changed = bytearray(data)
    changed[index] ^= 0x80
    return bytes(changed)


# --- replies ---------------------------------------------------------------------------------


def test_reply_round_trips_every_record_exactly_over_flowers_wire_format(server, sealed_reply):
    _, run_key, _, _ = server
    original = reply_content()
    opened = open_reply(over_the_wire(sealed_reply), run_key, **BINDING)
    assert list(opened) == list(original)
    assert list(opened["arrays"]) == list(original["arrays"])
    for key, array in original["arrays"].items():
        got = opened["arrays"][key]
        assert (got.dtype, tuple(got.shape), got.stype, got.data) == (
            array.dtype,
            tuple(array.shape),
            array.stype,
            array.data,
        )
        np.testing.assert_array_equal(got.numpy(), array.numpy())
    for name in ("metrics", "dp-events"):
        assert type(opened[name]) is type(original[name])
        assert list(opened[name].items()) == list(original[name].items())
        types = [type(v) for v in original[name].values()]
        assert [type(v) for v in opened[name].values()] == types
    assert len(opened["no-arrays"]) == 0 and isinstance(opened["no-arrays"], ArrayRecord)


def test_sealed_reply_shows_no_metric_name_value_or_weights(sealed_reply):
    assert set(sealed_reply) == {SEAL_RECORD, SEALED_RECORD}
    visible = b"".join(a.data for a in sealed_reply[SEALED_RECORD].values()) + sealed_reply[SEAL_RECORD]["header"]
    original = reply_content()
    assert b"num-examples" not in visible and b"4321" not in visible and b"fc.weight" not in visible
    assert original["arrays"]["fc.weight"].data[-64:] not in visible
    assert len(sealed_reply[SEALED_RECORD]) > 5  # several chunks


def test_large_reply_with_default_chunks_and_hybrid_suite():
    identity = Ed25519PrivateKey.generate()
    run_key, _ = announce_run_key(identity, RUN, HYBRID_SUITE)
    weights = np.frombuffer(os.urandom(3 * 2**20 + 8), dtype=np.float64)
    metrics = MetricRecord({"num-examples": 9})
    content = RecordDict({"arrays": ArrayRecord([weights]), "metrics": metrics})
    sealed = seal_reply(content, run_key.public, **BINDING)
    assert len(sealed[SEALED_RECORD]) == 4
    opened = open_reply(over_the_wire(sealed), run_key, **BINDING)
    np.testing.assert_array_equal(opened["arrays"].to_numpy_ndarrays()[0], weights)
    assert opened["metrics"]["num-examples"] == 9


@pytest.mark.parametrize(
    "change, field",
    [
        ({"round": ROUND + 1}, "header.round"),
        ({"round": ROUND - 1}, "header.round"),
        ({"node_id": NODE + 1}, "header.node"),
        ({"run_id": RUN + 1}, "header.run"),
        ({"kind": "evaluate"}, "header.kind"),
        ({"instruction": bytes(32)}, "header.instruction"),  # the answer to another instruction
    ],
)
def test_reply_replayed_to_another_round_node_run_or_kind_is_rejected(server, sealed_reply, change, field):
    _, run_key, _, _ = server
    assert _reject(_copy(sealed_reply), run_key, **change).field == field


def test_reply_header_edit_is_rejected(server, sealed_reply):
    _, run_key, _, _ = server
    tampered = _copy(sealed_reply)
    header = tampered[SEAL_RECORD]["header"]
    tampered[SEAL_RECORD]["header"] = header.replace(f'"round":{ROUND}'.encode(), b'"round":9')
    assert tampered[SEAL_RECORD]["header"] != header
    assert _reject(tampered, run_key, round=9).field == "key"


def test_reply_key_block_edit_is_rejected(server, sealed_reply):
    _, run_key, _, _ = server
    tampered = _copy(sealed_reply)
    tampered[SEAL_RECORD]["key"] = _flip(tampered[SEAL_RECORD]["key"], 3)
    assert _reject(tampered, run_key).field == "key"


def test_every_reply_chunk_is_authenticated(server, sealed_reply):
    _, run_key, _, _ = server
    for index in range(len(sealed_reply[SEALED_RECORD])):
        tampered = _copy(sealed_reply)
        chunk = tampered[SEALED_RECORD][f"chunk-{index}"]
        chunk.data = _flip(chunk.data, len(chunk.data) // 2)
        assert _reject(tampered, run_key).field == f"chunk {index}"


def test_reply_chunk_swap_removal_and_addition_are_rejected(server, sealed_reply):
    _, run_key, _, _ = server
    chunks = sealed_reply[SEALED_RECORD]
    last = len(chunks) - 1

    swapped = _copy(sealed_reply)
    first, second = swapped[SEALED_RECORD]["chunk-0"], swapped[SEALED_RECORD]["chunk-1"]
    first.data, second.data = second.data, first.data
    assert _reject(swapped, run_key).field == "chunk 0"

    truncated = _copy(sealed_reply)
    del truncated[SEALED_RECORD][f"chunk-{last}"]
    assert "truncated" in str(_reject(truncated, run_key))

    holed = _copy(sealed_reply)
    del holed[SEALED_RECORD]["chunk-2"]
    assert _reject(holed, run_key).field == "chunk 2"

    extended = _copy(sealed_reply)
    extended[SEALED_RECORD][f"chunk-{last + 1}"] = extended[SEALED_RECORD]["chunk-0"]
    assert "extended" in str(_reject(extended, run_key))

    stray = _copy(sealed_reply)
    stray[SEALED_RECORD]["chunk-01"] = stray[SEALED_RECORD]["chunk-1"]
    assert "unexpected entry" in str(_reject(stray, run_key))


def test_chunks_are_ordered_by_name_not_by_position_in_the_record(server, sealed_reply):
    _, run_key, _, _ = server
    reordered = _copy(sealed_reply)
    reversed_chunks = ArrayRecord()
    for key in reversed(list(reordered[SEALED_RECORD])):
        reversed_chunks[key] = reordered[SEALED_RECORD][key]
    reordered[SEALED_RECORD] = reversed_chunks
    opened = open_reply(over_the_wire(reordered), run_key, **BINDING)
    assert opened["metrics"]["num-examples"] == 4321


def test_unsealed_reply_is_rejected(server):
    _, run_key, _, _ = server
    assert _reject(reply_content(), run_key).field == SEAL_RECORD


@pytest.mark.parametrize(
    "frames",
    [
        [({"record": "x", "type": "bogus"}, b"")],
        [
            ({"record": "x", "type": "arrays", "count": 2}, b""),
            ({"key": "a", "dtype": "uint8", "shape": [1], "stype": "numpy.ndarray"}, b"\x00"),
        ],
        [({"record": "m", "type": "metrics"}, b'[["loss","not a number"]]')],
        [({"record": "m", "type": "config"}, b"{}")],
        [({"type": "config"}, b"[]")],
    ],
)
def test_authenticated_but_malformed_reply_is_rejected_cleanly(server, frames):
    _, run_key, _, _ = server
    sealed = seal_frames(frames, run_key.public, SealContext(RUN, ROUND, NODE, "train", INSTRUCTION))
    content = RecordDict(
        {
            SEAL_RECORD: ConfigRecord({"header": sealed.header, "key": sealed.key}),
            SEALED_RECORD: ArrayRecord(
                {
                    f"chunk-{i}": Array(dtype="uint8", shape=(len(c),), stype="fedvault.sealed-chunk", data=c)
                    for i, c in enumerate(sealed.chunks)
                }
            ),
        }
    )
    assert _reject(content, run_key).field == "payload"


def test_reply_sealed_to_another_run_key_is_rejected(sealed_reply):
    other_key, _ = announce_run_key(Ed25519PrivateKey.generate(), RUN)
    assert _reject(_copy(sealed_reply), other_key).field == "key"


# --- instructions ----------------------------------------------------------------------------


def instruction() -> RecordDict:
    model = ArrayRecord([np.arange(12, dtype=np.float32).reshape(3, 4), np.ones(5)])
    config = ConfigRecord({"server-round": ROUND, "lr": 0.05})
    return RecordDict({"arrays": model, "config": config})


@pytest.fixture(scope="module")
def signed(server):
    identity, _, announcement, _ = server
    return sign_instruction(instruction(), identity, announcement, **ADDRESS)


def _refuse(content: RecordDict, pin: IdentityPin, **change) -> IdentityError:
    with pytest.raises(IdentityError) as info:
        verify_instruction(content, pin=pin, **(ADDRESS | change))
    return info.value


def test_signed_instruction_verifies_and_gives_the_run_key(server, signed):
    _, run_key, _, pin = server
    received = over_the_wire(signed)
    assert {RUN_KEY_RECORD, SIGNATURE_RECORD} <= set(received)
    verified = verify_instruction(received, pin=pin, **ADDRESS)
    binding = BINDING | {"instruction": verified.digest}
    reply = seal_reply(reply_content(), verified.recipient, **binding)
    assert open_reply(reply, run_key, **binding)["metrics"]["num-examples"] == 4321


def test_tampered_model_is_rejected(server, signed):
    _, _, _, pin = server
    tampered = _copy(signed)
    array = tampered["arrays"][next(iter(tampered["arrays"]))]
    array.data = _flip(array.data, len(array.data) - 1)  # one weight's sign bit
    assert _refuse(tampered, pin).field == "signature"

    reshaped = _copy(signed)
    first = reshaped["arrays"][next(iter(reshaped["arrays"]))]
    first.shape = (4, 3)
    assert _refuse(reshaped, pin).field == "signature"

    added = _copy(signed)
    added["arrays"]["extra"] = Array(np.zeros(1))
    assert _refuse(added, pin).field == "signature"


def test_tampered_config_is_rejected(server, signed):
    _, _, _, pin = server
    tampered = _copy(signed)
    tampered["config"]["lr"] = 5.0
    assert _refuse(tampered, pin).field == "signature"


def test_instruction_replayed_in_another_round_or_run_is_rejected(server, signed):
    _, _, _, pin = server
    assert _refuse(_copy(signed), pin, round=ROUND + 1).field == "signature"
    assert _refuse(_copy(signed), pin, run_id=RUN + 1).field == "signature"


def test_instruction_signed_by_another_server_is_rejected(server):
    _, _, _, pin = server
    impostor = Ed25519PrivateKey.generate()
    _, announcement = announce_run_key(impostor, RUN)
    forged = sign_instruction(instruction(), impostor, announcement, **ADDRESS)
    assert "pins" in str(_refuse(forged, pin))


def test_unsigned_instruction_or_missing_announcement_is_rejected(server, signed):
    identity, _, _, pin = server
    unsigned = _copy(signed)
    del unsigned[SIGNATURE_RECORD]
    assert _refuse(unsigned, pin).field == SIGNATURE_RECORD

    bare_signature = _copy(signed)
    record = bare_signature[SIGNATURE_RECORD]
    record["signature"] = _flip(record["signature"], 0)
    assert _refuse(bare_signature, pin).field == "signature"

    # The server signs content without an announcement: the signature holds, the key is missing.
    without = instruction()
    statement = InstructionBinding(RUN, ROUND, "train", NODE).statement(content_digest(without))
    without[SIGNATURE_RECORD] = ConfigRecord(
        {
            "identity": identity.public_key().public_bytes_raw(),
            "statement": statement,
            "signature": sign_statement(identity, statement),
        }
    )
    assert _refuse(without, pin).field == RUN_KEY_RECORD


def test_swapped_announcement_is_rejected(server, signed):
    identity, _, _, pin = server
    _, attacker_choice = announce_run_key(identity, RUN)  # genuine, but not the one signed over
    tampered = _copy(signed)
    tampered[RUN_KEY_RECORD] = ConfigRecord(attacker_choice.to_dict())
    assert _refuse(tampered, pin).field == "signature"

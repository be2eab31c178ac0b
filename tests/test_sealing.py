"""Sealing core (HPKE + chunked AES-GCM) and the server identity: round trips and every tamper."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import stat

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedvault.security.identity import (
    IdentityError,
    IdentityPin,
    InstructionBinding,
    RunKeyAnnouncement,
    announce_run_key,
    fingerprint,
    generate_identity,
    load_identity,
    load_identity_public_key,
    sign_statement,
    verify_announcement,
    verify_statement,
)
from fedvault.security.sealing import (
    CHUNK_SIZE,
    HYBRID_SUITE,
    MIN_CHUNK_SIZE,
    SealContext,
    Sealed,
    SealingError,
    canonical_json,
    generate_run_key,
    open_arrays,
    open_bytes,
    seal_arrays,
    seal_bytes,
    seal_frames,
)

SMALL = MIN_CHUNK_SIZE  # small chunks make many-chunk messages cheap
CONTEXT = SealContext(run_id=2**63 + 11, round=3, node_id=2**64 - 5, kind="train", instruction=b"\x11" * 32)


@pytest.fixture(scope="module")
def run_key():
    return generate_run_key()


@pytest.fixture(scope="module")
def sealed(run_key):
    """A 5-chunk message (last chunk partial) and its plaintext."""
    payload = os.urandom(4 * SMALL + 100)
    return seal_bytes(payload, run_key.public, CONTEXT, chunk_size=SMALL), payload


def _reject(sealed: Sealed, run_key, context: SealContext = CONTEXT) -> SealingError:
    with pytest.raises(SealingError) as info:
        open_bytes(sealed, run_key, context)
    return info.value


def _flip(data: bytes, index: int) -> bytes:
    changed = bytearray(data)
    changed[index] ^= 0x01
    return bytes(changed)


# --- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, SMALL - 1, SMALL, 3 * SMALL, 7 * SMALL + 5])
def test_bytes_round_trip(run_key, size):
    payload = os.urandom(size)
    sealed = seal_bytes(payload, run_key.public, CONTEXT, chunk_size=SMALL)
    assert len(sealed.chunks) == max(1, -(-size // SMALL))
    assert bytes(open_bytes(sealed, run_key, CONTEXT)) == payload


def test_segments_are_sealed_as_their_concatenation(run_key):
    segments = [os.urandom(n) for n in (10, SMALL + 7, 0, 3, 2 * SMALL, 1)]
    sealed = seal_bytes(segments, run_key.public, CONTEXT, chunk_size=SMALL)
    assert bytes(open_bytes(sealed, run_key, CONTEXT)) == b"".join(segments)


def test_default_chunk_size_splits_large_payloads(run_key):
    payload = os.urandom(3 * CHUNK_SIZE + 12345)
    sealed = seal_bytes(payload, run_key.public, CONTEXT)
    assert len(sealed.chunks) == 4
    assert bytes(open_bytes(sealed, run_key, CONTEXT)) == payload
    assert payload[:64] not in b"".join(sealed.chunks)  # ciphertext, not plaintext


def test_arrays_round_trip_keeps_dtype_shape_values_and_order(run_key):
    rng = np.random.default_rng(0)
    arrays = {
        "conv.weight": rng.standard_normal((8, 3, 5, 5)).astype(np.float32),
        "scalar": np.array(2.5),
        "empty": np.zeros((0, 4), dtype=np.int64),
        "transposed": rng.standard_normal((7, 9)).T,  # not C-contiguous
        "mask": rng.random(33) > 0.5,
        "complex": (rng.standard_normal(600) + 1j).astype(np.complex128),
        "big_endian": np.arange(11, dtype=">i2"),
        "half": rng.standard_normal(1000).astype(np.float16),
    }
    sealed = seal_arrays(arrays, run_key.public, CONTEXT, chunk_size=SMALL)
    assert len(sealed.chunks) > 5
    opened = open_arrays(sealed, run_key, CONTEXT)
    assert list(opened) == list(arrays)
    for name, array in arrays.items():
        assert opened[name].dtype == array.dtype, name
        assert opened[name].shape == array.shape, name
        np.testing.assert_array_equal(opened[name], array)


def test_opened_arrays_own_their_memory_and_chunks_are_bytes(run_key):
    arrays = {"a": np.arange(3000, dtype=np.float32), "b": np.ones(5, dtype=np.int8)}
    sealed = seal_arrays(arrays, run_key.public, CONTEXT, chunk_size=SMALL)
    assert all(type(chunk) is bytes for chunk in sealed.chunks)  # as Flower's Array.data must be
    opened = open_arrays(sealed, run_key, CONTEXT)
    opened["a"][:] = -1  # writable, and no other array or a second opening sees the write
    np.testing.assert_array_equal(opened["b"], arrays["b"])
    np.testing.assert_array_equal(open_arrays(sealed, run_key, CONTEXT)["a"], arrays["a"])


def test_array_names_and_shapes_are_inside_the_ciphertext(run_key):
    arrays = {"secret_layer_name": np.zeros((17, 19), dtype=np.float32)}
    sealed = seal_arrays(arrays, run_key.public, CONTEXT)
    visible = sealed.header + sealed.key + b"".join(sealed.chunks)
    assert b"secret_layer_name" not in visible
    assert b"17" not in sealed.header


def test_object_arrays_are_refused(run_key):
    with pytest.raises(SealingError, match="object"):
        seal_arrays({"x": np.array([object()])}, run_key.public, CONTEXT)


@pytest.mark.parametrize(
    "meta",
    [
        {"name": "x", "dtype": "|O", "shape": [1]},
        {"name": "x", "dtype": "<f4", "shape": [-1]},
        {"name": "x", "dtype": "<f4", "shape": [3]},
        {"dtype": "<f4", "shape": [2]},
        {"name": "x"},
    ],
)
def test_malformed_array_frames_from_a_malicious_sealer_are_rejected(run_key, meta):
    sealed = seal_frames([(meta, np.zeros(2, np.float32))], run_key.public, CONTEXT)
    with pytest.raises(SealingError) as info:
        open_arrays(sealed, run_key, CONTEXT)
    assert info.value.field == "payload"


def test_context_must_hold_plain_non_negative_ints():
    with pytest.raises(SealingError, match="run_id must be an int"):
        SealContext(run_id=np.int64(3), round=1, node_id=1, kind="train")
    with pytest.raises(SealingError, match="round must be an int"):
        SealContext(run_id=3, round=-1, node_id=1, kind="train")


def test_hybrid_ml_kem_round_trip():
    hybrid = generate_run_key(HYBRID_SUITE)
    arrays = {"w": np.arange(3 * SMALL, dtype=np.float64)}
    sealed = seal_arrays(arrays, hybrid.public, CONTEXT, chunk_size=SMALL)
    assert b'"suite":"mlkem768-x25519"' in sealed.header
    assert len(sealed.key) == 1120 + 32 + 16  # ML-KEM-768+X25519 enc, 32-byte AES-256 key, tag
    np.testing.assert_array_equal(open_arrays(sealed, hybrid, CONTEXT)["w"], arrays["w"])
    assert _reject(sealed, generate_run_key(HYBRID_SUITE)).field == "key"


def test_each_message_uses_a_fresh_key(run_key):
    first = seal_bytes(b"same payload", run_key.public, CONTEXT)
    second = seal_bytes(b"same payload", run_key.public, CONTEXT)
    assert first.key != second.key and first.chunks != second.chunks


# --- tampering -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("v", 1),
        ("suite", HYBRID_SUITE),
        ("run", 1),
        ("round", 4),
        ("node", 6),
        ("kind", "evaluate"),
        ("instruction", "22" * 32),
        ("chunk", 2 * SMALL),
        ("length", 4 * SMALL + 99),
        ("count", 6),
    ],
)
def test_every_header_field_is_authenticated(run_key, sealed, field, value):
    message, _ = sealed
    header = json.loads(message.header)
    header[field] = value
    forged = dataclasses.replace(message, header=canonical_json(header))
    # Opened by a victim expecting the original context: the field mismatch is named.
    assert _reject(forged, run_key).field.startswith(("header", "chunk"))
    # Opened by one expecting the forged values: the cryptography still refuses it.
    if field in ("run", "round", "node", "kind", "instruction"):
        name = {"run": "run_id", "node": "node_id"}.get(field, field)
        expected = bytes.fromhex(value) if field == "instruction" else value
        expecting_forgery = dataclasses.replace(CONTEXT, **{name: expected})
        assert _reject(forged, run_key, expecting_forgery).field == "key"


def test_header_edit_that_keeps_the_structure_breaks_the_key_block(run_key, sealed):
    message, _ = sealed
    header = json.loads(message.header)
    header["chunk"], header["count"] = 2 * SMALL, 3  # a consistent re-chunking claim
    forged = dataclasses.replace(message, header=canonical_json(header))
    chunks = message.chunks
    forged = dataclasses.replace(forged, chunks=(chunks[0] + chunks[1], chunks[2] + chunks[3], chunks[4]))
    error = _reject(forged, run_key)
    assert error.field in ("key", "chunk 0", "chunk 1")


def test_non_canonical_header_is_rejected(run_key, sealed):
    message, _ = sealed
    spaced = json.dumps(json.loads(message.header), sort_keys=True).encode()
    assert _reject(dataclasses.replace(message, header=spaced), run_key).field == "header"


@pytest.mark.parametrize("position", [0, 31, 32, -1])  # encapsulated key, then wrapped data key
def test_key_block_tampering_is_rejected(run_key, sealed, position):
    message, _ = sealed
    forged = dataclasses.replace(message, key=_flip(message.key, position))
    assert _reject(forged, run_key).field == "key"


def test_every_chunk_is_authenticated(run_key, sealed):
    message, payload = sealed
    assert bytes(open_bytes(message, run_key, CONTEXT)) == payload
    for index in range(len(message.chunks)):
        for position in (0, len(message.chunks[index]) - 1):  # ciphertext byte, tag byte
            chunks = list(message.chunks)
            chunks[index] = _flip(chunks[index], position)
            error = _reject(dataclasses.replace(message, chunks=tuple(chunks)), run_key)
            assert error.field == f"chunk {index}"


def test_reordered_chunks_are_rejected(run_key, sealed):
    message, _ = sealed
    chunks = list(message.chunks)
    chunks[1], chunks[2] = chunks[2], chunks[1]
    assert _reject(dataclasses.replace(message, chunks=tuple(chunks)), run_key).field == "chunk 1"


def test_truncation_and_extension_are_rejected(run_key, sealed):
    message, _ = sealed
    truncated = message.chunks[:-1]
    assert "truncated" in str(_reject(dataclasses.replace(message, chunks=truncated), run_key))
    extended = message.chunks + (message.chunks[0],)
    assert "extended" in str(_reject(dataclasses.replace(message, chunks=extended), run_key))
    cut = message.chunks[:-1] + (message.chunks[-1][:-1],)
    assert _reject(dataclasses.replace(message, chunks=cut), run_key).field == "chunk 4"


def test_chunks_spliced_from_another_message_are_rejected(run_key, sealed):
    message, _ = sealed
    other = seal_bytes(os.urandom(4 * SMALL + 100), run_key.public, CONTEXT, chunk_size=SMALL)
    spliced = message.chunks[:2] + other.chunks[2:3] + message.chunks[3:]
    assert _reject(dataclasses.replace(message, chunks=spliced), run_key).field == "chunk 2"


@pytest.mark.parametrize(
    "change, field",
    [
        ({"round": 4}, "header.round"),
        ({"round": 2}, "header.round"),
        ({"node_id": 1}, "header.node"),
        ({"run_id": 7}, "header.run"),
        ({"kind": "evaluate"}, "header.kind"),
        ({"instruction": b"\x22" * 32}, "header.instruction"),
    ],
)
def test_replay_to_another_round_node_run_or_kind_is_rejected(run_key, sealed, change, field):
    message, _ = sealed
    error = _reject(message, run_key, dataclasses.replace(CONTEXT, **change))
    assert error.field == field
    assert "expected" in str(error)


def test_message_for_another_run_key_is_rejected(sealed):
    message, _ = sealed
    assert _reject(message, generate_run_key()).field == "key"


# --- identity --------------------------------------------------------------------------------


def test_generate_identity_writes_private_key_0600_and_never_overwrites(tmp_path):
    files = generate_identity(tmp_path / "id")
    assert stat.S_IMODE(files.private_key.stat().st_mode) == 0o600
    key = load_identity(files.private_key)
    public = load_identity_public_key(files.public_key)
    assert public.public_bytes_raw() == key.public_key().public_bytes_raw()
    assert files.fingerprint == hashlib.sha256(public.public_bytes_raw()).hexdigest()
    before = files.private_key.read_bytes()
    with pytest.raises(IdentityError, match="already exists"):
        generate_identity(tmp_path / "id")
    assert files.private_key.read_bytes() == before
    replaced = generate_identity(tmp_path / "id", overwrite=True)
    assert replaced.fingerprint != files.fingerprint
    assert sorted(p.name for p in (tmp_path / "id").iterdir()) == ["identity.key", "identity.pub"]


def test_identity_key_readable_by_others_is_refused(tmp_path):
    files = generate_identity(tmp_path)
    files.private_key.chmod(0o644)
    with pytest.raises(IdentityError, match="chmod 600"):
        load_identity(files.private_key)


def test_pin_from_file_or_fingerprint_in_any_spelling(tmp_path):
    files = generate_identity(tmp_path)
    spelled = "SHA256:" + ":".join(files.fingerprint[i : i + 2] for i in range(0, 64, 2)).upper()
    from_file = IdentityPin.from_public_key_file(files.public_key)
    assert IdentityPin.from_fingerprint(spelled) == from_file
    with pytest.raises(IdentityError, match="64 hex"):
        IdentityPin.from_fingerprint(files.fingerprint[:-1])


@pytest.fixture(scope="module")
def server():
    identity = Ed25519PrivateKey.generate()
    return identity, IdentityPin(fingerprint(identity.public_key()))


def test_announcement_round_trip_gives_the_run_public_key(server):
    identity, pin = server
    for suite in ("x25519", HYBRID_SUITE):
        run_key, announcement = announce_run_key(identity, CONTEXT.run_id, suite)
        received = RunKeyAnnouncement.from_dict(announcement.to_dict())
        public = verify_announcement(received, pin=pin, run_id=CONTEXT.run_id)
        assert public.public_bytes == run_key.public.public_bytes and public.suite == suite
        sealed = seal_bytes(b"update", public, CONTEXT)
        assert bytes(open_bytes(sealed, run_key, CONTEXT)) == b"update"


def test_announcement_from_another_server_is_rejected(server):
    _, pin = server
    _, foreign = announce_run_key(Ed25519PrivateKey.generate(), CONTEXT.run_id)
    with pytest.raises(IdentityError, match="pins"):
        verify_announcement(foreign, pin=pin, run_id=CONTEXT.run_id)


def test_announcement_claiming_the_pinned_identity_but_signed_by_another_key_is_rejected(server):
    identity, pin = server
    _, genuine = announce_run_key(identity, CONTEXT.run_id)
    attacker = Ed25519PrivateKey.generate()
    forged = RunKeyAnnouncement(genuine.statement, attacker.sign(b"fedvault/run-key/v1\x00" + genuine.statement))
    with pytest.raises(IdentityError, match="signature is invalid"):
        verify_announcement(forged, pin=pin, run_id=CONTEXT.run_id)


def test_announcement_with_edited_statement_or_signature_is_rejected(server):
    identity, pin = server
    _, genuine = announce_run_key(identity, CONTEXT.run_id)
    fields = json.loads(genuine.statement)
    fields["kem"] = generate_run_key().public.public_bytes.hex()  # swap in an attacker's KEM key
    for forged in (
        RunKeyAnnouncement(canonical_json(fields), genuine.signature),
        RunKeyAnnouncement(genuine.statement, _flip(genuine.signature, 5)),
    ):
        with pytest.raises(IdentityError, match="signature is invalid"):
            verify_announcement(forged, pin=pin, run_id=CONTEXT.run_id)


def test_unsigned_or_missing_announcement_is_rejected(server):
    identity, _ = server
    _, genuine = announce_run_key(identity, CONTEXT.run_id)
    with pytest.raises(IdentityError, match="unsigned"):
        RunKeyAnnouncement.from_dict({"statement": genuine.statement, "signature": b""})
    with pytest.raises(IdentityError, match="unsigned"):
        RunKeyAnnouncement.from_dict({"statement": genuine.statement})
    with pytest.raises(IdentityError, match="no statement"):
        RunKeyAnnouncement.from_dict({})


def test_announcement_for_another_run_is_rejected(server):
    identity, pin = server
    _, old = announce_run_key(identity, CONTEXT.run_id - 1)
    with pytest.raises(IdentityError, match=f"for run {CONTEXT.run_id - 1}"):
        verify_announcement(old, pin=pin, run_id=CONTEXT.run_id)


def test_instruction_signature_binds_digest_run_round_kind_and_node(server):
    identity, pin = server
    public = identity.public_key().public_bytes_raw()
    digest = hashlib.sha256(b"model").digest()
    binding = InstructionBinding(CONTEXT.run_id, 3, "train", 7)
    statement = binding.statement(digest)
    signature = sign_statement(identity, statement)
    call = dict(identity_public_key=public, pin=pin, expected=binding, content_digest=digest)
    verify_statement(statement, signature, **call)
    changes = [
        (dict(content_digest=hashlib.sha256(b"modem").digest()), "content does not match"),
        (dict(expected=dataclasses.replace(binding, round=4)), "signed for round 3"),
        (dict(expected=dataclasses.replace(binding, run_id=CONTEXT.run_id + 1)), "signed for run"),
        (dict(expected=dataclasses.replace(binding, kind="evaluate")), "signed for kind 'train'"),
        (dict(expected=dataclasses.replace(binding, node_id=8)), "signed for node 7"),
    ]
    for change, reason in changes:
        with pytest.raises(IdentityError, match=reason) as info:
            verify_statement(statement, signature, **(call | change))
        assert info.value.field == "signature"
    with pytest.raises(IdentityError, match="signature is invalid"):
        verify_statement(statement, _flip(signature, 0), **call)
    with pytest.raises(IdentityError, match="signature is invalid"):  # a statement edited to another node
        verify_statement(statement.replace(b'"node":7', b'"node":8'), signature, **call)


def test_run_key_signature_cannot_pass_as_an_instruction_signature(server):
    identity, pin = server
    _, announcement = announce_run_key(identity, CONTEXT.run_id)
    with pytest.raises(IdentityError):
        verify_statement(
            announcement.statement,
            announcement.signature,
            identity_public_key=identity.public_key().public_bytes_raw(),
            pin=pin,
            expected=InstructionBinding(CONTEXT.run_id, 3, "train", 7),
            content_digest=hashlib.sha256(announcement.statement).digest(),
        )

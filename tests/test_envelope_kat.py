"""Known-answer vectors for the sealed-reply envelope: committed ciphertexts that must keep opening.

``tests/data/envelope_kat.json`` holds, per suite, a fixed run private key and a reply sealed once
with it (``python tests/test_envelope_kat.py`` wrote it). Opening it with today's code must give
back exactly the records below: a change of the wire format (header layout, domain strings, chunk
AAD, framing) or of a dependency's HPKE output handling fails here instead of between versions.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedvault.security.envelope import CHUNK_STYPE, open_reply, seal_reply
from fedvault.security.sealing import RunKeyPair, RunPublicKey, SealingError

VECTORS = Path(__file__).with_name("data") / "envelope_kat.json"
BINDING = {"run_id": 7, "round": 3, "node_id": 11, "kind": "train", "instruction": bytes(range(32))}


def reply() -> RecordDict:
    """The fixed plaintext reply every vector seals."""
    arrays = ArrayRecord({"w": Array(np.arange(12, dtype=np.float32).reshape(3, 4)), "b": Array(np.array([0.5, -1.0]))})
    return RecordDict(
        {
            "arrays": arrays,
            "metrics": MetricRecord({"num-examples": 40, "train_steps": 6}),
            "dp-event": ConfigRecord({"party": "client-2", "round": 3}),
        }
    )


def run_key(suite: str, x25519_private: bytes, mlkem_seed: bytes | None) -> RunKeyPair:
    """The run key pair from fixed private bytes (X25519 raw key; ML-KEM-768 64-byte seed)."""
    x_private = x25519.X25519PrivateKey.from_private_bytes(x25519_private)
    x_public = x_private.public_key().public_bytes_raw()
    if mlkem_seed is None:
        return RunKeyPair(suite, x_private, RunPublicKey.from_bytes(suite, x_public))
    ml_private = mlkem.MLKEM768PrivateKey.from_seed_bytes(mlkem_seed)
    public = ml_private.public_key().public_bytes_raw() + x_public
    private = hpke.MLKEM768X25519PrivateKey(ml_private, x_private)
    return RunKeyPair(suite, private, RunPublicKey.from_bytes(suite, public))


def _key(vector: dict) -> RunKeyPair:
    seed = vector.get("mlkem_seed")
    return run_key(vector["suite"], bytes.fromhex(vector["x25519_private"]), bytes.fromhex(seed) if seed else None)


def _sealed(vector: dict) -> RecordDict:
    chunks = ArrayRecord()
    for index, chunk in enumerate(bytes.fromhex(c) for c in vector["chunks"]):
        chunks[f"chunk-{index}"] = Array(dtype="uint8", shape=(len(chunk),), stype=CHUNK_STYPE, data=chunk)
    seal = ConfigRecord({"header": bytes.fromhex(vector["header"]), "key": bytes.fromhex(vector["key"])})
    return RecordDict({vector["seal_record"]: seal, vector["sealed_record"]: chunks})


def _same(a: RecordDict, b: RecordDict) -> bool:
    if list(a) != list(b):
        return False
    for name in a:
        left, right = a[name], b[name]
        if isinstance(left, ArrayRecord):
            if list(left) != list(right) or any(not np.array_equal(left[k].numpy(), right[k].numpy()) for k in left):
                return False
        elif dict(left) != dict(right):
            return False
    return True


@pytest.mark.parametrize("suite", ["x25519", "mlkem768-x25519"])
def test_committed_vector_opens_to_the_fixed_reply(suite):
    vector = json.loads(VECTORS.read_text())[suite]
    opened = open_reply(_sealed(vector), _key(vector), **BINDING)
    assert _same(opened, reply())


@pytest.mark.parametrize("suite", ["x25519", "mlkem768-x25519"])
def test_a_changed_byte_of_the_vector_fails(suite):
    vector = json.loads(VECTORS.read_text())[suite]
    header = bytearray(bytes.fromhex(vector["header"]))
    header[-2] ^= 1
    with pytest.raises(SealingError):
        open_reply(_sealed({**vector, "header": header.hex()}), _key(vector), **BINDING)


def write_vectors() -> None:
    """Seal :func:`reply` once per suite with fixed private keys and write the vectors file."""
    vectors = {}
    for suite, seed in (("x25519", None), ("mlkem768-x25519", bytes(range(64, 128)))):
        x_private = bytes(range(1, 33))
        key = run_key(suite, x_private, seed)
        sealed = seal_reply(reply(), key.public, **BINDING)
        (seal_name, seal), (sealed_name, chunks) = sealed.items()
        vectors[suite] = {
            "suite": suite,
            "x25519_private": x_private.hex(),
            "mlkem_seed": seed.hex() if seed else None,
            "seal_record": seal_name,
            "sealed_record": sealed_name,
            "header": bytes(seal["header"]).hex(),
            "key": bytes(seal["key"]).hex(),
            "chunks": [bytes(chunks[k].data).hex() for k in chunks],
        }
    VECTORS.parent.mkdir(exist_ok=True)
    VECTORS.write_text(json.dumps(vectors, indent=1) + "\n")


if __name__ == "__main__":
    write_vectors()

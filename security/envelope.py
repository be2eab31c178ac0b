"""Sealed replies and signed instructions as Flower ``RecordDict`` content.

Wire format (record names are constants of this module)::

    instruction (server -> client): the usual records ("arrays", "config", ...) plus
      "fedvault.run-key"    ConfigRecord {"statement": bytes, "signature": bytes}
                            (identity.RunKeyAnnouncement: the run's KEM key, signed)
      "fedvault.signature"  ConfigRecord {"identity": raw Ed25519 public key (32 bytes),
                                          "statement": InstructionBinding(run, round, kind,
                                                       node).statement(content_digest(content)),
                                          "signature": sign_statement(identity, statement)}
                            one statement per destination node and message type; the client
                            checks every field against its own run, node and handler

    reply (client -> server): the whole reply content replaced by
      "fedvault.seal"       ConfigRecord {"header": bytes, "key": bytes}     (sealing.Sealed; the
                            header names run, round, node, kind and instruction_digest(statement)
                            of the instruction answered)
      "fedvault.sealed"     ArrayRecord {"chunk-0": Array(dtype="uint8", shape=(len,),
                                          stype="fedvault.sealed-chunk", data=ciphertext), ...}

The reply plaintext is a list of ``sealing.seal_frames`` frames, one per record in order:
``{"record": name, "type": "arrays", "count": n}`` (no data) followed by n frames
``{"key", "dtype", "shape", "stype"}`` carrying each ``Array.data`` as is; or
``{"record": name, "type": "metrics" | "config"}`` carrying the canonical JSON of the items as
``[key, value]`` pairs in order (bytes as ``{"b64": ...}``). Every record of the reply is sealed,
"num-examples" and DP events included: the server needs them only after opening, so the
SuperLink never sees them.

``content_digest`` is SHA-256 over ``"fedvault/content/v1\\0"`` and, for each record except the
signature record and the receipts record (``fedvault.protocol.RECEIPTS``, each receipt signed on
its own), in sorted name order: the name, the record type, then for arrays each key,
dtype, shape, stype and data in the record's order, for metrics/config the canonical JSON of the
items sorted by key (all fields length-prefixed, u64 big-endian). It covers the round's config as
well as the model, since a tampered config (learning rate, DP noise) can harm as much as a
tampered model.
"""

from __future__ import annotations

import base64
import hashlib
import re
import struct
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedvault.protocol import RECEIPTS
from fedvault.security.buffers import fresh_bytes
from fedvault.security.identity import (
    IdentityError,
    IdentityPin,
    InstructionBinding,
    RunKeyAnnouncement,
    identity_public_bytes,
    instruction_digest,
    sign_statement,
    verify_announcement,
    verify_statement,
)
from fedvault.security.sealing import (
    CHUNK_SIZE,
    SUITES,
    RunKeyPair,
    RunPublicKey,
    SealContext,
    Sealed,
    SealingError,
    canonical_json,
    open_frames,
    parse_canonical_json,
    seal_frames,
)

RUN_KEY_RECORD = "fedvault.run-key"
SIGNATURE_RECORD = "fedvault.signature"
SEAL_RECORD = "fedvault.seal"
SEALED_RECORD = "fedvault.sealed"
CHUNK_STYPE = "fedvault.sealed-chunk"
_DIGEST_DOMAIN = b"fedvault/content/v1\x00"
#: Records outside the instruction digest: the signature itself, and receipts (each signed on its own).
_UNDIGESTED = frozenset({SIGNATURE_RECORD, RECEIPTS})
_CHUNK_KEY = re.compile(r"^chunk-(0|[1-9][0-9]*)$")


def content_digest(content: RecordDict) -> bytes:
    """Canonical SHA-256 of every record but the signature record (see the module docstring)."""
    digest = hashlib.sha256(_DIGEST_DOMAIN)
    for name in sorted(content):
        if name in _UNDIGESTED:
            continue
        record = content[name]
        _update(digest, name.encode(), _record_type(record).encode())
        if isinstance(record, ArrayRecord):
            digest.update(struct.pack(">Q", len(record)))
            for key, array in record.items():
                shape = canonical_json(list(array.shape))
                _update(digest, key.encode(), array.dtype.encode(), shape, array.stype.encode(), array.data)
        else:
            _update(digest, canonical_json(sorted(_encode_values(record))))
    return digest.digest()


def announced(content: RecordDict, announcement: RunKeyAnnouncement) -> RecordDict:
    """``content`` plus the run key announcement (a new RecordDict; the records are shared)."""
    unsigned = RecordDict(dict(content.items()))
    unsigned[RUN_KEY_RECORD] = ConfigRecord(dict(announcement.to_dict()))  # dict() widens the value type
    return unsigned


def signed_for(
    unsigned: RecordDict, digest: bytes, identity: Ed25519PrivateKey, binding: InstructionBinding
) -> RecordDict:
    """``unsigned`` (from :func:`announced`, whose ``content_digest`` is ``digest``) signed for one
    destination: many nodes share the records and the digest, each gets its own statement."""
    statement = binding.statement(digest)
    signed = RecordDict(dict(unsigned.items()))
    signed[SIGNATURE_RECORD] = ConfigRecord(
        {
            "identity": identity_public_bytes(identity),
            "statement": statement,
            "signature": sign_statement(identity, statement),
        }
    )
    return signed


def sign_instruction(
    content: RecordDict,
    identity: Ed25519PrivateKey,
    announcement: RunKeyAnnouncement,
    *,
    run_id: int,
    round: int,
    kind: str,
    node_id: int,
) -> RecordDict:
    """``content`` plus the run key announcement and a signature over both for one node and kind."""
    unsigned = announced(content, announcement)
    return signed_for(unsigned, content_digest(unsigned), identity, InstructionBinding(run_id, round, kind, node_id))


def signed_instruction_digest(content: RecordDict) -> bytes:
    """:func:`~fedvault.security.identity.instruction_digest` of a signed instruction's statement."""
    signature = _config(content, SIGNATURE_RECORD)
    if signature is None:
        raise IdentityError(f"instruction is not signed (no {SIGNATURE_RECORD!r})", SIGNATURE_RECORD)
    return instruction_digest(_bytes(signature, "statement", SIGNATURE_RECORD))


@dataclass(frozen=True)
class VerifiedInstruction:
    """A verified instruction: the run key to seal the reply to, and the digest the reply names."""

    recipient: RunPublicKey
    digest: bytes


def verify_instruction(
    content: RecordDict,
    *,
    pin: IdentityPin,
    run_id: int,
    round: int,
    kind: str,
    node_id: int,
    suites: Collection[str] = tuple(SUITES),
) -> VerifiedInstruction:
    """Check the server's signature and run key announcement against what this client expects.

    Raises :class:`IdentityError` when the instruction is unsigned, signed by a key other than
    the pinned one, altered, for another run, round, node or message kind, or announces a suite
    outside ``suites``.
    """
    signature = _config(content, SIGNATURE_RECORD)
    if signature is None:
        problem = f"instruction is not signed (no {SIGNATURE_RECORD!r})"
        raise IdentityError(problem, SIGNATURE_RECORD)
    statement = _bytes(signature, "statement", SIGNATURE_RECORD)
    verify_statement(
        statement,
        _bytes(signature, "signature", SIGNATURE_RECORD),
        identity_public_key=_bytes(signature, "identity", SIGNATURE_RECORD),
        pin=pin,
        expected=InstructionBinding(run_id, round, kind, node_id),
        content_digest=content_digest(content),
    )
    announcement = _config(content, RUN_KEY_RECORD)
    if announcement is None:
        problem = f"instruction has no run key announcement ({RUN_KEY_RECORD!r})"
        raise IdentityError(problem, RUN_KEY_RECORD)
    recipient = verify_announcement(RunKeyAnnouncement.from_dict(announcement), pin=pin, run_id=run_id, suites=suites)
    return VerifiedInstruction(recipient, instruction_digest(statement))


def seal_reply(
    content: RecordDict,
    recipient: RunPublicKey,
    *,
    run_id: int,
    round: int,
    node_id: int,
    kind: str,
    instruction: bytes,
    chunk_size: int = CHUNK_SIZE,
) -> RecordDict:
    """Seal every record of a reply to the run key, as the answer to ``instruction`` (its digest);
    only sizes stay visible."""
    frames: list[tuple[dict[str, Any], Any]] = []
    for name, record in content.items():
        record_type = _record_type(record)
        if isinstance(record, ArrayRecord):
            frames.append(({"record": name, "type": record_type, "count": len(record)}, b""))
            frames += [
                ({"key": key, "dtype": a.dtype, "shape": list(a.shape), "stype": a.stype}, a.data)
                for key, a in record.items()
            ]
        else:
            values = canonical_json(_encode_values(record))
            frames.append(({"record": name, "type": record_type}, values))
    context = SealContext(run_id, round, node_id, kind, instruction)
    sealed = seal_frames(frames, recipient, context, chunk_size=chunk_size)
    chunks = ArrayRecord()
    for index, chunk in enumerate(sealed.chunks):
        chunks[f"chunk-{index}"] = Array(dtype="uint8", shape=(len(chunk),), stype=CHUNK_STYPE, data=chunk)
    seal = ConfigRecord({"header": sealed.header, "key": sealed.key})
    return RecordDict({SEAL_RECORD: seal, SEALED_RECORD: chunks})


def open_reply(
    content: RecordDict, run_key: RunKeyPair, *, run_id: int, round: int, node_id: int, kind: str, instruction: bytes
) -> RecordDict:
    """Check and open a sealed reply to the instruction whose digest is ``instruction``; the
    original records, in order.

    Raises :class:`SealingError` naming what failed (``field``): a missing envelope record, a
    header field (replay from another round/node/run/kind/instruction), ``key``, ``chunks`` or
    ``chunk i``.
    """
    seal = _config(content, SEAL_RECORD)
    if seal is None:
        raise SealingError(SEAL_RECORD, "reply is not sealed (no such ConfigRecord)")
    sealed = Sealed(
        header=_bytes(seal, "header", SEAL_RECORD), key=_bytes(seal, "key", SEAL_RECORD), chunks=tuple(_chunks(content))
    )
    context = SealContext(run_id, round, node_id, kind, instruction)
    frames = iter(open_frames(sealed, run_key, context, fresh_bytes))  # Array.data must be bytes: no copy
    try:
        return _rebuild(frames)
    except SealingError:
        raise
    except (KeyError, TypeError, ValueError) as err:  # authenticated, yet not what seal_reply makes
        raise SealingError("payload", f"sealed records are malformed: {err!r}") from None


def _rebuild(frames: Iterator[tuple[dict[str, Any], bytes]]) -> RecordDict:
    """The records ``seal_reply`` framed (KeyError/TypeError/ValueError if the frames are not)."""
    content = RecordDict()
    for meta, data in frames:
        name, record_type = meta["record"], meta["type"]
        if name in content:
            raise ValueError(f"record {name!r} appears twice")
        if record_type == "arrays":
            items = []
            for _ in range(meta["count"]):
                frame = next(frames, None)
                if frame is None:
                    raise ValueError(f"record {name!r} has fewer arrays than its count")
                items.append(frame)
            arrays = ArrayRecord()
            for item, array_data in items:
                if item["key"] in arrays:
                    raise ValueError(f"array {item['key']!r} appears twice in record {name!r}")
                arrays[item["key"]] = Array(
                    dtype=item["dtype"], shape=tuple(item["shape"]), stype=item["stype"], data=array_data
                )
            content[name] = arrays
        elif record_type in ("metrics", "config"):
            values = _decode_values(parse_canonical_json(data, f"record {name!r}"))
            content[name] = (MetricRecord if record_type == "metrics" else ConfigRecord)(values)
        else:
            raise ValueError(f"unknown record type {record_type!r}")
    return content


def _chunks(content: RecordDict) -> list[bytes]:
    """The ciphertext chunks in index order; stray or missing chunk names raise SealingError."""
    record = content.get(SEALED_RECORD)
    if not isinstance(record, ArrayRecord):
        raise SealingError("chunks", f"reply has no ArrayRecord {SEALED_RECORD!r}")
    indices = {}
    for key, array in record.items():
        match = _CHUNK_KEY.match(key)
        if match is None:
            raise SealingError("chunks", f"unexpected entry {key!r} in {SEALED_RECORD!r}")
        shape = (len(array.data),)
        if array.dtype != "uint8" or array.stype != CHUNK_STYPE or tuple(array.shape) != shape:
            raise SealingError(f"chunk {match.group(1)}", "is not a uint8 sealed-chunk array")
        indices[int(match.group(1))] = array.data
    missing = sorted(set(range(len(indices))) - set(indices))
    if missing:
        raise SealingError(f"chunk {missing[0]}", "is missing (chunks removed)")
    return [indices[i] for i in range(len(indices))]


def _config(content: RecordDict, name: str) -> ConfigRecord | None:
    record = content.get(name)
    return record if isinstance(record, ConfigRecord) else None


def _bytes(record: ConfigRecord, key: str, name: str) -> bytes:
    value = record.get(key)
    if not isinstance(value, bytes):
        raise SealingError(f"{name}.{key}", "is missing or not bytes")
    return value


def _record_type(record: Any) -> str:
    if isinstance(record, ArrayRecord):
        return "arrays"
    if isinstance(record, MetricRecord):
        return "metrics"
    if isinstance(record, ConfigRecord):
        return "config"
    raise SealingError("payload", f"cannot seal a {type(record).__name__}")


def _encode_values(record: MetricRecord | ConfigRecord) -> list[list[Any]]:
    """Record items as JSON ``[key, value]`` pairs in order; bytes become ``{"b64": ...}``."""

    def encode(value: Any) -> Any:
        if isinstance(value, bytes):
            return {"b64": base64.b64encode(value).decode()}
        return [encode(v) for v in value] if isinstance(value, list) else value

    return [[key, encode(value)] for key, value in record.items()]


def _decode_values(values: Any) -> dict[str, Any]:
    def decode(value: Any) -> Any:
        if isinstance(value, dict):
            return base64.b64decode(value["b64"], validate=True)
        return [decode(v) for v in value] if isinstance(value, list) else value

    if not (isinstance(values, list) and all(isinstance(v, list) and len(v) == 2 for v in values)):
        raise ValueError("record values must be a list of [key, value] pairs")
    return {key: decode(value) for key, value in values}


def _update(digest: Any, *fields: bytes) -> None:
    """Feed length-prefixed fields (u64 big-endian length, then the bytes)."""
    for field in fields:
        digest.update(struct.pack(">Q", len(field)))
        digest.update(field)

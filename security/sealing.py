"""End-to-end sealing of client updates to the server's per-run KEM key (HPKE, RFC 9180).

Construction (a KEM/DEM hybrid with a chunked DEM)::

    header = canonical JSON {"v": 2, "suite", "run", "round", "node", "kind", "instruction" (hex),
                             "chunk": C, "length": L, "count": n = max(1, ceil(L / C))}
    H      = SHA-256("fedvault/seal/v2/header\\0" || header)
    K      = os.urandom(Nk)                                   fresh for every message
    key    = HPKE SealBase(pkR, info = "fedvault/seal/v2/key\\0" || H, aad = "", pt = K)
           = enc || ct                                        (RFC 9180 sections 5.1.1 and 6.1)
    chunk_i = AES-GCM-Seal(K, nonce = I2OSP(i, 12), aad = H || I2OSP(i, 8) || I2OSP(n, 8),
                           pt = P[i*C : (i+1)*C])             i = 0 .. n-1

Why this shape:

* The ``cryptography`` binding offers HPKE only single-shot (no context, no Export), and one
  HPKE call per ~1 MiB chunk would cost a KEM operation per chunk. So HPKE wraps a random
  per-message data key K (the KEM/DEM pattern of RFC 9180 section 1 / ISO 18033-2), and K
  encrypts the payload as a sequence of AEAD records, the "STREAM" online-AE construction of
  Hoang, Reyhanitabar, Rogaway and Vizar (CRYPTO 2015), as used by age (C2SP age spec, payload)
  and Tink's streaming AEAD. Records are encrypted straight from the arrays' memory and
  decrypted straight into the memory of the frame they belong to (only a record that straddles
  two buffers goes through a staging copy), so nothing but the cipher touches the bulk data.
* K is used for one message only, so the counter nonce never repeats under a key (RFC 9180
  section 5.2 builds its nonces the same way, ``base_nonce XOR seq``; with a single-use key a
  zero base nonce is equivalent). n < 2**32 keeps within NIST SP 800-38D's invocation limit.
* H is bound into K's HPKE ``info``: editing any header field (run, round, node, kind, sizes,
  suite) makes the key block fail to open. The counter nonce detects reordered records; n in
  the (authenticated) header detects truncation and extension; a fresh K per message defeats
  splicing records from other messages. H, i and n are also in every record's AAD: redundant
  given the above, but it keeps each record self-describing should K ever outlive one message.
* ``instruction`` is the digest of the signed instruction the reply answers
  (:func:`fedvault.security.identity.instruction_digest`): a reply opens only as the answer to
  that one instruction, not to another one for the same run, round, node and kind.
* Replay across rounds/nodes/kinds/runs/instructions is caught first by comparing the header with what the
  opener expects (a clear reason), then cryptographically (a forged header breaks H).
* HPKE base mode authenticates nothing about the sender: who sent a reply is Flower's node
  authentication; the server checks ``node`` against the message's source node.

Suites (``SUITES``): ``"x25519"`` = DHKEM(X25519, HKDF-SHA256) + HKDF-SHA256 + AES-128-GCM
(the default); ``"mlkem768-x25519"`` = the ML-KEM-768 + X25519 hybrid KEM (post-quantum;
draft-ietf-hpke-pq) + HKDF-SHA256 + AES-256-GCM (256-bit records to match ML-KEM-768's
category 3 rather than stop at AES-128). Records use the suite's AEAD.

Framing (``seal_frames``): the plaintext P is ``I2OSP(len(M), 4) || M`` with M the canonical
JSON manifest ``{"frames": [{"meta": ..., "size": ...}, ...]}``, then each frame's bytes at the
next 64-byte-aligned offset (zero padding). The manifest is inside the ciphertext, so names,
dtypes and shapes are hidden; only L (and thus the update's size) shows.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.utils import Buffer

from fedvault.errors import FedvaultError
from fedvault.security.buffers import fresh_array, fresh_bytes

FORMAT_VERSION = 2
CHUNK_SIZE = 1 << 20
MIN_CHUNK_SIZE = 1 << 10
MAX_CHUNK_SIZE = 1 << 26
MAX_CHUNKS = (1 << 32) - 1
TAG_SIZE = 16
ALIGNMENT = 64
_HEADER_DOMAIN = b"fedvault/seal/v2/header\x00"
_KEY_DOMAIN = b"fedvault/seal/v2/key\x00"
_HEADER_FIELDS = frozenset({"v", "suite", "run", "round", "node", "kind", "instruction", "chunk", "length", "count"})
_X25519_BYTES = 32
_MLKEM768_BYTES = 1184
B = TypeVar("B")


class SealingError(FedvaultError, ValueError):
    """A sealed message, key or announcement is rejected; ``field`` names what failed."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(self.describe(field, reason))
        self.field = field
        self.reason = reason

    @staticmethod
    def describe(field: str, reason: str) -> str:
        return f"sealed message rejected: {field}: {reason}"


@dataclass(frozen=True)
class Suite:
    """An HPKE suite (RFC 9180 section 7) plus the record AEAD key size it implies."""

    name: str
    kem: hpke.KEM
    kdf: hpke.KDF
    aead: hpke.AEAD
    key_size: int
    public_key_size: int

    @property
    def hpke_suite(self) -> hpke.Suite:
        return hpke.Suite(self.kem, self.kdf, self.aead)


SUITES: dict[str, Suite] = {
    "x25519": Suite("x25519", hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_128_GCM, 16, _X25519_BYTES),
    "mlkem768-x25519": Suite(
        "mlkem768-x25519",
        hpke.KEM.MLKEM768_X25519,
        hpke.KDF.HKDF_SHA256,
        hpke.AEAD.AES_256_GCM,
        32,
        _MLKEM768_BYTES + _X25519_BYTES,
    ),
}
DEFAULT_SUITE = "x25519"
HYBRID_SUITE = "mlkem768-x25519"


def get_suite(name: str) -> Suite:
    """The suite called ``name``; raises :class:`SealingError` listing the known ones."""
    try:
        return SUITES[name]
    except KeyError:
        known = ", ".join(SUITES)
        raise SealingError("suite", f"unknown suite {name!r} (known: {known})") from None


@dataclass(frozen=True)
class SealContext:
    """What a sealed message is bound to: run, round, node, message kind (e.g. "train") and the
    digest of the instruction it answers (empty: none)."""

    run_id: int
    round: int
    node_id: int
    kind: str
    instruction: bytes = b""

    def __post_init__(self) -> None:
        for name in ("run_id", "round", "node_id"):
            value = getattr(self, name)
            if not _is_count(value):
                raise SealingError("context", f"{name} must be an int >= 0, got {value!r}")
        if not isinstance(self.kind, str) or not self.kind:
            raise SealingError("context", f"kind must be a non-empty str, got {self.kind!r}")
        if not isinstance(self.instruction, bytes):
            raise SealingError("context", f"instruction must be bytes, got {type(self.instruction).__name__}")


@dataclass(frozen=True)
class RunPublicKey:
    """The server's run KEM public key: what a client seals to."""

    suite: str
    public_bytes: bytes
    key: Any  # x25519.X25519PublicKey | hpke.MLKEM768X25519PublicKey

    @classmethod
    def from_bytes(cls, suite: str, public_bytes: bytes) -> RunPublicKey:
        """Parse ``public_bytes`` (X25519: 32 bytes; hybrid: ML-KEM-768 key || X25519 key)."""
        spec = get_suite(suite)
        if len(public_bytes) != spec.public_key_size:
            raise SealingError(
                "kem public key", f"{len(public_bytes)} bytes, expected {spec.public_key_size} for suite {suite}"
            )
        try:
            x_key = x25519.X25519PublicKey.from_public_bytes(public_bytes[-_X25519_BYTES:])
            if spec.name == DEFAULT_SUITE:
                return cls(suite, bytes(public_bytes), x_key)
            ml_key = mlkem.MLKEM768PublicKey.from_public_bytes(public_bytes[:_MLKEM768_BYTES])
        except ValueError as err:
            raise SealingError("kem public key", f"not a valid {suite} key ({err})") from None
        return cls(suite, bytes(public_bytes), hpke.MLKEM768X25519PublicKey(ml_key, x_key))


@dataclass(frozen=True)
class RunKeyPair:
    """The server's ephemeral per-run KEM key pair. Keep it in memory only."""

    suite: str
    private_key: Any  # x25519.X25519PrivateKey | hpke.MLKEM768X25519PrivateKey
    public: RunPublicKey


def generate_run_key(suite: str = DEFAULT_SUITE) -> RunKeyPair:
    """A fresh KEM key pair for ``suite`` (keys from the library's CSPRNG)."""
    spec = get_suite(suite)
    x_private = x25519.X25519PrivateKey.generate()
    x_public = x_private.public_key().public_bytes_raw()
    if spec.name == DEFAULT_SUITE:
        return RunKeyPair(suite, x_private, RunPublicKey.from_bytes(suite, x_public))
    ml_private = mlkem.MLKEM768PrivateKey.generate()
    public = ml_private.public_key().public_bytes_raw() + x_public
    private = hpke.MLKEM768X25519PrivateKey(ml_private, x_private)
    return RunKeyPair(suite, private, RunPublicKey.from_bytes(suite, public))


@dataclass(frozen=True)
class Sealed:
    """A sealed message: authenticated plaintext header, HPKE key block, AEAD chunks."""

    header: bytes
    key: bytes
    chunks: tuple[bytes, ...]


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no whitespace, ASCII: one byte string per value (for hashing and signing)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def parse_canonical_json(data: bytes, what: str) -> Any:
    """Inverse of :func:`canonical_json`; anything not in canonical form raises SealingError."""
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, ValueError):
        raise SealingError(what, "is not valid JSON") from None
    if canonical_json(value) != data:
        raise SealingError(what, "is not in canonical form")
    return value


def seal_bytes(
    payload: Buffer | list[Buffer] | tuple[Buffer, ...],
    recipient: RunPublicKey,
    context: SealContext,
    *,
    chunk_size: int = CHUNK_SIZE,
) -> Sealed:
    """Seal one buffer or a sequence of buffers (sealed as their concatenation, without joining)."""
    segments = payload if isinstance(payload, (list, tuple)) else [payload]
    views = [memoryview(s).cast("B") for s in segments]
    length = sum(len(v) for v in views)
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        bounds = f"[{MIN_CHUNK_SIZE}, {MAX_CHUNK_SIZE}]"
        raise SealingError("chunk", f"size {chunk_size} outside {bounds}")
    count = _chunk_count(length, chunk_size)
    if count > MAX_CHUNKS:
        raise SealingError("length", f"{length} bytes need more than {MAX_CHUNKS} chunks")
    suite = get_suite(recipient.suite)
    header = canonical_json(
        {
            "v": FORMAT_VERSION,
            "suite": suite.name,
            "run": context.run_id,
            "round": context.round,
            "node": context.node_id,
            "kind": context.kind,
            "instruction": context.instruction.hex(),
            "chunk": chunk_size,
            "length": length,
            "count": count,
        }
    )
    header_hash = hashlib.sha256(_HEADER_DOMAIN + header).digest()
    data_key = os.urandom(suite.key_size)
    key_block = suite.hpke_suite.encrypt(data_key, recipient.key, info=_KEY_DOMAIN + header_hash)
    aead = AESGCM(data_key)
    chunks = []
    for i, chunk in enumerate(_gather(views, chunk_size, length)):
        sealed, out = fresh_bytes(len(chunk) + TAG_SIZE)  # bytes, as Flower's Array.data must be
        aead.encrypt_into(_nonce(i), chunk, _chunk_aad(header_hash, i, count), out)
        out.release()
        chunks.append(sealed)
    return Sealed(header, key_block, tuple(chunks))


def open_bytes(sealed: Sealed, run_key: RunKeyPair, context: SealContext) -> memoryview:
    """Check and decrypt ``sealed``; the plaintext, decrypted in place into one fresh buffer.

    Raises :class:`SealingError` whose ``field`` names the first check that failed: a header
    field (``header.round`` ... : replay or misdirection), ``chunks`` (truncated or extended),
    ``chunk i`` (edited, reordered or spliced) or ``key`` (key block edited, header edited, or
    sealed to another key). Nothing is allocated for the plaintext before the key block opens.
    """
    reader = _Reader.open(sealed, run_key, context)
    plaintext, view = fresh_array(reader.length)
    reader.read_into(view)
    reader.finish()
    return plaintext


def seal_frames(
    frames: Sequence[tuple[Mapping[str, Any], Buffer]],
    recipient: RunPublicKey,
    context: SealContext,
    *,
    chunk_size: int = CHUNK_SIZE,
) -> Sealed:
    """Seal ``(meta, buffer)`` frames; ``meta`` is any JSON object (see the module docstring)."""
    views = [memoryview(data).cast("B") for _, data in frames]
    manifest = canonical_json({"frames": [{"meta": dict(meta), "size": len(v)} for (meta, _), v in zip(frames, views)]})
    segments: list[Any] = [struct.pack(">I", len(manifest)), manifest]
    offset = 4 + len(manifest)
    for view in views:
        padding = -offset % ALIGNMENT
        segments += [bytes(padding), view]
        offset += padding + len(view)
    return seal_bytes(segments, recipient, context, chunk_size=chunk_size)


def open_frames(
    sealed: Sealed, run_key: RunKeyPair, context: SealContext, allocate: Callable[[int], tuple[B, memoryview]]
) -> list[tuple[dict[str, Any], B]]:
    """Open a :func:`seal_frames` message: ``(meta, buffer)`` pairs, each frame decrypted straight
    into a buffer of its own from ``allocate(size)`` (the buffer and a writable view of it, e.g.
    :func:`~fedvault.security.buffers.fresh_array`). The manifest is read from the first chunk,
    and checked to fit the header's length, before any frame is allocated."""
    reader = _Reader.open(sealed, run_key, context)
    if reader.length < 4:
        raise SealingError("payload", "too short for a frame manifest")
    (size,) = struct.unpack(">I", reader.read(4))
    if 4 + size > reader.length:
        raise SealingError("payload manifest", f"{size} bytes, payload has {reader.length}")
    entries = _manifest_entries(parse_canonical_json(reader.read(size), "payload manifest"))
    paddings = _frame_paddings(4 + size, [entry["size"] for entry in entries], reader.length)
    frames = []
    for entry, padding in zip(entries, paddings):
        reader.read(padding)
        buffer, view = allocate(entry["size"])
        reader.read_into(view)
        frames.append((entry["meta"], buffer))
    reader.finish()
    return frames


def seal_arrays(
    arrays: Mapping[str, np.ndarray], recipient: RunPublicKey, context: SealContext, *, chunk_size: int = CHUNK_SIZE
) -> Sealed:
    """Seal named numpy arrays (plain dtypes, any shape); C-contiguous ones are not copied."""
    frames: list[tuple[Mapping[str, Any], Buffer]] = []
    for name, array in arrays.items():
        array = np.asarray(array, order="C")
        if array.dtype.hasobject or array.dtype.fields is not None:
            raise SealingError("payload", f"array {name!r} has dtype {array.dtype}: only plain dtypes are sealed")
        meta = {"name": name, "dtype": array.dtype.str, "shape": list(array.shape)}
        frames.append((meta, array.reshape(-1).view(np.uint8).data))
    return seal_frames(frames, recipient, context, chunk_size=chunk_size)


def open_arrays(sealed: Sealed, run_key: RunKeyPair, context: SealContext) -> dict[str, np.ndarray]:
    """Open a :func:`seal_arrays` message; each array is writable, in a buffer of its own."""
    arrays: dict[str, np.ndarray] = {}
    for meta, view in open_frames(sealed, run_key, context, fresh_array):
        try:
            dtype = np.dtype(meta["dtype"])
            if dtype.hasobject or dtype.fields is not None:
                raise ValueError(f"dtype {dtype} is not a plain dtype")
            if not (isinstance(meta["shape"], list) and all(map(_is_count, meta["shape"]))):
                raise ValueError("shape must be a list of non-negative integers")
            array = np.frombuffer(view, dtype=dtype).reshape(meta["shape"])
        except (KeyError, TypeError, ValueError) as err:
            raise SealingError("payload", f"bad array frame {meta!r}: {err}") from None
        if meta.get("name") in arrays or not isinstance(meta.get("name"), str):
            raise SealingError("payload", f"missing or repeated array name in {meta!r}")
        arrays[meta["name"]] = array
    return arrays


def _check_header(header: bytes, suite: str, context: SealContext) -> dict[str, Any]:
    """Parse the header and compare it with what the opener expects (named field on mismatch)."""
    fields = parse_canonical_json(header, "header")
    if not isinstance(fields, dict) or set(fields) != _HEADER_FIELDS:
        raise SealingError("header", f"fields must be {sorted(_HEADER_FIELDS)}")
    expected = {
        "v": FORMAT_VERSION,
        "suite": suite,
        "run": context.run_id,
        "round": context.round,
        "node": context.node_id,
        "kind": context.kind,
        "instruction": context.instruction.hex(),
    }
    for name, value in expected.items():
        if fields[name] != value or type(fields[name]) is not type(value):
            raise SealingError(f"header.{name}", f"message is for {name} {fields[name]!r}, expected {value!r}")
    chunk, length, count = fields["chunk"], fields["length"], fields["count"]
    if not (_is_count(chunk) and MIN_CHUNK_SIZE <= chunk <= MAX_CHUNK_SIZE):
        raise SealingError("header.chunk", f"bad chunk size {chunk!r}")
    if not _is_count(length):
        raise SealingError("header.length", f"bad length {length!r}")
    if type(count) is not int or count != _chunk_count(length, chunk):
        raise SealingError("header.count", f"{count!r} chunks do not fit length {length}")
    return fields


class _Reader:
    """A sealed message's plaintext, read in order. Each chunk is decrypted once: straight into the
    reader's buffer when it fits there whole, else into a staging buffer that reads copy from."""

    def __init__(self, chunks: Sequence[Buffer], aead: AESGCM, header_hash: bytes, length: int, chunk_size: int):
        self.length = length
        self._chunks = chunks
        self._aead = aead
        self._header_hash = header_hash
        self._next = 0  # the next chunk to decrypt
        self._staging = fresh_array(min(chunk_size, length))[1]
        self._staged = self._staging[:0]  # decrypted, still unread bytes of the last staged chunk

    @classmethod
    def open(cls, sealed: Sealed, run_key: RunKeyPair, context: SealContext) -> _Reader:
        """Check the header and the chunk sizes, then open the key block."""
        fields = _check_header(sealed.header, run_key.suite, context)
        chunk_size, length, count = fields["chunk"], fields["length"], fields["count"]
        if len(sealed.chunks) != count:
            problem = "truncated" if len(sealed.chunks) < count else "extended"
            raise SealingError("chunks", f"{problem}: {len(sealed.chunks)} chunks, header says {count}")
        for i, chunk in enumerate(sealed.chunks):
            expected = min(chunk_size, length - i * chunk_size) + TAG_SIZE
            if len(chunk) != expected:
                raise SealingError(f"chunk {i}", f"{len(chunk)} bytes, expected {expected}")
        suite = get_suite(run_key.suite)
        header_hash = hashlib.sha256(_HEADER_DOMAIN + sealed.header).digest()
        try:
            data_key = suite.hpke_suite.decrypt(sealed.key, run_key.private_key, info=_KEY_DOMAIN + header_hash)
        except (InvalidTag, ValueError):
            raise SealingError(
                "key", "key block does not open: header or encapsulated key edited, or another run key"
            ) from None
        return cls(sealed.chunks, AESGCM(data_key), header_hash, length, chunk_size)

    def read_into(self, out: memoryview) -> None:
        """Fill ``out`` with the next ``len(out)`` plaintext bytes."""
        filled = self._take_staged(out)
        while filled < len(out):
            size = len(self._chunks[self._next]) - TAG_SIZE
            if len(out) - filled >= size:
                self._decrypt(out[filled : filled + size])
                filled += size
            else:
                self._staged = self._staging[:size]
                self._decrypt(self._staged)
                filled += self._take_staged(out[filled:])

    def read(self, size: int) -> bytes:
        """The next ``size`` plaintext bytes (small reads: manifest, padding)."""
        data = bytearray(size)
        self.read_into(memoryview(data))
        return bytes(data)

    def finish(self) -> None:
        """Authenticate the chunks no read reached: the one, empty chunk of an empty message."""
        while self._next < len(self._chunks):
            self._decrypt(memoryview(bytearray()))

    def _take_staged(self, out: memoryview) -> int:
        take = min(len(out), len(self._staged))
        out[:take] = self._staged[:take]
        self._staged = self._staged[take:]
        return take

    def _decrypt(self, out: memoryview) -> None:
        index = self._next
        aad = _chunk_aad(self._header_hash, index, len(self._chunks))
        try:
            self._aead.decrypt_into(_nonce(index), self._chunks[index], aad, out)
        except InvalidTag:
            raise SealingError(
                f"chunk {index}", "failed authentication: edited, reordered or from another message"
            ) from None
        self._next += 1


def _manifest_entries(manifest: Any) -> list[dict[str, Any]]:
    """The frame entries of a parsed manifest (SealingError unless ``{"frames": [{meta, size}]}``)."""
    entries = manifest.get("frames") if isinstance(manifest, dict) else None
    if not isinstance(entries, list) or len(manifest) != 1:
        raise SealingError("payload manifest", "must be {'frames': [...]}")
    for entry in entries:
        if not (
            isinstance(entry, dict)
            and set(entry) == {"meta", "size"}
            and isinstance(entry["meta"], dict)
            and _is_count(entry["size"])
        ):
            raise SealingError("payload manifest", f"bad frame entry {entry!r}")
    return entries


def _frame_paddings(offset: int, sizes: list[int], length: int) -> list[int]:
    """The zero padding before each frame, the first starting after ``offset``; the frames must end
    exactly at ``length``."""
    paddings = []
    for size in sizes:
        paddings.append(-offset % ALIGNMENT)
        offset += paddings[-1] + size
    if offset != length:
        raise SealingError("payload", f"frames end at byte {offset}, payload has {length}")
    return paddings


def _gather(views: list[memoryview], chunk_size: int, length: int) -> Iterator[memoryview]:
    """Chunks of the concatenation of ``views``: slices where possible, else a staging copy.

    A yielded staging view is overwritten by the next chunk: consume it before asking for more.
    """
    if length == 0:
        yield memoryview(b"")
        return
    views = [v for v in views if len(v)]
    staging = fresh_array(min(chunk_size, length))[1]
    index, offset = 0, 0  # next unread byte: views[index][offset]
    for start in range(0, length, chunk_size):
        want = min(chunk_size, length - start)
        if len(views[index]) - offset >= want:  # inside one view: no copy
            chunk = views[index][offset : offset + want]
            offset += want
        else:
            filled = 0
            while filled < want:
                take = min(want - filled, len(views[index]) - offset)
                staging[filled : filled + take] = views[index][offset : offset + take]
                filled, offset = filled + take, offset + take
                if offset == len(views[index]):
                    index, offset = index + 1, 0
            chunk = staging[:want]
        if index < len(views) and offset == len(views[index]):
            index, offset = index + 1, 0
        yield chunk


def _chunk_count(length: int, chunk_size: int) -> int:
    return max(1, -(-length // chunk_size))


def _nonce(index: int) -> bytes:
    return index.to_bytes(12, "big")


def _chunk_aad(header_hash: bytes, index: int, count: int) -> bytes:
    return header_hash + struct.pack(">QQ", index, count)


def _is_count(value: Any) -> bool:
    return type(value) is int and value >= 0

"""Server identity (Ed25519, RFC 8032): key files, pinning, run key announcement, model signatures.

* ``generate_identity(dir)`` writes ``identity.key`` (PKCS#8 PEM, mode 0600) and ``identity.pub``
  (SubjectPublicKeyInfo PEM). Users pin the server by its fingerprint: SHA-256 of the raw 32-byte
  public key, in hex (the SSH/age practice of pinning a key digest).
* Per run the server makes an ephemeral KEM key pair (``sealing.generate_run_key``) and signs a
  run key announcement: the statement ``canonical JSON {"v": 1, "type": "run-key",
  "run", "suite", "kem" (hex), "created" (unix s), "identity" (hex)}`` is signed as
  ``"fedvault/run-key/v1\\0" || statement``. A client accepts it only if the identity key matches
  its pin, the signature verifies, the run is its own run and the suite is in its allow-list.
* Every instruction is signed as ``"fedvault/instruction/v2\\0" || canonical JSON {"v": 2,
  "type": "instruction", "run", "round", "kind" (Flower message type: "train", "evaluate"),
  "node" (destination node id), "nonce" (16 random bytes, hex), "digest" (hex)}`` over a digest of what is sent
  (:func:`fedvault.security.envelope.content_digest`): one statement per destination node, so an
  instruction cannot be redelivered to another node or as another message type. Its SHA-256
  (:func:`instruction_digest`) is what a sealed reply names as the instruction it answers.

The distinct domain prefixes keep one kind of signature from passing as the other. Statements
travel as the exact bytes signed, so verification never depends on re-encoding.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedvault.atomic import atomic_write
from fedvault.security.sealing import (
    DEFAULT_SUITE,
    SUITES,
    RunKeyPair,
    RunPublicKey,
    SealingError,
    canonical_json,
    generate_run_key,
    parse_canonical_json,
)

IDENTITY_KEY = "identity.key"
IDENTITY_PUB = "identity.pub"
_RUN_KEY_DOMAIN = b"fedvault/run-key/v1\x00"
_INSTRUCTION_DOMAIN = b"fedvault/instruction/v2\x00"
_DIGEST_DOMAIN = b"fedvault/instruction-digest/v2\x00"
_STATEMENT_FIELDS = frozenset({"v", "type", "run", "suite", "kem", "created", "identity"})
_INSTRUCTION_FIELDS = frozenset({"v", "type", "run", "round", "kind", "node", "nonce", "digest"})
_FINGERPRINT = re.compile(r"^[0-9a-f]{64}$")


class IdentityError(SealingError):
    """A server identity, pin, announcement or signature is missing, malformed or not trusted."""

    def __init__(self, reason: str, field: str = "identity") -> None:
        super().__init__(field, reason)

    @staticmethod
    def describe(field: str, reason: str) -> str:
        return f"server identity: {reason}"


@dataclass(frozen=True)
class IdentityFiles:
    """Where :func:`generate_identity` wrote the key pair, and the fingerprint to pin."""

    private_key: Path
    public_key: Path
    fingerprint: str


def generate_identity(directory: str | Path, overwrite: bool = False) -> IdentityFiles:
    """Write a new Ed25519 identity into ``directory`` (created 0700 if missing).

    Raises :class:`IdentityError` if either file exists, unless ``overwrite``. Each file is
    written to a temp file and renamed; the private key is 0600 from creation.
    """
    folder = Path(directory).expanduser()
    private_path, public_path = folder / IDENTITY_KEY, folder / IDENTITY_PUB
    if not overwrite:
        for path in (private_path, public_path):
            if path.exists():
                raise IdentityError(f"identity file {path} already exists (pass overwrite to replace it)")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    atomic_write(private_path, lambda fh: fh.write(private_pem), 0o600)
    atomic_write(public_path, lambda fh: fh.write(public_pem), 0o644)
    return IdentityFiles(private_path, public_path, fingerprint(key.public_key()))


def load_identity(path: str | Path) -> Ed25519PrivateKey:
    """Load the server's private identity key; refuse one readable by group or others (as ssh)."""
    path = Path(path).expanduser()
    try:
        mode = path.stat().st_mode & 0o777
        data = path.read_bytes()
    except OSError as err:
        raise IdentityError(f"cannot read identity key {path}: {err.strerror}") from None
    if mode & 0o077:
        raise IdentityError(f"identity key {path} has mode {mode:04o}; run 'chmod 600 {path}'")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as err:
        raise IdentityError(f"{path} is not an unencrypted PEM private key ({err})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise IdentityError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    return key


def load_identity_public_key(path: str | Path) -> Ed25519PublicKey:
    """Load a server identity public key (PEM SubjectPublicKeyInfo, as ``identity.pub``)."""
    path = Path(path).expanduser()
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except OSError as err:
        raise IdentityError(f"cannot read identity public key {path}: {err.strerror}") from None
    except ValueError as err:
        raise IdentityError(f"{path} is not a PEM public key ({err})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise IdentityError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    return key


def fingerprint(public_key: Ed25519PublicKey) -> str:
    """SHA-256 of the raw 32-byte public key, lowercase hex: what users compare and pin."""
    return hashlib.sha256(public_key.public_bytes_raw()).hexdigest()


@dataclass(frozen=True)
class IdentityPin:
    """The server identity a client trusts, held as its fingerprint."""

    fingerprint: str

    @classmethod
    def from_fingerprint(cls, value: str) -> IdentityPin:
        """Accept 64 hex digits, any case, optionally ``sha256:``-prefixed or colon-separated."""
        normal = value.strip().lower().removeprefix("sha256:").replace(":", "")
        if not _FINGERPRINT.match(normal):
            raise IdentityError(f"server fingerprint {value!r} is not 64 hex digits (SHA-256)")
        return cls(normal)

    @classmethod
    def from_public_key_file(cls, path: str | Path) -> IdentityPin:
        return cls(fingerprint(load_identity_public_key(path)))

    def check(self, identity_public_key: bytes) -> Ed25519PublicKey:
        """The key, if its fingerprint is the pinned one; else :class:`IdentityError`."""
        try:
            key = Ed25519PublicKey.from_public_bytes(identity_public_key)
        except ValueError:
            raise IdentityError("server identity key is not a 32-byte Ed25519 key") from None
        seen = fingerprint(key)
        if not hmac.compare_digest(seen, self.fingerprint):
            raise IdentityError(f"signed by server identity {seen}, but this client pins {self.fingerprint}")
        return key


@dataclass(frozen=True)
class RunKeyAnnouncement:
    """A signed statement binding a run's KEM public key to the server identity."""

    statement: bytes
    signature: bytes

    def to_dict(self) -> dict[str, bytes]:
        """Plain values for a Flower ``ConfigRecord``."""
        return {"statement": self.statement, "signature": self.signature}

    @classmethod
    def from_dict(cls, values: Any) -> RunKeyAnnouncement:
        """Inverse of :meth:`to_dict`; a missing or empty signature means unsigned: rejected."""
        statement, signature = values.get("statement"), values.get("signature")
        if not isinstance(statement, bytes) or not statement:
            raise IdentityError("run key announcement has no statement", "announcement")
        if not isinstance(signature, bytes) or not signature:
            raise IdentityError("run key announcement is unsigned", "announcement")
        return cls(statement, signature)

    def fields(self) -> dict[str, Any]:
        """The parsed statement (not yet verified)."""
        fields = parse_canonical_json(self.statement, "announcement")
        if not isinstance(fields, dict) or set(fields) != _STATEMENT_FIELDS:
            expected = sorted(_STATEMENT_FIELDS)
            raise IdentityError(f"statement fields must be {expected}", "announcement")
        if fields["v"] != 1 or fields["type"] != "run-key":
            raise IdentityError("statement is not a version 1 run key statement", "announcement")
        return fields


def announce_run_key(
    identity: Ed25519PrivateKey, run_id: int, suite: str = DEFAULT_SUITE
) -> tuple[RunKeyPair, RunKeyAnnouncement]:
    """A fresh run KEM key pair and its announcement signed by ``identity``."""
    run_key = generate_run_key(suite)
    statement = canonical_json(
        {
            "v": 1,
            "type": "run-key",
            "run": run_id,
            "suite": suite,
            "kem": run_key.public.public_bytes.hex(),
            "created": int(time.time()),
            "identity": identity.public_key().public_bytes_raw().hex(),
        }
    )
    return run_key, RunKeyAnnouncement(statement, identity.sign(_RUN_KEY_DOMAIN + statement))


def verify_announcement(
    announcement: RunKeyAnnouncement, *, pin: IdentityPin, run_id: int, suites: Collection[str] = tuple(SUITES)
) -> RunPublicKey:
    """The run public key to seal to, once the announcement is pinned, signed, for ``run_id`` and of
    a suite in the client's allow-list ``suites``."""
    fields = announcement.fields()
    key = pin.check(_unhex(fields["identity"], "announcement identity"))
    try:
        key.verify(announcement.signature, _RUN_KEY_DOMAIN + announcement.statement)
    except InvalidSignature:
        raise IdentityError("run key announcement signature is invalid", "announcement") from None
    if fields["run"] != run_id:
        raise IdentityError(f"run key announcement is for run {fields['run']}, this is run {run_id}", "announcement")
    if fields["suite"] not in suites:
        allowed = ", ".join(sorted(suites))
        raise IdentityError(
            f"the server announced suite {fields['suite']!r}, which this client does not allow (allowed: {allowed})",
            "announcement",
        )
    return RunPublicKey.from_bytes(fields["suite"], _unhex(fields["kem"], "announcement kem"))


def identity_public_bytes(identity: Ed25519PrivateKey) -> bytes:
    """The raw 32-byte public key of ``identity`` (what signed records carry)."""
    return identity.public_key().public_bytes_raw()


@dataclass(frozen=True)
class InstructionBinding:
    """What one instruction is for: run, round, message kind and destination node."""

    run_id: int
    round: int
    kind: str
    node_id: int

    def statement(self, content_digest: bytes, nonce: bytes | None = None) -> bytes:
        """The exact bytes signed (before the domain prefix); ``nonce`` (default: 16 fresh random
        bytes) makes each instruction, and so the digest its reply names, unique."""
        return canonical_json(
            {
                "v": 2,
                "type": "instruction",
                "run": self.run_id,
                "round": self.round,
                "kind": self.kind,
                "node": self.node_id,
                "nonce": (os.urandom(16) if nonce is None else nonce).hex(),
                "digest": content_digest.hex(),
            }
        )


def sign_statement(identity: Ed25519PrivateKey, statement: bytes) -> bytes:
    """Ed25519 signature over an instruction statement (:meth:`InstructionBinding.statement`)."""
    return identity.sign(_INSTRUCTION_DOMAIN + statement)


def instruction_digest(statement: bytes) -> bytes:
    """SHA-256 naming one signed instruction; a sealed reply carries it (``SealContext.instruction``)."""
    return hashlib.sha256(_DIGEST_DOMAIN + statement).digest()


def verify_statement(
    statement: bytes,
    signature: bytes,
    *,
    identity_public_key: bytes,
    pin: IdentityPin,
    expected: InstructionBinding,
    content_digest: bytes,
) -> None:
    """Raise :class:`IdentityError` unless the pinned identity signed ``statement`` and it names
    ``expected`` run, round, kind and node and the digest of what arrived (the first field that
    differs is named: another round, a train instruction delivered as evaluate, another node)."""
    key = pin.check(identity_public_key)
    try:
        key.verify(signature, _INSTRUCTION_DOMAIN + statement)
    except InvalidSignature:
        raise IdentityError("instruction signature is invalid (statement or signature altered)", "signature") from None
    fields = parse_canonical_json(statement, "instruction statement")
    if not isinstance(fields, dict) or set(fields) != _INSTRUCTION_FIELDS or fields["v"] != 2:
        raise IdentityError(f"instruction statement fields must be {sorted(_INSTRUCTION_FIELDS)}, v 2", "signature")
    wanted = {"run": expected.run_id, "round": expected.round, "kind": expected.kind, "node": expected.node_id}
    for name, value in wanted.items():
        if fields[name] != value or type(fields[name]) is not type(value):
            raise IdentityError(
                f"instruction was signed for {name} {fields[name]!r}, but arrived as {name} {value!r} "
                "(replayed, redirected or relabelled)",
                "signature",
            )
    if fields["digest"] != content_digest.hex():
        raise IdentityError(
            f"instruction content does not match its signature (run {expected.run_id} round {expected.round}): "
            "the model or its config was altered",
            "signature",
        )


def _unhex(value: Any, what: str) -> bytes:
    try:
        return bytes.fromhex(value)
    except (TypeError, ValueError):
        raise IdentityError(f"{what} is not hex", "announcement") from None

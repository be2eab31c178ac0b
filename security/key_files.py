"""Private key files, optionally encrypted with a passphrase, and handing them to Flower.

Without a passphrase a TLS or CA key is written as PKCS#8 PEM and a SuperNode key in OpenSSH
format, unencrypted, as Flower reads them. With one, every such key is written as an encrypted
PKCS#8 PEM (``-----BEGIN ENCRYPTED PRIVATE KEY-----``): ``cryptography``'s
``BestAvailableEncryption``, today PBES2 (RFC 8018) with PBKDF2-HMAC-SHA256 at 2048 iterations and
AES-256-CBC. That iteration count is low, so the passphrase must be random, not a word: fedvault
refuses one shorter than :data:`MIN_PASSPHRASE` characters (``openssl rand -base64 24`` makes one).

Flower's processes read their keys from a path and know no passphrase (``flower-superlink
--ssl-keyfile``, ``flower-supernode --auth-supernode-private-key``). :func:`plain_key_file`
therefore decrypts an encrypted key in fedvault's process and writes the plain key into an
anonymous in-memory file (Linux ``memfd_create(2)``), passed to the child as an inherited file
descriptor and named ``/proc/self/fd/N``: the decrypted key never touches a disk and disappears
with the processes holding it.

The passphrase comes from ``--passphrase-file FILE`` (its content, one trailing newline removed)
or else the environment variable :data:`PASSPHRASE_ENV`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from fedvault.errors import FedvaultError

PASSPHRASE_ENV = "FEDVAULT_KEY_PASSPHRASE"
MIN_PASSPHRASE = 16
_ENCRYPTED_PEM = b"-----BEGIN ENCRYPTED PRIVATE KEY-----"
_OPENSSH_PEM = b"-----BEGIN OPENSSH PRIVATE KEY-----"


class KeysError(FedvaultError, ValueError):
    """Key material is missing, would be overwritten, or an address/argument is invalid."""


def read_passphrase(file: str | Path | None, environ: Mapping[str, str] | None = None) -> bytes | None:
    """The passphrase from ``file`` (one trailing newline removed), else ``$FEDVAULT_KEY_PASSPHRASE``,
    else None. An unreadable or empty file is a :class:`KeysError`."""
    if file is not None:
        path = Path(file).expanduser()
        try:
            text = path.read_bytes()
        except OSError as err:
            raise KeysError(f"cannot read passphrase file {path}: {err.strerror}") from None
        passphrase = text.removesuffix(b"\n").removesuffix(b"\r")
        if not passphrase:
            raise KeysError(f"passphrase file {path} is empty")
        return passphrase
    value = (os.environ if environ is None else environ).get(PASSPHRASE_ENV)
    return value.encode() if value else None


def check_new_passphrase(passphrase: bytes | None) -> None:
    """Refuse a passphrase too short to encrypt new keys with (see the module docstring)."""
    if passphrase is not None and len(passphrase) < MIN_PASSPHRASE:
        raise KeysError(
            f"passphrase has {len(passphrase)} characters; use at least {MIN_PASSPHRASE} random ones "
            "(e.g. openssl rand -base64 24 > FILE): the key files' PBKDF2 uses only 2048 iterations"
        )


def private_key_bytes(key: PrivateKeyTypes, passphrase: bytes | None, *, openssh: bool = False) -> bytes:
    """``key`` as a file: encrypted PKCS#8 PEM with a passphrase, else plain OpenSSH (``openssh``,
    for SuperNode keys) or plain PKCS#8 PEM."""
    pem = serialization.Encoding.PEM
    if passphrase is not None:
        encryption = serialization.BestAvailableEncryption(passphrase)
        return key.private_bytes(pem, serialization.PrivateFormat.PKCS8, encryption)
    plain = serialization.PrivateFormat.OpenSSH if openssh else serialization.PrivateFormat.PKCS8
    return key.private_bytes(pem, plain, serialization.NoEncryption())


def is_encrypted(path: Path) -> bool:
    """True when ``path`` holds an encrypted PKCS#8 PEM key."""
    try:
        with open(path, "rb") as handle:
            return handle.read(len(_ENCRYPTED_PEM)) == _ENCRYPTED_PEM
    except OSError as err:
        raise KeysError(f"cannot read key file {path}: {err.strerror}") from None


def load_private_key(path: Path, passphrase: bytes | None) -> PrivateKeyTypes:
    """Load a key written by :func:`private_key_bytes`; :class:`KeysError` naming ``path`` when it
    is encrypted and no passphrase was given, the passphrase is wrong, or it is no key at all. A
    passphrase given for an unencrypted key is not needed and not used."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise KeysError(f"cannot read key file {path}: {err.strerror}") from None
    encrypted = data.startswith(_ENCRYPTED_PEM)
    if encrypted and passphrase is None:
        raise KeysError(f"{path} is encrypted: give its passphrase with --passphrase-file FILE or ${PASSPHRASE_ENV}")
    password = passphrase if encrypted else None
    try:
        if data.startswith(_OPENSSH_PEM):
            return serialization.load_ssh_private_key(data, password)
        return serialization.load_pem_private_key(data, password)
    except ValueError as err:
        if encrypted and "password" in str(err).lower():
            raise KeysError(f"wrong passphrase for {path}") from None
        raise KeysError(f"{path} is not a private key file ({err})") from None
    except (TypeError, UnsupportedAlgorithm) as err:
        raise KeysError(f"{path} is not a private key file ({err})") from None


@dataclass
class PlainKey:
    """A private key as a child process can read it: ``path``, plus the descriptor ``fd`` the
    child must inherit (``pass_fds``) when ``path`` is an in-memory copy (None: a file on disk)."""

    path: Path
    fd: int | None = None

    @property
    def pass_fds(self) -> tuple[int, ...]:
        return () if self.fd is None else (self.fd,)

    def close(self) -> None:
        """Release the in-memory copy (the children that inherited it keep theirs)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def plain_key_file(path: Path, passphrase: bytes | None, *, openssh: bool = False) -> PlainKey:
    """``path`` itself when it is not encrypted; else the key decrypted with ``passphrase`` into an
    in-memory file named ``/proc/self/fd/N`` (``openssh``: in OpenSSH format, for
    ``flower-supernode``; else PKCS#8 PEM). The same path works in this process and in a child
    started with ``pass_fds=plain.pass_fds``. Call :meth:`PlainKey.close` when the children are
    started or stopped."""
    if not is_encrypted(path):
        return PlainKey(path)
    key = load_private_key(path, passphrase)
    if not hasattr(os, "memfd_create"):
        raise KeysError(f"{path} is encrypted, and handing a decrypted key to Flower needs Linux (memfd_create)")
    fd = os.memfd_create("fedvault-key", os.MFD_CLOEXEC)  # inherited only where pass_fds names it
    try:
        data = private_key_bytes(key, None, openssh=openssh)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    except BaseException:
        os.close(fd)
        raise
    return PlainKey(Path(f"/proc/self/fd/{fd}"), fd)

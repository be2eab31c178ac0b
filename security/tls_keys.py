"""Key material for a TLS-protected, node-authenticated Flower deployment.

``init_keys`` makes, with the ``cryptography`` package, everything ``fedvault server`` and
``fedvault client`` need, in one directory::

    ca.pem                  CA certificate (self-signed). Every client machine needs it.
    ca.key                  CA private key (0600). Keep it offline; only needed to issue more.
    server.pem              SuperLink TLS certificate, signed by the CA, SANs = server addresses.
    server.key              SuperLink TLS private key (0600).
    clients/client-<i>.key  SuperNode authentication private key, OpenSSH format (0600), i = 1..N.
    clients/client-<i>.pub  Its public key (``ecdsa-sha2-nistp384 ...``), registered on the server.

Protocol (Flower 1.41): the SuperLink serves HTTPS with ``server.pem`` (X.509, RFC 5280; the
subject alternative names are matched by clients as in RFC 6125); SuperNodes verify it against
``ca.pem`` (``--root-certificates``; server authentication only, no mTLS). Each SuperNode proves
its identity by signing a timestamp with ECDSA over a NIST curve (FIPS 186-4; Flower accepts only
NIST curves, ``flwr.supercore.primitives.asymmetric.uses_nist_ec_curve``); the SuperLink accepts
only public keys registered with ``flwr supernode register``. All keys are ECDSA P-384.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedvault.atomic import atomic_write
from fedvault.errors import FedvaultError

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
CLIENTS_DIR = "clients"
LOCAL_ADDRESSES = ("localhost", "127.0.0.1", "::1")
CA_VALIDITY = datetime.timedelta(days=3650)
SERVER_VALIDITY = datetime.timedelta(days=825)
CLOCK_SKEW = datetime.timedelta(hours=1)
_CURVE = ec.SECP384R1
_SIGNATURE_HASH = hashes.SHA384
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_NAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*\.?$")
_CLIENT_KEY = re.compile(r"^client-([1-9][0-9]*)\.pub$")


class KeysError(FedvaultError, ValueError):
    """Key material is missing, would be overwritten, or an address/argument is invalid."""


def client_key_name(index: int) -> str:
    """File stem of client ``index`` (1-based): ``client-<index>``."""
    return f"client-{index}"


@dataclass(frozen=True)
class KeyLayout:
    """Paths of the files in a keys directory (see the module docstring)."""

    directory: Path

    @property
    def ca_cert(self) -> Path:
        return self.directory / CA_CERT

    @property
    def ca_key(self) -> Path:
        return self.directory / CA_KEY

    @property
    def server_cert(self) -> Path:
        return self.directory / SERVER_CERT

    @property
    def server_key(self) -> Path:
        return self.directory / SERVER_KEY

    def client_key(self, index: int) -> Path:
        """Private key of client ``index`` (1-based)."""
        return self.directory / CLIENTS_DIR / f"{client_key_name(index)}.key"

    def client_public_key(self, index: int) -> Path:
        """Public key of client ``index`` (1-based)."""
        return self.directory / CLIENTS_DIR / f"{client_key_name(index)}.pub"

    def client_public_keys(self) -> list[Path]:
        """Every ``clients/client-<i>.pub`` present, ordered by ``i``."""
        folder = self.directory / CLIENTS_DIR
        if not folder.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CLIENT_KEY.match(p.name))]
        return [path for _, path in sorted(found)]


def load_layout(directory: str | Path, *, server: bool = False, client: int | None = None) -> KeyLayout:
    """Return the layout of ``directory``, checking the files a role needs exist.

    Every role needs ``ca.pem``. ``server=True`` also needs ``server.pem``, ``server.key`` and at
    least one ``clients/client-<i>.pub``; ``client=i`` needs ``clients/client-<i>.key``.
    Raises :class:`KeysError` naming the first missing file.
    """
    layout = KeyLayout(Path(directory).expanduser().resolve())
    if not layout.directory.is_dir():
        raise KeysError(f"keys directory {layout.directory} does not exist (create it with 'fedvault keys')")
    needed = [layout.ca_cert]
    if server:
        needed += [layout.server_cert, layout.server_key]
    if client is not None:
        if client < 1:
            raise KeysError(f"client index must be >= 1, got {client}")
        needed.append(layout.client_key(client))
    for path in needed:
        if not path.is_file():
            raise KeysError(f"missing key file {path} (create it with 'fedvault keys')")
    if server and not layout.client_public_keys():
        folder = layout.directory / CLIENTS_DIR
        raise KeysError(f"no client public keys in {folder} (create them with 'fedvault keys')")
    return layout


def init_keys(
    directory: str | Path, clients: int, server_addresses: Iterable[str] = (), overwrite: bool = False
) -> KeyLayout:
    """Create a CA, a server TLS certificate and ``clients`` SuperNode key pairs in ``directory``.

    ``server_addresses`` are the DNS names or IP addresses clients will dial (no port); localhost,
    127.0.0.1 and ::1 are always added. All files are checked before any is written: an existing
    one raises :class:`KeysError` naming it unless ``overwrite=True`` (which also deletes client
    keys numbered above ``clients``, so a server never registers a stale key). Each file is
    written to a temporary file and renamed into place; private keys are created with mode 0600.
    """
    if clients < 1:
        raise KeysError(f"number of clients must be >= 1, got {clients}")
    sans = _subject_alternative_names([*LOCAL_ADDRESSES, *server_addresses])
    layout = KeyLayout(Path(directory).expanduser().resolve())
    files = _generate(layout, clients, sans)
    if not overwrite:
        for path in files:
            if path.exists():
                raise KeysError(f"key file {path} already exists (pass overwrite to replace it)")
    (layout.directory / CLIENTS_DIR).mkdir(mode=0o700, parents=True, exist_ok=True)
    for path, (content, private) in files.items():
        mode = 0o600 if private else 0o644  # temp file is created 0600 (mkstemp), then chmod'ed
        atomic_write(path, partial(_write_bytes, content), mode)  # partial binds this iteration's content
    for stale in layout.client_public_keys()[clients:]:  # left by an earlier, larger init
        stale.with_suffix(".key").unlink(missing_ok=True)
        stale.unlink()
    return layout


def _write_bytes(data: bytes, handle: IO[bytes]) -> None:
    """An :func:`atomic_write` callback that writes ``data``."""
    handle.write(data)


def _generate(layout: KeyLayout, clients: int, sans: x509.SubjectAlternativeName) -> dict[Path, tuple[bytes, bool]]:
    """Every file of the layout as ``path -> (content, is_private)``, generated in memory."""
    pem = serialization.Encoding.PEM
    ca_key = ec.generate_private_key(_CURVE())
    ca_cert = _ca_certificate(ca_key)
    server_key = ec.generate_private_key(_CURVE())
    server_cert = _server_certificate(server_key, ca_key, ca_cert, sans)
    files = {
        layout.ca_cert: (ca_cert.public_bytes(pem), False),
        layout.ca_key: (_pkcs8(ca_key), True),
        layout.server_cert: (server_cert.public_bytes(pem), False),
        layout.server_key: (_pkcs8(server_key), True),
    }
    for index in range(1, clients + 1):
        key = ec.generate_private_key(_CURVE())
        private = key.private_bytes(pem, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        comment = f" fedvault-{client_key_name(index)}\n".encode()
        files[layout.client_key(index)] = (private, True)
        files[layout.client_public_key(index)] = (public + comment, False)
    return files


def _subject_alternative_names(addresses: Iterable[str]) -> x509.SubjectAlternativeName:
    """DNS names and IP addresses, deduplicated, in the order given; bad entries raise KeysError."""
    names: list[x509.GeneralName] = []
    for raw in addresses:
        address = raw.strip()
        if address.startswith("[") and address.endswith("]"):
            address = address[1:-1]
        try:
            name: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(address))
        except ValueError:
            if not _DNS_NAME.match(address) or address.replace(".", "").isdigit():
                raise KeysError(
                    f"server address {raw!r} is not a DNS name or IP address (give a host without scheme or port)"
                ) from None
            name = x509.DNSName(address.rstrip(".").lower())
        if name not in names:
            names.append(name)
    return x509.SubjectAlternativeName(names)


def _ca_certificate(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    """Self-signed CA certificate (RFC 5280 section 4.2.1.9: cA=TRUE, pathLen=0)."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedvault CA")])
    now = datetime.datetime.now(datetime.UTC)
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, _SIGNATURE_HASH())
    )


def _server_certificate(
    key: ec.EllipticCurvePrivateKey,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    sans: x509.SubjectAlternativeName,
) -> x509.Certificate:
    """TLS server certificate for the SuperLink, signed by the CA (serverAuth, the given SANs)."""
    now = datetime.datetime.now(datetime.UTC)
    first = sans[0].value
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"fedvault SuperLink {first}")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + SERVER_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(sans, critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, _SIGNATURE_HASH())
    )


def _pkcs8(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )

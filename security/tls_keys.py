"""Key material for a TLS-protected, node-authenticated Flower deployment, kept apart by who needs it.

``init_keys(DIR, N)`` makes, with the ``cryptography`` package, one folder per party::

    DIR/ca/ca.key, ca.pem          the CA. ca.key only issues server certificates (`keys rotate
                                   --server-tls`): it never goes to the server; keep DIR offline
    DIR/server/                    copy this folder, and only it, to the server machine
        ca.pem                     CA certificate
        server.pem, server.key     SuperLink TLS certificate (SANs = server addresses) and its key
        identity.key, identity.pub server identity (`fedvault keys init` adds it; not init_keys)
        clients/client-<i>.pub     SuperNode public keys: `fedvault server` registers them
        revoked_keys               public keys it never registers and unregisters at start
    DIR/clients/client-<i>/        copy to client machine i
        ca.pem, identity.pub       what the client trusts: the CA and the server identity it pins
        client-<i>.key, .pub       its SuperNode key pair

Every folder is 0700, every private key 0600 and every public file 0644. With a passphrase the
private keys are encrypted (:mod:`fedvault.security.key_files`). ``load_server_keys`` refuses a
folder that holds ``ca.key`` or a client's private key: a compromised server then cannot issue
certificates or act as a client.

``revoked_keys`` holds one OpenSSH public key per line, as sshd's ``RevokedKeys`` file
(sshd_config(5)); a key is identified by its type and base64 body, the comment
(``fedvault-client-<i>``) names the client. ``rotate_client_key`` gives client i a new key pair and
revokes the old public key; ``revoke_client`` revokes client i's key and removes it from
``server/clients``; ``rotate_server_tls`` issues a new server key and certificate from the CA.

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
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedvault.atomic import atomic_write
from fedvault.security.identity import IDENTITY_KEY, IDENTITY_PUB
from fedvault.security.key_files import KeysError, check_new_passphrase, load_private_key, private_key_bytes

__all__ = ["KeysError"]  # re-exported: callers catch it from here

CA_DIR = "ca"
SERVER_DIR = "server"
CLIENTS_DIR = "clients"
CA_CERT = "ca.pem"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
REVOKED_KEYS = "revoked_keys"
LOCAL_ADDRESSES = ("localhost", "127.0.0.1", "::1")
CA_VALIDITY = datetime.timedelta(days=3650)
SERVER_VALIDITY = datetime.timedelta(days=825)
CLOCK_SKEW = datetime.timedelta(hours=1)
_CURVE = ec.SECP384R1
_SIGNATURE_HASH = hashes.SHA384
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_NAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*\.?$")
_CLIENT_PUB = re.compile(r"^client-([1-9][0-9]*)\.pub$")
_CLIENT_DIR = re.compile(r"^client-([1-9][0-9]*)$")
_CLIENT_KEY = re.compile(r"^client-[1-9][0-9]*\.key$")


def client_key_name(index: int) -> str:
    """File stem of client ``index`` (1-based): ``client-<index>``."""
    return f"client-{index}"


@dataclass(frozen=True)
class ServerKeys:
    """The server's folder (``DIR/server``): what ``fedvault server`` reads."""

    directory: Path

    @property
    def ca_cert(self) -> Path:
        return self.directory / CA_CERT

    @property
    def server_cert(self) -> Path:
        return self.directory / SERVER_CERT

    @property
    def server_key(self) -> Path:
        return self.directory / SERVER_KEY

    @property
    def identity_key(self) -> Path:
        return self.directory / IDENTITY_KEY

    @property
    def identity_pub(self) -> Path:
        return self.directory / IDENTITY_PUB

    @property
    def revoked_keys(self) -> Path:
        return self.directory / REVOKED_KEYS

    def client_public_key(self, index: int) -> Path:
        """Public key of client ``index`` (1-based), as the server registers it."""
        return self.directory / CLIENTS_DIR / f"{client_key_name(index)}.pub"

    def client_public_keys(self) -> list[Path]:
        """Every ``clients/client-<i>.pub`` present, ordered by ``i``."""
        folder = self.directory / CLIENTS_DIR
        if not folder.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CLIENT_PUB.match(p.name))]
        return [path for _, path in sorted(found)]

    def revoked(self) -> list[str]:
        """The lines of ``revoked_keys`` (empty when there is none)."""
        return read_revoked(self.revoked_keys)

    def registrable_public_keys(self) -> list[Path]:
        """:meth:`client_public_keys` without the revoked ones: what a server registers."""
        revoked = {key_id(line) for line in self.revoked()}
        return [path for path in self.client_public_keys() if key_id(path.read_text()) not in revoked]


@dataclass(frozen=True)
class ClientKeys:
    """Client ``index``'s folder (``DIR/clients/client-<i>``): what ``fedvault client`` reads."""

    directory: Path
    index: int

    @property
    def ca_cert(self) -> Path:
        return self.directory / CA_CERT

    @property
    def identity_pub(self) -> Path:
        return self.directory / IDENTITY_PUB

    @property
    def private_key(self) -> Path:
        return self.directory / f"{client_key_name(self.index)}.key"

    @property
    def public_key(self) -> Path:
        return self.directory / f"{client_key_name(self.index)}.pub"


@dataclass(frozen=True)
class KeyLayout:
    """The directory ``init_keys`` writes (see the module docstring)."""

    directory: Path

    @property
    def ca_key(self) -> Path:
        return self.directory / CA_DIR / CA_KEY

    @property
    def ca_cert(self) -> Path:
        return self.directory / CA_DIR / CA_CERT

    @property
    def server(self) -> ServerKeys:
        return ServerKeys(self.directory / SERVER_DIR)

    def client(self, index: int) -> ClientKeys:
        """Client ``index``'s folder (1-based)."""
        return ClientKeys(self.directory / CLIENTS_DIR / client_key_name(index), index)

    def client_indices(self) -> list[int]:
        """The ``i`` of every ``clients/client-<i>/`` folder, ascending."""
        folder = self.directory / CLIENTS_DIR
        if not folder.is_dir():
            return []
        return sorted(int(m.group(1)) for p in folder.iterdir() if p.is_dir() and (m := _CLIENT_DIR.match(p.name)))


# ---- revocation list --------------------------------------------------------------------------


def key_id(public_key: str) -> str:
    """``"<type> <base64>"`` of an OpenSSH public key line (the comment is not part of the key)."""
    fields = public_key.split()
    if len(fields) < 2:
        raise KeysError(f"not an OpenSSH public key line: {public_key.strip()[:60]!r}")
    return f"{fields[0]} {fields[1]}"


def read_revoked(path: Path) -> list[str]:
    """The public key lines of a ``revoked_keys`` file (none when it is absent)."""
    if not path.is_file():
        return []
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def add_revoked(path: Path, public_keys: Iterable[str]) -> list[str]:
    """Add ``public_keys`` (OpenSSH lines) to the revocation list ``path``, atomically; return
    those that were not already in it."""
    lines = read_revoked(path)
    known = {key_id(line) for line in lines}
    added = []
    for line in public_keys:
        if key_id(line) not in known:
            known.add(key_id(line))
            added.append(line.strip())
    if added:
        text = "".join(f"{line}\n" for line in [*lines, *added]).encode()
        _write(path, text, private=False)
    return added


# ---- loading ----------------------------------------------------------------------------------


def load_layout(directory: str | Path) -> KeyLayout:
    """The ``init_keys`` directory ``directory``, checking it has its ``server/`` folder."""
    layout = KeyLayout(Path(directory).expanduser().resolve())
    if not layout.server.ca_cert.is_file():
        raise KeysError(
            f"{layout.directory} is not a keys directory from 'fedvault keys init' (no {SERVER_DIR}/{CA_CERT})"
        )
    return layout


def server_part(directory: str | Path) -> ServerKeys:
    """``directory/server`` when ``directory`` is an ``init_keys`` directory, else ``directory``
    itself (a server's copy of that folder); it must hold ``server.pem``."""
    path = Path(directory).expanduser().resolve()
    server = ServerKeys(path / SERVER_DIR) if (path / SERVER_DIR).is_dir() else ServerKeys(path)
    if not server.server_cert.is_file():
        raise KeysError(f"missing key file {server.server_cert} (create it with 'fedvault keys init')")
    return server


def load_server_keys(directory: str | Path, *, allow_private_keys: bool = False) -> ServerKeys:
    """The server folder ``directory``, checking ``ca.pem``, ``server.pem``, ``server.key`` and at
    least one registrable client public key exist. Unless ``allow_private_keys``, refuse a folder
    that holds ``ca.key`` or a client's private key anywhere below it; with it, an ``init_keys``
    directory stands for its ``server/`` folder (one machine runs everything). :class:`KeysError`
    names the first missing or forbidden file."""
    path = Path(directory).expanduser().resolve()
    if allow_private_keys and (path / SERVER_DIR).is_dir():
        path = path / SERVER_DIR
    server = ServerKeys(path)
    if not server.directory.is_dir():
        raise KeysError(f"keys directory {server.directory} does not exist (create it with 'fedvault keys init')")
    if not allow_private_keys:
        forbidden = sorted(
            p for p in server.directory.rglob("*") if p.is_file() and (p.name == CA_KEY or _CLIENT_KEY.match(p.name))
        )
        if forbidden:
            hint = (
                f"--keys {server.directory / SERVER_DIR}"
                if (server.directory / SERVER_DIR).is_dir()
                else "only the server/ folder of 'fedvault keys init'"
            )
            raise KeysError(
                f"keys directory {server.directory} holds {forbidden[0].relative_to(server.directory)}, a key the "
                f"server must not have: give it {hint} (or --allow-ca-and-client-keys)"
            )
    for path in (server.ca_cert, server.server_cert, server.server_key):
        if not path.is_file():
            raise KeysError(f"missing key file {path} (create it with 'fedvault keys init')")
    if not server.registrable_public_keys():
        folder = server.directory / CLIENTS_DIR
        raise KeysError(f"no client public keys (that are not revoked) in {folder} (create them with 'fedvault keys')")
    return server


def client_folder(directory: str | Path, index: int) -> Path:
    """Client ``index``'s folder: ``directory/clients/client-<i>`` when ``directory`` is an
    ``init_keys`` directory (one machine runs everything), else ``directory`` itself."""
    path = Path(directory).expanduser().resolve()
    inner = path / CLIENTS_DIR / client_key_name(index)
    return inner if inner.is_dir() else path


def load_client_keys(directory: str | Path, index: int) -> ClientKeys:
    """Client ``index``'s keys in ``directory`` (its folder, or the ``init_keys`` directory),
    checking ``ca.pem`` and ``client-<i>.key`` exist; :class:`KeysError` names the missing file."""
    if index < 1:
        raise KeysError(f"client index must be >= 1, got {index}")
    keys = ClientKeys(client_folder(directory, index), index)
    if not keys.directory.is_dir():
        raise KeysError(f"keys directory {keys.directory} does not exist (create it with 'fedvault keys init')")
    for path in (keys.ca_cert, keys.private_key):
        if not path.is_file():
            raise KeysError(f"missing key file {path} (create it with 'fedvault keys init')")
    return keys


# ---- making and replacing keys ----------------------------------------------------------------


def init_keys(
    directory: str | Path,
    clients: int,
    server_addresses: Iterable[str] = (),
    overwrite: bool = False,
    passphrase: bytes | None = None,
) -> KeyLayout:
    """Create a CA, a server TLS certificate and ``clients`` SuperNode key pairs in ``directory``.

    ``server_addresses`` are the DNS names or IP addresses clients will dial (no port); localhost,
    127.0.0.1 and ::1 are always added. All files are checked before any is written: an existing
    one raises :class:`KeysError` naming it unless ``overwrite=True``. Overwriting revokes every
    client public key the server folder held (a SuperLink whose database still has them registered
    unregisters them at start) and deletes client folders numbered above ``clients``. Each file is
    written to a temporary file and renamed into place. ``passphrase`` encrypts every private key.
    """
    if clients < 1:
        raise KeysError(f"number of clients must be >= 1, got {clients}")
    check_new_passphrase(passphrase)
    sans = _subject_alternative_names([*LOCAL_ADDRESSES, *server_addresses])
    layout = KeyLayout(Path(directory).expanduser().resolve())
    files = _generate(layout, clients, sans, passphrase)
    if not overwrite:
        for path in files:
            if path.exists():
                raise KeysError(f"key file {path} already exists (pass overwrite to replace it)")
    old_keys = [path.read_text() for path in layout.server.client_public_keys()]
    for folder in sorted({layout.directory, layout.directory / CLIENTS_DIR, *(path.parent for path in files)}):
        _private_dir(folder)
    if old_keys:
        add_revoked(layout.server.revoked_keys, old_keys)
    for path, (content, private) in files.items():
        _write(path, content, private)
    for index in layout.client_indices():
        if index > clients:  # left by an earlier, larger init (its public key is revoked above)
            shutil.rmtree(layout.client(index).directory)
    for stale in layout.server.client_public_keys()[clients:]:
        stale.unlink()
    return layout


def share_identity(layout: KeyLayout) -> None:
    """Copy ``server/identity.pub`` into every client folder (the pin ``fedvault client`` uses)."""
    public = layout.server.identity_pub.read_bytes()
    for index in layout.client_indices():
        _write(layout.client(index).identity_pub, public, private=False)


def rotate_client_key(layout: KeyLayout, index: int, passphrase: bytes | None = None) -> str | None:
    """Give client ``index`` a new SuperNode key pair (a new client when it had none).

    Writes ``clients/client-<i>/`` (key pair, ``ca.pem``, ``identity.pub``) and
    ``server/clients/client-<i>.pub``; the old public key, if any, is added to ``revoked_keys``
    first and returned. ``passphrase`` encrypts the new private key.
    """
    if index < 1:
        raise KeysError(f"client index must be >= 1, got {index}")
    check_new_passphrase(passphrase)
    server, client = layout.server, layout.client(index)
    old_path = server.client_public_key(index)
    old = old_path.read_text().strip() if old_path.is_file() else None
    private, public = _node_key_pair(index, passphrase)
    _private_dir(client.directory)
    _private_dir(old_path.parent)
    if old is not None:
        add_revoked(server.revoked_keys, [old])
    _write(client.private_key, private, private=True)
    _write(client.public_key, public, private=False)
    _write(client.ca_cert, server.ca_cert.read_bytes(), private=False)
    if server.identity_pub.is_file():
        _write(client.identity_pub, server.identity_pub.read_bytes(), private=False)
    _write(old_path, public, private=False)
    return old


def rotate_server_tls(
    layout: KeyLayout, server_addresses: Iterable[str] = (), passphrase: bytes | None = None
) -> ServerKeys:
    """A new SuperLink TLS key and certificate, signed with ``ca/ca.key`` (decrypted with
    ``passphrase`` when encrypted; the new key is encrypted with it when given), for the names of
    the current certificate plus ``server_addresses``."""
    if not layout.ca_key.is_file():
        raise KeysError(f"missing CA key {layout.ca_key}: a server certificate can only be issued where the CA is")
    check_new_passphrase(passphrase)
    ca_key = load_private_key(layout.ca_key, passphrase)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise KeysError(f"{layout.ca_key} is not an EC key")
    ca_cert = x509.load_pem_x509_certificate(layout.ca_cert.read_bytes())
    server = layout.server
    names = list(LOCAL_ADDRESSES)
    if server.server_cert.is_file():
        current = x509.load_pem_x509_certificate(server.server_cert.read_bytes())
        sans = current.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names += [str(name.value) for name in sans]
    sans = _subject_alternative_names([*names, *server_addresses])
    key = ec.generate_private_key(_CURVE())
    cert = _server_certificate(key, ca_key, ca_cert, sans)
    _write(server.server_key, private_key_bytes(key, passphrase), private=True)
    _write(server.server_cert, cert.public_bytes(serialization.Encoding.PEM), private=False)
    return server


def revoke_client(server: ServerKeys, index: int) -> tuple[list[str], bool]:
    """Revoke client ``index``: add its public key to ``revoked_keys`` and remove its ``.pub`` from
    ``server/clients``. Returns every revoked key of that client (older, rotated keys included)
    and whether this call revoked one; :class:`KeysError` when it has no key, revoked or not."""
    path = server.client_public_key(index)
    newly = False
    if path.is_file():
        newly = bool(add_revoked(server.revoked_keys, [path.read_text()]))
        path.unlink()
    comment = f"fedvault-{client_key_name(index)}"
    lines = [line for line in server.revoked() if comment in line.split()[2:]]
    if not lines:
        raise KeysError(f"client {index} has no key in {path.parent} and none in {server.revoked_keys}")
    return lines, newly


def _private_dir(path: Path) -> None:
    """Create ``path`` (and missing parents) as 0700, and make it 0700 if it exists."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def _write(path: Path, content: bytes, private: bool) -> None:
    """Write ``content`` atomically; 0600 when ``private``, else 0644 (created 0600, then chmod'ed)."""
    atomic_write(path, lambda handle: handle.write(content), 0o600 if private else 0o644)


def _node_key_pair(index: int, passphrase: bytes | None) -> tuple[bytes, bytes]:
    """A SuperNode key: (private key file, ``<type> <base64> fedvault-client-<i>`` public line)."""
    key = ec.generate_private_key(_CURVE())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private_key_bytes(key, passphrase, openssh=True), public + f" fedvault-{client_key_name(index)}\n".encode()


def _generate(
    layout: KeyLayout, clients: int, sans: x509.SubjectAlternativeName, passphrase: bytes | None
) -> dict[Path, tuple[bytes, bool]]:
    """Every file of the layout as ``path -> (content, is_private)``, generated in memory."""
    pem = serialization.Encoding.PEM
    ca_key = ec.generate_private_key(_CURVE())
    ca_certificate = _ca_certificate(ca_key)
    ca_cert = ca_certificate.public_bytes(pem)
    server_key = ec.generate_private_key(_CURVE())
    server_cert = _server_certificate(server_key, ca_key, ca_certificate, sans)
    server = layout.server
    files = {
        layout.ca_key: (private_key_bytes(ca_key, passphrase), True),
        layout.ca_cert: (ca_cert, False),
        server.ca_cert: (ca_cert, False),
        server.server_cert: (server_cert.public_bytes(pem), False),
        server.server_key: (private_key_bytes(server_key, passphrase), True),
    }
    for index in range(1, clients + 1):
        private, public = _node_key_pair(index, passphrase)
        client = layout.client(index)
        files[client.ca_cert] = (ca_cert, False)
        files[client.private_key] = (private, True)
        files[client.public_key] = (public, False)
        files[server.client_public_key(index)] = (public, False)
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

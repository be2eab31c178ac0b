"""fedvault.security.tls_keys: the CA, server certificate and SuperNode keys work with TLS and with Flower."""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import ssl
import stat
import threading

import pytest
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from flwr.cli.supernode.register import try_load_public_key
from flwr.supercore.primitives.asymmetric import public_key_to_bytes, uses_nist_ec_curve
from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

from fedvault.security.tls_keys import KeysError, init_keys, load_layout


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    return init_keys(tmp_path_factory.mktemp("keys") / "k", 3, ["fl.example.org", "10.1.2.3", "[2001:db8::7]"])


def test_layout_files_and_modes(layout):
    private = [layout.ca_key, layout.server_key] + [layout.client_key(i) for i in (1, 2, 3)]
    public = [layout.ca_cert, layout.server_cert] + [layout.client_public_key(i) for i in (1, 2, 3)]
    assert all(_mode(path) == 0o600 for path in private), {p.name: oct(_mode(p)) for p in private}
    assert all(_mode(path) == 0o644 for path in public)
    assert layout.client_public_keys() == [layout.client_public_key(i) for i in (1, 2, 3)]
    assert not list(layout.directory.rglob("*.tmp"))  # no temp file left behind
    assert load_layout(layout.directory, server=True) == layout
    assert (
        load_layout(layout.directory, client=2)
        .client_key(2)
        .read_bytes()
        .startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    )


def test_private_keys_are_0600_even_with_a_permissive_umask(tmp_path):
    previous = os.umask(0)
    try:
        keys = init_keys(tmp_path / "k", 1)
    finally:
        os.umask(previous)
    assert _mode(keys.server_key) == _mode(keys.ca_key) == _mode(keys.client_key(1)) == 0o600


def test_existing_keys_are_never_overwritten_without_the_flag(tmp_path):
    keys = init_keys(tmp_path / "k", 3)
    before = {p: p.read_bytes() for p in keys.directory.rglob("*") if p.is_file()}
    with pytest.raises(KeysError, match=r"ca\.pem already exists"):
        init_keys(tmp_path / "k", 3)
    assert {p: p.read_bytes() for p in keys.directory.rglob("*") if p.is_file()} == before

    again = init_keys(tmp_path / "k", 2, overwrite=True)
    assert again.ca_cert.read_bytes() != before[keys.ca_cert]
    assert again.client_key(1).read_bytes() != before[keys.client_key(1)]
    assert _mode(again.client_key(1)) == 0o600
    # client-3 of the old CA must not be registered by a server any more
    assert again.client_public_keys() == [again.client_public_key(1), again.client_public_key(2)]
    assert not again.client_key(3).exists()


def test_server_certificate_names_every_address(layout):
    cert = x509.load_pem_x509_certificate(layout.server_cert.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {"localhost", "fl.example.org"}
    assert set(sans.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address(a) for a in ("127.0.0.1", "::1", "10.1.2.3", "2001:db8::7")
    }


def test_server_certificate_verifies_against_the_ca_only_for_its_names(layout):
    ca = x509.load_pem_x509_certificate(layout.ca_cert.read_bytes())
    leaf = x509.load_pem_x509_certificate(layout.server_cert.read_bytes())
    builder = PolicyBuilder().store(Store([ca]))
    for name in (
        x509.DNSName("localhost"),
        x509.DNSName("fl.example.org"),
        x509.IPAddress(ipaddress.ip_address("10.1.2.3")),
    ):
        chain = builder.build_server_verifier(name).verify(leaf, [])
        assert chain[-1] == ca
    with pytest.raises(VerificationError):
        builder.build_server_verifier(x509.DNSName("other.example.org")).verify(leaf, [])
    other_ca = x509.load_pem_x509_certificate(init_keys(layout.directory.parent / "other", 1).ca_cert.read_bytes())
    with pytest.raises(VerificationError):
        PolicyBuilder().store(Store([other_ca])).build_server_verifier(x509.DNSName("localhost")).verify(leaf, [])


def test_tls_handshake_with_python_ssl(layout):
    """What Flower's HTTPS stack (uvicorn server, httpx client) does, on a loopback socket."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(layout.server_cert, layout.server_key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve(n: int) -> None:
        for _ in range(n):
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"ok")
            except (ssl.SSLError, OSError):
                pass

    thread = threading.Thread(target=serve, args=(2,), daemon=True)
    thread.start()
    try:
        client_ctx = ssl.create_default_context(cafile=str(layout.ca_cert))
        with client_ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="127.0.0.1") as tls:
            assert tls.recv(2) == b"ok"
        system_ctx = ssl.create_default_context()  # without the fedvault CA
        with pytest.raises(ssl.SSLCertVerificationError):
            system_ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="127.0.0.1")
    finally:
        thread.join(5)
        listener.close()


def test_client_keys_load_with_flowers_own_loaders(layout):
    for index in (1, 2, 3):
        # what flower-supernode --auth-supernode-private-key does
        loaded = _try_setup_client_authentication(
            argparse.Namespace(auth_supernode_private_key=str(layout.client_key(index)), auth_supernode_public_key=None)
        )
        assert loaded is not None
        _, public = loaded
        assert uses_nist_ec_curve(public)
        # what flwr supernode register does with the .pub; it must be the same key
        assert try_load_public_key(layout.client_public_key(index)) == public_key_to_bytes(public)
    keys = {layout.client_public_key(i).read_bytes().split()[1] for i in (1, 2, 3)}
    assert len(keys) == 3  # distinct key pairs


@pytest.mark.parametrize("address", ["https://fl.example.org", "fl.example.org:8000", "a b", "1.2.3"])
def test_bad_server_address_is_refused_before_writing(tmp_path, address):
    with pytest.raises(KeysError, match="is not a DNS name or IP address"):
        init_keys(tmp_path / "k", 1, [address])
    assert not (tmp_path / "k").exists()


def test_load_layout_names_what_is_missing(tmp_path, layout):
    with pytest.raises(KeysError, match="does not exist"):
        load_layout(tmp_path / "nowhere")
    with pytest.raises(KeysError, match=r"client-9\.key"):
        load_layout(layout.directory, client=9)
    (tmp_path / "only-ca").mkdir()
    (tmp_path / "only-ca" / "ca.pem").write_bytes(layout.ca_cert.read_bytes())
    assert load_layout(tmp_path / "only-ca").ca_cert.is_file()  # enough for a client's CA
    with pytest.raises(KeysError, match=r"server\.pem"):
        load_layout(tmp_path / "only-ca", server=True)
    with pytest.raises(KeysError, match=">= 1"):
        init_keys(tmp_path / "zero", 0)

"""fedvault.security.tls_keys and key_files: the CA, server certificate and SuperNode keys work with TLS
and with Flower, sit in one folder per party, can be encrypted, rotated and revoked; `keys revoke`
removes a client from a live federation (the integration test at the end)."""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import shutil
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from deploy_helpers import READY, Processes, client_args, run_cli
from flwr.cli.supernode.register import try_load_public_key
from flwr.supercore.primitives.asymmetric import public_key_to_bytes, uses_nist_ec_curve
from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication
from waits import seconds

from fedvault.deploy.processes import free_port, wait_for_log
from fedvault.deploy.superlink import CONNECTION_NAME, Connection, list_nodes
from fedvault.security.key_files import (
    PASSPHRASE_ENV,
    check_new_passphrase,
    load_private_key,
    plain_key_file,
    read_passphrase,
)
from fedvault.security.tls_keys import (
    KeysError,
    init_keys,
    key_id,
    load_client_keys,
    load_layout,
    load_server_keys,
    revoke_client,
    rotate_client_key,
    rotate_server_tls,
    server_part,
)

PASSPHRASE = b"correct horse battery staple"


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    return init_keys(tmp_path_factory.mktemp("keys") / "k", 3, ["fl.example.org", "10.1.2.3", "[2001:db8::7]"])


def test_layout_files_and_modes(layout):
    server, clients = layout.server, [layout.client(i) for i in (1, 2, 3)]
    private = [layout.ca_key, server.server_key] + [c.private_key for c in clients]
    public = [layout.ca_cert, server.ca_cert, server.server_cert] + [server.client_public_key(i) for i in (1, 2, 3)]
    public += [c.ca_cert for c in clients] + [c.public_key for c in clients]
    assert all(_mode(path) == 0o600 for path in private), {p.name: oct(_mode(p)) for p in private}
    assert all(_mode(path) == 0o644 for path in public)
    folders = [p for p in layout.directory.rglob("*") if p.is_dir()] + [layout.directory]
    assert all(_mode(path) == 0o700 for path in folders), {str(p): oct(_mode(p)) for p in folders}
    assert {p for p in layout.directory.rglob("*") if p.is_file()} == {*private, *public}
    # what each party gets: the server no CA key and no client key; a client only its own key
    assert sorted(p.name for p in server.directory.rglob("*.key")) == ["server.key"]
    assert sorted(p.name for p in clients[1].directory.rglob("*.key")) == ["client-2.key"]
    assert server.client_public_keys() == [server.client_public_key(i) for i in (1, 2, 3)]
    assert server.registrable_public_keys() == server.client_public_keys() and server.revoked() == []
    assert load_server_keys(server.directory) == server == server_part(layout.directory)
    assert load_client_keys(layout.directory, 2) == clients[1] == load_client_keys(clients[1].directory, 2)
    assert clients[1].private_key.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    assert clients[1].public_key.read_bytes() == server.client_public_key(2).read_bytes()
    assert load_layout(layout.directory) == layout and layout.client_indices() == [1, 2, 3]


def test_private_keys_are_0600_even_with_a_permissive_umask(tmp_path):
    previous = os.umask(0)
    try:
        keys = init_keys(tmp_path / "k", 1)
    finally:
        os.umask(previous)
    assert _mode(keys.server.server_key) == _mode(keys.ca_key) == _mode(keys.client(1).private_key) == 0o600
    assert _mode(keys.directory / "clients") == _mode(keys.server.directory) == 0o700


def test_existing_keys_are_never_overwritten_without_the_flag(tmp_path):
    keys = init_keys(tmp_path / "k", 3)
    before = {p: p.read_bytes() for p in keys.directory.rglob("*") if p.is_file()}
    with pytest.raises(KeysError, match=r"ca\.key already exists"):
        init_keys(tmp_path / "k", 3)
    assert {p: p.read_bytes() for p in keys.directory.rglob("*") if p.is_file()} == before

    again = init_keys(tmp_path / "k", 2, overwrite=True)
    assert again.ca_cert.read_bytes() != before[keys.ca_cert]
    assert again.client(1).private_key.read_bytes() != before[keys.client(1).private_key]
    assert _mode(again.client(1).private_key) == 0o600
    # client-3 is gone, and no old key may be registered by a server again (a SuperLink database
    # from before still has them: it unregisters revoked keys at start)
    server = again.server
    assert server.client_public_keys() == [server.client_public_key(1), server.client_public_key(2)]
    assert not again.client(3).directory.exists()
    old = [before[keys.server.client_public_key(i)].decode() for i in (1, 2, 3)]
    assert {key_id(line) for line in server.revoked()} == {key_id(line) for line in old}
    assert server.registrable_public_keys() == server.client_public_keys()


def test_server_refuses_a_folder_that_holds_the_ca_key_or_a_client_key(layout, tmp_path):
    with pytest.raises(KeysError) as caught:
        load_server_keys(layout.directory)
    message = str(caught.value)
    assert "holds ca/ca.key, a key the server must not have" in message
    assert f"--keys {layout.server.directory}" in message and "--allow-ca-and-client-keys" in message
    assert load_server_keys(layout.directory, allow_private_keys=True) == layout.server  # one machine
    copy = tmp_path / "server-copy"
    shutil.copytree(layout.server.directory, copy)
    assert load_server_keys(copy).server_cert == copy / "server.pem"
    shutil.copy(layout.client(1).private_key, copy / "clients")  # an operator's slip
    with pytest.raises(KeysError, match=r"holds clients/client-1\.key"):
        load_server_keys(copy)


def test_passphrase_encrypts_every_private_key_and_loading_needs_it(tmp_path, monkeypatch):
    keys = init_keys(tmp_path / "k", 1, passphrase=PASSPHRASE)
    client = keys.client(1)
    for path in (keys.ca_key, keys.server.server_key, client.private_key):
        assert path.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----"), path
        assert _mode(path) == 0o600
        with pytest.raises(KeysError, match=rf"{path.name} is encrypted: give its passphrase with --passphrase-file"):
            load_private_key(path, None)
        with pytest.raises(KeysError, match=rf"wrong passphrase for .*{path.name}"):
            load_private_key(path, b"not the passphrase at all")
        assert load_private_key(path, PASSPHRASE) is not None
    # Flower gets the plain key through an in-memory file, never a decrypted file on disk
    plain = plain_key_file(client.private_key, PASSPHRASE, openssh=True)
    try:
        assert str(plain.path) == f"/proc/self/fd/{plain.fd}" and plain.pass_fds == (plain.fd,)
        loaded = _try_setup_client_authentication(
            argparse.Namespace(auth_supernode_private_key=str(plain.path), auth_supernode_public_key=None)
        )
        assert loaded is not None
        assert try_load_public_key(keys.server.client_public_key(1)) == public_key_to_bytes(loaded[1])
    finally:
        plain.close()
    files = {p: p.read_bytes() for p in keys.directory.rglob("*") if p.is_file()}
    assert not any(b"-----BEGIN OPENSSH PRIVATE KEY-----" in data for data in files.values())
    unencrypted = init_keys(tmp_path / "plain", 1)
    assert plain_key_file(unencrypted.client(1).private_key, None).path == unencrypted.client(1).private_key
    # where the passphrase comes from, and what is refused
    (tmp_path / "pass").write_bytes(PASSPHRASE + b"\n")
    monkeypatch.setenv(PASSPHRASE_ENV, "from the environment")
    assert read_passphrase(tmp_path / "pass") == PASSPHRASE
    assert read_passphrase(None) == b"from the environment"
    monkeypatch.delenv(PASSPHRASE_ENV)
    assert read_passphrase(None) is None
    (tmp_path / "empty").write_bytes(b"\n")
    with pytest.raises(KeysError, match="is empty"):
        read_passphrase(tmp_path / "empty")
    with pytest.raises(KeysError, match="cannot read passphrase file"):
        read_passphrase(tmp_path / "missing")
    with pytest.raises(KeysError, match="at least 16 random"):
        check_new_passphrase(b"short")
    with pytest.raises(KeysError, match="at least 16 random"):
        init_keys(tmp_path / "weak", 1, passphrase=b"hunter2")
    assert not (tmp_path / "weak").exists()


def test_rotating_a_client_key_revokes_the_old_one(tmp_path):
    keys = init_keys(tmp_path / "k", 2)
    server, client = keys.server, keys.client(2)
    old_pub, old_key = server.client_public_key(2).read_text(), client.private_key.read_bytes()
    assert rotate_client_key(keys, 2).strip() == old_pub.strip()
    assert client.private_key.read_bytes() != old_key and _mode(client.private_key) == 0o600
    new_pub = server.client_public_key(2).read_text()
    assert new_pub == client.public_key.read_text() and key_id(new_pub) != key_id(old_pub)
    assert [key_id(line) for line in server.revoked()] == [key_id(old_pub)]
    assert server.registrable_public_keys() == [server.client_public_key(1), server.client_public_key(2)]
    assert try_load_public_key(server.client_public_key(2)) == public_key_to_bytes(
        _try_setup_client_authentication(
            argparse.Namespace(auth_supernode_private_key=str(client.private_key), auth_supernode_public_key=None)
        )[1]
    )
    # a client number without a key yet: a new client, nothing revoked
    assert rotate_client_key(keys, 3, PASSPHRASE) is None
    assert keys.client(3).ca_cert.read_bytes() == server.ca_cert.read_bytes()
    assert keys.client(3).private_key.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert len(server.registrable_public_keys()) == 3 and len(server.revoked()) == 1


def test_revoking_a_client_takes_its_key_off_the_server_for_good(tmp_path):
    keys = init_keys(tmp_path / "k", 2)
    server = keys.server
    first = server.client_public_key(2).read_text()
    rotate_client_key(keys, 2)
    second = server.client_public_key(2).read_text()
    lines, newly = revoke_client(server_part(keys.directory), 2)
    assert newly and {key_id(line) for line in lines} == {key_id(first), key_id(second)}
    assert not server.client_public_key(2).exists()
    assert server.registrable_public_keys() == [server.client_public_key(1)]
    assert _mode(server.revoked_keys) == 0o644
    again, newly = revoke_client(server, 2)  # on the server machine, after copying revoked_keys there
    assert not newly and again == lines
    # an old copy of the .pub put back is still not registrable
    server.client_public_key(2).write_text(second)
    assert server.registrable_public_keys() == [server.client_public_key(1)]
    with pytest.raises(KeysError, match="client 7 has no key"):
        revoke_client(server, 7)
    server.client_public_key(1).unlink()
    server.client_public_key(2).unlink()
    with pytest.raises(KeysError, match="no client public keys \\(that are not revoked\\)"):
        load_server_keys(server.directory)


def test_rotating_the_server_certificate_keeps_its_names_and_needs_the_ca(tmp_path):
    keys = init_keys(tmp_path / "k", 1, ["fl.example.org"], passphrase=PASSPHRASE)
    old = keys.server.server_cert.read_bytes()
    with pytest.raises(KeysError, match=r"ca\.key is encrypted"):
        rotate_server_tls(keys, ["new.example.org"])
    rotate_server_tls(keys, ["new.example.org"], PASSPHRASE)
    cert = x509.load_pem_x509_certificate(keys.server.server_cert.read_bytes())
    assert cert.public_bytes(serialization.Encoding.PEM) != old
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {"localhost", "fl.example.org", "new.example.org"}
    ca = x509.load_pem_x509_certificate(keys.ca_cert.read_bytes())
    PolicyBuilder().store(Store([ca])).build_server_verifier(x509.DNSName("new.example.org")).verify(cert, [])
    assert keys.server.server_key.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    keys.ca_key.unlink()  # on a copy without the CA
    with pytest.raises(KeysError, match="missing CA key"):
        rotate_server_tls(keys, [], PASSPHRASE)


def test_keys_cli_rotates_and_revokes_and_says_what_to_copy(tmp_path, capsys, monkeypatch):
    from fedvault.cli import main

    monkeypatch.delenv(PASSPHRASE_ENV, raising=False)
    keys = tmp_path / "k"
    assert main(["keys", "init", str(keys), "--clients", "2"]) == 0
    layout = load_layout(keys)
    assert layout.client(2).identity_pub.read_bytes() == layout.server.identity_pub.read_bytes()
    capsys.readouterr()
    assert main(["keys", "rotate", str(keys), "--client", "2"]) == 0
    out = capsys.readouterr().out
    assert f"its old key is revoked in {layout.server.revoked_keys}" in out
    assert f"copy {layout.client(2).directory} to client machine 2" in out
    assert main(["keys", "revoke", str(keys / "server"), "--client", "2"]) == 0
    out = capsys.readouterr().out
    assert f"client 2's key revoked in {layout.server.revoked_keys}" in out and "--superlink ADMIN_ADDRESS" in out
    assert len(layout.server.revoked()) == 2 and layout.server.registrable_public_keys() == [
        layout.server.client_public_key(1)
    ]
    for argv, error in (
        (["keys", "rotate", str(keys)], "give --client I"),
        (["keys", "rotate", str(keys), "--client", "1", "--address", "x.org"], "--address only applies"),
        (["keys", "rotate", str(keys / "server"), "--client", "1"], "not a keys directory"),
        (["keys", "revoke", str(keys), "--client", "5"], "client 5 has no key"),
        (["server", "--keys", str(keys), "--state", str(tmp_path / "s")], "a key the server must not have"),
    ):
        assert main(argv) == 2, argv
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and error in lines[0], (argv, lines)
    assert not (tmp_path / "s").exists()  # refused before anything was written


def test_server_certificate_names_every_address(layout):
    cert = x509.load_pem_x509_certificate(layout.server.server_cert.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {"localhost", "fl.example.org"}
    assert set(sans.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address(a) for a in ("127.0.0.1", "::1", "10.1.2.3", "2001:db8::7")
    }


def test_server_certificate_verifies_against_the_ca_only_for_its_names(layout):
    ca = x509.load_pem_x509_certificate(layout.ca_cert.read_bytes())
    leaf = x509.load_pem_x509_certificate(layout.server.server_cert.read_bytes())
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
    server_ctx.load_cert_chain(layout.server.server_cert, layout.server.server_key)
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
        client_ctx = ssl.create_default_context(cafile=str(layout.client(1).ca_cert))
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
            argparse.Namespace(
                auth_supernode_private_key=str(layout.client(index).private_key), auth_supernode_public_key=None
            )
        )
        assert loaded is not None
        _, public = loaded
        assert uses_nist_ec_curve(public)
        # what flwr supernode register does with the .pub; it must be the same key
        assert try_load_public_key(layout.server.client_public_key(index)) == public_key_to_bytes(public)
    keys = {layout.server.client_public_key(i).read_bytes().split()[1] for i in (1, 2, 3)}
    assert len(keys) == 3  # distinct key pairs


@pytest.mark.parametrize("address", ["https://fl.example.org", "fl.example.org:8000", "a b", "1.2.3"])
def test_bad_server_address_is_refused_before_writing(tmp_path, address):
    with pytest.raises(KeysError, match="is not a DNS name or IP address"):
        init_keys(tmp_path / "k", 1, [address])
    assert not (tmp_path / "k").exists()


def test_loaders_name_what_is_missing(tmp_path, layout):
    with pytest.raises(KeysError, match="does not exist"):
        load_server_keys(tmp_path / "nowhere")
    with pytest.raises(KeysError, match="does not exist"):
        load_client_keys(tmp_path / "nowhere", 1)
    with pytest.raises(KeysError, match="not a keys directory"):
        load_layout(layout.server.directory)
    with pytest.raises(KeysError, match=r"client-2\.key"):
        load_client_keys(layout.client(1).directory, 2)  # client 1's folder given to client 2
    (tmp_path / "only-ca").mkdir()
    (tmp_path / "only-ca" / "ca.pem").write_bytes(layout.ca_cert.read_bytes())
    with pytest.raises(KeysError, match=r"server\.pem"):
        load_server_keys(tmp_path / "only-ca")
    with pytest.raises(KeysError, match=r"client-1\.key"):
        load_client_keys(tmp_path / "only-ca", 1)
    with pytest.raises(KeysError, match=">= 1"):
        load_client_keys(layout.directory, 0)
    with pytest.raises(KeysError, match=">= 1"):
        init_keys(tmp_path / "zero", 0)


# ---- `keys revoke` on a live federation (real processes on 127.0.0.1) --------------------------


@pytest.mark.integration
def test_keys_revoke_removes_a_client_from_a_live_run_and_state_files_are_private(tmp_path):
    """Encrypted keys for three clients; `fedvault server` submits a one-round run that needs two.
    Client 2 joins first (the round waits for a second client), is revoked with `keys revoke
    --superlink` and leaves; clients 1 and 3 join and the round trains them alone."""
    root, processes = tmp_path, Processes()
    passphrase = root / "passphrase"
    passphrase.write_bytes(PASSPHRASE + b"\n")
    made = run_cli(["keys", "init", str(root / "keys"), "--clients", "3", "--passphrase-file", str(passphrase)])
    assert made.returncode == 0, made.stderr
    keys = load_layout(root / "keys")
    env = {PASSPHRASE_ENV: PASSPHRASE.decode()}
    port = free_port()
    try:
        server = processes.start(_live_server_args(root, port, passphrase), root / "server.log", "fedvault server")
        wait_for_log(server, READY, seconds(90))
        admin = Connection(
            CONNECTION_NAME,
            root / "state" / "flwr-home",
            re.search(r"admin API \(flwr\) on (\S+) only", server.log_text()).group(1),
            keys.server.ca_cert,
        )
        superlink_pid = int(re.search(r"SuperLink \(pid (\d+)\)", server.log_text()).group(1))
        assert "/proc/self/fd/" in _argv_after(superlink_pid, "--ssl-keyfile")  # decrypted in memory only

        def client(i: int, extra: dict[str, str] | None = None, args: tuple[str, ...] = ()):
            return processes.start(
                [*client_args(port, root / "keys" / "clients" / f"client-{i}", i, 3, root / f"client-{i}"), *args],
                root / f"client-{i}.log",
                f"fedvault client {i}",
                extra,
            )

        def joined(started) -> int:
            wait_for_log(started, READY, seconds(90))
            return int(re.search(r"as node (\d+)", started.log_text()).group(1))

        revoked = client(2, env)
        revoked_id = joined(revoked)
        revoke = run_cli(
            ["keys", "revoke", str(root / "keys" / "server"), "--client", "2", "--superlink", admin.address]
        )
        assert revoke.returncode == 0, revoke.stderr
        assert f"unregistered node {revoked_id} from SuperLink {admin.address}" in revoke.stdout
        assert {n["node-id"]: n["status"] for n in list_nodes(admin)}[revoked_id] == "unregistered"
        assert revoked.popen.wait(timeout=seconds(90)) == 2  # its SuperNode is refused and stops
        assert "the SuperLink no longer accepts its key" in revoked.log_text()

        one, three = client(1, env), client(3, None, ("--passphrase-file", str(passphrase)))
        one_id, three_id = joined(one), joined(three)
        node_pid = int(re.search(r"SuperNode \(pid (\d+)\)", three.log_text()).group(1))
        assert "/proc/self/fd/" in _argv_after(node_pid, "--auth-supernode-private-key")
        assert server.popen.wait(timeout=seconds(300)) == 0, server.log_text()
        records = [json.loads(line) for line in (root / "runs" / "main" / "metrics.jsonl").read_text().splitlines()]
        assert records[1]["clients_sampled"] == records[1]["replies_ok"] == 2
        trained = {
            i: "Receiving: train message" in (root / f"client-{i}" / "supernode.log").read_text() for i in (1, 2, 3)
        }
        assert trained == {1: True, 2: False, 3: True}
        assert {one_id, three_id}.isdisjoint({revoked_id})
        assert one.alive() and three.alive()
    finally:
        processes.stop_all()
    # State: every folder 0700; the database, logs, policy and FLWR_HOME files 0600.
    state = root / "state"
    for folder in [state, *(p for p in state.rglob("*") if p.is_dir())]:
        assert _mode(folder) == 0o700, folder
    stated = [*state.glob("state.db*"), *state.glob("*.log"), state / "server-policy.toml"]
    stated += [p for p in (state / "flwr-home").rglob("*") if p.is_file()]
    assert len(stated) >= 5 and {str(p): oct(_mode(p)) for p in stated if _mode(p) != 0o600} == {}
    for i in (1, 3):  # the SuperNode's log and FLWR_HOME, the ClientApp's answered-rounds record
        client_state = root / f"client-{i}"
        folders = [client_state, *(p for p in client_state.rglob("*") if p.is_dir())]
        files = [p for p in client_state.rglob("*") if p.is_file()]
        assert {p.name for p in files} >= {"supernode.log", "source"} and any(
            "answered-rounds" in str(p) for p in files
        )
        assert {str(p): oct(_mode(p)) for p in [*folders, *files] if _mode(p) not in (0o700, 0o600)} == {}


def _live_server_args(root: Path, port: int, passphrase: Path) -> list[str]:
    settings = [
        'task="digits"',
        "num-clients=2",
        "num-server-rounds=1",
        "batch-size=32",
        "local-epochs=1",
        "privacy.sample-level=false",
        "fraction-train=1.0",
        "fraction-evaluate=0.0",
        f"round-timeout={seconds(300)}",
        f'run-dir="{root / "runs" / "main"}"',
    ]
    return [
        "server",
        *(arg for setting in settings for arg in ("--set", setting)),
        "--keys",
        str(root / "keys" / "server"),
        "--passphrase-file",
        str(passphrase),
        "--state",
        str(root / "state"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]


def _argv_after(pid: int, flag: str) -> str:
    """The value after ``flag`` in the running process ``pid``'s command line."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    return argv[argv.index(flag) + 1]

"""Start a Flower SuperLink for fedvault, register client keys, submit and track runs.

Flower 1.41 serves the Fleet (SuperNodes), Control (``flwr`` CLI) and Runtime (ServerApp) APIs
on one HTTPS port, and its open-source Control API has no authentication. fedvault therefore
binds ``flower-superlink`` to 127.0.0.1 on an internal *admin* port and puts the
:mod:`~fedvault.deploy.fleet_front` on the public address: it forwards Flower's Fleet routes
only, so a party that reaches the public port can act as a registered SuperNode and nothing
more. The admin API (this module's ``flwr`` calls, the SuperExec, an operator's ``flwr``) stays
on loopback. The SuperLink runs with TLS (certificate from :mod:`fedvault.security.tls_keys`, on
both ports), SuperNode authentication (only registered public keys may connect), a SQLite state
database, no runtime ``uv sync``, and a gRPC health server used for readiness.

The ``flwr`` CLI finds a SuperLink through a named connection in ``$FLWR_HOME/config.toml``.
fedvault writes an isolated FLWR_HOME under the state directory naming one connection,
``fedvault``, with the CA as ``root-certificates``; :func:`register_node`, :func:`unregister_node`,
:func:`list_nodes`, :func:`submit_run` and :func:`run_status` run ``flwr ... <connection> --format
json`` in it. ``flwr supernode list`` does not show public keys, so :func:`node_ids_by_key` asks
the Control API's ``/v1/control/list-nodes`` (the request ``flwr supernode list`` sends) directly.

Revocation: keys listed in the server folder's ``revoked_keys`` are never registered, and at start
every one still registered in the database (revoked while the SuperLink was down) is unregistered
(:func:`unregister_public_keys`); ``fedvault keys revoke --superlink`` does the same on a running
SuperLink. Flower marks an unregistered node ``unregistered``: it is no longer offered to the
ServerApp, its signed Fleet requests are refused, and its key can never be registered again on
that database.

State directory layout (0700; the SuperLink and the flwr CLI run with umask 077, so the files
they create, ``state.db`` included, are 0600)::

    state.db        SuperLink state (runs, logs, registered nodes); survives restarts
    superlink.log   SuperLink output (stdout and stderr)
    flwr-home/      FLWR_HOME of the SuperLink process and of the flwr CLI (config.toml: the admin address)
"""

from __future__ import annotations

import json
import logging
import ssl
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from fedvault.atomic import atomic_write
from fedvault.deploy.fleet_front import FleetFront, start_fleet_front
from fedvault.deploy.processes import (
    PRIVATE_UMASK,
    ManagedProcess,
    child_env,
    executable,
    format_config,
    free_port,
    join_host_port,
    private_directory,
    start_process,
    stop,
    wait_healthy,
    wait_listening,
)
from fedvault.errors import ConfigError, FedvaultError
from fedvault.security.key_files import PlainKey, plain_key_file
from fedvault.security.tls_keys import ServerKeys, key_id, load_server_keys

log = logging.getLogger(__name__)

CONNECTION_NAME = "fedvault"
DEFAULT_PORT = 8000  # Flower's default SuperLink port
STATE_DB = "state.db"
LOG_FILE = "superlink.log"
FLWR_HOME_DIR = "flwr-home"
CLI_TIMEOUT_S = 120.0
_ALREADY_REGISTERED = "[code: 23]"  # Flower: "Public key already in use."
ADMIN_HOST = "127.0.0.1"  # the SuperLink itself (Control, Runtime and Fleet APIs) listens here only
_ANY_HOST = {"0.0.0.0", "::", ""}


class FlwrCliError(FedvaultError, RuntimeError):
    """A ``flwr`` CLI call failed; the message quotes Flower's error."""


@dataclass(frozen=True)
class Connection:
    """A named SuperLink connection in an isolated FLWR_HOME, as the ``flwr`` CLI uses it."""

    name: str
    flwr_home: Path
    address: str
    root_certificates: Path | None  # None only with insecure=True

    def env(self) -> dict[str, str]:
        """Environment for ``flwr`` commands (and ``flwr run`` invoked by hand) against it."""
        return child_env({"FLWR_HOME": str(self.flwr_home)})


@dataclass
class SuperLink:
    """A running SuperLink started by :func:`start_superlink`, behind its Fleet front."""

    process: ManagedProcess
    front: FleetFront  # the public port: Fleet API only
    address: str  # public host:port dialled on this machine; remote SuperNodes use a SAN of server.pem
    connection: Connection  # the admin API on loopback (connection.address), for flwr
    health_address: str
    database: Path
    node_ids: dict[Path, int | None] = field(default_factory=dict)  # public key -> registered id
    unregistered: dict[str, int] = field(default_factory=dict)  # revoked key -> node id unregistered at start
    plain_key: PlainKey | None = None  # the decrypted TLS key, when server.key is encrypted

    def stop(self) -> int:
        """Stop the front, then the SuperLink process (its state stays in ``database``)."""
        self.front.stop()
        try:
            return stop(self.process)
        finally:
            if self.plain_key is not None:
                self.plain_key.close()


def superlink_command(
    *,
    state_dir: Path,
    keys: ServerKeys | None,
    host: str,
    port: int,
    health_address: str,
    server_key: Path | None = None,
) -> list[str]:
    """The ``flower-superlink`` argv for fedvault: TLS + node auth with ``keys``, else insecure.
    ``server_key`` replaces ``keys.server_key`` (the decrypted in-memory copy of an encrypted one)."""
    argv = [
        executable("flower-superlink"),
        "--database",
        str(state_dir / STATE_DB),
        "--disable-runtime-dependency-installation",
        "--health-server-address",
        health_address,
        "--host",
        host,
        "--port",
        str(port),
    ]
    if keys is None:
        return [*argv, "--insecure"]
    return [
        *argv,
        "--ssl-ca-certfile",
        str(keys.ca_cert),
        "--ssl-certfile",
        str(keys.server_cert),
        "--ssl-keyfile",
        str(server_key or keys.server_key),
        "--enable-supernode-auth",
    ]


def start_superlink(
    state_dir: str | Path,
    keys_dir: str | Path | ServerKeys | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    admin_port: int | None = None,
    health_address: str | None = None,
    insecure: bool = False,
    register: bool = True,
    timeout: float = 60.0,
    env: Mapping[str, str] | None = None,
    passphrase: bytes | None = None,
    allow_private_keys: bool = False,
) -> SuperLink:
    """Start ``flower-superlink`` on loopback, register every client public key, then open the
    public Fleet front on ``host:port``.

    The SuperLink listens on ``127.0.0.1:admin_port`` (default: a free port), where the returned
    ``connection`` reaches its Control API; ``host:port`` forwards only Fleet requests to it.
    TLS and SuperNode authentication use ``keys_dir``, the server folder of a
    :mod:`fedvault.security.tls_keys` layout (:func:`~fedvault.security.tls_keys.load_server_keys`
    refuses one holding the CA key or client keys unless ``allow_private_keys``); ``passphrase``
    decrypts an encrypted ``server.key``. With ``register=True`` each ``clients/client-<i>.pub``
    not in ``revoked_keys`` is registered and each revoked key still registered is unregistered.
    ``state_dir`` is made 0700 and the SuperLink runs with umask 077. ``insecure=True`` turns
    off TLS and authentication (any SuperNode may join) and logs a warning: local experiments
    only. ``health_address`` defaults to a free loopback port. ``env`` adds variables for the
    SuperLink and the apps it starts (e.g. the ServerApp's ``FEDVAULT_SERVER_POLICY``). On failure the process is
    stopped and :class:`~fedvault.deploy.processes.ProcessError` (or
    :class:`~fedvault.deploy.fleet_front.FleetFrontError` for the public port) says why.
    """
    state_dir = Path(state_dir).expanduser().resolve()
    if insecure:
        keys = None
        log.warning(
            "INSECURE SuperLink: no TLS and no SuperNode authentication; anything that reaches "
            "%s can join as a SuperNode, receive the models and send updates. Local experiments only.",
            join_host_port(host, port),
        )
    elif keys_dir is None:
        raise ConfigError("a keys directory is required unless the SuperLink is insecure")
    elif isinstance(keys_dir, ServerKeys):
        keys = keys_dir
    else:
        keys = load_server_keys(keys_dir, allow_private_keys=allow_private_keys)
    private_directory(state_dir)
    health_address = health_address or join_host_port(ADMIN_HOST, free_port())
    admin_port = admin_port or free_port(ADMIN_HOST)
    plain_key = None if keys is None else plain_key_file(keys.server_key, passphrase)
    try:
        argv = superlink_command(
            state_dir=state_dir,
            keys=keys,
            host=ADMIN_HOST,
            port=admin_port,
            health_address=health_address,
            server_key=None if plain_key is None else plain_key.path,
        )
        admin_address = join_host_port(ADMIN_HOST, admin_port)
        connection = write_connection(state_dir / FLWR_HOME_DIR, admin_address, None if keys is None else keys.ca_cert)
        process = start_process(
            argv,
            name="SuperLink",
            log_path=state_dir / LOG_FILE,
            env={**connection.env(), **(env or {})},
            pass_fds=() if plain_key is None else plain_key.pass_fds,
            umask=PRIVATE_UMASK,
        )
    except BaseException:
        if plain_key is not None:
            plain_key.close()
        raise
    node_ids: dict[Path, int | None] = {}
    unregistered: dict[str, int] = {}
    try:
        wait_healthy(health_address, timeout, process)
        # Flower starts the health server in the API's startup hook, just before the port binds.
        wait_listening(ADMIN_HOST, admin_port, timeout, process)
        if register and keys is not None:
            for public_key in keys.registrable_public_keys():
                node_ids[public_key] = register_node(connection, public_key)
            revoked = keys.revoked()
            if revoked:
                done = unregister_public_keys(connection, revoked)
                unregistered = {line: node for line, node in done.items() if node is not None}
                for line, node in unregistered.items():
                    log.warning("unregistered node %d: its key is revoked (%s)", node, line.split()[-1])
        front = start_fleet_front(
            host,
            port,
            f"{'http' if keys is None else 'https'}://{admin_address}",
            certfile=None if keys is None else keys.server_cert,
            keyfile=None if plain_key is None else plain_key.path,
            upstream_ca=None if keys is None else keys.ca_cert,
        )
    except BaseException:
        stop(process)
        if plain_key is not None:
            plain_key.close()
        raise
    address = join_host_port(ADMIN_HOST if host in _ANY_HOST else host, port)
    return SuperLink(
        process, front, address, connection, health_address, state_dir / STATE_DB, node_ids, unregistered, plain_key
    )


def write_connection(
    flwr_home: Path, address: str, root_certificates: Path | None, name: str = CONNECTION_NAME
) -> Connection:
    """Write ``flwr_home/config.toml`` naming one default connection; return it.

    ``root_certificates=None`` writes ``insecure = true``. The file is replaced atomically.
    """
    entry: dict[str, Any] = {"address": address}
    if root_certificates is None:
        entry["insecure"] = True
    else:
        entry["root-certificates"] = str(root_certificates)
    document = {"superlink": {"default": name, name: entry}}
    private_directory(flwr_home)
    text = tomli_w.dumps(document).encode()
    atomic_write(flwr_home / "config.toml", lambda handle: handle.write(text), mode=0o600)
    return Connection(name, flwr_home, address, root_certificates)


def flwr_json(connection: Connection, args: Sequence[str], timeout: float = CLI_TIMEOUT_S) -> dict[str, Any]:
    """Run ``flwr <args> --format json`` against ``connection``; return the JSON on success.

    Raises :class:`FlwrCliError` with Flower's error message when it reports failure.
    """
    command = [executable("flwr"), *args, "--format", "json"]
    try:
        done = subprocess.run(
            command, env=connection.env(), capture_output=True, text=True, timeout=timeout, umask=PRIVATE_UMASK
        )
    except subprocess.TimeoutExpired:
        raise FlwrCliError(f"'flwr {' '.join(args)}' did not finish within {timeout:g} s") from None
    try:
        reply = json.loads(done.stdout)
    except json.JSONDecodeError:
        reply = {"success": False, "error-message": done.stderr or done.stdout}
    if not reply.get("success"):
        lines = [line.strip() for line in str(reply.get("error-message", "")).splitlines()]
        why = " ".join(line for line in lines if line and not line.startswith("Using SuperLink"))
        raise FlwrCliError(f"'flwr {' '.join(args)}' failed: {why or 'no error message'}")
    return reply


def register_node(connection: Connection, public_key: Path) -> int | None:
    """Register a SuperNode public key; return its node id, or None if already registered."""
    try:
        reply = flwr_json(connection, ["supernode", "register", str(public_key), connection.name])
    except FlwrCliError as err:
        if _ALREADY_REGISTERED in str(err):
            return None
        raise
    return int(reply["node-id"])


def unregister_node(connection: Connection, node_id: int) -> None:
    """``flwr supernode unregister``: the node's key is refused from now on (see the module docstring)."""
    flwr_json(connection, ["supernode", "unregister", str(node_id), connection.name])


def node_ids_by_key(connection: Connection) -> dict[str, tuple[int, str]]:
    """Every node the SuperLink knows as ``key_id -> (node id, status)``, from the Control API's
    ``list-nodes`` (its ``NodeInfo.public_key`` is PEM SubjectPublicKeyInfo; the key id is the
    OpenSSH ``<type> <base64>`` of :func:`fedvault.security.tls_keys.key_id`). A key registered
    twice (impossible in Flower: public keys are unique) keeps its last entry."""
    import httpx
    from cryptography.hazmat.primitives import serialization
    from flwr.proto.control_pb2 import ListNodesRequest, ListNodesResponse

    root = connection.root_certificates
    verify: ssl.SSLContext | bool = False if root is None else ssl.create_default_context(cafile=str(root))
    url = f"{'http' if root is None else 'https'}://{connection.address}/v1/control/list-nodes"
    headers = {"content-type": "application/protobuf", "accept": "application/protobuf"}
    try:
        with httpx.Client(verify=verify, trust_env=False, timeout=CLI_TIMEOUT_S) as client:
            reply = client.post(url, content=ListNodesRequest().SerializeToString(), headers=headers)
    except httpx.HTTPError as err:
        raise FlwrCliError(f"cannot list the nodes of the SuperLink at {connection.address}: {err}") from None
    if reply.status_code != 200:
        raise FlwrCliError(
            f"listing the nodes of the SuperLink at {connection.address} failed: HTTP {reply.status_code} "
            f"{reply.text[:200]}"
        )
    nodes = {}
    for info in ListNodesResponse.FromString(reply.content).nodes_info:
        if not info.public_key:
            continue
        public = serialization.load_pem_public_key(info.public_key)
        openssh = public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
        nodes[key_id(openssh)] = (int(info.node_id), str(info.status))
    return nodes


def unregister_public_keys(connection: Connection, public_keys: Sequence[str]) -> dict[str, int | None]:
    """Unregister the node of each OpenSSH public key line that is still registered; return
    ``line -> node id`` unregistered now (None: unknown to this SuperLink or already unregistered)."""
    nodes = node_ids_by_key(connection)
    done: dict[str, int | None] = {}
    for line in public_keys:
        node_id, status = nodes.get(key_id(line), (None, "unknown"))
        if node_id is None or status == "unregistered":
            done[line] = None
            continue
        unregister_node(connection, node_id)
        done[line] = node_id
    return done


def list_nodes(connection: Connection) -> list[dict[str, Any]]:
    """``flwr supernode list``: dicts with ``node-id`` (int), ``status`` (registered, online,
    offline, unregistered) and timestamps."""
    nodes = flwr_json(connection, ["supernode", "list", connection.name])["nodes"]
    return [{**node, "node-id": int(node["node-id"])} for node in nodes]


def wait_node_online(connection: Connection, node_id: int, timeout: float) -> dict[str, Any]:
    """Poll :func:`list_nodes` until ``node_id`` is ``online``; return its entry."""
    deadline = time.monotonic() + timeout
    while True:
        node = next((n for n in list_nodes(connection) if n["node-id"] == node_id), None)
        if node is not None and node["status"] == "online":
            return node
        if time.monotonic() > deadline:
            state = "unknown" if node is None else node["status"]
            raise FlwrCliError(f"SuperNode {node_id} not online after {timeout:g} s (status {state})")
        time.sleep(0.5)


def submit_run(connection: Connection, app_dir: str | Path, run_config: Mapping[str, Any] | None = None) -> int:
    """``flwr run APP_DIR <connection>``: build the app's FAB, start a run, return its run id.

    ``run_config`` overrides keys of ``[tool.flwr.app.config]`` (values are TOML-encoded).
    Runtime dependency installation is off on fedvault's SuperLink and SuperNodes, so the
    ServerApp and ClientApps import the app's packages from the environment they run in.
    """
    args = ["run", str(Path(app_dir).expanduser().resolve()), connection.name]
    if run_config:
        args += ["--run-config", format_config(run_config)]
    return int(flwr_json(connection, args)["run-id"])


def run_status(connection: Connection, run_id: int) -> str:
    """Status of a run from ``flwr ls``: ``pending``, ``starting``, ``running``, or
    ``finished:completed`` / ``finished:failed`` / ``finished:stopped``."""
    runs = flwr_json(connection, ["ls", connection.name, "--run-id", str(run_id)])["runs"]
    for run in runs:
        if int(run["run-id"]) == run_id:
            return str(run["status"])
    raise FlwrCliError(f"run {run_id} not found on SuperLink {connection.address}")

"""Start a Flower SuperNode for fedvault and report whether it joined the SuperLink.

The SuperNode dials the SuperLink over HTTPS, verifying its certificate against the fedvault CA
(``--root-certificates``), and authenticates with its OpenSSH EC private key: every Fleet
request is signed (ECDSA-SHA256 over a timestamp) and the SuperLink accepts only registered
public keys. Runtime ``uv sync`` stays off (Flower's SuperNode default).

Readiness has two stages, both verified on flwr 1.41:

* health: Flower's gRPC health server (``--health-server-address``) starts *before* the SuperNode
  contacts the SuperLink and always answers ``SERVING``; it means "process up", not "joined".
* connected: after the SuperLink activates the node, the SuperNode logs ``SuperNode ID: <id>``;
  from then on ``flwr supernode list`` on the server shows that id ``online``.

Failures are read from the log and reported in one line (:data:`FAILURES`).

Each message's ClientApp forks from the node's warm, pre-imported process
(:mod:`fedvault.deploy.warm_clientapp`) unless ``warm_clientapp=False`` (Flower's one fresh
``flwr-clientapp`` process per message).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fedvault.deploy.processes import (
    PRIVATE_UMASK,
    ManagedProcess,
    ProcessError,
    child_env,
    format_config,
    free_port,
    join_host_port,
    private_directory,
    start_process,
    stop,
    wait_for_log,
    wait_healthy,
)
from fedvault.deploy.supernode_process import POLL_ENV
from fedvault.deploy.warm_clientapp import WarmClientApp, start_warm_clientapp
from fedvault.errors import ConfigError
from fedvault.flower_timing import FLOWER_IDLE_POLL_S
from fedvault.security.key_files import PlainKey, plain_key_file

log = logging.getLogger(__name__)

CONNECTED = r"SuperNode ID: (-?\d+)"
DEFAULT_POLL_S = 1.0  # idle SuperNode -> SuperLink (Flower: 3 s); a round's instruction waits 0-1 s
SUPEREXEC_POLL_S = 0.1  # SuperExec -> its own SuperNode on loopback (Flower: 1 s)
FLWR_HOME_DIR = "flwr-home"
# Regex on the SuperNode log -> what went wrong, in order (first match wins).
FAILURES: dict[str, str] = {
    r"\[code: 2004\]|Failed to activate SuperNode": (
        "the SuperLink refused this SuperNode's key: register its .pub on the server "
        "(fedvault server registers KEYS/server/clients/*.pub unless revoked; or flwr supernode register)"
    ),
    r"Hostname mismatch|IP address mismatch": (
        "the SuperLink's TLS certificate does not name the address dialled: use an address "
        "given to 'fedvault keys' or re-issue the certificate with it"
    ),
    r"CERTIFICATE_VERIFY_FAILED|SSL/TLS handshake error": (
        "TLS verification of the SuperLink failed: pass the fedvault CA certificate (ca.pem) as root certificates"
    ),
    r"Server disconnected without sending a response": (
        "the SuperLink closed the connection: this SuperNode speaks plain HTTP (insecure) but the SuperLink expects TLS"
    ),
    r"Unable to parse the private key file": (
        "the SuperNode private key is not an OpenSSH EC key (use clients/client-<i>/client-<i>.key)"
    ),
    r"SuperNode authentication requires a secure TLS connection": (
        "SuperNode authentication needs TLS: give root certificates instead of insecure mode"
    ),
}


@dataclass
class SuperNode:
    """A running SuperNode started by :func:`start_supernode`."""

    process: ManagedProcess
    node_id: int | None  # None when started with wait_connected=False
    health_address: str
    runtime_address: str
    plain_key: PlainKey | None = None  # the decrypted node key, when the key file is encrypted
    warm: WarmClientApp | None = None  # where its ClientApps fork from (None: one process per message)

    def stop(self) -> int:
        """Stop the SuperNode (it deregisters from the SuperLink on a graceful exit) and its warm ClientApp."""
        try:
            return stop(self.process)
        finally:
            if self.warm is not None:
                self.warm.stop()
            if self.plain_key is not None:
                self.plain_key.close()


def supernode_command(
    *,
    superlink: str,
    node_config: Mapping[str, bool | int | float | str],
    root_certificates: Path | None,
    private_key: Path | None,
    insecure: bool,
    health_address: str,
    runtime_port: int,
) -> list[str]:
    """The ``flower-supernode`` argv (Flower's entry point, run by
    :mod:`fedvault.deploy.supernode_process`). ``root_certificates=None`` (without ``insecure``) makes
    Flower verify the SuperLink against the system trust store."""
    argv = [
        sys.executable,
        "-m",
        "fedvault.deploy.supernode_process",
        "--superlink",
        superlink,
        "--node-config",
        format_config(node_config),
        "--health-server-address",
        health_address,
        "--host",
        "127.0.0.1",
        "--port",
        str(runtime_port),
    ]
    if insecure:
        return [*argv, "--insecure"]
    if root_certificates is not None:
        argv += ["--root-certificates", str(root_certificates)]
    if private_key is not None:
        argv += ["--auth-supernode-private-key", str(private_key)]
    return argv


def start_supernode(
    superlink: str,
    state_dir: str | Path,
    *,
    partition_id: int,
    num_partitions: int,
    root_certificates: str | Path | None,
    private_key: str | Path | None,
    insecure: bool = False,
    node_config: Mapping[str, bool | int | float | str] | None = None,
    runtime_port: int | None = None,
    health_address: str | None = None,
    timeout: float = 60.0,
    wait_connected: bool = True,
    passphrase: bytes | None = None,
    warm_clientapp: bool = True,
    poll_interval: float = DEFAULT_POLL_S,
) -> SuperNode:
    """Start ``flower-supernode`` against ``superlink`` (``host:port``) and wait until it joins.

    ``partition_id``/``num_partitions`` (and ``node_config``) reach the ClientApp as
    ``context.node_config``. ``root_certificates`` is the fedvault ``ca.pem`` (None: system trust
    store); ``private_key`` is ``client-<i>.key``, decrypted with ``passphrase`` into an in-memory
    file when it is encrypted (:func:`~fedvault.security.key_files.plain_key_file`).
    ``warm_clientapp`` forks each message's ClientApp from a pre-imported process (its log:
    ``state_dir/warm-clientapp.log``). ``poll_interval``: seconds the idle SuperNode waits before
    asking the SuperLink again (Flower's fixed 3 s at most), and its SuperExec between asks for tasks.
    ``insecure=True`` drops TLS and authentication and logs a warning. The local Runtime API port
    and the health address default to free loopback ports. Output goes to
    ``state_dir/supernode.log``; ``state_dir`` is made 0700 and the SuperNode (and the ClientApps it
    starts) run with umask 077.

    Raises :class:`~fedvault.deploy.processes.ProcessError` whose first line says what went wrong (see
    :data:`FAILURES`) and which quotes the log tail; the process is then stopped.
    """
    if not 0 < poll_interval <= FLOWER_IDLE_POLL_S:
        raise ConfigError(f"poll interval must be > 0 and <= 3 s (Flower's own idle poll), got {poll_interval}")
    if not 0 <= partition_id < num_partitions:
        raise ConfigError(f"partition id {partition_id} must be in [0, {num_partitions}) (num-partitions)")
    if insecure:
        log.warning(
            "INSECURE SuperNode: no TLS and no authentication towards %s; the connection can "
            "be read and altered on the network. Local experiments only.",
            superlink,
        )
    elif private_key is None:
        raise ConfigError("a SuperNode private key is required unless the SuperNode is insecure")
    state_dir = private_directory(Path(state_dir).expanduser().resolve())
    health_address = health_address or join_host_port("127.0.0.1", free_port())
    runtime_port = runtime_port or free_port()
    plain_key = None
    if private_key is not None and not insecure:
        plain_key = plain_key_file(Path(private_key).resolve(), passphrase, openssh=True)
    warm: WarmClientApp | None = None
    try:
        argv = supernode_command(
            superlink=superlink,
            node_config={"partition-id": partition_id, "num-partitions": num_partitions, **(node_config or {})},
            root_certificates=None if root_certificates is None else Path(root_certificates).resolve(),
            private_key=None if plain_key is None else plain_key.path,
            insecure=insecure,
            health_address=health_address,
            runtime_port=runtime_port,
        )
        env = child_env(
            {
                "FLWR_HOME": str(state_dir / FLWR_HOME_DIR),
                POLL_ENV: str(poll_interval),
                "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": str(min(poll_interval, SUPEREXEC_POLL_S)),
            }
        )
        warm = start_warm_clientapp(state_dir / "warm-clientapp.log", env) if warm_clientapp else None
        if warm is not None:
            env["PATH"] = os.pathsep.join([str(warm.bin_dir), env["PATH"]])  # SuperExec finds its shim first
        process = start_process(
            argv,
            name=f"SuperNode {partition_id}",
            log_path=state_dir / "supernode.log",
            env=env,
            pass_fds=() if plain_key is None else plain_key.pass_fds,
            umask=PRIVATE_UMASK,
        )
    except BaseException:
        if warm is not None:
            warm.stop()
        if plain_key is not None:
            plain_key.close()
        raise
    node = SuperNode(process, None, health_address, join_host_port("127.0.0.1", runtime_port), plain_key, warm)
    try:
        wait_healthy(health_address, timeout, process)
        if wait_connected:
            node.node_id = int(wait_for_log(process, CONNECTED, timeout).group(1))
        if warm is not None:
            warm.wait_ready(timeout)
    except ProcessError as err:
        node.stop()
        raise ProcessError(_explain(process, superlink, err)) from None
    except BaseException:
        node.stop()
        raise
    return node


def _explain(process: ManagedProcess, superlink: str, err: ProcessError) -> str:
    """The one-line cause (first matching :data:`FAILURES` entry) followed by the log tail."""
    text = process.log_text()
    for regex, why in FAILURES.items():
        if re.search(regex, text):
            return f"SuperNode cannot join SuperLink {superlink}: {why}\n{process.log_tail()}"
    if "Connection attempt failed" in text:
        return (
            f"SuperNode cannot reach SuperLink {superlink}: no connection (is it running, and "
            f"is the address right?)\n{process.log_tail()}"
        )
    return str(err)

"""``fedvault keys init|rotate|revoke``, ``fedvault server`` and ``fedvault client``: Flower's deployment engine.

``fedvault keys init DIR`` writes one folder per party (:mod:`fedvault.security.tls_keys`):
``DIR/server`` for the server machine, ``DIR/clients/client-<i>`` for client i, and ``DIR/ca`` (the
CA key) for nobody but the operator. ``keys rotate`` gives a client a new node key (revoking the
old one) or the server a new TLS certificate; ``keys revoke`` revokes a client's key and, with
``--superlink``, unregisters its node from a running SuperLink over the loopback admin API.

``fedvault server`` starts a SuperLink (TLS + SuperNode authentication unless ``--insecure``) on
loopback behind a public front that serves only the Fleet API (:mod:`fedvault.deploy.superlink`),
registers the client keys, writes a Flower app directory whose ``[tool.flwr.app.config]`` is the
resolved run config (generated from :class:`fedvault.config.RunConfig` at submit time, so it
carries every key, strategy parameters included, and never drifts from the repo's pyproject),
submits the run with ``flwr run``, streams its log (``flwr log --stream``), waits until it is
finished and reports its status. ``fedvault client`` starts a SuperNode with its key and the CA
and supervises it. Both print ``ready`` once their process is up (the client: once it joined).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import signal
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import tomli_w
from cryptography import x509

from fedvault.atomic import atomic_write
from fedvault.cli_config import add_config_args, add_verbosity_args
from fedvault.config import RunConfig
from fedvault.deploy.node_activity import NodeActivity
from fedvault.deploy.processes import (
    PRIVATE_UMASK,
    ManagedProcess,
    ProcessError,
    executable,
    exited_error,
    join_host_port,
    private_directory,
    start_process,
    stop,
    supervise,
)
from fedvault.errors import ConfigError, FedvaultError
from fedvault.rundir import CONFIG_FILE, SUMMARY_FILE, default_run_dir
from fedvault.security import identity
from fedvault.security.key_files import PASSPHRASE_ENV, load_private_key, read_passphrase
from fedvault.security.tls_keys import (
    LOCAL_ADDRESSES,
    KeyLayout,
    KeysError,
    ServerKeys,
    client_folder,
    init_keys,
    load_client_keys,
    load_layout,
    load_server_keys,
    revoke_client,
    rotate_client_key,
    rotate_server_tls,
    server_part,
    share_identity,
)

APP_DIR = "app"
RUNS_DIR = "runs"
FEDVAULT_COMPONENTS = {"serverapp": "fedvault.server.app:app", "clientapp": "fedvault.client.app:app"}
STATUS_POLL_S = 20.0  # backstop poll of `flwr ls` while the log stream is open
FINISH_GRACE_S = 30.0  # how long the run status may lag behind the end of its log stream
_COMPLETED = "finished:completed"
_ANY_HOST = ("0.0.0.0", "::")


class DeployError(FedvaultError, RuntimeError):
    """A deployment command cannot go on (bad arguments, run directory, or a process failed)."""


# ---- argparse ---------------------------------------------------------------------------------


def add_deploy_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``keys``, ``server`` and ``client`` to the ``fedvault`` command's subparsers."""
    keys = subparsers.add_parser(
        "keys",
        help="make, rotate and revoke the CA, server certificate and client keys",
        description="Key material for `fedvault server` / `fedvault client`. `keys init DIR` writes one "
        "folder per party: DIR/server (copy it, and only it, to the server machine), "
        "DIR/clients/client-<i> (copy it to client machine i) and DIR/ca (the CA key: keep DIR offline). "
        f"With --passphrase-file FILE (or ${PASSPHRASE_ENV}) every private key is encrypted; "
        "`fedvault server` and `fedvault client` then need the same passphrase.",
    )
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    init = keys_sub.add_parser(
        "init",
        help="create DIR with a CA, a server TLS certificate and N client keys",
        description="Create a CA (DIR/ca), the server's folder DIR/server (SuperLink TLS certificate for "
        "localhost and each --address, server identity, the clients' public keys) and one folder per "
        "client DIR/clients/client-<i> (its SuperNode key, ca.pem, the server identity to pin). "
        "Every folder is 0700, private keys 0600. Prints what to copy where.",
    )
    init.add_argument("dir", metavar="DIR")
    init.add_argument("--clients", type=int, required=True, metavar="N", help="number of client keys")
    init.add_argument(
        "--address",
        action="append",
        default=[],
        metavar="HOST",
        help="DNS name or IP clients will dial (repeatable; localhost is always included)",
    )
    init.add_argument(
        "--force",
        action="store_true",
        help="replace existing key files (the old client keys are added to server/revoked_keys)",
    )
    _add_passphrase_arg(init, "encrypt the CA, server TLS and client keys with the passphrase in FILE")
    init.set_defaults(func=cmd_keys_init)

    rotate = keys_sub.add_parser(
        "rotate",
        help="new node key for a client (the old one is revoked) or a new server TLS certificate",
        description="--client I: a new SuperNode key pair for client I (a new client if it had none); its "
        "old public key goes to server/revoked_keys. Copy DIR/clients/client-I to client I and "
        "DIR/server/clients/client-I.pub plus DIR/server/revoked_keys to the server; with --superlink "
        "ADDRESS the new key is registered and the old node unregistered on that running SuperLink. "
        "--server-tls: a new SuperLink key and certificate from the CA (DIR/ca/ca.key), for the current "
        "names plus each --address; copy server.pem and server.key to the server and restart it.",
    )
    rotate.add_argument("dir", metavar="DIR", help="the directory `fedvault keys init` made")
    rotate.add_argument("--client", type=int, metavar="I", help="client number (1-based)")
    rotate.add_argument("--server-tls", action="store_true", help="issue a new server TLS key and certificate")
    rotate.add_argument(
        "--address", action="append", default=[], metavar="HOST", help="with --server-tls: add this name (repeatable)"
    )
    _add_superlink_arg(rotate)
    _add_passphrase_arg(rotate, "decrypt the CA key with, and encrypt the new keys with, the passphrase in FILE")
    rotate.set_defaults(func=cmd_keys_rotate)

    revoke = keys_sub.add_parser(
        "revoke",
        help="revoke a client's key; with --superlink also unregister its node from a running SuperLink",
        description="Add client I's public key to revoked_keys in the server folder and remove it from "
        "server/clients: `fedvault server` then never registers it, and at start unregisters it if the "
        "SuperLink's database still has it. With --superlink ADDRESS (the admin address `fedvault server` "
        "prints, on the server machine) its node is also unregistered now: it is no longer sampled and "
        "its requests are refused, in the running run too. DIR is the `keys init` directory or the "
        "server's copy of DIR/server. Revocation is for good: that SuperLink database never accepts "
        "the key again; give the client a new key with `keys rotate --client I`.",
    )
    revoke.add_argument("dir", metavar="DIR", help="the `keys init` directory, or the server folder (DIR/server)")
    revoke.add_argument("--client", type=int, required=True, metavar="I", help="client number (1-based)")
    _add_superlink_arg(revoke)
    revoke.set_defaults(func=cmd_keys_revoke)

    server = subparsers.add_parser(
        "server",
        help="run a SuperLink and one federated run on it (TLS + node auth by default)",
        description="Start a Flower SuperLink with TLS and SuperNode authentication, register the client "
        "keys (not those in revoked_keys; revoked keys its database still holds are unregistered), submit a "
        "run with the resolved config, stream its log, and exit when it is finished "
        "(non-zero if it failed or stopped early).",
    )
    add_config_args(server)
    add_verbosity_args(server, "also show the SuperLink's own log (Flower's) with the run's")
    server.add_argument(
        "--keys",
        metavar="DIR",
        help="the server folder from `fedvault keys init` (KEYS/server); refused if it holds the CA key "
        "or client private keys",
    )
    server.add_argument(
        "--allow-ca-and-client-keys",
        action="store_true",
        help="accept a --keys folder that also holds ca.key or client private keys, or the keys init "
        "directory itself (tests on one machine)",
    )
    _add_passphrase_arg(server, "passphrase of an encrypted server.key")
    server.add_argument(
        "--state",
        required=True,
        metavar="DIR",
        help="SuperLink state (database, logs, app dir; made 0700, its files 0600); run directories go to DIR/runs",
    )
    server.add_argument("--host", help="interface clients connect to (default 0.0.0.0; 127.0.0.1 with --insecure)")
    server.add_argument(
        "--port",
        type=int,
        default=8000,
        help="port clients connect to (default 8000); it serves only Flower's Fleet API, the admin API "
        "(flwr) listens on 127.0.0.1",
    )
    server.add_argument(
        "--insecure", action="store_true", help="no TLS and no SuperNode authentication (local experiments only)"
    )
    server.add_argument(
        "--resume", metavar="RUN_DIR", help="continue RUN_DIR from its latest checkpoint with its config.toml"
    )
    server.add_argument(
        "--keep-running", action="store_true", help="keep the SuperLink serving after the run until Ctrl-C"
    )
    _add_allow_plugin_arg(server, "server", "task or strategy")
    server.add_argument(
        "--startup-timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="seconds to wait for the SuperLink to become healthy",
    )
    server.set_defaults(func=cmd_server)

    client = subparsers.add_parser(
        "client",
        help="run a SuperNode that trains for a fedvault server",
        description="Start a Flower SuperNode that verifies the SuperLink with the CA and authenticates "
        "with its client key; trains partition CLIENT_ID-1 of NUM_PARTITIONS. Runs until Ctrl-C.",
    )
    client.add_argument("--server", required=True, metavar="HOST:PORT", help="SuperLink address")
    client.add_argument(
        "--keys",
        metavar="DIR",
        help="this client's folder from `fedvault keys init` (KEYS/clients/client-<I>: ca.pem, client-<I>.key, "
        "identity.pub), or the keys init directory itself",
    )
    _add_passphrase_arg(client, "passphrase of an encrypted client-<I>.key")
    client.add_argument("--client-id", type=int, required=True, metavar="I", help="1-based client number")
    client.add_argument(
        "--num-partitions",
        type=int,
        required=True,
        metavar="N",
        help="number of data partitions (= num-clients of the run)",
    )
    client.add_argument(
        "--data-path",
        metavar="PATH",
        help="train on this .npz (arrays x, y) instead of a partition of the task's data (node config)",
    )
    client.add_argument("--device", choices=("auto", "cpu", "cuda"), help="training device (node config)")
    client.add_argument(
        "--server-identity",
        metavar="FINGERPRINT|FILE",
        help="pinned server identity (default identity.pub in the --keys folder if present); required unless "
        "--insecure. "
        "This node then accepts only instructions that identity signed, and seals every reply",
    )
    client.add_argument(
        "--insecure",
        action="store_true",
        help="no TLS and no authentication; without a pinned identity also unsealed (local experiments only)",
    )
    client.add_argument(
        "--suite",
        action="append",
        choices=("x25519", "mlkem768-x25519"),
        help="HPKE suite this node accepts (repeatable; default: all)",
    )
    client.add_argument(
        "--require-dp", action="store_true", help="refuse to train unless the run uses sample-level DP-SGD"
    )
    client.add_argument(
        "--max-epsilon",
        type=float,
        metavar="E",
        help="this node's epsilon cap per run (implies --require-dp): trains with min(run's, E)",
    )
    client.add_argument("--delta", type=float, metavar="D", help="this node's delta: trains with min(run's, D)")
    _add_allow_plugin_arg(client, "node", "task")
    client.add_argument(
        "--state",
        metavar="DIR",
        help="SuperNode log and node privacy ledger (default ~/.fedvault/client-<I>; made 0700, its files 0600)",
    )
    client.add_argument(
        "--startup-timeout", type=float, default=60.0, metavar="S", help="seconds to wait for the SuperNode to join"
    )
    client.add_argument(
        "--poll-interval",
        type=float,
        default=1.0,
        metavar="S",
        help="seconds the idle SuperNode waits before asking the server again for a message (Flower's "
        "fixed 3 s at most; every round's instruction waits up to this long, and every client asks this often)",
    )
    client.add_argument(
        "--cold-clientapp",
        action="store_true",
        help="start a fresh flwr-clientapp process for every message (Flower's default: about 4 s of imports "
        "each) instead of forking it from this node's warm, pre-imported process",
    )
    client.set_defaults(func=cmd_client)


def _add_passphrase_arg(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--passphrase-file",
        metavar="FILE",
        help=f"{what} (its content, one trailing newline removed; default: ${PASSPHRASE_ENV} if set)",
    )


def _add_allow_plugin_arg(parser: argparse.ArgumentParser, party: str, kinds: str) -> None:
    parser.add_argument(
        "--allow-plugin",
        action="append",
        metavar="SPEC",
        help=f"let a run name the {kinds} 'package.module:attr' SPEC (repeatable; written to this {party}'s own "
        "policy, which the run config cannot change). Built-ins and installed entry points need no allowing; "
        "any other module:attr is refused in one line before it is imported, since importing it runs the "
        "code of whoever wrote the run config",
    )


def _add_superlink_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--superlink",
        metavar="ADDRESS",
        help="admin address of a running SuperLink (printed by `fedvault server`: 'admin API (flwr) on "
        "127.0.0.1:PORT'; run this on the server machine) to apply the change to now",
    )


# ---- fedvault keys init | rotate | revoke -----------------------------------------------------


def cmd_keys_init(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Create the keys directory (TLS, node keys, the server identity) and explain it."""
    out = out or sys.stdout  # looked up per call: tests and callers redirect sys.stdout
    directory = Path(args.dir).expanduser().resolve()
    server = ServerKeys(directory / "server")
    if not args.force:
        for path in (server.identity_key, server.identity_pub):
            if path.exists():
                raise KeysError(f"key file {path} already exists (pass --force to replace it)")
    passphrase = read_passphrase(getattr(args, "passphrase_file", None))
    layout = init_keys(directory, args.clients, args.address, overwrite=args.force, passphrase=passphrase)
    fingerprint = identity.generate_identity(layout.server.directory, overwrite=args.force).fingerprint
    share_identity(layout)
    out.write(describe_keys(layout, args.clients, args.address, fingerprint, encrypted=passphrase is not None))
    return 0


def describe_keys(
    layout: KeyLayout, clients: int, addresses: Sequence[str], fingerprint: str, encrypted: bool = False
) -> str:
    """What ``fedvault keys init`` made and what to copy where."""
    d = layout.directory
    dial = join_host_port(next(iter(addresses), "127.0.0.1"), 8000)
    made = [
        ("ca/", "CA key and certificate: keep offline; only `keys rotate --server-tls` needs it"),
        (
            "server/",
            f"for the server machine: TLS (valid for {', '.join([*LOCAL_ADDRESSES, *addresses])}), "
            "identity, the clients' public keys, revoked_keys",
        ),
        ("clients/client-<i>/", f"for client machine i (1..{clients}) only: its node key, ca.pem, identity.pub"),
    ]
    lines = [f"keys written to {d}" + (" (private keys encrypted with the passphrase)" if encrypted else "")]
    lines += [f"  {name:<28} {what}" for name, what in made]
    lines.append(f"server identity fingerprint (clients pin it): {fingerprint}")
    lines.append(f"  {layout.server.directory} -> the server machine, as SERVER_KEYS")
    lines.append(f"  {d / 'clients' / 'client-i'} -> client machine i, as KEYS")
    pass_hint = " --passphrase-file FILE" if encrypted else ""
    lines.append(f"then run: fedvault server --keys SERVER_KEYS{pass_hint} --state STATE ...")
    lines.append(
        f"     and: fedvault client --server {dial} --keys KEYS{pass_hint} --client-id i --num-partitions {clients}"
    )
    return "\n".join(lines) + "\n"


def cmd_keys_rotate(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """``fedvault keys rotate DIR --client I | --server-tls``."""
    out = out or sys.stdout  # looked up per call: tests and callers redirect sys.stdout
    if args.client is None and not args.server_tls:
        raise ConfigError("give --client I (a new node key) and/or --server-tls (a new server certificate)")
    if args.address and not args.server_tls:
        raise ConfigError("--address only applies with --server-tls")
    layout = load_layout(args.dir)
    passphrase = read_passphrase(args.passphrase_file)
    if args.server_tls:
        server = rotate_server_tls(layout, args.address, passphrase)
        _say(out, f"new server TLS key and certificate: {server.server_key}, {server.server_cert}")
        _say(out, "copy both to the server's keys folder and restart `fedvault server`")
    if args.client is not None:
        old = rotate_client_key(layout, args.client, passphrase)
        client = layout.client(args.client)
        _say(out, f"new node key for client {args.client}: {client.private_key}")
        if old is not None:
            _say(out, f"its old key is revoked in {layout.server.revoked_keys}")
        _say(
            out,
            f"copy {client.directory} to client machine {args.client}, and "
            f"{layout.server.client_public_key(args.client)} and {layout.server.revoked_keys} "
            "to the server's keys folder",
        )
        if args.superlink:
            with _admin_connection(args.superlink, layout.server) as connection:
                from fedvault.deploy.superlink import register_node, unregister_public_keys

                node_id = register_node(connection, layout.server.client_public_key(args.client))
                _say(out, f"registered on SuperLink {args.superlink} as node {node_id}")
                if old is not None:
                    _report_unregistered(out, args.superlink, unregister_public_keys(connection, [old]))
    return 0


def cmd_keys_revoke(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """``fedvault keys revoke DIR --client I [--superlink ADDRESS]``."""
    out = out or sys.stdout  # looked up per call: tests and callers redirect sys.stdout
    server = server_part(args.dir)
    lines, newly = revoke_client(server, args.client)
    state = "revoked" if newly else "was already revoked"
    _say(out, f"client {args.client}'s key {state} in {server.revoked_keys}")
    if args.superlink:
        with _admin_connection(args.superlink, server) as connection:
            from fedvault.deploy.superlink import unregister_public_keys

            _report_unregistered(out, args.superlink, unregister_public_keys(connection, lines))
    else:
        _say(
            out,
            f"a server started with this folder never registers it; for a running one run on the server machine: "
            f"fedvault keys revoke SERVER_KEYS --client {args.client} --superlink ADMIN_ADDRESS",
        )
    return 0


@contextlib.contextmanager
def _admin_connection(address: str, server: ServerKeys) -> Iterator[Any]:
    """A ``flwr`` connection to the admin API at ``address``, verified with the server's CA, in a
    throw-away FLWR_HOME."""
    import tempfile

    from fedvault.deploy.superlink import write_connection

    with tempfile.TemporaryDirectory(prefix="fedvault-admin-") as home:
        yield write_connection(Path(home), address, server.ca_cert)


def _report_unregistered(out: TextIO, address: str, done: Mapping[str, int | None]) -> None:
    nodes = [node for node in done.values() if node is not None]
    if nodes:
        _say(out, f"unregistered node {', '.join(map(str, nodes))} from SuperLink {address}: its requests are refused")
    else:
        _say(out, f"SuperLink {address} has no registered node with that key (unknown there, or already unregistered)")


# ---- fedvault server --------------------------------------------------------------------------


def resolve_server_config(
    config_file: str | None, overrides: Sequence[str], state_dir: Path, resume_dir: str | None = None
) -> RunConfig:
    """The run's config: file + overrides with an absolute ``run-dir`` (new, under
    ``state_dir/runs`` unless set), or for ``resume_dir`` its ``config.toml`` + overrides with
    ``resume = true``. Refuses to start a new run in a directory that already holds one."""
    if resume_dir is not None:
        if config_file is not None:
            raise ConfigError("give either a CONFIG file or --resume RUN_DIR (which brings its own config)")
        run_dir = Path(resume_dir).expanduser().resolve()
        if not (run_dir / CONFIG_FILE).is_file():
            raise ConfigError(f"--resume {run_dir}: not a run directory (no {CONFIG_FILE})")
        from fedvault.server.checkpoint import list_checkpoints

        if not list_checkpoints(run_dir):
            raise ConfigError(f"--resume {run_dir}: no checkpoint yet (no round finished; start a new run)")
        fixed = ["resume=true", f"run-dir={_toml_string(str(run_dir))}"]
        return RunConfig.from_sources(run_dir / CONFIG_FILE, [*overrides, *fixed])
    cfg = RunConfig.from_sources(config_file, overrides)
    if cfg.resume:
        raise ConfigError("resume = true needs --resume RUN_DIR (it names the run to continue)")
    run_dir = Path(cfg.run_dir).expanduser() if cfg.run_dir else default_run_dir(cfg.task, state_dir / RUNS_DIR)
    run_dir = run_dir.resolve()
    if (run_dir / CONFIG_FILE).exists():
        raise ConfigError(f"run-dir {run_dir} already holds a run; continue it with --resume {run_dir}")
    return RunConfig.from_flat({**cfg.to_flat(), "run-dir": str(run_dir)})


def write_app_dir(
    directory: str | Path,
    run_config: Mapping[str, Any],
    components: Mapping[str, str] = FEDVAULT_COMPONENTS,
    name: str = "fedvault-deployment",
    mode: int = 0o644,
) -> Path:
    """Write ``directory/pyproject.toml``: a Flower app whose components are ``components`` and
    whose ``[tool.flwr.app.config]`` is ``run_config`` (flat ``a.b`` keys become tables).

    The components are imported from the environment the SuperLink and SuperNodes run in
    (fedvault disables Flower's runtime dependency installation), so the app dir holds no code.
    """
    from flwr.common.config import unflatten_dict

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    document = {
        "project": {
            "name": name,
            "version": "1.0.0",
            "license": "Apache-2.0",
            "description": "Generated by fedvault: the run config of one deployment run",
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "fedvault",
                    "components": dict(components),
                    "config": unflatten_dict(dict(run_config)),
                }
            }
        },
    }
    text = tomli_w.dumps(document).encode()
    atomic_write(directory / "pyproject.toml", lambda fh: fh.write(text), mode)
    return directory


def cmd_server(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """``fedvault server``: SuperLink + one run; exit 0 only if the run completed every round."""
    out = out or sys.stdout  # looked up per call: tests and callers redirect sys.stdout
    shown = io.StringIO() if args.quiet else out  # --quiet: the run's log is still in STATE/run-<id>.log
    from fedvault.deploy.superlink import start_superlink, submit_run
    from fedvault.server.tracking import check_tracking

    state_dir = Path(args.state).expanduser().resolve()
    cfg = resolve_server_config(args.config, args.overrides, state_dir, args.resume)
    layout = None
    if not args.insecure:
        if args.keys is None:
            raise ConfigError("--keys DIR is required (or --insecure for a local experiment)")
        layout = load_server_keys(args.keys, allow_private_keys=args.allow_ca_and_client_keys)
        registrable = len(layout.registrable_public_keys())
        if registrable < cfg.num_clients:
            raise ConfigError(
                f"num-clients = {cfg.num_clients} but {layout.directory} has only {registrable} client keys "
                f"that are not revoked (fedvault keys init --clients {cfg.num_clients}, or keys rotate --client I)"
            )
    passphrase = read_passphrase(args.passphrase_file)
    if layout is not None:
        load_private_key(layout.server_key, passphrase)  # a missing or wrong passphrase stops here
    private_directory(state_dir)
    if cfg.sealing.enabled(deployed=True) and not cfg.sealing.identity_key:
        identity_key = _server_identity_key(layout, state_dir)
        cfg = RunConfig.from_flat({**cfg.to_flat(), "sealing.identity-key": str(identity_key)})
    server_policy = _server_policy_env(cfg, state_dir, args.allow_plugin or ())
    _check_server_plugins(cfg, server_policy)  # a plug-in the ServerApp would refuse stops here, in one line
    check_tracking(cfg)  # so does a tracker that is not installed
    host = args.host or ("127.0.0.1" if args.insecure else "0.0.0.0")
    with _sigterm_as_interrupt():
        superlink = start_superlink(
            state_dir,
            layout,
            host=host,
            port=args.port,
            insecure=args.insecure,
            timeout=args.startup_timeout,
            env=server_policy,  # for the ServerApp the SuperLink starts
            passphrase=passphrase,
        )
        try:
            dial = _client_address(layout, host, args.port)
            _say(
                shown,
                f"SuperLink (pid {superlink.process.pid}) listening on {join_host_port(host, args.port)} for "
                f"SuperNodes (Fleet API only); state {state_dir}",
            )
            _say(
                shown,
                f"admin API (flwr) on {superlink.connection.address} only: "
                f"FLWR_HOME={superlink.connection.flwr_home} flwr ls {superlink.connection.name}",
            )
            keys_hint = "--insecure" if layout is None else "--keys KEYS"
            _say(
                shown,
                f"clients: fedvault client --server {dial} {keys_hint} --client-id <1..{cfg.num_clients}> "
                f"--num-partitions {cfg.num_clients}",
            )
            if cfg.sealing.enabled(deployed=True):
                _say(
                    shown,
                    f"server identity fingerprint (clients pin it with --server-identity): "
                    f"{_fingerprint(Path(cfg.sealing.identity_key))}",
                )
            _say(shown, "ready")
            app_dir = write_app_dir(private_directory(state_dir / APP_DIR), cfg.to_flat(), mode=0o600)
            run_id = submit_run(superlink.connection, app_dir)
            _say(
                shown,
                f"run {run_id} submitted; run directory {cfg.run_dir}"
                + (" (resuming from its latest checkpoint)" if cfg.resume else ""),
            )
            also = [superlink.process] if args.verbose else []  # Flower's own SuperLink log, interleaved
            status = follow_run(superlink, run_id, state_dir / f"run-{run_id}.log", shown, also)
            code = _report(out, run_id, status, Path(cfg.run_dir))
            if args.keep_running:
                _say(shown, "run finished; SuperLink keeps serving (Ctrl-C to stop)")
                supervise([superlink.process])
            return code
        finally:
            superlink.stop()


def follow_run(superlink: Any, run_id: int, log_path: Path, out: TextIO, also: Sequence[ManagedProcess] = ()) -> str:
    """Print the run's log (``flwr log --stream``), and the logs of ``also``, as they grow; return the
    run's final status.

    Raises :class:`~fedvault.deploy.processes.ProcessError` if the SuperLink exits first.
    """
    from fedvault.deploy.superlink import run_status

    connection = superlink.connection
    streamer = start_process(
        [executable("flwr"), "log", str(run_id), connection.name, "--stream"],
        name="flwr log",
        log_path=log_path,
        env=connection.env(),
        umask=PRIVATE_UMASK,
    )
    printed, stream_ended_at, next_poll = 0, None, time.monotonic() + STATUS_POLL_S
    printed_also = [0] * len(also)
    try:
        while True:
            printed = _print_new(streamer, printed, out)
            printed_also = [_print_new(process, done, out) for process, done in zip(also, printed_also)]
            if not superlink.process.alive():
                raise exited_error(superlink.process, f"while run {run_id} was going")
            if not superlink.front.alive():
                raise DeployError(
                    f"the public Fleet front on {superlink.front.address} stopped while run {run_id} was going"
                )
            now = time.monotonic()
            if stream_ended_at is None and not streamer.alive():
                stream_ended_at, next_poll = now, now
            if now >= next_poll:
                status = run_status(connection, run_id)
                if status.startswith("finished"):
                    _print_new(streamer, printed, out)
                    return status
                if stream_ended_at is not None and now - stream_ended_at > FINISH_GRACE_S:
                    raise DeployError(f"log of run {run_id} ended but its status is still '{status}'")
                next_poll = now + (1.0 if stream_ended_at is not None else STATUS_POLL_S)
            time.sleep(0.5)
    finally:
        stop(streamer)


def _print_new(streamer: ManagedProcess, printed: int, out: TextIO) -> int:
    text = streamer.log_text()
    if len(text) > printed:
        out.write(text[printed:])
        out.flush()
    return len(text)


def _report(out: TextIO, run_id: int, status: str, run_dir: Path) -> int:
    """One line with the run's outcome; the exit code (0 only when every round ran)."""
    summary_path = run_dir / SUMMARY_FILE
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else None
    if status != _COMPLETED or summary is None:
        _say(
            out,
            f"run {run_id} {status}" + ("" if summary else f" without a summary in {run_dir}") + " (its log is above)",
        )
        return 1
    final = summary.get("final_accuracy")
    accuracy = "n/a" if final is None else f"{summary['initial_accuracy']:.4f} -> {final:.4f}"
    _say(out, f"run {run_id} {status}: {summary['rounds']} rounds, accuracy {accuracy}; run directory {run_dir}")
    if summary.get("stopped"):
        _say(out, f"run {run_id} stopped early: {summary['stopped']}")
        return 1
    return 0


def _client_address(layout: ServerKeys | None, host: str, port: int) -> str:
    """The address clients should dial: the host, or when listening on all interfaces the first
    non-local name in the server certificate (127.0.0.1 if there is none)."""
    if host not in _ANY_HOST:
        return join_host_port(host, port)
    names: list[str] = []
    if layout is not None:
        cert = x509.load_pem_x509_certificate(layout.server_cert.read_bytes())
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(n.value) for n in sans if str(n.value) not in LOCAL_ADDRESSES]
    return join_host_port(names[0] if names else "127.0.0.1", port)


SERVER_POLICY_FILE = "server-policy.toml"


def _server_policy_env(cfg: RunConfig, state_dir: Path, allow_plugins: Sequence[str] = ()) -> dict[str, str]:
    """``$FEDVAULT_SERVER_POLICY`` for the SuperLink and the ServerApp it starts: the operator's own
    policy file when the variable already names one, else ``STATE/server-policy.toml`` (0600) written
    from this command's config and flags (``--allow-plugin``: its ``allow-plugins``). A run config
    edited on the SuperLink then cannot turn sealing off, swap the identity
    (:class:`fedvault.server.sealing.ServerSealingPolicy`) or name other plug-ins (:mod:`fedvault.server.plugins`)."""
    from fedvault.plugins import PluginPolicy
    from fedvault.server.sealing import SERVER_POLICY_ENV

    allowed = sorted(PluginPolicy.from_value(list(allow_plugins), "--allow-plugin").allowed)
    if os.environ.get(SERVER_POLICY_ENV):
        if allowed:
            raise ConfigError(
                f"--allow-plugin with ${SERVER_POLICY_ENV} set ({os.environ[SERVER_POLICY_ENV]}): "
                "list the plug-ins in that file's allow-plugins instead"
            )
        return {SERVER_POLICY_ENV: os.environ[SERVER_POLICY_ENV]}
    policy: dict[str, Any] = {"mode": "on" if cfg.sealing.enabled(deployed=True) else "off", "suite": cfg.sealing.suite}
    if cfg.sealing.identity_key:
        policy["identity-key"] = str(Path(cfg.sealing.identity_key).resolve())
    if allowed:
        policy["allow-plugins"] = allowed
    path = state_dir / SERVER_POLICY_FILE
    private_directory(state_dir)
    atomic_write(path, lambda handle: handle.write(tomli_w.dumps(policy).encode()), mode=0o600)
    return {SERVER_POLICY_ENV: str(path)}


def _check_server_plugins(cfg: RunConfig, server_policy: Mapping[str, str]) -> None:
    """PluginRefused (one line) when the ServerApp's policy would refuse the run's task or strategy."""
    from fedvault.server.plugins import check_run_plugins, plugin_policy_file
    from fedvault.server.sealing import SERVER_POLICY_ENV

    check_run_plugins(cfg, plugin_policy_file(server_policy[SERVER_POLICY_ENV]))


def _server_identity_key(layout: ServerKeys | None, state_dir: Path) -> Path:
    """The keys directory's ``identity.key``, else one made once in ``state_dir/identity``."""
    if layout is not None and layout.identity_key.is_file():
        return layout.identity_key
    folder = state_dir / "identity"
    if not (folder / identity.IDENTITY_KEY).is_file():
        identity.generate_identity(folder)
    return folder / identity.IDENTITY_KEY


def _fingerprint(identity_key: Path) -> str:
    from fedvault.security.identity import fingerprint, load_identity

    return fingerprint(load_identity(identity_key).public_key())


def _toml_string(value: str) -> str:
    """``value`` as a TOML basic string for ``--set`` (backslashes and quotes escaped)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


# ---- fedvault client --------------------------------------------------------------------------


def cmd_client(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """``fedvault client``: a SuperNode for partition ``client-id - 1``, supervised until Ctrl-C."""
    out = out or sys.stdout  # looked up per call: tests and callers redirect sys.stdout
    from fedvault.deploy.supernode import start_supernode

    if not 1 <= args.client_id <= args.num_partitions:
        raise ConfigError(f"--client-id must be in 1..{args.num_partitions} (--num-partitions), got {args.client_id}")
    if args.insecure:
        root_certificates = private_key = None
    else:
        if args.keys is None:
            raise ConfigError("--keys DIR is required (or --insecure for a local experiment)")
        keys = load_client_keys(args.keys, args.client_id)
        root_certificates, private_key = keys.ca_cert, keys.private_key
    passphrase = read_passphrase(args.passphrase_file)
    if private_key is not None:
        load_private_key(private_key, passphrase)  # a missing or wrong passphrase stops here
    state_dir = Path(args.state or Path.home() / ".fedvault" / f"client-{args.client_id}").expanduser().resolve()
    node_config: dict[str, Any] = {"ledger-path": str(state_dir / "node-ledger.sqlite")}
    if args.device:
        node_config["device"] = args.device
    if args.data_path:
        node_config["data-path"] = str(Path(args.data_path).expanduser().resolve())
    node_config.update(client_policy_config(args, state_dir))
    with _sigterm_as_interrupt():
        try:
            node = start_supernode(
                args.server,
                state_dir,
                partition_id=args.client_id - 1,
                num_partitions=args.num_partitions,
                root_certificates=root_certificates,
                private_key=private_key,
                insecure=args.insecure,
                node_config=node_config,
                timeout=args.startup_timeout,
                passphrase=passphrase,
                warm_clientapp=not args.cold_clientapp,
                poll_interval=args.poll_interval,
            )
        except ProcessError as err:
            first = str(err).splitlines()[0]
            raise DeployError(f"{first} (SuperNode log: {state_dir / 'supernode.log'})") from None
        _say(
            out,
            f"SuperNode (pid {node.process.pid}) connected to {args.server} as node {node.node_id}, "
            f"partition {args.client_id - 1} of {args.num_partitions}; log {node.process.log_path}",
        )
        _say(out, "ready")
        code = _supervise_node(node, NodeActivity(Path(node_config["answered-rounds"])), out)
    if code is None:
        return 0  # Ctrl-C or SIGTERM
    if code == 0:
        # Flower's SuperNode interrupts itself when the SuperLink answers its heartbeat with 401:
        # its key is no longer registered there.
        raise DeployError(
            f"SuperNode {node.node_id} stopped: the SuperLink no longer accepts its key (unregistered, e.g. by "
            f"`fedvault keys revoke`; a new key: `fedvault keys rotate --client {args.client_id}`)"
        )
    raise DeployError(f"SuperNode exited with code {code} (log: {node.process.log_path})")


def _supervise_node(node: Any, activity: NodeActivity, out: TextIO) -> int | None:
    """Wait until the SuperNode exits (its exit code) or Ctrl-C / SIGTERM (None), saying each round
    it answers and each run's end; then stop it. Call inside :func:`_sigterm_as_interrupt`."""
    try:
        while node.process.alive():
            for line in activity.poll():
                _say(out, line)
            time.sleep(0.5)
        return int(node.process.popen.returncode)
    except KeyboardInterrupt:
        return None
    finally:
        node.stop()


def client_policy_config(args: argparse.Namespace, state_dir: Path) -> dict[str, Any]:
    """This node's security policy as node config keys (:mod:`fedvault.client.policy`): the run
    config cannot change them. Without a pin only ``--insecure`` starts, unsealed and warned."""
    from fedvault.client.policy import ClientPolicy

    policy: dict[str, Any] = {"answered-rounds": str(state_dir / "answered-rounds")}
    pin = args.server_identity or _default_pin(args.keys, getattr(args, "client_id", None))
    if pin:
        policy["server-identity"] = str(Path(pin).resolve()) if Path(pin).is_file() else pin
    elif args.insecure:
        policy["sealing"] = "off"
        print(
            "fedvault client: WARNING: --insecure without a pinned server identity: this node accepts "
            "unsigned instructions from anyone who reaches it and sends its updates, metrics and DP events "
            "UNSEALED (the SuperLink stores them in plaintext). Local experiments only.",
            file=sys.stderr,
        )
    else:
        raise ConfigError(
            "no server identity pinned: pass --server-identity FINGERPRINT|identity.pub (or put identity.pub "
            "in the --keys folder); --insecure runs without TLS and unsealed, for local experiments only"
        )
    if args.suite:
        policy["sealing-suites"] = ",".join(args.suite)
    if args.require_dp:
        policy["dp-required"] = True
    if args.max_epsilon is not None:
        policy["dp-max-epsilon"] = args.max_epsilon
    if args.delta is not None:
        policy["dp-delta"] = args.delta
    if args.allow_plugin:
        policy["allow-plugins"] = ",".join(args.allow_plugin)  # node config values are scalars
    ClientPolicy.from_values(policy)  # a bad pin or value fails here, not in the first round
    return policy


def _default_pin(keys_dir: str | None, client_id: int | None) -> str | None:
    """``identity.pub`` in the client's keys folder when it exists."""
    if keys_dir is None:
        return None
    folder = client_folder(keys_dir, client_id) if client_id is not None else Path(keys_dir).expanduser()
    path = folder / identity.IDENTITY_PUB
    return str(path) if path.is_file() else None


# ---- shared -----------------------------------------------------------------------------------


def _say(out: TextIO, line: str) -> None:
    out.write(line + "\n")
    out.flush()


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C, so ``finally`` blocks stop the children this command started
    (they run in their own sessions and would outlive a plain kill of this process)."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)

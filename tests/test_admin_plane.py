"""The public port serves only Flower's Fleet API; the admin plane (Control, Runtime) is loopback only.

Two parts. First the Fleet front alone, in this process, in front of a recording upstream over TLS:
what it forwards (exact Fleet POSTs, bodies streamed both ways, connections kept alive on both
sides, forwarding headers set by the front and never by the client) and what it refuses without
the upstream ever seeing it. Then a real deployment (`fedvault keys init`, `fedvault server`, two
`fedvault client`): an outsider that holds only `ca.pem` tries every admin action through Flower's
own `flwr` CLI and through raw HTTPS on the public port, and is refused by the front each time,
while the same calls on the loopback admin address work and the federation completes its run.
Every process is stopped by PID in teardown, also when a test fails.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import signal
import socket
import ssl
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from deploy_helpers import READY, Processes, client_args, run_cli, wait_for
from flwr.proto.control_pb2 import (
    ListRunsRequest,
    RegisterNodeRequest,
    StartRunRequest,
    StopRunRequest,
    StreamLogsRequest,
    UnregisterNodeRequest,
)
from flwr.proto.run_pb2 import GetRunRequest
from flwr.proto.runtime_pb2 import AcquireTaskRequest, PullTaskInputRequest
from waits import seconds

from fedvault.deploy.cli import write_app_dir
from fedvault.deploy.fleet_front import FleetFrontError, start_fleet_front
from fedvault.deploy.fleet_proxy import FLEET_PATHS, REFUSED, allowed
from fedvault.deploy.processes import executable, free_port, wait_for_log
from fedvault.deploy.superlink import CONNECTION_NAME, Connection, flwr_json, list_nodes, run_status, write_connection
from fedvault.security.tls_keys import init_keys

PROTOBUF = {"content-type": "application/protobuf", "accept": "application/protobuf"}
#: Requests the public port must refuse: admin routes, and Fleet look-alikes that a lax prefix or
#: a decoding front would let through.
REFUSED_REQUESTS = [
    ("POST", "/v1/control/list-runs", ListRunsRequest()),
    ("POST", "/v1/control/stream-logs", StreamLogsRequest(run_id=1)),
    ("POST", "/v1/control/start-run", StartRunRequest()),
    ("POST", "/v1/control/stop-run", StopRunRequest(run_id=1)),
    ("POST", "/v1/control/register-node", RegisterNodeRequest(public_key=b"k")),
    ("POST", "/v1/control/unregister-node", UnregisterNodeRequest(node_id=1)),
    ("POST", "/v1/runtime/acquire-task", AcquireTaskRequest()),
    ("POST", "/v1/runtime/pull-task-input", PullTaskInputRequest()),
    ("GET", "/docs", None),
    ("GET", "/openapi.json", None),
    ("GET", "/health", None),
    ("GET", "/v1/fleet/get-run", None),
    ("PUT", "/v1/fleet/get-run", GetRunRequest()),
    ("POST", "/v1/fleet/get-run/", GetRunRequest()),
    ("POST", "/v1/fleet/get-run?x=1", GetRunRequest()),
    ("POST", "/V1/FLEET/GET-RUN", GetRunRequest()),
    ("POST", "/v1/fleet/../control/list-runs", ListRunsRequest()),
    ("POST", "/v1/fleet/%2e%2e/control/list-runs", ListRunsRequest()),
    ("POST", "/v1/fleet/get-run/../../control/list-runs", ListRunsRequest()),
    ("POST", "//v1/control/list-runs", ListRunsRequest()),
    ("POST", "/v1/fleet%2fget-run", GetRunRequest()),
]


def _https(
    address: str, ca: Path, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    """One request with ``path`` sent verbatim (no normalisation) over TLS verified with ``ca``."""
    host, port = address.rsplit(":", 1)
    connection = http.client.HTTPSConnection(
        host, int(port), context=ssl.create_default_context(cafile=str(ca)), timeout=seconds(30)
    )
    try:
        payload = body.SerializeToString() if hasattr(body, "SerializeToString") else body
        connection.request(method, path, body=payload, headers={**PROTOBUF, **(headers or {})})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


# ---- the front alone, before a recording upstream ---------------------------------------------


class Recorder:
    """Upstream ASGI app: records each request it receives (body hashed as it streams in) and
    answers ``x-want-bytes`` bytes of a fixed pattern (or a small JSON echo)."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    async def __call__(self, scope, receive, send) -> None:
        digest, size = hashlib.sha256(), 0
        while True:
            message = await receive()
            chunk = message.get("body", b"")
            digest.update(chunk)
            size += len(chunk)
            if not message.get("more_body", False):
                break
        headers = [(k.decode(), v.decode()) for k, v in scope["headers"]]
        self.seen.append(
            {
                "method": scope["method"],
                "path": scope["raw_path"],
                "headers": headers,
                "sha256": digest.hexdigest(),
                "size": size,
                "peer_port": scope["client"][1],
            }
        )
        want = int(dict(headers).get("x-want-bytes", "0"))
        body = _pattern(want) if want else json.dumps({"size": size}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/protobuf"), (b"content-length", str(len(body)).encode())],
            }
        )
        for start in range(0, len(body), 1 << 16):
            await send({"type": "http.response.body", "body": body[start : start + (1 << 16)], "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _pattern(size: int) -> bytes:
    return (bytes(range(256)) * (size // 256 + 1))[:size]


def _serve(app: Any, cert: Path, key: Path) -> tuple[uvicorn.Server, threading.Thread, int]:
    """``app`` under uvicorn with TLS on a free loopback port, in a daemon thread."""
    listener = socket.create_server(("127.0.0.1", 0))
    config = uvicorn.Config(
        app, ssl_certfile=str(cert), ssl_keyfile=str(key), lifespan="off", ws="none", log_config=None
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    wait_for(lambda: server.started, seconds(20), "upstream test server")
    return server, thread, listener.getsockname()[1]


@pytest.fixture(scope="module")
def front(tmp_path_factory):
    keys = init_keys(tmp_path_factory.mktemp("front") / "k", 1).server
    recorder = Recorder()
    upstream, thread, upstream_port = _serve(recorder, keys.server_cert, keys.server_key)
    fleet_front = start_fleet_front(
        "127.0.0.1",
        free_port(),
        f"https://127.0.0.1:{upstream_port}",
        certfile=keys.server_cert,
        keyfile=keys.server_key,
        upstream_ca=keys.ca_cert,
    )
    try:
        yield {"front": fleet_front, "recorder": recorder, "keys": keys, "upstream_port": upstream_port}
    finally:
        fleet_front.stop()
        upstream.should_exit = True
        thread.join(seconds(10))


def test_the_allow_list_is_exactly_flowers_fleet_router():
    from flwr.superlink.routers.fleet.router import router

    routes = {(method, route.path) for route in router.routes for method in route.methods}
    assert routes == {("POST", path) for path in FLEET_PATHS}
    assert allowed("POST", b"/v1/fleet/pull-messages", b"")
    assert not allowed("POST", b"/v1/fleet/pull-messages", b"a=1")
    assert not allowed("GET", b"/v1/fleet/pull-messages", b"")
    assert not allowed("POST", b"/v1/fleet/pull-messages/", b"")
    assert not allowed("POST", b"/v1/fleet/", b"")


def test_refused_requests_get_403_and_never_reach_the_upstream(front):
    recorder, ca = front["recorder"], front["keys"].ca_cert
    recorder.seen.clear()
    for method, path, body in REFUSED_REQUESTS:
        status, reply = _https(front["front"].address, ca, method, path, body)
        assert status == 403, (method, path, status, reply)
        assert json.loads(reply) == {"detail": REFUSED}
    assert recorder.seen == []


def test_fleet_bodies_stream_both_ways_over_kept_alive_connections(front):
    recorder, ca = front["recorder"], front["keys"].ca_cert
    recorder.seen.clear()
    host, port = front["front"].address.rsplit(":", 1)
    connection = http.client.HTTPSConnection(host, int(port), context=ssl.create_default_context(cafile=str(ca)))
    try:
        upload = _pattern(24 << 20)  # 24 MiB in 1 MiB chunks, chunked transfer encoding
        chunks = (upload[i : i + (1 << 20)] for i in range(0, len(upload), 1 << 20))
        connection.request("POST", "/v1/fleet/push-object", body=chunks, headers=PROTOBUF, encode_chunked=True)
        first = connection.getresponse()
        assert first.status == 200 and json.loads(first.read()) == {"size": len(upload)}
        sock = connection.sock
        connection.request(
            "POST", "/v1/fleet/pull-object", body=b"x" * 10, headers={**PROTOBUF, "x-want-bytes": "9000000"}
        )
        second = connection.getresponse()
        assert second.status == 200 and second.read() == _pattern(9_000_000)
        assert connection.sock is sock  # the client's connection was kept alive
    finally:
        connection.close()
    pushed, pulled = recorder.seen
    assert pushed["path"] == b"/v1/fleet/push-object" and pushed["size"] == len(upload)
    assert pushed["sha256"] == hashlib.sha256(upload).hexdigest()
    assert pulled["path"] == b"/v1/fleet/pull-object" and pulled["size"] == 10
    assert pushed["peer_port"] == pulled["peer_port"]  # one pooled upstream connection for both


def test_forwarding_headers_come_from_the_front_and_flower_headers_pass(front):
    recorder, ca = front["recorder"], front["keys"].ca_cert
    recorder.seen.clear()
    spoofed = {
        "x-forwarded-for": "203.0.113.9",
        "forwarded": "for=203.0.113.9",
        "x-forwarded-proto": "gopher",
        "connection": "keep-alive, x-private",
        "x-private": "hop",
        "flwr-public-key": "cHVibGlj",
        "flwr-signature": "c2ln",
    }
    status, _ = _https(front["front"].address, ca, "POST", "/v1/fleet/get-run", GetRunRequest(), spoofed)
    assert status == 200
    (seen,) = recorder.seen
    names = [name for name, _ in seen["headers"]]
    headers = dict(seen["headers"])
    assert names.count("x-forwarded-for") == 1 and headers["x-forwarded-for"] == "127.0.0.1"
    assert headers["x-forwarded-proto"] == "https"
    assert "forwarded" not in headers and "x-private" not in headers
    assert headers["host"] == f"127.0.0.1:{front['upstream_port']}"
    assert headers["flwr-public-key"] == "cHVibGlj" and headers["flwr-signature"] == "c2ln"


def test_unreachable_upstream_is_502_and_a_taken_port_is_a_clear_error(front):
    keys = front["keys"]
    nowhere = start_fleet_front(
        "127.0.0.1",
        free_port(),
        f"https://127.0.0.1:{free_port()}",
        certfile=keys.server_cert,
        keyfile=keys.server_key,
        upstream_ca=keys.ca_cert,
    )
    try:
        status, reply = _https(nowhere.address, keys.ca_cert, "POST", "/v1/fleet/get-run", GetRunRequest())
        assert status == 502 and "SuperLink is unreachable" in json.loads(reply)["detail"]
        with pytest.raises(FleetFrontError, match=rf"cannot listen on {nowhere.address} for SuperNodes"):
            start_fleet_front(
                "127.0.0.1",
                int(nowhere.address.rsplit(":", 1)[1]),
                "https://127.0.0.1:9",
                certfile=keys.server_cert,
                keyfile=keys.server_key,
                upstream_ca=keys.ca_cert,
            )
    finally:
        nowhere.stop()
    assert not nowhere.alive()


# ---- a real deployment and an outsider with ca.pem --------------------------------------------


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """Keys for two clients, `fedvault server --keep-running` with a one-round run submitted and
    waiting for its clients, and an outsider's FLWR_HOME that names the public port."""
    root = tmp_path_factory.mktemp("admin-plane")
    processes = Processes()
    try:
        made = run_cli(["keys", "init", str(root / "keys"), "--clients", "2"])
        assert made.returncode == 0, made.stderr
        port = free_port()
        server = processes.start(_server_args(root, port), root / "server.log", "fedvault server")
        wait_for_log(server, READY, seconds(90))
        run_id = int(wait_for_log(server, r"run (\d+) submitted", seconds(90)).group(1))
        admin_address = re.search(r"admin API \(flwr\) on (\S+) only", server.log_text()).group(1)
        ca = root / "keys" / "server" / "ca.pem"
        admin = Connection(CONNECTION_NAME, root / "state" / "flwr-home", admin_address, ca)
        outsider = write_connection(root / "outsider-home", f"127.0.0.1:{port}", ca, name="outside")
        yield {
            "root": root,
            "port": port,
            "server": server,
            "run_id": run_id,
            "admin": admin,
            "outsider": outsider,
            "processes": processes,
        }
    finally:
        processes.stop_all()


@pytest.mark.integration
def test_the_superlink_listens_on_loopback_only(deployment):
    superlink_pid = int(re.search(r"SuperLink \(pid (\d+)\)", deployment["server"].log_text()).group(1))
    argv = Path(f"/proc/{superlink_pid}/cmdline").read_bytes().decode().split("\0")
    admin_host, admin_port = deployment["admin"].address.rsplit(":", 1)
    assert argv[argv.index("--host") + 1] == admin_host == "127.0.0.1"
    assert argv[argv.index("--port") + 1] == admin_port != str(deployment["port"])


@pytest.mark.integration
def test_outsider_flwr_cli_is_refused_every_admin_action(deployment, tmp_path):
    run_id, outsider, admin = str(deployment["run_id"]), deployment["outsider"], deployment["admin"]
    stranger = init_keys(tmp_path / "stranger", 1)  # a key the server never registered
    registered = {node["node-id"] for node in list_nodes(admin)}
    evil_app = write_app_dir(tmp_path / "evil", {"task": "digits"})
    actions = {
        "list runs": ["ls"],
        "read logs": ["log", run_id, "--show"],
        "submit a run": ["run", str(evil_app)],
        "stop the run": ["stop", run_id],
        "register a node key": ["supernode", "register", str(stranger.server.client_public_key(1))],
        "unregister a node": ["supernode", "unregister", str(min(registered))],
        "list nodes": ["supernode", "list"],
    }
    for what, args in actions.items():
        done = _flwr(outsider, [*args, outsider.name])
        assert done.returncode != 0, f"{what}: {done.stdout}{done.stderr}"
        assert REFUSED in _squash(done.stdout + done.stderr), f"{what}: {done.stdout}{done.stderr}"
    # The same CLI on the loopback admin address works: the refusals are the front's doing.
    for args in (["ls"], ["log", run_id, "--show"], ["supernode", "list"]):
        done = _flwr(admin, [*args, admin.name])
        assert done.returncode == 0, f"admin {args}: {done.stdout}{done.stderr}"
    assert {node["node-id"] for node in list_nodes(admin)} == registered
    assert not run_status(admin, deployment["run_id"]).startswith("finished")


@pytest.mark.integration
def test_raw_https_to_control_and_runtime_paths_is_refused(deployment):
    public, ca = deployment["outsider"].address, deployment["admin"].root_certificates
    for method, path, body in REFUSED_REQUESTS:
        status, reply = _https(public, ca, method, path, body)
        assert status == 403 and json.loads(reply) == {"detail": REFUSED}, (method, path, status, reply)
    # Controls: the same Control request on the admin address is answered; an unsigned Fleet
    # request on the public port reaches the SuperLink, whose node authentication refuses it.
    status, _ = _https(deployment["admin"].address, ca, "POST", "/v1/control/list-runs", ListRunsRequest())
    assert status == 200
    status, reply = _https(public, ca, "POST", "/v1/fleet/get-run", GetRunRequest(run_id=deployment["run_id"]))
    assert status == 401 and b"Invalid SuperNode authentication" in reply
    superlink_log = (deployment["root"] / "state" / "superlink.log").read_text()
    for never in (
        "/v1/control/stop-run",
        "/v1/control/unregister-node",
        "/docs",
        "/openapi.json",
        "/v1/fleet/.",
        "%2e",
    ):
        assert never not in superlink_log, f"{never} reached the SuperLink"


@pytest.mark.integration
def test_a_key_the_outsider_tried_to_register_cannot_join(deployment, tmp_path):
    stranger = init_keys(tmp_path / "stranger", 1)
    stranger.client(1).ca_cert.write_bytes((deployment["root"] / "keys" / "server" / "ca.pem").read_bytes())
    _flwr(deployment["outsider"], ["supernode", "register", str(stranger.server.client_public_key(1)), "outside"])
    done = run_cli(
        [
            *client_args(deployment["port"], stranger.directory, 1, 2, tmp_path / "c"),
            "--startup-timeout",
            str(seconds(30)),
            "--server-identity",
            str(deployment["root"] / "keys" / "server" / "identity.pub"),
        ]
    )
    assert done.returncode == 2
    assert "refused this SuperNode's key: register its .pub" in done.stderr, done.stderr


@pytest.mark.integration
def test_the_federation_still_completes_its_run(deployment):
    """Runs last in this module: it starts the two clients the waiting run needs."""
    root, processes, server = deployment["root"], deployment["processes"], deployment["server"]
    for i in (1, 2):
        client = processes.start(
            client_args(deployment["port"], root / "keys", i, 2, root / f"client-{i}"),
            root / f"client-{i}.log",
            f"fedvault client {i}",
        )
        wait_for_log(client, READY, seconds(60))
    run_id = deployment["run_id"]
    wait_for_log(server, rf"run {run_id} finished:completed: 1 rounds", seconds(240))
    records = [json.loads(line) for line in (root / "runs" / "main" / "metrics.jsonl").read_text().splitlines()]
    assert records[1]["replies_ok"] == 2
    runs = flwr_json(deployment["admin"], ["ls", deployment["admin"].name])["runs"]
    assert [int(run["run-id"]) for run in runs] == [run_id]  # the outsider's submission made none
    superlink_log = (root / "state" / "superlink.log").read_text()
    for path, times in (("register-node", 2), ("unregister-node", 0), ("start-run", 1), ("stop-run", 0)):
        assert superlink_log.count(f'"POST /v1/control/{path} ') == times, path  # fedvault server's own calls only
    wait_for_log(server, "SuperLink keeps serving", seconds(30))
    server.popen.send_signal(signal.SIGTERM)
    assert server.popen.wait(timeout=seconds(60)) == 0, server.log_text()


# ---- helpers ----------------------------------------------------------------------------------


def _server_args(root: Path, port: int) -> list[str]:
    settings = [
        'task="digits"',
        "num-clients=2",
        "num-server-rounds=1",
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
        "--state",
        str(root / "state"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--keep-running",
    ]


def _flwr(connection: Connection, args: list[str]) -> subprocess.CompletedProcess[str]:
    """``flwr ARGS`` in the connection's FLWR_HOME, output captured."""
    return subprocess.run(
        [executable("flwr"), *args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env=connection.env(),
        timeout=seconds(120),
    )


def _squash(text: str) -> str:
    """Output with line wrapping and box drawing undone, for matching a sentence in it."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())

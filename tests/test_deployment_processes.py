"""Real flower-superlink / flower-supernode processes on 127.0.0.1, started the fedvault way.

Every process is stopped by its PID (process group) in a ``finally``, also when a test fails.
"""

from __future__ import annotations

import logging
import signal
import sys
import time

import pytest
from flwr.common.config import parse_config_args
from waits import seconds

from fedvault.deploy.processes import (
    ProcessError,
    child_env,
    format_config,
    free_port,
    start_process,
    stop,
    supervise,
    wait_for_log,
    wait_healthy,
)
from fedvault.deploy.superlink import list_nodes, start_superlink, wait_node_online
from fedvault.deploy.supernode import start_supernode
from fedvault.errors import ConfigError
from fedvault.security.tls_keys import init_keys, revoke_client

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return init_keys(tmp_path_factory.mktemp("keys") / "k", 2)


@pytest.fixture(scope="module")
def superlink(keys, tmp_path_factory):
    link = start_superlink(tmp_path_factory.mktemp("link"), keys.server.directory, port=free_port())
    try:
        yield link
    finally:
        link.stop()


@pytest.fixture
def started():
    """Collects SuperNodes a test starts and stops each of them afterwards."""
    nodes = []
    try:
        yield nodes
    finally:
        for node in nodes:
            node.stop()


def _node(superlink_address, tmp_path, name, **kwargs):
    kwargs.setdefault("timeout", seconds(30))
    kwargs.setdefault("warm_clientapp", False)  # these tests run no ClientApp
    return start_supernode(superlink_address, tmp_path / name, partition_id=0, num_partitions=2, **kwargs)


def _python(code: str, log_path):
    return start_process([sys.executable, "-c", code], name="child", log_path=log_path, env=child_env())


def test_superlink_with_tls_and_node_auth_is_healthy_and_has_the_keys_registered(superlink, keys):
    argv = superlink.process.popen.args
    assert "--enable-supernode-auth" in argv and "--insecure" not in argv
    assert argv[argv.index("--ssl-certfile") + 1] == str(keys.server.server_cert)
    assert "--disable-runtime-dependency-installation" in argv
    assert superlink.database.is_file()
    wait_healthy(superlink.health_address, seconds(10), superlink.process)
    assert set(superlink.node_ids) == set(keys.server.client_public_keys())
    listed = {node["node-id"]: node["status"] for node in list_nodes(superlink.connection)}
    assert {listed[node_id] for node_id in superlink.node_ids.values()} == {"registered"}


def test_registered_supernode_connects_and_shows_online(superlink, keys, tmp_path, started):
    node = _node(
        superlink.address,
        tmp_path,
        "n1",
        root_certificates=keys.client(1).ca_cert,
        private_key=keys.client(1).private_key,
    )
    started.append(node)
    assert node.node_id == superlink.node_ids[keys.server.client_public_key(1)]
    assert wait_node_online(superlink.connection, node.node_id, seconds(15))["status"] == "online"
    assert "partition-id=0 num-partitions=2" in " ".join(node.process.popen.args)


def test_unregistered_supernode_is_refused_with_a_clear_message(superlink, keys, tmp_path):
    outsider = init_keys(tmp_path / "outsider", 1)  # same CA trust, key never registered
    with pytest.raises(ProcessError) as caught:
        _node(
            superlink.address,
            tmp_path,
            "out",
            root_certificates=keys.client(1).ca_cert,
            private_key=outsider.client(1).private_key,
        )
    first_line, _, tail = str(caught.value).partition("\n")
    assert "refused this SuperNode's key: register its .pub" in first_line
    assert "Failed to activate SuperNode" in tail  # Flower's own words are quoted


def test_supernode_without_the_ca_cannot_reach_the_tls_superlink(superlink, keys, tmp_path):
    with pytest.raises(ProcessError) as caught:
        _node(superlink.address, tmp_path, "noca", root_certificates=None, private_key=keys.client(2).private_key)
    first_line, _, tail = str(caught.value).partition("\n")
    assert "TLS verification of the SuperLink failed" in first_line
    assert "CERTIFICATE_VERIFY_FAILED" in tail
    statuses = {n["node-id"]: n["status"] for n in list_nodes(superlink.connection)}
    assert statuses[superlink.node_ids[keys.server.client_public_key(2)]] == "registered"  # never joined


def test_supernode_health_is_serving_before_it_reaches_any_superlink(keys, tmp_path, started):
    nowhere = f"127.0.0.1:{free_port()}"  # nothing listens there
    node = _node(
        nowhere,
        tmp_path,
        "lonely",
        root_certificates=keys.client(1).ca_cert,
        private_key=keys.client(1).private_key,
        wait_connected=False,
    )
    started.append(node)
    wait_for_log(node.process, "Connection attempt failed", seconds(15))
    assert node.process.alive() and "SuperNode ID" not in node.process.log_text()
    wait_healthy(node.health_address, seconds(10), node.process)  # still "healthy": health != connected
    with pytest.raises(ProcessError, match="cannot reach SuperLink .*no connection"):
        _node(
            nowhere,
            tmp_path,
            "lonely2",
            root_certificates=keys.client(2).ca_cert,
            private_key=keys.client(2).private_key,
            timeout=seconds(5),
        )


def test_insecure_superlink_warns_and_accepts_an_unauthenticated_supernode(tmp_path, caplog, started):
    with caplog.at_level(logging.WARNING):
        link = start_superlink(tmp_path / "link", insecure=True, port=free_port())
    try:
        assert any("INSECURE SuperLink" in r.getMessage() for r in caplog.records)
        assert "--insecure" in link.process.popen.args
        assert "--enable-supernode-auth" not in link.process.popen.args
        node = _node(link.address, tmp_path, "n", root_certificates=None, private_key=None, insecure=True)
        started.append(node)
        assert wait_node_online(link.connection, node.node_id, seconds(15))["status"] == "online"
    finally:
        for node in started:
            node.stop()
        started.clear()
        link.stop()


def test_restart_on_the_same_state_keeps_registrations_except_revoked_keys(tmp_path):
    keys = init_keys(tmp_path / "k", 2)
    server = keys.server
    link = start_superlink(tmp_path / "link", server.directory, port=free_port())
    try:
        node_id, revoked_id = (link.node_ids[server.client_public_key(i)] for i in (1, 2))
        assert isinstance(node_id, int) and isinstance(revoked_id, int)
    finally:
        link.stop()
    (revoked,), _ = revoke_client(server, 2)  # while the SuperLink is down: its database still has the key
    again = start_superlink(tmp_path / "link", server.directory, port=free_port())
    try:
        assert again.node_ids == {server.client_public_key(1): None}  # already registered
        assert again.unregistered == {revoked: revoked_id}  # revoked_keys is applied at start
        statuses = {n["node-id"]: n["status"] for n in list_nodes(again.connection)}
        assert statuses == {node_id: "registered", revoked_id: "unregistered"}
    finally:
        again.stop()
    assert (tmp_path / "link").stat().st_mode & 0o777 == 0o700
    for name in ("state.db", "superlink.log", "flwr-home/config.toml"):
        assert (tmp_path / "link" / name).stat().st_mode & 0o777 == 0o600, name


def test_child_that_dies_before_healthy_reports_its_log_tail(tmp_path):
    child = _python("print('boom: bad flag'); raise SystemExit(3)", tmp_path / "c.log")
    try:
        with pytest.raises(ProcessError) as caught:
            wait_healthy(f"127.0.0.1:{free_port()}", seconds(20), child)
        message = str(caught.value)
        assert "exited with code 3 before becoming healthy" in message.splitlines()[0]
        assert "boom: bad flag" in message
    finally:
        stop(child)


def test_stop_reaches_grandchildren_and_escalates_to_sigkill(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    code = (
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(g.pid))\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    child = _python(code, tmp_path / "c.log")
    try:
        wait_for_log(child, "ready", seconds(20))
        grandchild = int(pid_file.read_text())
        assert stop(child, timeout=1) == -signal.SIGKILL  # SIGTERM was ignored
        deadline = time.monotonic() + seconds(5)
        while _running(grandchild) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _running(grandchild)
    finally:
        stop(child, timeout=1)


def test_supervise_stops_the_others_when_one_exits(tmp_path):
    sleeper = _python("import time; time.sleep(60)", tmp_path / "a.log")
    quitter = _python("import time; time.sleep(0.5); raise SystemExit(5)", tmp_path / "b.log")
    try:
        assert supervise([sleeper, quitter]) == 5
        assert not sleeper.alive()
    finally:
        stop(sleeper)
        stop(quitter)


def test_format_config_round_trips_through_flowers_parser():
    values = {
        "partition-id": 3,
        "num-partitions": 10,
        "lr": 1e-05,
        "dp": True,
        "task": "pkg.mod:Task",
        "note": "a b 'c'",
        "path": "C:\\data dir",
    }
    assert parse_config_args([format_config(values)]) == values
    for bad in ({"k": "both ' and \""}, {"k": "line\nbreak"}, {"k": float("nan")}, {"a b": 1}):
        with pytest.raises(ConfigError):
            format_config(bad)


def _running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (the grandchild's parent may be gone)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False

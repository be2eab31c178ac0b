"""`fedvault keys init|server|client` end to end: real processes on 127.0.0.1, TLS + node auth.

The module starts one federation (keys, `fedvault server`, three `fedvault client`) for a two-round
`digits` run, then, against the same clients: kills a second run's server side after round 1's
checkpoint and resumes it with `fedvault server --resume`; searches the SuperLink's state for the
bytes of a client update, also when the run config says sealing off (control: the initial
model's bytes are found); and, last, SIGKILLs a client mid-round.
Every process is stopped by PID in teardown, also when a test fails. Refusal of an unregistered
SuperNode key and of a SuperNode without the CA at the process level is covered in
tests/test_deployment_processes.py; here only the CLI's one-line error is checked.

Resume is checked bitwise: the resumed run's final model equals the uninterrupted run's exactly.
Client training is deterministic given the seed and the round (DP-SGD off: its noise is drawn from
a CSPRNG), the checkpoint restores the global arrays bitwise (tests/test_checkpoint.py), with
fraction-train = 1.0 every round samples every node whatever Python's RNG draws, and the server
sums the replies in node-id order rather than arrival order (float32 addition is not associative).
"""

from __future__ import annotations

import argparse
import io
import json
import re
import signal
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from deploy_helpers import READY, Processes, client_args, killpg, run_cli, wait_for
from flwr.common.config import get_fused_config_from_dir
from waits import seconds

from fedvault.config import RunConfig
from fedvault.deploy.cli import cmd_keys_init, resolve_server_config, write_app_dir
from fedvault.deploy.processes import free_port, wait_for_log
from fedvault.deploy.superlink import start_superlink
from fedvault.errors import ConfigError
from fedvault.security.tls_keys import KeysError, init_keys
from fedvault.server.checkpoint import load_checkpoint

ROUNDS = 2
RUN = [
    "--set",
    'task="digits"',
    "--set",
    "batch-size=32",
    "--set",
    "learning-rate=0.05",
    "--set",
    "num-clients=3",
    "--set",
    f"num-server-rounds={ROUNDS}",
    "--set",
    "local-epochs=1",
    "--set",
    "privacy.sample-level=false",
    "--set",
    "fraction-evaluate=0.0",
    "--set",
    "fraction-train=1.0",
    "--set",
    "seed=7",
]
RUN_TIMEOUT_S = seconds(150)
# The round timeout of the fault test: the two live clients must answer within it (a round of theirs took
# 16 s on 2 busy cores), and it bounds the wait for the dead one. Under the 2 x 30 s heartbeat window, so
# round 2 usually starts while the dead node is still listed rather than waiting a timeout for a third node.
FAULT_TIMEOUT_S = seconds(25)


# ---- fast checks of the command layer (no processes) ------------------------------------------


def test_keys_init_prints_what_to_copy_and_the_identity_fingerprint(tmp_path):
    out = io.StringIO()
    args = argparse.Namespace(
        dir=str(tmp_path / "k"), clients=2, address=["fl.example.org"], force=False, passphrase_file=None
    )
    assert cmd_keys_init(args, out) == 0
    text = out.getvalue()
    fingerprint = re.search(r"fingerprint \(clients pin it\): ([0-9a-f]{64})", text).group(1)
    from fedvault.security.identity import fingerprint as fp
    from fedvault.security.identity import load_identity_public_key

    for pub in ("server/identity.pub", "clients/client-1/identity.pub", "clients/client-2/identity.pub"):
        assert fp(load_identity_public_key(tmp_path / "k" / pub)) == fingerprint, pub
    assert not (tmp_path / "k" / "clients" / "client-1" / "identity.key").exists()
    assert f"{tmp_path / 'k' / 'server'} -> the server machine, as SERVER_KEYS" in text
    assert f"{tmp_path / 'k' / 'clients' / 'client-i'} -> client machine i, as KEYS" in text
    assert "--server fl.example.org:8000" in text and "--num-partitions 2" in text
    with pytest.raises(KeysError, match="identity.key already exists"):
        cmd_keys_init(args, io.StringIO())  # no half-overwritten keys directory either
    args.force = True
    assert cmd_keys_init(args, io.StringIO()) == 0


def test_app_dir_config_is_the_resolved_config_as_flower_reads_it(tmp_path):
    cfg = resolve_server_config(
        None, ['task="digits"', 'strategy.name="fedavgm"', "strategy.server-momentum=0.5"], tmp_path / "state"
    )
    app = write_app_dir(tmp_path / "app", cfg.to_flat())
    assert get_fused_config_from_dir(app, {}) == cfg.to_flat()  # strategy params too: no drift
    assert RunConfig.from_flat(get_fused_config_from_dir(app, {})) == cfg
    components = tomllib.loads((app / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["components"]
    assert components == {"serverapp": "fedvault.server.app:app", "clientapp": "fedvault.client.app:app"}
    assert Path(cfg.run_dir).is_absolute() and Path(cfg.run_dir).parent == (tmp_path / "state" / "runs").resolve()


def test_server_config_refuses_reusing_a_run_dir_and_resuming_without_a_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.toml").write_text('task = "digits"\n')
    with pytest.raises(ConfigError, match="already holds a run; continue it with --resume"):
        resolve_server_config(None, [f'run-dir="{run_dir}"'], tmp_path)
    with pytest.raises(ConfigError, match="no checkpoint yet"):
        resolve_server_config(None, [], tmp_path, resume_dir=str(run_dir))
    with pytest.raises(ConfigError, match="either a CONFIG file or --resume"):
        resolve_server_config("x.toml", [], tmp_path, resume_dir=str(run_dir))


def test_client_without_the_ca_is_a_one_line_error(tmp_path):
    keys = init_keys(tmp_path / "k", 1)
    keys.client(1).ca_cert.unlink()
    done = run_cli(
        [
            "client",
            "--server",
            "127.0.0.1:9",
            "--keys",
            str(keys.directory),
            "--client-id",
            "1",
            "--num-partitions",
            "1",
            "--state",
            str(tmp_path / "c"),
        ]
    )
    assert done.returncode == 2
    assert (
        done.stderr.strip()
        == f"fedvault client: error: missing key file {keys.client(1).ca_cert} (create it with 'fedvault keys init')"
    )


# ---- real processes ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """Keys, an uninterrupted two-round run, and three clients that stay up for the module."""
    root = tmp_path_factory.mktemp("deploy")
    processes = Processes()
    try:
        keys_out = run_cli(["keys", "init", str(root / "keys"), "--clients", "3"])
        assert keys_out.returncode == 0, keys_out.stderr
        port = free_port()
        server = processes.start(_server_args(root, port, "reference"), root / "server.log", "fedvault server")
        wait_for_log(server, READY, seconds(60))
        clients = [
            processes.start(
                client_args(port, root / "keys", i, 3, root / f"client-{i}"),
                root / f"client-{i}.log",
                f"fedvault client {i}",
            )
            for i in (1, 2, 3)
        ]
        for client in clients:
            wait_for_log(client, READY, seconds(60))
        code = server.popen.wait(timeout=RUN_TIMEOUT_S)
        yield {
            "root": root,
            "port": port,
            "code": code,
            "server": server,
            "clients": clients,
            "processes": processes,
            "run_dir": root / "runs" / "reference",
            "keys": root / "keys",
        }
    finally:
        processes.stop_all()


@pytest.mark.integration
def test_two_rounds_with_tls_and_node_auth_improve_accuracy(federation):
    server_log = federation["server"].log_text()
    assert federation["code"] == 0, server_log
    argv = " ".join(federation["server"].popen.args)
    assert "--insecure" not in argv
    assert re.search(r"run \d+ finished:completed: 2 rounds, accuracy", server_log)
    assert "round   2/2" in server_log  # the ServerApp's progress reached this terminal
    rounds = [line for line in (federation["run_dir"] / "metrics.jsonl").read_text().splitlines() if line]
    records = [json.loads(line) for line in rounds]
    assert [r["round"] for r in records] == [0, 1, 2]
    assert all(r["replies_ok"] == 3 for r in records[1:])
    accuracy = [r["central"]["accuracy"] for r in records]
    assert accuracy[2] > accuracy[1] > accuracy[0]
    run_id = re.search(r"run (\d+) finished:completed", server_log).group(1)
    said = (f"run {run_id}: answered train round 1", f"run {run_id}: answered train round 2")
    for number, client in enumerate(federation["clients"], start=1):
        assert client.alive()  # clients outlive the run; they stop on Ctrl-C / SIGTERM
        shown = lambda client=client: all(line in client.log_text() for line in said)  # noqa: E731
        wait_for(shown, seconds(20), "the client's round lines")
        warm_log = federation["root"] / f"client-{number}" / "warm-clientapp.log"
        forked = lambda log=warm_log: len(re.findall(r"task pid \d+ exited 0", log.read_text())) >= 2  # noqa: E731
        wait_for(forked, seconds(20), "both rounds' tasks forked from the warm ClientApp")  # its exit is logged last


@pytest.mark.integration
def test_unregistered_client_is_refused_with_one_line(federation, tmp_path):
    keys = init_keys(tmp_path / "k", 1)  # a key pair the SuperLink never registered
    link = start_superlink(tmp_path / "link", federation["keys"] / "server", port=free_port())
    try:
        keys.client(1).ca_cert.write_bytes((federation["keys"] / "server" / "ca.pem").read_bytes())  # the right CA
        done = run_cli(
            [
                "client",
                "--server",
                link.address,
                "--keys",
                str(keys.directory),
                "--client-id",
                "1",
                "--num-partitions",
                "3",
                "--state",
                str(tmp_path / "c"),
                "--startup-timeout",
                str(seconds(30)),
                "--server-identity",
                str(federation["keys"] / "server" / "identity.pub"),
            ]
        )
    finally:
        link.stop()
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "refused this SuperNode's key: register its .pub" in lines[0], done.stderr


@pytest.mark.integration
def test_killed_server_resumes_from_its_checkpoint_to_the_same_model(federation):
    root, processes = federation["root"], federation["processes"]
    run_dir = root / "runs" / "killed"
    server = processes.start(_server_args(root, federation["port"], "killed"), root / "killed.log", "fedvault server")
    first = run_dir / "checkpoints" / "round-0001.npz"
    wait_for(lambda: first.exists() or not server.alive(), RUN_TIMEOUT_S, "round 1's checkpoint")
    superlink = int(re.search(r"SuperLink \(pid (\d+)\)", server.log_text()).group(1))
    processes.groups.append(superlink)
    server.popen.send_signal(signal.SIGKILL)  # the whole server side dies at once
    killpg(superlink, signal.SIGKILL)
    server.popen.wait(timeout=seconds(10))
    assert not (run_dir / "summary.json").exists()

    resumed = processes.start(
        [
            "server",
            "--resume",
            str(run_dir),
            "--keys",
            str(federation["keys"] / "server"),
            "--state",
            str(root / "state"),
            "--host",
            "127.0.0.1",
            "--port",
            str(federation["port"]),
        ],
        root / "resumed.log",
        "fedvault server --resume",
    )
    assert resumed.popen.wait(timeout=RUN_TIMEOUT_S + seconds(60)) == 0, resumed.log_text()
    assert f"resuming {run_dir} at round 2" in resumed.log_text()

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    assert [r["round"] for r in records] == [0, 1, 2]  # no round lost, none recorded twice
    reference_dir = federation["run_dir"]
    ref1, got1 = (load_checkpoint(d / "checkpoints" / "round-0001.npz") for d in (reference_dir, run_dir))
    reference = torch.load(reference_dir / "model.pt")
    final = torch.load(run_dir / "model.pt")
    assert list(final) == list(reference)
    for name, value in reference.items():  # bitwise (module docstring)
        np.testing.assert_array_equal(got1.arrays[name], ref1.arrays[name], err_msg=name)
        assert torch.equal(final[name], value), name
        assert np.abs(value.numpy() - ref1.arrays[name]).max() > 1e-3  # round 2 moved the model


@pytest.mark.integration
@pytest.mark.parametrize("sealing", ["auto", "off"])
def test_superlink_state_holds_no_update_bytes_even_when_the_run_config_says_sealing_off(federation, sealing):
    """One client trains one round, so the final global model is that client's reply, bitwise
    (FedAvg of a single update: weight 1.0). Search every file in the SuperLink's state directory
    for it: it is absent, also when the run config says ``sealing.mode = "off"`` (finding V2: the
    server's local policy file and the pinned clients keep sealing on). Control: the initial model,
    which instructions carry signed but in the clear, is found by the same search."""
    root, processes = federation["root"], federation["processes"]
    run = f"plaintext-{sealing}"
    policy = root / f"server-policy-{sealing}.toml"  # the server's own file (fedvault.server.sealing)
    policy.write_text(f'mode = "on"\nidentity-key = "{federation["keys"] / "server" / "identity.key"}"\n')
    args = _server_args(root, federation["port"], run) + [
        "--set",
        "num-server-rounds=1",
        "--set",
        "fraction-train=0.34",
        "--set",
        f'sealing.mode="{sealing}"',
        "--set",
        f"seed={11 if sealing == 'auto' else 13}",
    ]
    server = processes.start(args, root / f"{run}.log", "fedvault server", {"FEDVAULT_SERVER_POLICY": str(policy)})
    assert server.popen.wait(timeout=RUN_TIMEOUT_S) == 0, server.log_text()
    records = [json.loads(line) for line in (root / "runs" / run / "metrics.jsonl").read_text().splitlines() if line]
    assert records[1]["replies_ok"] == records[1]["clients_sampled"] == 1
    initial = load_checkpoint(root / "runs" / run / "checkpoints" / "round-0000.npz").arrays  # sent in the clear
    patterns = _update_windows(torch.load(root / "runs" / run / "model.pt"), initial)
    assert len(patterns) > 20
    stored = {path: path.read_bytes() for path in (root / "state").rglob("*") if path.is_file()}
    assert any(path.name.startswith("state.db") for path in stored)

    def found(windows: list[bytes]) -> list[str]:
        return sorted({str(p.relative_to(root)) for p, data in stored.items() for w in windows if w in data})

    assert found(patterns) == [], f"plaintext update bytes found in {found(patterns)}"
    control = [w for name, value in initial.items() for w in _windows(value)]
    assert found(control), "control: the initial model (sent in the clear) should be in the SuperLink's state"


@pytest.mark.integration
def test_a_client_killed_mid_round_is_recorded_and_the_run_completes(federation):
    """Runs last in this module: it leaves the federation with two clients."""
    root, processes = federation["root"], federation["processes"]
    victim = federation["clients"][2]
    supernode_log = root / "client-3" / "supernode.log"
    node_id = int(re.search(r"as node (\d+)", victim.log_text()).group(1))
    supernode_pid = int(re.search(r"SuperNode \(pid (\d+)\)", victim.log_text()).group(1))
    received_before = supernode_log.read_text().count("Receiving: train message")
    args = _server_args(root, federation["port"], "fault") + ["--set", f"round-timeout={FAULT_TIMEOUT_S}"]
    server = processes.start(args, root / "fault.log", "fedvault server")
    wait_for(
        lambda: supernode_log.read_text().count("Receiving: train message") > received_before or not server.alive(),
        RUN_TIMEOUT_S,
        "round 1's train message at client 3",
    )
    for pgid in (supernode_pid, victim.pid):  # the SuperNode (and its ClientApp) die mid-round
        killpg(pgid, signal.SIGKILL)
    assert server.popen.wait(timeout=RUN_TIMEOUT_S + 3 * FAULT_TIMEOUT_S) == 0, server.log_text()

    records = [
        json.loads(line) for line in (root / "runs" / "fault" / "metrics.jsonl").read_text().splitlines() if line
    ]
    assert [r["round"] for r in records] == [0, 1, 2]
    first, second = records[1], records[2]
    assert first["clients_sampled"] == 3 and first["replies_ok"] == 2 and first["failed_nodes"] == [node_id]
    # The dead node's train (and evaluate) wait ends at the round timeout or at Flower's NODE_UNAVAILABLE
    # reply (two missed 30 s heartbeats), whichever comes first: under a time factor either can win.
    assert first["seconds"] <= 2 * FAULT_TIMEOUT_S + seconds(20)
    assert second["replies_ok"] == 2  # the dead node either timed out again or was no longer listed
    assert second["failed_nodes"] == [node_id] if second["clients_sampled"] == 3 else second["failed_nodes"] == []
    assert second["central"]["accuracy"] > records[0]["central"]["accuracy"]
    assert re.search(r"run \d+ finished:completed: 2 rounds", server.log_text())


# ---- helpers ----------------------------------------------------------------------------------


def _server_args(root: Path, port: int, run: str) -> list[str]:
    return [
        "server",
        *RUN,
        "--set",
        f'run-dir="{root / "runs" / run}"',
        "--keys",
        str(root / "keys" / "server"),
        "--state",
        str(root / "state"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]


def _windows(array: np.ndarray, size: int = 64) -> list[bytes]:
    """High-entropy ``size``-byte slices of a float32 array (none for other dtypes)."""
    if np.asarray(array).dtype != np.float32:
        return []
    raw = np.ascontiguousarray(array).tobytes()
    slices = (raw[start : start + size] for start in range(0, len(raw) - size + 1, size))
    return [w for w in slices if len(set(np.frombuffer(w, np.float32))) >= size // 8]


def _update_windows(state: dict, initial: dict, size: int = 64) -> list[bytes]:
    """Non-overlapping ``size``-byte slices of the trained float tensors that differ from the
    initial model's (rows of dead units never change, and the initial model travels unsealed) and
    are not low-entropy (a run of zeros would match anything)."""
    windows = []
    for name, tensor in state.items():
        data = tensor.detach().contiguous().numpy()
        if data.dtype != np.float32:
            continue
        raw, before = data.tobytes(), np.ascontiguousarray(initial[name]).tobytes()
        for start in range(0, len(raw) - size + 1, size):
            window = raw[start : start + size]
            if window != before[start : start + size] and len(set(np.frombuffer(window, np.float32))) >= size // 8:
                windows.append(window)
    return windows

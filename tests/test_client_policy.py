"""The client owns its security policy (node config / local file), and instructions are bound.

Real Flower Messages through the real ClientApp, signed by the real ServerSealing: a run config
that switches sealing off cannot make a pinned client accept an unsigned instruction, an unpinned
client never takes a pin from anywhere but its node, a TRAIN instruction delivered as EVALUATE or
to another node is refused, a replayed round is refused (also after a restart), a suite outside
the allow-list is refused, and a run asking for less DP than the node's floor gets the floor."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from waits import seconds

from fedvault.client.app import build_client_app
from fedvault.client.policy import ClientPolicy, ClientPolicyError, DPFloor
from fedvault.config import RunConfig
from fedvault.deploy.cli import client_policy_config
from fedvault.deploy.processes import child_env, executable
from fedvault.errors import ConfigError
from fedvault.protocol import DP_EPSILON, METRICS, NUM_EXAMPLES, POLICY_REFUSED, STATUS
from fedvault.security.envelope import SIGNATURE_RECORD, open_reply, signed_instruction_digest
from fedvault.security.identity import IdentityError, generate_identity
from fedvault.security.sealing import HYBRID_SUITE
from fedvault.security.tls_keys import init_keys
from fedvault.server.sealing import SERVER_POLICY_ENV, ServerSealing, ServerSealingPolicy
from fedvault.tasks import load_task

RUN_ID, NODE = 1, 7  # the flower_task_identity fixture's run and node
PLAIN = {"task": "digits", "num-clients": 4, "batch-size": 32, "learning-rate": 0.05, "privacy.sample-level": False}


@pytest.fixture(scope="module")
def identity(tmp_path_factory):
    return generate_identity(tmp_path_factory.mktemp("identity"))


@pytest.fixture
def server(identity):
    return ServerSealing(identity.private_key, RUN_ID, "x25519")


def _instruction(
    server: ServerSealing, server_round: int = 1, node: int = NODE, kind: str = MessageType.TRAIN
) -> Message:
    torch.manual_seed(0)
    content = RecordDict(
        {
            "arrays": ArrayRecord(load_task("digits").build_model().state_dict()),
            "config": ConfigRecord({"server-round": server_round}),
        }
    )
    return server.sign([Message(content, dst_node_id=node, message_type=kind)], server_round)[0]


def _delivered(msg: Message, kind: str) -> Message:
    """``msg`` as a relay may hand it on: same content, the message type it chooses."""
    return Message(msg.content, dst_node_id=NODE, message_type=kind)


def _context(node_config: dict, run_config: dict | None = None) -> Context:
    return Context(
        run_id=RUN_ID,
        node_id=NODE,
        node_config={"partition-id": 0, "num-partitions": 4, **node_config},
        state=RecordDict(),
        run_config=dict(PLAIN if run_config is None else run_config),
    )


def _deployed(msg: Message, context: Context) -> Message:
    """The deployed ClientApp (run config from Flower, policy from the node config)."""
    return build_client_app()(msg, context)


def _opened(server: ServerSealing, reply: Message, instruction: Message, kind: str):
    """The sealed reply to a round-1 ``instruction``, opened as the server does."""
    digest = signed_instruction_digest(instruction.content)
    return open_reply(
        reply.content, server.run_key, run_id=RUN_ID, round=1, node_id=NODE, kind=kind, instruction=digest
    )


# ---- V2, V3: the run config cannot switch sealing off or choose the pin ---------------------------


def test_run_config_sealing_off_does_not_make_a_pinned_client_accept_unsigned(server, identity, flower_task_identity):
    unsigned = _instruction(server)
    del unsigned.content[SIGNATURE_RECORD]
    context = _context({"server-identity": identity.fingerprint}, {**PLAIN, "sealing.mode": "off"})
    with pytest.raises(IdentityError, match="instruction is not signed"):
        _deployed(unsigned, context)


def test_pinned_client_refuses_a_foreign_identity_whatever_the_run_config_says(
    server, identity, tmp_path, flower_task_identity
):
    foreign = ServerSealing(generate_identity(tmp_path / "attacker").private_key, RUN_ID, "x25519")
    context = _context({"server-identity": str(identity.public_key)}, {**PLAIN, "sealing.mode": "off"})
    with pytest.raises(IdentityError, match="but this client pins"):
        _deployed(_instruction(foreign), context)


def test_unpinned_client_refuses_and_the_run_config_cannot_pin(server, identity, flower_task_identity):
    with pytest.raises(ClientPolicyError, match="pins no server identity"):
        _deployed(_instruction(server), _context({}))
    with pytest.raises(ConfigError, match="sealing.server-identity"):  # no such run config key any more
        _deployed(_instruction(server), _context({}, {**PLAIN, "sealing.server-identity": identity.fingerprint}))


def test_node_policy_file_is_read_and_node_config_wins(identity, tmp_path):
    policy = tmp_path / "policy.toml"
    policy.write_text(f'server-identity = "{identity.fingerprint}"\ndp-max-epsilon = 2.0\n')
    read = ClientPolicy.from_node_config({"policy-file": str(policy), "dp-delta": 1e-6})
    assert read.pin is not None and read.pin.fingerprint == identity.fingerprint
    assert read.dp == DPFloor(required=True, max_epsilon=2.0, delta=1e-6)
    policy.write_text('sealing = "off"\nsurprise = 1\n')
    with pytest.raises(ConfigError, match=r"policy\.toml: unknown key\(s\) \['surprise'\]"):
        ClientPolicy.from_node_config({"policy-file": str(policy)})


# ---- W1, W2: instructions bound to message type and destination node ------------------------------


def test_train_instruction_delivered_as_evaluate_is_refused(server, identity, flower_task_identity):
    train = _instruction(server, kind=MessageType.TRAIN)
    with pytest.raises(IdentityError, match="signed for kind 'train', but arrived as kind 'evaluate'"):
        _deployed(_delivered(train, MessageType.EVALUATE), _context({"server-identity": identity.fingerprint}))


def test_instruction_for_another_node_is_refused(server, identity, flower_task_identity):
    for_b = _instruction(server, node=NODE + 1)
    with pytest.raises(IdentityError, match=f"signed for node {NODE + 1}, but arrived as node {NODE}"):
        _deployed(_delivered(for_b, MessageType.TRAIN), _context({"server-identity": identity.fingerprint}))


def test_reply_names_the_instruction_it_answers(server, identity, flower_task_identity):
    instruction = _instruction(server)
    reply = _deployed(instruction, _context({"server-identity": identity.fingerprint}))
    opened = _opened(server, reply, instruction, "train")
    assert opened[METRICS]["num-examples"] > 0
    other = signed_instruction_digest(_instruction(server).content)  # same round, node, kind and model
    with pytest.raises(Exception, match="header.instruction"):
        open_reply(reply.content, server.run_key, run_id=RUN_ID, round=1, node_id=NODE, kind="train", instruction=other)


@pytest.mark.parametrize("sealing", ["on", "off"])
def test_replayed_or_older_round_is_refused_also_after_a_restart(
    server, identity, tmp_path, sealing, flower_task_identity
):
    node = {"answered-rounds": str(tmp_path / "answered")}
    node |= {"server-identity": identity.fingerprint} if sealing == "on" else {"sealing": "off"}
    policy = ClientPolicy.from_node_config(node)
    app = build_client_app(RunConfig.from_flat(PLAIN), policy)
    context = _context(node)
    second = _instruction(server, 2)
    assert not app(second, context).has_error()
    with pytest.raises(ClientPolicyError, match="already answered train round 2"):
        app(second, context)  # the same instruction delivered twice
    with pytest.raises(ClientPolicyError, match="round 1 of run 1"):
        app(_instruction(server, 1), context)  # an older round
    restarted = _context(node)  # a new process: empty context.state, the file remains
    with pytest.raises(ClientPolicyError, match="already answered train round 2"):
        app(_instruction(server, 2), restarted)
    assert not app(_instruction(server, 3), restarted).has_error()
    assert not app(_instruction(server, 3, kind=MessageType.EVALUATE), restarted).has_error()  # per type


# ---- W3: the suite allow-list is the client's -----------------------------------------------------


def test_suite_outside_the_allow_list_is_refused(server, identity, flower_task_identity):
    node = {"server-identity": identity.fingerprint, "sealing-suites": HYBRID_SUITE}
    with pytest.raises(IdentityError, match="announced suite 'x25519', which this client does not allow"):
        _deployed(_instruction(server), _context(node))
    hybrid = ServerSealing(identity.private_key, RUN_ID, HYBRID_SUITE)
    assert not _deployed(_instruction(hybrid), _context(node)).has_error()


# ---- the client's DP floor ------------------------------------------------------------------------


def test_run_without_dp_is_refused_by_a_node_that_requires_it(server, identity, flower_task_identity):
    node = {"server-identity": identity.fingerprint, "dp-required": True}
    instruction = _instruction(server)
    reply = _deployed(instruction, _context(node))
    opened = _opened(server, reply, instruction, "train")
    assert opened[STATUS][STATUS] == POLICY_REFUSED and "requires sample-level DP" in str(opened[STATUS]["reason"])
    assert "arrays" not in opened


def test_node_that_requires_dp_withholds_its_test_metrics_as_a_refusal(server, identity, flower_task_identity):
    node = {"server-identity": identity.fingerprint, "dp-required": True}
    instruction = _instruction(server, kind=MessageType.EVALUATE)
    reply = _deployed(instruction, _context(node))
    opened = _opened(server, reply, instruction, "evaluate")
    assert opened[STATUS][STATUS] == POLICY_REFUSED and "withheld" in str(opened[STATUS]["reason"])
    assert set(opened[METRICS]) == {NUM_EXAMPLES} and opened[METRICS][NUM_EXAMPLES] == 0


def test_dp_floor_takes_the_smaller_epsilon_and_delta():
    cfg = RunConfig.from_flat({"privacy.target-epsilon": 50.0, "privacy.target-delta": 1e-3})
    tight = DPFloor(required=True, max_epsilon=2.0, delta=1e-6).apply(cfg)
    assert (tight.privacy.target_epsilon, tight.privacy.target_delta) == (2.0, 1e-6)
    stricter_run = RunConfig.from_flat({"privacy.target-epsilon": 1.0})
    assert DPFloor(max_epsilon=2.0).apply(stricter_run) is stricter_run  # more noise than the floor: kept


def test_run_asking_for_less_noise_trains_under_the_node_cap(server, identity, tmp_path, flower_task_identity):
    run = {**PLAIN, "privacy.sample-level": True, "privacy.target-epsilon": 50.0, "num-server-rounds": 1}
    run |= {"local-epochs": 1, "privacy.grad-sample-mode": "hooks"}
    node = {"server-identity": identity.fingerprint, "dp-max-epsilon": 1.0, "ledger-path": str(tmp_path / "l.sqlite")}
    instruction = _instruction(server)
    reply = _deployed(instruction, _context(node, run))
    opened = _opened(server, reply, instruction, "train")
    assert 0 < opened[METRICS][DP_EPSILON] <= 1.0 + 1e-9  # the run's 50 would have spent ~50 in its one round


# ---- the server's policy is local; fedvault client needs a pin ----------------------------------


def test_deployed_server_seals_whatever_the_run_config_says(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv(SERVER_POLICY_ENV, raising=False)
    asked_off = RunConfig.from_flat({"sealing.mode": "off"})
    with caplog.at_level(logging.WARNING, logger="fedvault"):
        assert ServerSealingPolicy.local(asked_off, deployed=True).enabled
    assert "ignored: the server's sealing policy is local" in caplog.text
    local = tmp_path / "server-policy.toml"
    local.write_text('mode = "off"\n')
    monkeypatch.setenv(SERVER_POLICY_ENV, str(local))
    assert not ServerSealingPolicy.local(RunConfig.from_flat({"sealing.mode": "on"}), deployed=True).enabled


def test_fedvault_server_hands_its_serverapp_a_local_policy_file(tmp_path, monkeypatch):
    from fedvault.deploy.cli import _server_policy_env

    monkeypatch.delenv(SERVER_POLICY_ENV, raising=False)
    key = tmp_path / "keys" / "identity.key"
    mine = RunConfig.from_flat({"sealing.mode": "on", "sealing.identity-key": str(key)})
    env = _server_policy_env(mine, tmp_path / "state")
    path = Path(env[SERVER_POLICY_ENV])
    assert path == tmp_path / "state" / "server-policy.toml" and path.stat().st_mode & 0o077 == 0
    assert SERVER_POLICY_ENV not in os.environ  # passed to the SuperLink's children, not set here
    monkeypatch.setenv(SERVER_POLICY_ENV, str(path))  # what the ServerApp then sees
    edited = RunConfig.from_flat({"sealing.mode": "off", "sealing.identity-key": str(tmp_path / "attacker.key")})
    policy = ServerSealingPolicy.local(edited, deployed=True)  # what the ServerApp reads from the stored run
    assert policy.enabled and policy.identity_key == str(key.resolve())
    own = tmp_path / "operator-policy.toml"  # a file the operator names is kept as it is
    monkeypatch.setenv(SERVER_POLICY_ENV, str(own))
    assert _server_policy_env(edited, tmp_path / "state2") == {SERVER_POLICY_ENV: str(own)}
    assert not (tmp_path / "state2").exists()


def test_fedvault_client_without_a_pin_refuses_to_start_with_one_line(tmp_path):
    keys = init_keys(tmp_path / "k", 1)  # TLS keys, no identity.pub
    args = ["--server", "127.0.0.1:9", "--keys", str(keys.directory), "--client-id", "1", "--num-partitions", "1"]
    done = subprocess.run(
        [executable("fedvault"), "client", *args, "--state", str(tmp_path / "c")],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=seconds(120),
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedvault client: error: no server identity pinned"), done.stderr
    assert not (tmp_path / "c" / "supernode.log").exists()  # no SuperNode was started


def test_insecure_client_without_a_pin_is_unsealed_and_warned(tmp_path, capsys):
    args = argparse.Namespace(
        server_identity=None,
        keys=None,
        insecure=True,
        suite=None,
        require_dp=False,
        max_epsilon=None,
        delta=None,
        allow_plugin=None,
    )
    policy = client_policy_config(args, tmp_path)
    assert policy["sealing"] == "off" and "server-identity" not in policy
    assert "WARNING: --insecure without a pinned server identity" in capsys.readouterr().err

"""Plug-ins by policy (issue #16, W5): a run config names only the tasks and strategies the receiving
side allows, so whoever controls the run config cannot make the server or a client import its code.

Real Flower Messages through the real ClientApp (deployed: policy from node config) and the real
ServerApp (deployed: policy from ``$FEDVAULT_SERVER_POLICY``), carried by an in-process transport
(:class:`Loopback`, a Grid that hands each instruction to a node's ClientApp; not an engine). The
plug-ins live in a user's module written per test; importing it leaves a marker file and an entry
in ``sys.modules``, so "nothing was imported" is checked, not assumed."""

from __future__ import annotations

import argparse
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from strategy_helpers import InstantGrid
from waits import seconds

from fedvault.cli import build_parser
from fedvault.client.app import build_client_app
from fedvault.client.policy import ClientPolicy
from fedvault.config import RunConfig
from fedvault.deploy.cli import _check_server_plugins, _server_policy_env, client_policy_config
from fedvault.deploy.processes import child_env, executable
from fedvault.errors import ConfigError
from fedvault.plugins import PluginPolicy, PluginRefused
from fedvault.protocol import ARRAYS, METRICS, NUM_EXAMPLES, POLICY_REFUSED, STATUS
from fedvault.security.envelope import open_reply, signed_instruction_digest
from fedvault.security.identity import generate_identity
from fedvault.server.app import build_server_app, run_server
from fedvault.server.plugins import check_run_plugins, plugin_policy_file
from fedvault.server.sealing import SERVER_POLICY_ENV, ServerSealing
from fedvault.simulations.harness import client_policy
from fedvault.strategies.registry import ENTRY_POINT_GROUP as STRATEGY_GROUP
from fedvault.tasks import TASK_GROUP, load_task

RUN_ID, NODE = 1, 7  # the flower_task_identity fixture's run and node
BASE = {
    "num-clients": 2,
    "num-server-rounds": 1,
    "local-epochs": 1,
    "batch-size": 32,
    "learning-rate": 0.05,
    "fraction-evaluate": 0.0,
    "privacy.sample-level": False,
    "sealing.mode": "off",
}
USER_MODULE = '''
"""A user's plug-ins: the digits task and FedAvg under other names. Importing this module is seen."""
from pathlib import Path

from flwr.serverapp.strategy import FedAvg

from fedvault.tasks.digits import DigitsTask

Path(__file__).with_suffix(".imported").touch()


class Task(DigitsTask):
    """The digits task, from a user's module."""


class Strategy(FedAvg):
    """FedAvg, from a user's module."""
'''


class UserModule:
    """A fresh module of plug-ins on ``sys.path``; ``imported`` says whether anything imported it."""

    def __init__(self, folder: Path) -> None:
        self.name = f"w5_plugins_{uuid.uuid4().hex[:10]}"
        self.path = folder / f"{self.name}.py"
        self.path.write_text(USER_MODULE)
        self.task, self.strategy = f"{self.name}:Task", f"{self.name}:Strategy"

    @property
    def imported(self) -> bool:
        return self.name in sys.modules or self.path.with_suffix(".imported").exists()


@pytest.fixture
def user(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    module = UserModule(tmp_path)
    yield module
    sys.modules.pop(module.name, None)


def _run(task: str = "digits", strategy: str = "fedavg", **extra) -> dict:
    return {**BASE, "task": task, "strategy.name": strategy, **extra}


def _train(server_round: int = 1, node: int = NODE, kind: str = MessageType.TRAIN) -> Message:
    torch.manual_seed(0)
    content = RecordDict(
        {
            ARRAYS: ArrayRecord(load_task("digits").build_model().state_dict()),
            "config": ConfigRecord({"server-round": server_round}),
        }
    )
    return Message(content, dst_node_id=node, message_type=kind)


def _context(node_config: dict, run_config: dict, node: int = NODE, partition: int = 0) -> Context:
    return Context(
        run_id=RUN_ID,
        node_id=node,
        node_config={"partition-id": partition, "num-partitions": 2, **node_config},
        state=RecordDict(),
        run_config=dict(run_config),
    )


def _one_line_refusal(reason: str, spec: str, side: str) -> None:
    assert "\n" not in reason and f"'{spec}'" in reason, reason
    assert reason.startswith(f"{side} policy refuses ") and f"fedvault {side} --allow-plugin" in reason, reason


# ---- the policy itself ----------------------------------------------------------------------------


def test_builtins_and_installed_entry_points_pass_any_other_module_attr_needs_the_list(user):
    nothing = PluginPolicy()
    assert nothing.permits("digits", TASK_GROUP) and nothing.permits("FedAdam", STRATEGY_GROUP)
    assert nothing.permits("fedvault.tasks.digits:DigitsTask", TASK_GROUP)  # an installed entry point's value
    assert not nothing.permits(user.task, TASK_GROUP) and not nothing.permits("os:system", STRATEGY_GROUP)
    listed = PluginPolicy.from_value([user.task], "test")
    assert listed.permits(user.task, TASK_GROUP) and not listed.permits(user.strategy, STRATEGY_GROUP)
    assert PluginPolicy.simulation().permits(user.strategy, STRATEGY_GROUP)
    assert not user.imported  # deciding reads names and installed metadata only


def test_allow_lists_take_toml_lists_or_comma_separated_node_config_and_refuse_anything_else():
    assert PluginPolicy.from_value("a.b:C, d:E,", "x").allowed == {"a.b:C", "d:E"}
    assert PluginPolicy.from_value(["a.b:C"], "x").allowed == {"a.b:C"}
    for bad in ("digits", "a.b", "a:b:c", "a b:C", "1a:B", 3, [4]):
        with pytest.raises(ConfigError, match="client policy 'allow-plugins'"):
            ClientPolicy.from_values({"allow-plugins": bad})


def test_a_refusal_is_one_line_whatever_the_run_config_puts_in_the_name():
    with pytest.raises(PluginRefused) as info:
        PluginPolicy().check(
            "task", "evil:Task\nINFO all is well", TASK_GROUP, "client", "fedvault client --allow-plugin"
        )
    assert "\n" not in str(info.value) and "'evil:Task\\nINFO all is well'" in str(info.value)


# ---- the client: refused before import, as a policy-refused reply ---------------------------------


def test_client_refuses_an_unlisted_module_task_with_a_sealed_one_line_reply_and_imports_nothing(
    user, tmp_path, flower_task_identity
):
    identity = generate_identity(tmp_path / "identity")
    server = ServerSealing(identity.private_key, RUN_ID, "x25519")
    instruction = server.sign([_train()], 1)[0]
    context = _context({"server-identity": identity.fingerprint}, _run(user.task, **{"sealing.mode": "on"}))
    reply = build_client_app()(instruction, context)  # deployed: policy from the node config
    opened = open_reply(
        reply.content,
        server.run_key,
        run_id=RUN_ID,
        round=1,
        node_id=NODE,
        kind="train",
        instruction=signed_instruction_digest(instruction.content),
    )
    assert opened[STATUS][STATUS] == POLICY_REFUSED and ARRAYS not in opened
    _one_line_refusal(str(opened[STATUS]["reason"]), user.task, "client")
    assert not user.imported


def test_client_refuses_evaluate_too_and_the_supernode_goes_on(user, flower_task_identity):
    app = build_client_app()
    context = _context({"sealing": "off"}, _run(user.task))
    for kind in (MessageType.EVALUATE, MessageType.TRAIN):
        reply = app(_train(kind=kind), context)
        assert reply.content[STATUS][STATUS] == POLICY_REFUSED and reply.content[METRICS][NUM_EXAMPLES] == 0
        _one_line_refusal(str(reply.content[STATUS]["reason"]), user.task, "client")
    assert not user.imported
    assert app(_train(2), _context({"sealing": "off"}, _run("digits"))).content[METRICS][NUM_EXAMPLES] > 0


@pytest.mark.parametrize("where", ["node-config", "policy-file"])
def test_client_trains_a_module_task_on_its_own_allow_list(user, tmp_path, where, flower_task_identity):
    if where == "node-config":
        node = {"sealing": "off", "allow-plugins": user.task}
    else:
        (tmp_path / "policy.toml").write_text(f'sealing = "off"\nallow-plugins = ["{user.task}"]\n')
        node = {"policy-file": str(tmp_path / "policy.toml")}
    reply = build_client_app()(_train(), _context(node, _run(user.task)))
    assert STATUS not in reply.content and reply.content[METRICS][NUM_EXAMPLES] > 0 and ARRAYS in reply.content
    assert user.imported


def test_an_installed_entry_point_task_needs_no_allowing(user, tmp_path, monkeypatch, flower_task_identity):
    dist = tmp_path / "w5_user_plugins-0.1.dist-info"  # a real installed-distribution record
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: w5-user-plugins\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[fedvault.tasks]\nw5-digits = {user.task}\n")
    context = _context({"sealing": "off"}, _run("w5-digits"))
    assert build_client_app()(_train(), context).content[METRICS][NUM_EXAMPLES] > 0
    context = _context({"sealing": "off"}, _run(user.task))  # the entry point's value: the same installed code
    assert STATUS not in build_client_app()(_train(), context).content


def test_fedvault_client_allow_plugin_goes_to_the_node_config(tmp_path):
    args = argparse.Namespace(
        server_identity="ab" * 32,
        keys=None,
        insecure=False,
        suite=None,
        require_dp=False,
        max_epsilon=None,
        delta=None,
        allow_plugin=["mine.tasks:Wine", "mine.tasks:Iris"],
    )
    node_config = client_policy_config(args, tmp_path)
    assert node_config["allow-plugins"] == "mine.tasks:Wine,mine.tasks:Iris"  # a scalar, as node config needs
    assert ClientPolicy.from_node_config(node_config).plugins.allowed == {"mine.tasks:Wine", "mine.tasks:Iris"}
    args.allow_plugin = ["not-a-spec"]
    with pytest.raises(ConfigError, match="'not-a-spec' is not 'package.module:attr'"):
        client_policy_config(args, tmp_path)


@pytest.mark.parametrize("command", ["client", "server"])
def test_help_explains_allow_plugin(command, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--allow-plugin SPEC" in text and "refused in one line before it is imported" in text


# ---- the server: refused before import or any file; end to end over a loopback transport -----------


class Loopback(InstantGrid):
    """Hands each instruction to the real ClientApp of its node in this process (a transport, not an engine)."""

    def __init__(self, node_configs: dict[int, dict], run_config: dict) -> None:
        super().__init__(node_configs)
        self.app = build_client_app()  # deployed: each node's policy is its node config
        self.contexts = {
            node: _context(config, run_config, node, partition)
            for partition, (node, config) in enumerate(node_configs.items())
        }

    def answer(self, msg: Message) -> Message:
        return self.app(msg, self.contexts[msg.metadata.dst_node_id])


def _server_policy(tmp_path: Path, monkeypatch, allow: list[str]) -> None:
    path = tmp_path / "server-policy.toml"
    path.write_text('mode = "off"\n' + (f"allow-plugins = {allow!r}\n".replace("'", '"') if allow else ""))
    monkeypatch.setenv(SERVER_POLICY_ENV, str(path))


def _serve(run_config: dict, grid: Loopback) -> None:
    """The deployed ServerApp (``fedvault.server.app:app``'s build): its run config comes from Flower."""
    context = Context(run_id=RUN_ID, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config))
    build_server_app()(grid, context)


@pytest.mark.parametrize("plugin", ["task", "strategy"])
def test_deployed_server_refuses_an_unlisted_module_plugin_before_importing_or_writing(
    user, tmp_path, monkeypatch, plugin, flower_task_identity
):
    _server_policy(tmp_path, monkeypatch, [user.strategy if plugin == "task" else user.task])
    spec = user.task if plugin == "task" else user.strategy
    run = _run(**{plugin: spec}, **{"run-dir": str(tmp_path / "run")})
    with pytest.raises(PluginRefused) as info:
        _serve(run, Loopback({7: {"sealing": "off"}, 8: {"sealing": "off"}}, run))
    _one_line_refusal(str(info.value), spec, "server")
    assert f"refuses {plugin} " in str(info.value)
    assert not user.imported and not (tmp_path / "run").exists()


def test_deployed_server_and_clients_run_the_plugins_each_allows(user, tmp_path, monkeypatch, flower_task_identity):
    _server_policy(tmp_path, monkeypatch, [user.task, user.strategy])
    run = _run(user.task, user.strategy, **{"run-dir": str(tmp_path / "run")})
    clients = {7: {"sealing": "off", "allow-plugins": user.task}, 8: {"sealing": "off", "allow-plugins": user.task}}
    _serve(run, Loopback(clients, run))
    summary = (tmp_path / "run" / "summary.json").read_text()
    assert '"stopped": null' in summary and user.imported
    assert '"replies_ok": 2' in (tmp_path / "run" / "metrics.jsonl").read_text()


def test_a_client_that_does_not_allow_the_servers_plugin_refuses_and_the_run_says_why(
    user, tmp_path, monkeypatch, flower_task_identity
):
    _server_policy(tmp_path, monkeypatch, [user.task])
    run = _run(user.task, **{"run-dir": str(tmp_path / "run"), "min-replies": 1})
    grid = Loopback({7: {"sealing": "off", "allow-plugins": user.task}, 8: {"sealing": "off"}}, run)
    _serve(run, grid)
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert '"replies_ok": 1' in metrics and "client policy refuses task" in metrics  # node 8's reason, in the record


def test_fedvault_server_writes_allow_plugin_to_its_policy_file_and_refuses_the_rest(tmp_path, monkeypatch):
    monkeypatch.delenv(SERVER_POLICY_ENV, raising=False)
    cfg = RunConfig.from_flat(_run("mine.tasks:Wine", "mine.strategies:Mine"))
    env = _server_policy_env(cfg, tmp_path / "state", ["mine.tasks:Wine"])
    assert plugin_policy_file(env[SERVER_POLICY_ENV]).allowed == {"mine.tasks:Wine"}
    with pytest.raises(PluginRefused, match="server policy refuses strategy 'mine.strategies:Mine'"):
        _check_server_plugins(cfg, env)
    env = _server_policy_env(cfg, tmp_path / "state", ["mine.tasks:Wine", "mine.strategies:Mine"])
    _check_server_plugins(cfg, env)
    monkeypatch.setenv(SERVER_POLICY_ENV, str(tmp_path / "operator.toml"))  # the operator's own file decides
    with pytest.raises(ConfigError, match="--allow-plugin with \\$FEDVAULT_SERVER_POLICY set"):
        _server_policy_env(cfg, tmp_path / "state", ["mine.tasks:Wine"])


def test_fedvault_server_refuses_an_unlisted_plugin_in_one_line_before_starting_anything(user, tmp_path):
    cmd = [executable("fedvault"), "server", "--insecure", "--state", str(tmp_path / "state")]
    cmd += ["--set", f'task="{user.task}"', "--allow-plugin", "other.module:Task"]
    env = child_env({"PYTHONPATH": str(tmp_path)})  # importable, so only the policy stops it
    env.pop(SERVER_POLICY_ENV, None)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=seconds(120))
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedvault server: error: server policy refuses task"), done.stderr
    assert not user.imported and not (tmp_path / "state" / "state.db").exists()  # no SuperLink was started


# ---- simulation: one user owns both sides ---------------------------------------------------------


def test_simulation_allows_the_plugins_its_own_user_names(user, tmp_path, flower_task_identity):
    cfg = RunConfig.from_flat(_run(user.task, user.strategy, **{"run-dir": str(tmp_path / "run")}))
    assert client_policy(cfg).plugins.anything  # the harness's clients (fedvault simulate, simulate())
    node_configs = {7: {}, 8: {}}
    grid = Loopback(node_configs, cfg.to_flat())
    grid.app = build_client_app(cfg)  # a baked-in simulation config, no policy given: the config's own task
    summary = run_server(grid, cfg)  # not deployed: the server runs its user's plug-ins
    assert summary["stopped"] is None and user.imported
    check_run_plugins(cfg, PluginPolicy.simulation())

"""SCAFFOLD, FedNova and FedProx: client hooks driven by a real training loop, the server math,
and the behaviour the papers promise on problems whose answer is known in closed form.

Quadratic federation: client i holds one example (sqrt(h_i), sqrt(h_i) a_i) for a bias-free
linear model, so its MSE loss is f_i(w) = h_i (w - a_i)^2 and K steps of SGD with rate eta give
y_i - a_i = q_i (x - a_i), q_i = (1 - 2 eta h_i)^K. The global objective (1/N) sum f_i has its
optimum at w* = sum h_i a_i / sum h_i.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.exception import InconsistentMessageReplies
from strategy_helpers import FakeClient, StaticGrid, client_reply, mlp, random_clients, run_round, train_locally

from fedvault.strategies.client_steps import build_client_steps as build_hooks
from fedvault.strategies.client_steps import finish_client_steps as finish_hooks
from fedvault.strategies.fednova import A_NORM_KEY, TAU_KEY, FedNova, FedNovaHook, fednova_update
from fedvault.strategies.fedprox import ProximalHook
from fedvault.strategies.hooks import HookError, local_work
from fedvault.strategies.registry import build_strategy
from fedvault.strategies.scaffold import (
    CLIENT_CONTROL_KEY,
    CLIENT_DELTA_KEY,
    SERVER_CONTROL_KEY,
    Scaffold,
    ScaffoldHook,
    scaffold_server_update,
)

pytestmark = pytest.mark.timeout(60)
mse = torch.nn.functional.mse_loss


def _control(model: torch.nn.Module, seed: int, scale: float = 0.1) -> ArrayRecord:
    rng = np.random.default_rng(seed)
    return ArrayRecord(
        {k: Array((scale * rng.standard_normal(v.shape)).astype(np.float32)) for k, v in model.state_dict().items()}
    )


def _train_message(config: dict | None = None, **records) -> RecordDict:
    return RecordDict({"config": ConfigRecord(config or {}), **records})


# ---- client hooks -------------------------------------------------------------------------------


def test_build_hooks_reads_the_train_message():
    model = mlp()
    assert build_hooks(_train_message(), RecordDict(), model) == []
    assert build_hooks(_train_message({"proximal-mu": 0.0}), RecordDict(), model) == []
    content = _train_message({"proximal-mu": 0.1, "fednova": True}, **{SERVER_CONTROL_KEY: _control(model, 0)})
    assert [type(h) for h in build_hooks(content, RecordDict(), model)] == [ProximalHook, ScaffoldHook, FedNovaHook]


def test_proximal_step_adds_the_gradient_of_half_mu_squared_distance_to_global():
    model, mu = mlp(), 0.3
    hook = ProximalHook(model, mu)
    anchor = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    distance = 0.5 * mu * sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor))
    expected = torch.autograd.grad(distance, list(model.parameters()))
    for p in model.parameters():
        p.grad = torch.ones_like(p)  # the data gradient the term is added to
    hook.after_backward(model)
    for p, g in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, 1 + g)


def test_fedprox_keeps_local_model_closer_to_global():
    clients = random_clients(1, steps=30, lr=0.5)
    client = clients[1]
    distances = {}
    for mu in (0.0, 1.0):
        model = mlp()
        start = [p.detach().clone() for p in model.parameters()]
        hooks = build_hooks(_train_message({"proximal-mu": mu}), RecordDict(), model)
        train_locally(model, hooks, client, torch.nn.functional.cross_entropy)
        distances[mu] = sum(float(((p.detach() - s) ** 2).sum()) for p, s in zip(model.parameters(), start))
    assert distances[1.0] < distances[0.0]


def test_scaffold_correction_is_c_minus_c_i():
    model, client = mlp(), random_clients(1)[1]
    c = _control(model, 1)
    state = RecordDict({CLIENT_CONTROL_KEY: _control(model, 2)})
    hook = ScaffoldHook(model, c, state, momentum=0.0)
    loss = torch.nn.functional.cross_entropy(model(client.x), client.y)
    plain = torch.autograd.grad(loss, list(model.parameters()))
    loss = torch.nn.functional.cross_entropy(model(client.x), client.y)
    loss.backward()
    hook.after_backward(model)
    for (name, p), g in zip(model.named_parameters(), plain):
        expected = g + torch.from_numpy(c[name].numpy() - state[CLIENT_CONTROL_KEY][name].numpy())
        torch.testing.assert_close(p.grad, expected)


def test_scaffold_option_two_update_and_node_state():
    model, client = mlp(), random_clients(1, steps=4, lr=0.2)[1]
    c, state = _control(model, 1), RecordDict({CLIENT_CONTROL_KEY: _control(model, 2)})
    c_i = {k: a.numpy() for k, a in state[CLIENT_CONTROL_KEY].items()}
    x = {k: v.detach().clone().numpy() for k, v in model.state_dict().items()}
    hooks = build_hooks(_train_message(**{SERVER_CONTROL_KEY: c}), state, model)
    train_locally(model, hooks, client, torch.nn.functional.cross_entropy)
    records, metrics = finish_hooks(hooks, model, client.steps, client.lr)
    y = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    for key in x:
        c_plus = c_i[key] - c[key].numpy() + (x[key] - y[key]) / (client.steps * client.lr)
        np.testing.assert_allclose(records[CLIENT_DELTA_KEY][key].numpy(), c_plus - c_i[key], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(state[CLIENT_CONTROL_KEY][key].numpy(), c_plus, rtol=1e-4, atol=1e-6)
    assert metrics == {}


def test_scaffold_starts_from_zero_client_control():
    model = mlp()
    c = _control(model, 3)
    hook = ScaffoldHook(model, c, RecordDict(), momentum=0.0)
    for name, corr in hook.correction.items():
        np.testing.assert_array_equal(corr.numpy(), c[name].numpy())


def test_local_work_matches_momentum_sgd_displacement():
    """With a constant gradient g, x - y = lr * ||a||_1 * g for heavy-ball SGD."""
    g = torch.tensor([0.5, -2.0, 1.0])
    for steps, momentum in [(1, 0.0), (7, 0.0), (7, 0.9), (30, 0.5)]:
        w = torch.zeros(3, requires_grad=True)
        optimizer = torch.optim.SGD([w], lr=0.1, momentum=momentum)
        for _ in range(steps):
            optimizer.zero_grad()
            (w * g).sum().backward()
            optimizer.step()
        torch.testing.assert_close(-w.detach(), 0.1 * local_work(steps, momentum) * g)
    with pytest.raises(HookError, match="momentum must be in"):
        local_work(3, 1.0)


def test_fednova_hook_reports_steps_and_work():
    records, metrics = FedNovaHook(momentum=0.9).finish(mlp(), 12, 0.1)
    assert records == {} and metrics == {TAU_KEY: 12.0, A_NORM_KEY: local_work(12, 0.9)}
    with pytest.raises(HookError, match="no steps"):
        FedNovaHook(momentum=0.0).finish(mlp(), 0, 0.1)


def test_finish_hooks_rejects_clashing_keys():
    hooks = [FedNovaHook(0.0), FedNovaHook(0.0)]
    with pytest.raises(HookError, match="already written"):
        finish_hooks(hooks, mlp(), 3, 0.1)


# ---- server math ----------------------------------------------------------------------------


def test_scaffold_server_update_uses_uniform_mean_and_sampled_over_total():
    x, c = {"w": np.array([1.0, 2.0])}, {"w": np.array([0.5, 0.5])}
    models = [{"w": np.array([2.0, 2.0])}, {"w": np.array([1.0, 4.0])}]
    deltas = [{"w": np.array([1.0, 0.0])}, {"w": np.array([3.0, 2.0])}]
    new_x, new_c = scaffold_server_update(x, c, models, deltas, num_clients=8, server_learning_rate=0.5)
    np.testing.assert_allclose(new_x["w"], x["w"] + 0.5 * np.array([0.5, 1.0]))
    np.testing.assert_allclose(new_c["w"], c["w"] + (2 / 8) * np.array([2.0, 1.0]))


def test_fednova_update_equals_fedavg_when_work_is_equal():
    x = {"w": np.array([1.0, -1.0])}
    models = [{"w": np.array([0.0, 0.0])}, {"w": np.array([3.0, 1.0])}]
    new = fednova_update(x, models, weights=[1, 3], a_norms=[5.0, 5.0])
    np.testing.assert_allclose(new["w"], 0.25 * models[0]["w"] + 0.75 * models[1]["w"])


def test_fednova_update_normalises_by_work():
    x = {"w": np.array([0.0])}
    models = [{"w": np.array([1.0])}, {"w": np.array([4.0])}]  # 1 and 4 units of work: same direction per unit
    new = fednova_update(x, models, weights=[1, 1], a_norms=[1.0, 4.0])
    tau_eff = 2.5
    np.testing.assert_allclose(new["w"], tau_eff * np.array([1.0]))


# ---- strategies with real messages ---------------------------------------------------------------


def test_scaffold_sends_c_and_updates_it_with_partial_participation(flower_task_identity):
    strategy = Scaffold(fraction_train=0.5, min_train_nodes=2, min_available_nodes=4)
    model, clients = mlp(), random_clients(4)
    arrays = ArrayRecord(model.state_dict())
    messages = list(strategy.configure_train(1, arrays, ConfigRecord(), StaticGrid(clients)))
    assert len(messages) == 2
    for msg in messages:
        assert all(not a.numpy().any() for a in msg.content[SERVER_CONTROL_KEY].values())
    replies = [
        client_reply(m, clients[m.metadata.dst_node_id], model, torch.nn.functional.cross_entropy) for m in messages
    ]
    deltas = [{k: a.numpy() for k, a in r.content[CLIENT_DELTA_KEY].items()} for r in replies]
    new_arrays, _ = strategy.aggregate_train(1, replies)
    for key, value in strategy.control.items():
        np.testing.assert_allclose(value, (deltas[0][key] + deltas[1][key]) / 4, rtol=1e-6)
    sent = next(iter(strategy.configure_train(2, new_arrays, ConfigRecord(), StaticGrid(clients)))).content[
        SERVER_CONTROL_KEY
    ]
    for key, value in strategy.control.items():
        np.testing.assert_allclose(sent[key].numpy(), value, rtol=1e-6)


def test_scaffold_rejects_reply_without_delta_c(flower_task_identity):
    strategy = Scaffold()
    model, clients = mlp(), random_clients(2)
    messages = list(strategy.configure_train(1, ArrayRecord(model.state_dict()), ConfigRecord(), StaticGrid(clients)))
    replies = [
        client_reply(m, clients[m.metadata.dst_node_id], model, torch.nn.functional.cross_entropy) for m in messages
    ]
    del replies[1].content[CLIENT_DELTA_KEY]
    with pytest.raises(InconsistentMessageReplies, match="has no ArrayRecord 'scaffold.delta-c'"):
        strategy.aggregate_train(1, replies)


def test_fednova_rejects_reply_without_work(flower_task_identity):
    strategy = FedNova()
    model, clients = mlp(), random_clients(2)
    messages = list(strategy.configure_train(1, ArrayRecord(model.state_dict()), ConfigRecord(), StaticGrid(clients)))
    assert all(m.content["config"]["fednova"] is True for m in messages)
    replies = []
    for m in messages:
        reply = client_reply(m, clients[m.metadata.dst_node_id], model, torch.nn.functional.cross_entropy)
        metrics = MetricRecord({k: v for k, v in reply.content["metrics"].items() if k != A_NORM_KEY})
        metrics[A_NORM_KEY] = 0.0
        replies.append(Message(RecordDict({"arrays": reply.content["arrays"], "metrics": metrics}), reply_to=m))
    with pytest.raises(InconsistentMessageReplies, match="'fednova.a-norm'=0.0, expected a positive number"):
        strategy.aggregate_train(1, replies)


def _quadratic_clients(h: list[float], a: list[float], steps: list[int], lr: float) -> dict[int, FakeClient]:
    return {
        i + 1: FakeClient(torch.tensor([[hi**0.5]]), torch.tensor([[hi**0.5 * ai]]), k, lr)
        for i, (hi, ai, k) in enumerate(zip(h, a, steps))
    }


def _run(strategy_name: str, clients: dict[int, FakeClient], rounds: int) -> float:
    strategy = build_strategy(strategy_name, {}, {"num-clients": len(clients)})
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(-1.0)
    arrays = ArrayRecord(model.state_dict())
    for server_round in range(1, rounds + 1):
        arrays, _ = run_round(strategy, arrays, clients, model, criterion=mse, server_round=server_round)
    return float(arrays["weight"].numpy().item())


def test_scaffold_removes_client_drift_that_biases_fedavg(flower_task_identity):
    h, a, steps, lr = [1.0, 10.0], [0.0, 1.0], [50, 50], 0.01
    q = [(1 - 2 * lr * hi) ** k for hi, k in zip(h, steps)]
    optimum = sum(hi * ai for hi, ai in zip(h, a)) / sum(h)
    fedavg_fixed_point = sum((1 - qi) * ai for qi, ai in zip(q, a)) / sum(1 - qi for qi in q)

    fedavg = _run("fedavg", _quadratic_clients(h, a, steps, lr), rounds=30)
    scaffold = _run("scaffold", _quadratic_clients(h, a, steps, lr), rounds=30)
    assert fedavg == pytest.approx(fedavg_fixed_point, abs=1e-4)
    assert abs(fedavg - optimum) > 0.1  # the drift SCAFFOLD is meant to remove
    assert scaffold == pytest.approx(optimum, abs=1e-3)


def test_fednova_removes_objective_inconsistency_of_unequal_local_steps(flower_task_identity):
    h, a, steps, lr = [1.0, 1.0], [0.0, 1.0], [5, 50], 0.005
    r = [1 - (1 - 2 * lr * hi) ** k for hi, k in zip(h, steps)]
    optimum = 0.5
    fedavg_fixed_point = sum(ri * ai for ri, ai in zip(r, a)) / sum(r)
    fednova_fixed_point = sum(ri / k * ai for ri, k, ai in zip(r, steps, a)) / sum(ri / k for ri, k in zip(r, steps))

    fedavg = _run("fedavg", _quadratic_clients(h, a, steps, lr), rounds=40)
    fednova = _run("fednova", _quadratic_clients(h, a, steps, lr), rounds=40)
    assert fedavg == pytest.approx(fedavg_fixed_point, abs=1e-4)
    assert fednova == pytest.approx(fednova_fixed_point, abs=1e-4)
    assert abs(fednova - optimum) < abs(fedavg - optimum) / 3

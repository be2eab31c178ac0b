"""Sample-level DP-SGD (fedvault.privacy.dp_sgd): clipping, noise, reuse across rounds, auto mode."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedvault.privacy import dp_sgd
from fedvault.privacy.dp_sgd import (
    DPSGDError,
    PrivateTrainer,
    choose_grad_sample_mode,
    dp_compatible,
    measure_step_times,
    planned_steps,
    poisson_sample_rate,
    steps_per_epoch,
)
from fedvault.tasks import SupervisedTask, TrainResult

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")
CE = nn.CrossEntropyLoss()


def sgd(lr: float, momentum: float = 0.0):
    return lambda params: torch.optim.SGD(params, lr=lr, momentum=momentum)


def trainer_for(model, dataset, batch_size, *, lr=1.0, sigma=0.0, clip=1.0, mode="hooks", **kw) -> PrivateTrainer:
    return PrivateTrainer(
        model,
        sgd(lr),
        DataLoader(dataset, batch_size=batch_size),
        noise_multiplier=sigma,
        max_grad_norm=clip,
        criterion=CE,
        grad_sample_mode=mode,
        **kw,
    )


class CrossEntropyTask(SupervisedTask):
    """The task's own loop (SupervisedTask.train) is what the trainer wraps."""

    name = "cross-entropy"


@dataclass
class Round:
    state_dict: dict[str, torch.Tensor]
    steps: int


def train_round(trainer: PrivateTrainer, state, epochs: int, **kwargs) -> Round:
    result = trainer.train(CrossEntropyTask(), epochs, global_state=state, **kwargs)
    return Round({k: v.detach().clone() for k, v in trainer.model.state_dict().items()}, result.steps)


def start_state(trainer: PrivateTrainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.module._module.state_dict().items()}


def test_planning_helpers_match_what_opacus_builds():
    dataset = TensorDataset(torch.randn(100, 4), torch.randint(0, 3, (100,)))
    trainer = trainer_for(nn.Linear(4, 3), dataset, batch_size=32)
    assert trainer.steps_per_epoch == steps_per_epoch(100, 32) == 4
    assert trainer.sample_rate == poisson_sample_rate(100, 32) == 0.25
    assert trainer.expected_batch_size == 25
    assert planned_steps(100, 32, epochs=3) == 12
    result = train_round(trainer, start_state(trainer), epochs=3)
    assert result.steps == 12 == trainer.accounted_steps()


@pytest.mark.parametrize("mode", ["hooks", "functorch", "ghost", "ew", "bk"])
def test_each_example_gradient_is_clipped_to_the_bound(mode):
    torch.manual_seed(0)
    n, clip = 8, 0.05
    x, y = torch.randn(n, 6) * 3, torch.randint(0, 3, (n,))
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    # batch_size = n gives q = 1: every example is in every (single) step
    trainer = trainer_for(model, TensorDataset(x, y), batch_size=n, clip=clip, mode=mode)
    start = start_state(trainer)

    reference = dp_compatible(model)  # a hook-free twin of the trainer's model
    reference.load_state_dict(start)
    clipped_sum = [torch.zeros_like(p) for p in reference.parameters()]
    unclipped_sum = [torch.zeros_like(p) for p in reference.parameters()]
    norms = []
    for i in range(n):
        grads = torch.autograd.grad(CE(reference(x[i : i + 1]), y[i : i + 1]), list(reference.parameters()))
        norm = torch.sqrt(sum((g**2).sum() for g in grads)).item()
        norms.append(norm)
        for acc, raw, g in zip(clipped_sum, unclipped_sum, grads):
            acc += g * min(1.0, clip / norm)
            raw += g
    assert min(norms) > 2 * clip  # clipping is active for every example

    result = train_round(trainer, start, epochs=1)
    assert result.steps == 1
    update = [result.state_dict[k] - start[k] for k in start]
    for got, acc, raw in zip(update, clipped_sum, unclipped_sum):
        torch.testing.assert_close(got, -acc / n, atol=1e-6, rtol=1e-4)
        assert not torch.allclose(got, -raw / n, atol=1e-4)
    assert math.sqrt(sum((u**2).sum().item() for u in update)) <= clip + 1e-6


@pytest.mark.parametrize("mode", ["hooks", "functorch", "ghost", "ew", "bk"])
def test_noise_std_is_sigma_times_clip_over_expected_batch_size(mode):
    # x = 0 and no bias: every gradient is exactly zero, so the update is the noise alone.
    n, batch, sigma, clip = 64, 16, 2.0, 0.5
    dataset = TensorDataset(torch.zeros(n, 200), torch.randint(0, 100, (n,)))
    trainer = trainer_for(nn.Linear(200, 100, bias=False), dataset, batch, sigma=sigma, clip=clip, mode=mode)
    assert trainer.expected_batch_size == int(n * poisson_sample_rate(n, batch)) == 16
    start = start_state(trainer)
    deltas = []
    for _ in range(2):
        result = train_round(trainer, start, epochs=1)
        deltas.append((result.state_dict["weight"] - start["weight"]).flatten() / math.sqrt(result.steps))
    noise = torch.cat(deltas).double()
    expected = sigma * clip / trainer.expected_batch_size
    assert abs(noise.std().item() / expected - 1) < 0.03
    assert abs(noise.mean().item()) < 4 * expected / math.sqrt(noise.numel())


def test_engine_is_built_once_and_reused_across_rounds():
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv1d(1, 8, 5, stride=2), nn.BatchNorm1d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 18, 10)
    )
    dataset = TensorDataset(torch.randn(256, 1, 40), torch.randint(0, 10, (256,)))
    trainer = PrivateTrainer(
        model,
        sgd(0.05, momentum=0.9),
        DataLoader(dataset, batch_size=32),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        criterion=CE,
    )
    global_model = dp_compatible(model)  # BatchNorm -> GroupNorm, same keys as the trainer's model
    assert not any(isinstance(m, nn.BatchNorm1d) for m in global_model.modules())
    state = global_model.state_dict()
    module, optimizer = trainer.module, trainer.parts.optimizer
    hooks = len(module.autograd_grad_sample_hooks)

    total_steps = 0
    for _ in range(8):
        result = train_round(trainer, state, epochs=1)
        state, total_steps = result.state_dict, total_steps + result.steps
        assert set(state) == set(global_model.state_dict())
    assert trainer.module is module and trainer.parts.optimizer is optimizer
    assert len(module.autograd_grad_sample_hooks) == hooks
    assert total_steps == trainer.accounted_steps() == 8 * trainer.steps_per_epoch
    assert all(m == 1.0 and q == trainer.sample_rate for m, q, _ in trainer.accountant.history)

    trainer.close()
    assert not any(hasattr(p, "grad_sample") for p in trainer._model.parameters())
    with pytest.raises(DPSGDError, match="closed"):
        train_round(trainer, state, epochs=1)


def test_global_weights_load_in_place_with_or_without_module_prefix():
    dataset = TensorDataset(torch.randn(20, 4), torch.randint(0, 3, (20,)))
    trainer = trainer_for(nn.Linear(4, 3), dataset, batch_size=5, lr=0.0, sigma=1.0)
    global_state = {"weight": torch.randn(3, 4), "bias": torch.randn(3)}
    for keys in (global_state, {"_module." + k: v for k, v in global_state.items()}):
        result = train_round(trainer, keys, epochs=1)  # lr = 0: the weights stay what was loaded
        assert set(result.state_dict) == {"weight", "bias"}
        for k, v in global_state.items():
            torch.testing.assert_close(result.state_dict[k], v, rtol=0, atol=0)
    with pytest.raises(DPSGDError, match="missing"):
        train_round(trainer, {"weight": global_state["weight"]}, epochs=1)
    with pytest.raises(DPSGDError, match="do not fit"):
        train_round(trainer, {"weight": torch.zeros(2, 4), "bias": torch.zeros(3)}, epochs=1)


@pytest.mark.parametrize("mode", ["hooks", "functorch", "ghost", "ew", "bk"])
def test_empty_poisson_batches_still_take_an_accounted_noise_step(mode, monkeypatch):
    dataset = TensorDataset(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))
    trainer = trainer_for(nn.Linear(3, 2, bias=False), dataset, batch_size=1, sigma=1.0, mode=mode)  # q = 0.5
    start = start_state(trainer)
    noise_only, step = [], dp_sgd._PrivateStep.noise_only_step
    monkeypatch.setattr(dp_sgd._PrivateStep, "noise_only_step", lambda self: (noise_only.append(1), step(self))[1])
    seen = []
    trainer.module.register_forward_pre_hook(lambda _m, args: seen.append(len(args[0])))
    result = train_round(trainer, start, epochs=20)
    assert noise_only  # P(no empty batch in 40 draws) = 0.75**40
    assert 0 not in seen  # the task's loop never sees an empty batch
    assert result.steps == trainer.accounted_steps() == 40 == len(seen) + len(noise_only)
    assert not torch.equal(result.state_dict["weight"], start["weight"])


@pytest.mark.parametrize("mode", ["hooks", "functorch", "ghost", "ew", "bk"])
def test_batch_memory_manager_splits_physical_batches_but_accounts_logical_steps(mode):
    dataset = TensorDataset(torch.randn(64, 4), torch.randint(0, 3, (64,)))
    trainer = trainer_for(nn.Linear(4, 3), dataset, batch_size=32, sigma=1.0, mode=mode, max_physical_batch_size=8)
    sizes = []
    trainer.module.register_forward_pre_hook(lambda _m, args: sizes.append(len(args[0])))
    result = train_round(trainer, start_state(trainer), epochs=3)
    assert max(sizes) <= 8 and len(sizes) > result.steps
    assert result.steps == trainer.accounted_steps() == 3 * 2


def test_poisson_samples_and_noise_do_not_follow_the_global_torch_seed():
    dataset = TensorDataset(torch.zeros(200, 3), torch.zeros(200, dtype=torch.long))
    draws = []
    for _ in range(2):
        torch.manual_seed(0)  # what a seeded run does; the DP randomness must not depend on it
        trainer = trainer_for(nn.Linear(3, 2, bias=False), dataset, batch_size=20, sigma=1.0)
        batches = list(trainer.parts.loader.batch_sampler)
        start = start_state(trainer)
        noise = train_round(trainer, start, epochs=1).state_dict["weight"] - start["weight"]
        draws.append((batches, noise))
    assert draws[0][0] != draws[1][0]
    assert not torch.equal(draws[0][1], draws[1][1])


def test_invalid_setup_is_refused_with_a_named_reason():
    dataset = TensorDataset(torch.randn(8, 4), torch.randint(0, 3, (8,)))
    with pytest.raises(DPSGDError, match="reduction"):
        PrivateTrainer(
            nn.Linear(4, 3),
            sgd(0.1),
            DataLoader(dataset, batch_size=4),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            criterion=nn.CrossEntropyLoss(reduction="none"),
        )
    with pytest.raises(DPSGDError, match="grad_sample_mode"):
        trainer_for(nn.Linear(4, 3), dataset, 4, mode="vmap")
    with pytest.raises(DPSGDError, match="max_grad_norm"):
        trainer_for(nn.Linear(4, 3), dataset, 4, clip=0.0)


def test_choose_grad_sample_mode_picks_the_lowest_time():
    assert choose_grad_sample_mode({"hooks": 2.0, "ghost": 1.0}) == "ghost"
    assert choose_grad_sample_mode({"hooks": 1.0, "ghost": 2.0}) == "hooks"
    assert choose_grad_sample_mode({"ghost": 1.0, "hooks": 1.0}) == "hooks"
    with pytest.raises(DPSGDError):
        choose_grad_sample_mode({})


def test_auto_mode_picks_the_measured_faster_mode_and_caches_it():
    # A Linear-heavy MLP: hooks materialises 64 copies of each weight matrix, ghost does not.
    def build():
        return nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))

    dataset = TensorDataset(torch.randn(256, 256), torch.randint(0, 10, (256,)))
    trainer = trainer_for(build(), dataset, batch_size=64, mode="auto", sigma=1.0)
    choice = trainer.mode_choice
    assert trainer.grad_sample_mode == choice.mode == choose_grad_sample_mode(choice.seconds_per_step)

    batch = (torch.randn(64, 256), torch.zeros(64, dtype=torch.long))
    times = measure_step_times(build(), batch, CE, torch.device("cpu"), reps=5)
    medians = {mode: statistics.median(v) for mode, v in times.items()}
    assert set(medians) == {"hooks", "functorch", "ghost", "ew", "bk"} and all(m > 0 for m in medians.values())
    assert choice.mode != "ghost" and set(choice.seconds_per_step) == {"hooks", "functorch", "ew"}

    again = trainer_for(build(), dataset, batch_size=64, mode="auto", sigma=1.0)
    assert again.mode_choice is choice  # measured once per process for this architecture and batch size
    assert train_round(again, start_state(again), epochs=1).steps == again.steps_per_epoch


@pytest.mark.parametrize("picked", ["ghost", "bk"])
def test_auto_times_the_loss_clipping_modes_too_when_the_tasks_loop_honours_the_criterion(monkeypatch, picked):
    """A linear model on fixed features (ScatterNet + linear): ghost and bk clipping need no per-sample
    gradients there. With ``criterion_honoured`` (SupervisedTask's loop) auto times them beside the others,
    and a round in whichever mode it picks runs the task's loop through the clipping loss when needed."""
    monkeypatch.setattr(dp_sgd, "choose_grad_sample_mode", lambda seconds: picked)  # as it may measure here
    monkeypatch.setattr(dp_sgd, "_MODE_CHOICES", {})  # "auto" caches its choice per process
    dataset = TensorDataset(torch.randn(256, 81 * 49), torch.randint(0, 10, (256,)))
    trainer = trainer_for(nn.Linear(81 * 49, 10), dataset, batch_size=64, mode="auto", criterion_honoured=True)
    assert set(trainer.mode_choice.seconds_per_step) == {"hooks", "functorch", "ew", "ghost", "bk"}
    assert trainer.grad_sample_mode == picked
    assert train_round(trainer, start_state(trainer), epochs=1).steps == trainer.steps_per_epoch


def test_a_client_on_a_built_in_task_lets_auto_time_the_loss_clipping_modes():
    from fedvault.client.node import DataSelection
    from fedvault.client.private_training import private_trainer
    from fedvault.config import RunConfig

    cfg = RunConfig.from_flat({"task": "digits", "num-clients": 2, "privacy.grad-sample-mode": "auto"})
    trainer = private_trainer(cfg, DataSelection.from_run(cfg, {"partition-id": 0}), "cpu")
    assert set(trainer.mode_choice.seconds_per_step) == {"hooks", "functorch", "ew", "ghost", "bk"}


def test_auto_leaves_out_a_mode_that_cannot_train_the_model(monkeypatch, caplog):
    real = dp_sgd.make_private_parts

    def no_ew(*args, **kwargs):
        if kwargs["grad_sample_mode"] == "ew":
            raise NotImplementedError("no expanded-weights rule for this layer")
        return real(*args, **kwargs)

    monkeypatch.setattr(dp_sgd, "make_private_parts", no_ew)
    model, batch = (
        nn.Sequential(nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3)),
        (torch.randn(8, 7), torch.zeros(8, dtype=torch.long)),
    )
    choice = dp_sgd.auto_grad_sample_mode(model, batch, CE, torch.device("cpu"))
    assert set(choice.seconds_per_step) == {"hooks", "functorch"} and choice.mode in {"hooks", "functorch"}
    assert "grad-sample mode 'ew' cannot train this model (no expanded-weights rule for this layer)" in caplog.text


class ConstantPull:
    """A strategy-style hook: adds a fixed vector to the (already private) gradient."""

    def __init__(self, value: float) -> None:
        self.value, self.calls = value, 0

    def after_backward(self, model: nn.Module) -> None:
        self.calls += 1
        for p in model.parameters():
            p.grad.add_(self.value)


@pytest.mark.parametrize(
    "mode,physical",
    [("hooks", None), ("functorch", None), ("ghost", None), ("ew", None), ("bk", None), ("hooks", 4), ("bk", 4)],
)
def test_strategy_hooks_edit_the_noised_gradient_once_per_logical_step(mode, physical):
    """Clip ~0 and no noise: the private gradient is ~0, so only the hook moves the weights. Had it
    run before Opacus' pre_step, Opacus would have overwritten it and nothing would move."""
    dataset = TensorDataset(torch.randn(32, 4), torch.randint(0, 3, (32,)))
    trainer = trainer_for(
        nn.Linear(4, 3), dataset, batch_size=16, lr=0.1, clip=1e-12, mode=mode, max_physical_batch_size=physical
    )
    start, hook = start_state(trainer), ConstantPull(0.5)
    result = train_round(trainer, start, epochs=3, make_hooks=lambda model: [hook])
    assert hook.calls == result.steps == 3 * 2
    for name, value in start.items():
        torch.testing.assert_close(result.state_dict[name], value - 0.1 * 0.5 * result.steps, atol=1e-6, rtol=0)


class OwnLossTask(CrossEntropyTask):
    """A custom loop that ignores settings.criterion: under ghost or bk clipping its gradient is unclipped."""

    def train(self, model, loader, optimizer, settings):
        for _ in range(settings.epochs):
            for x, y in loader:
                optimizer.zero_grad()
                CE(model(x), y).backward()
                optimizer.step()
        return TrainResult(loss=0.0, steps=0)


@pytest.mark.parametrize("mode", ["ghost", "bk"])
def test_loss_clipping_modes_refuse_a_step_whose_loss_skipped_the_clipping_wrapper(mode):
    dataset = TensorDataset(torch.randn(16, 4), torch.randint(0, 3, (16,)))
    trainer = trainer_for(nn.Linear(4, 3), dataset, batch_size=8, sigma=1.0, mode=mode)
    with pytest.raises(DPSGDError, match="settings.criterion"):
        trainer.train(OwnLossTask(), 1, global_state=start_state(trainer))
    trainer_hooks = trainer_for(nn.Linear(4, 3), dataset, batch_size=8, sigma=1.0, mode="hooks")
    assert trainer_hooks.train(OwnLossTask(), 1).steps == trainer_hooks.accounted_steps() == 2


def test_round_learning_rate_overrides_the_optimizers_and_epsilon_is_reported():
    dataset = TensorDataset(torch.randn(32, 4), torch.randint(0, 3, (32,)))
    trainer = PrivateTrainer.with_budget(
        nn.Linear(4, 3),
        sgd(0.0),
        DataLoader(dataset, batch_size=8),
        target_epsilon=2.0,
        target_delta=1e-5,
        epochs=2,
        rounds=3,
        max_grad_norm=1.0,
        criterion=CE,
    )
    assert trainer.epsilon(1e-5) == 0.0
    start = start_state(trainer)
    moved = train_round(trainer, start, epochs=2, learning_rate=0.5)
    assert not torch.equal(moved.state_dict["weight"], start["weight"])  # lr 0.5, not the optimizer's 0
    train_round(trainer, start, epochs=2)
    train_round(trainer, start, epochs=2)
    assert trainer.epsilon(1e-5) == pytest.approx(2.0, rel=0.02)  # the whole planned budget, spent exactly

"""Book-keeping clipping: every kernel writes the clipped per-example gradient sum, and the trainer's
"bk" mode gives the update Opacus' hooks give."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedvault.privacy import book_keeping
from fedvault.privacy.book_keeping import BookKeepingLoss, BookKeepingModule, UnsupportedLayerError
from fedvault.privacy.dp_sgd import PrivateTrainer
from fedvault.tasks.base import SupervisedTask
from fedvault.tasks.mnist1d import Mnist1dTask

CE = nn.CrossEntropyLoss()


def conv1d_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(2, 5, 5, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv1d(5, 4, 3, stride=2, padding=2, dilation=2),
        nn.Flatten(),
        nn.Linear(4 * 10, 3),
    )


def conv2d_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, (3, 2), stride=(2, 1), padding=(1, 0)),
        nn.Tanh(),
        nn.Conv2d(4, 3, 3, dilation=2, bias=False),
        nn.Flatten(),
        nn.Linear(3 * 2 * 6, 3),
    )


def sequence_model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3), nn.Flatten(), nn.Linear(21, 3))


MODELS = {
    "conv1d": (conv1d_model, (2, 40)),
    "conv2d": (conv2d_model, (2, 12, 11)),
    "sequence": (sequence_model, (7, 4)),
}
KERNELS = {
    "conv": ["_conv_einsum", "_conv_grouped", "_conv_gram", "_conv_gram_broadcast", "_conv_broadcast"],
    "sequence": ["_linear_gram", "_linear_einsum"],
}


def reference_clipped_sum(model: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float) -> torch.Tensor:
    """Per-example gradients one example at a time, each clipped to ``clip``, summed and flattened."""
    rows = []
    for i in range(len(y)):
        grads = torch.autograd.grad(CE(model(x[i : i + 1]), y[i : i + 1]), list(model.parameters()))
        rows.append(torch.cat([g.flatten() for g in grads]))
    per_example = torch.stack(rows)
    factors = (clip / (per_example.norm(dim=1) + 1e-6)).clamp(max=1.0)
    assert (factors < 1).any() and (factors == 1).any()  # some examples clipped, some not
    return factors @ per_example


def flat_grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def batch_for(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor, float]:
    torch.manual_seed(0)
    factory, shape = MODELS[name]
    model, x = factory(), torch.randn(6, *shape)
    y = torch.randint(0, 3, (6,))
    norms = torch.stack(
        [
            torch.cat(
                [g.flatten() for g in torch.autograd.grad(CE(model(x[i : i + 1]), y[i : i + 1]), model.parameters())]
            ).norm()
            for i in range(6)
        ]
    )
    return model, x, y, norms.median().item()


@pytest.mark.parametrize(
    "name,kernel",
    [(name, kernel) for name in ("conv1d", "conv2d") for kernel in KERNELS["conv"]]
    + [("sequence", kernel) for kernel in KERNELS["sequence"]],
)
def test_every_kernel_writes_the_clipped_per_example_gradient_sum(name, kernel, monkeypatch):
    model, x, y, clip = batch_for(name)
    expected = reference_clipped_sum(model, x, y, clip)
    forced = getattr(book_keeping, kernel)
    real = book_keeping._candidates

    def only_forced(layer, activation, g):
        kind = "sequence" if isinstance(layer, nn.Linear) else "conv"
        return (forced,) if kernel in KERNELS[kind] and activation.dim() > 2 else real(layer, activation, g)

    monkeypatch.setattr(book_keeping, "_candidates", only_forced)
    module = BookKeepingModule(model)
    BookKeepingLoss(module, CE, clip)(module(x), y).backward()
    assert kernel in {k.__name__ for k in module._kernels.values()}
    torch.testing.assert_close(flat_grads(model), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_timed_choice_gives_the_same_sum_and_a_scaled_loss_scales_only_the_gradient(name):
    model, x, y, clip = batch_for(name)
    expected = reference_clipped_sum(model, x, y, clip)
    module = BookKeepingModule(model)
    criterion = BookKeepingLoss(module, CE, clip)
    with torch.no_grad():
        plain_loss = CE(model(x), y).item()
    loss = criterion(module(x), y)
    assert loss.item() == pytest.approx(plain_loss, rel=1e-6)
    loss.backward()
    torch.testing.assert_close(flat_grads(model), expected, atol=1e-5, rtol=1e-4)
    model.zero_grad(set_to_none=True)
    (criterion(module(x), y) * 1024.0).backward()  # what torch.amp.GradScaler does; clipping sees true norms
    torch.testing.assert_close(flat_grads(model), 1024.0 * expected, atol=1e-3, rtol=1e-4)


def test_unsupported_models_are_refused_naming_the_layer():
    with pytest.raises(UnsupportedLayerError, match=r"'1' \(GroupNorm\)"):
        BookKeepingModule(nn.Sequential(nn.Linear(4, 4), nn.GroupNorm(2, 4), nn.Linear(4, 2)))
    with pytest.raises(UnsupportedLayerError, match="groups=1"):
        BookKeepingModule(nn.Sequential(nn.Conv1d(4, 4, 3, groups=2)))
    frozen = nn.Sequential(nn.GroupNorm(2, 4), nn.Linear(4, 2))
    frozen[0].requires_grad_(False)
    BookKeepingModule(frozen)  # a frozen layer needs no clipping

    shared = nn.Linear(3, 3)
    module = BookKeepingModule(nn.Sequential(shared, nn.Tanh(), shared))
    with pytest.raises(UnsupportedLayerError, match="ran twice"):
        module(torch.randn(2, 3))


def test_a_left_over_gradient_or_a_loss_from_an_older_forward_is_refused():
    model = nn.Linear(3, 2)
    module = BookKeepingModule(model)
    criterion = BookKeepingLoss(module, CE, 1.0)
    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    criterion(module(x), y).backward()
    with pytest.raises(UnsupportedLayerError, match="already present"):
        criterion(module(x), y).backward()
    model.zero_grad(set_to_none=True)
    stale = criterion(module(x), y)
    module(x)  # a second forward replaces what the first kept
    with pytest.raises(UnsupportedLayerError, match="last training-mode forward"):
        stale.backward()
    assert model.weight.grad is None


def test_bk_mode_trains_the_main_jobs_cnn_to_the_update_opacus_hooks_give():
    """No noise and q = 1 (every example in the one step): the DP update is the clipped mean gradient,
    whichever mode computes it."""
    torch.manual_seed(1)
    dataset = TensorDataset(torch.randn(32, 1, 40), torch.randint(0, 10, (32,)))
    model = Mnist1dTask().build_model()
    updates = {}
    for mode in ("hooks", "bk"):
        trainer = PrivateTrainer(
            model,
            lambda params: torch.optim.SGD(params, lr=1.0),
            DataLoader(dataset, batch_size=32),
            noise_multiplier=0.0,
            max_grad_norm=0.1,
            criterion=CE,
            grad_sample_mode=mode,
            criterion_honoured=True,
        )
        start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        result = trainer.train(SupervisedTask(), 1, global_state=start)
        assert result.steps == trainer.accounted_steps() == 1
        updates[mode] = {k: trainer.model.state_dict()[k] - start[k] for k in start}
    for key, hooks_update in updates["hooks"].items():
        assert hooks_update.abs().sum() > 0
        torch.testing.assert_close(updates["bk"][key], hooks_update, atol=1e-6, rtol=1e-4)


def test_a_layer_the_forward_skipped_gets_a_zero_gradient():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.skipped = nn.Linear(3, 2), nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    model = Branchy()
    module = BookKeepingModule(model)
    BookKeepingLoss(module, CE, 1.0)(module(torch.randn(4, 3)), torch.randint(0, 2, (4,))).backward()
    assert model.used.weight.grad.abs().sum() > 0
    assert torch.equal(model.skipped.weight.grad, torch.zeros(2, 3)) and torch.equal(
        model.skipped.bias.grad, torch.zeros(2)
    )

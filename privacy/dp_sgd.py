"""Sample-level DP-SGD for one client process, through Opacus, built once and reused every round.

DP-SGD (Abadi et al. 2016, "Deep Learning with Differential Privacy", arXiv 1607.00133): each
logical batch is a Poisson sample (every local example independently with rate
``q = 1/ceil(N/B)``, as Opacus' ``DPDataLoader`` does); every per-example gradient is clipped
to L2 norm ``C``; the clipped gradients are summed, ``N(0, (σ·C)²)`` noise is added to every
coordinate, and the sum is divided by the fixed expected batch size ``floor(N·q)``. Each step
is a sampled Gaussian mechanism (σ, q); the client's accountant composes them. Empty Poisson
batches still take a noise-only step, and that step is accounted (skipping it would reveal
that the batch was empty).

:class:`PrivateTrainer` wires model, optimizer and loader through
``opacus.PrivacyEngine(accountant="prv").make_private`` once and runs the task's own
``Task.train`` on the wrapped objects every round: one training loop with DP on and off. Every
round it copies the global weights *in place* into the wrapped module's parameters (so the
``GradSampleModule``, its hooks, the ``DPOptimizer`` and the accountant are reused and memory
stays flat) and clears the local optimizer state. The empty batches are stepped by the wrapper,
so the task's loop never sees them.

Per-example gradients come from Opacus' ``"hooks"`` (materialised per-sample gradients from
module hooks), ``"functorch"`` (the same through ``torch.func``'s ``vmap`` of per-example
gradients), ``"ghost"`` (ghost clipping, Li et al. 2022, arXiv 2110.05679; Bu et al. 2023, arXiv
2205.10683: norms without materialising Linear-layer per-sample gradients, at the cost of a
second backward pass; the task's loop must use ``settings.criterion``), ``"ew"`` (torch's
expanded weights, per-sample gradients inside autograd) or ``"bk"`` (book-keeping clipping, Bu et
al. 2023, arXiv 2210.00038: one backward pass, per-layer norms from kept activations and output
gradients, :mod:`fedvault.privacy.book_keeping`; Linear and Conv layers only; the task's loop must
use ``settings.criterion``); ``"auto"`` times hooks, functorch and ew (and ghost and bk when the
task's loop uses ``settings.criterion``) once per process on the actual model and batch size and
keeps the fastest.

Randomness: by default Opacus runs with ``secure_mode=False``: the Poisson sampler and the noise
use torch's ordinary (Mersenne Twister / Philox) generators seeded from :mod:`secrets`, so neither
the sample nor the noise is predictable from the run's seed, but they are not cryptographic
generators and the noise is not hardened against floating-point attacks (Mironov, CCS 2012; Jin
et al. 2021, arXiv 2107.10138). ``secure_mode=True`` (config ``privacy.secure-mode``) is Opacus'
secure mode: sampler and noise from ``torchcsprng``'s ``/dev/urandom`` generator, and each noise
draw the sum of several Gaussians. It needs ``torchcsprng``, which has no build for current torch
(its last release, 0.2.1, targets torch 1.8): asking for it without the package is a clear error.
"""

from __future__ import annotations

import copy
import logging
import math
import secrets
import statistics
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from opacus import PrivacyEngine
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.utils.batch_memory_manager import wrap_data_loader
from opacus.validators import ModuleValidator
from opacus.validators.errors import UnsupportedModuleError
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedvault.errors import FedvaultError
from fedvault.privacy.accountants import calibrate_noise_multiplier, epsilon
from fedvault.privacy.book_keeping import BookKeepingLoss, BookKeepingModule
from fedvault.privacy.events import DPEvent
from fedvault.step_hooks import HookedOptimizer
from fedvault.tasks.base import Task, TrainingHook, TrainResult, TrainSettings

log = logging.getLogger("fedvault")

GRAD_SAMPLE_MODES = ("hooks", "functorch", "ghost", "ew", "bk")
#: Modes that clip inside the loss's ``backward()``: the task's loop must call ``settings.criterion``.
LOSS_CLIPPING_MODES = ("ghost", "bk")
#: What "auto" times and picks from. The loss-clipping modes join them only when the task's loop is known
#: to compute its loss with ``settings.criterion`` (``criterion_honoured``; a step without it is refused).
AUTO_MODES = ("hooks", "functorch", "ew")
AUTO_MODES_WITH_LOSS_CLIPPING = (*AUTO_MODES, *LOSS_CLIPPING_MODES)
OptimizerFactory = Callable[[Iterator[nn.Parameter]], torch.optim.Optimizer]


class DPSGDError(FedvaultError, ValueError):
    """Invalid DP-SGD setup: an incompatible model, bad parameters, or weights that do not fit."""


# ---- planning (before anything is built) ---------------------------------------------------


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Logical Poisson batches per epoch: ``ceil(N / B)`` (Opacus: ``len(data_loader)``)."""
    if num_examples < 1 or batch_size < 1:
        raise DPSGDError(f"DP-SGD: need num_examples >= 1 and batch_size >= 1, got {num_examples} and {batch_size}")
    return math.ceil(num_examples / batch_size)


def poisson_sample_rate(num_examples: int, batch_size: int) -> float:
    """Per-step Poisson sampling rate ``q = 1 / ceil(N / B)``, the rate the accountant records."""
    return 1 / steps_per_epoch(num_examples, batch_size)


def planned_steps(num_examples: int, batch_size: int, epochs: int) -> int:
    """Optimizer steps that ``epochs`` local epochs take: calibrate the noise multiplier on these."""
    return epochs * steps_per_epoch(num_examples, batch_size)


# ---- building blocks shared by the trainer, "auto" and the benchmark ------------------------


def dp_compatible(model: nn.Module) -> nn.Module:
    """A copy of ``model`` fixed for DP (BatchNorm -> GroupNorm, LSTM -> DPLSTM, ...), validated strictly.

    Build the *global* model with this too, so server and client state dicts have the same keys.
    """
    fixed = ModuleValidator.fix(model)
    try:
        ModuleValidator.validate(fixed, strict=True)
    except UnsupportedModuleError as exc:
        problems = "; ".join(str(e) for e in exc.args[0]) if exc.args and isinstance(exc.args[0], list) else str(exc)
        raise DPSGDError(f"DP-SGD: model {type(model).__name__} cannot be made DP-compatible: {problems}") from None
    return fixed


class _FastClippingOptimizer(DPOptimizerFastGradientClipping):
    """Opacus' optimizer for ghost and bk clipping, with ``accumulate`` cloning ``p.grad`` where
    Opacus deep-copies it: the same sums, without ``copy.deepcopy``'s Python overhead (about
    70 us per parameter per step, a tenth of a small model's whole step)."""

    def accumulate(self) -> None:
        for p in self.params:
            if p.summed_grad is not None:
                p.summed_grad.add_(p.grad)
            else:
                p.summed_grad = p.grad.detach().clone()


@dataclass
class PrivateParts:
    """The objects ``make_private`` returns, the same shape for every grad-sample mode."""

    engine: PrivacyEngine
    module: nn.Module  # an Opacus GradSampleModule
    optimizer: torch.optim.Optimizer  # an Opacus DPOptimizer
    criterion: Callable[..., Any]  # the ghost or bk loss wrapper, or the criterion itself
    loader: DataLoader


def make_private_parts(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    *,
    criterion: nn.Module,
    noise_multiplier: float,
    max_grad_norm: float,
    grad_sample_mode: str,
    noise_generator: torch.Generator | None = None,
    poisson_sampling: bool = True,
    secure_mode: bool = False,
) -> PrivateParts:
    """``PrivacyEngine(accountant="prv", secure_mode=...).make_private`` for one of :data:`GRAD_SAMPLE_MODES`;
    in secure mode Opacus' own CSPRNG replaces ``noise_generator`` and the loader's generator."""
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise DPSGDError(f"DP-SGD: grad_sample_mode must be one of {GRAD_SAMPLE_MODES}, got {grad_sample_mode!r}")
    reduction = getattr(criterion, "reduction", None)
    if reduction not in ("mean", "sum"):
        raise DPSGDError(
            f"DP-SGD: the criterion {type(criterion).__name__} needs reduction 'mean' or 'sum', got {reduction!r}"
        )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")  # documented in this module
        try:
            engine = PrivacyEngine(accountant="prv", secure_mode=secure_mode)
        except ImportError:
            raise DPSGDError(
                "DP-SGD: privacy.secure-mode = true needs the torchcsprng package (Opacus' secure generator), "
                "which is not installed; install a torchcsprng build for this torch, or set privacy.secure-mode = false"
            ) from None
    made = engine.make_private(  # bk: Opacus' ghost-clipping optimizer and loader, fedvault's module and loss
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        criterion=copy.deepcopy(criterion),  # ghost mode mutates the criterion it wraps
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        loss_reduction=reduction,
        poisson_sampling=poisson_sampling,
        grad_sample_mode="ghost" if grad_sample_mode == "bk" else grad_sample_mode,
        noise_generator=None if secure_mode else noise_generator,
    )
    if type(made[1]) is DPOptimizerFastGradientClipping:
        made[1].__class__ = _FastClippingOptimizer  # same state and noise; only accumulate() differs
    dp_criterion: Callable[..., Any]
    if grad_sample_mode == "bk":
        ghost_module, dp_optimizer, _, dp_loader = made
        ghost_module.cleanup()  # its hooks would run a second set of per-sample computations
        module = BookKeepingModule(model)
        dp_criterion = BookKeepingLoss(module, criterion, max_grad_norm)
    elif grad_sample_mode == "ghost":
        module, dp_optimizer, dp_criterion, dp_loader = made
    else:
        (module, dp_optimizer, dp_loader), dp_criterion = made, criterion
    return PrivateParts(engine, module, dp_optimizer, dp_criterion, dp_loader)


def train_step(
    module: nn.Module, optimizer: torch.optim.Optimizer, criterion: Callable[..., Any], x: Any, y: Any
) -> Any:
    """One optimizer step on a non-empty batch (x, y), as the trainer's task loop takes it; returns the loss."""
    optimizer.zero_grad(set_to_none=True)
    loss = criterion(module(x), y)
    loss.backward()
    optimizer.step()
    return loss


def _secure_generator(device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(secrets.randbits(63))
    return generator


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_step_times(
    model: nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor],
    criterion: nn.Module,
    device: torch.device,
    modes: Sequence[str] = GRAD_SAMPLE_MODES,
    *,
    reps: int = 3,
    steps: int = 3,
    warmup: int = 2,
) -> dict[str, list[float]]:
    """Seconds per step for each mode (``"plain"`` or one of :data:`GRAD_SAMPLE_MODES`), ``reps`` values each.

    Each mode trains its own copy of ``model`` on ``batch`` (already on ``device``); modes are
    interleaved within every repetition so machine load affects them alike. σ = C = 1.
    """
    x, y = batch
    runners: dict[str, tuple[nn.Module, torch.optim.Optimizer, Callable[..., Any]]] = {}
    for mode in modes:
        copy_ = copy.deepcopy(model).to(device)
        optimizer = torch.optim.SGD(copy_.parameters(), lr=0.0)
        if mode == "plain":
            runners[mode] = (copy_, optimizer, criterion)
        else:
            loader = DataLoader(TensorDataset(x.cpu(), y.cpu()), batch_size=len(y))
            parts = make_private_parts(
                copy_,
                optimizer,
                loader,
                criterion=criterion,
                noise_multiplier=1.0,
                max_grad_norm=1.0,
                grad_sample_mode=mode,
                poisson_sampling=False,
            )
            runners[mode] = (parts.module, parts.optimizer, parts.criterion)
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    try:
        for runner in runners.values():
            for _ in range(warmup):
                train_step(*runner, x, y)
        for _ in range(reps):
            for mode, runner in runners.items():
                _synchronize(device)
                start = time.perf_counter()
                for _ in range(steps):
                    train_step(*runner, x, y)
                _synchronize(device)
                times[mode].append((time.perf_counter() - start) / steps)
    finally:
        for module, _, _ in runners.values():
            cleanup = getattr(module, "cleanup", None)
            if callable(cleanup):
                cleanup()
    return times


def choose_grad_sample_mode(seconds_per_step: Mapping[str, float]) -> str:
    """The mode with the lowest time per step; a tie goes to ``"hooks"`` (one backward pass)."""
    if not seconds_per_step:
        raise DPSGDError("DP-SGD: no grad-sample mode timings to choose from")
    return min(seconds_per_step, key=lambda mode: (seconds_per_step[mode], mode != "hooks"))


@dataclass(frozen=True)
class ModeChoice:
    """The mode "auto" picked and the median seconds per step it measured."""

    mode: str
    seconds_per_step: Mapping[str, float]


_MODE_CHOICES: dict[tuple[str, int, str, tuple[str, ...]], ModeChoice] = {}


def auto_grad_sample_mode(
    model: nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor],
    criterion: nn.Module,
    device: torch.device,
    candidates: tuple[str, ...] = AUTO_MODES,
) -> ModeChoice:
    """Time every mode of ``candidates`` that can train the model, once per process per
    (architecture, batch size, device, candidates); cached."""
    key = (repr(model), len(batch[1]), device.type, candidates)
    if key not in _MODE_CHOICES:
        modes = [mode for mode in candidates if _runs(model, batch, criterion, device, mode)]
        if not modes:
            raise DPSGDError(f"DP-SGD: no grad-sample mode ({', '.join(candidates)}) can train this model")
        times = measure_step_times(model, batch, criterion, device, modes)
        medians = {mode: statistics.median(values) for mode, values in times.items()}
        _MODE_CHOICES[key] = ModeChoice(choose_grad_sample_mode(medians), medians)
    return _MODE_CHOICES[key]


def _runs(
    model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], criterion: nn.Module, device: torch.device, mode: str
) -> bool:
    """Whether ``mode`` can take a step on this model and device (not every mode supports every layer)."""
    try:
        measure_step_times(model, batch, criterion, device, (mode,), reps=1, steps=1, warmup=0)
    except Exception as exc:  # noqa: BLE001 - any failure rules the mode out; the reason is logged
        log.warning(
            "DP-SGD: grad-sample mode %r cannot train this model (%s); 'auto' leaves it out",
            mode,
            str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
        )
        return False
    return True


def _synthetic_batch(loader: DataLoader, batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch shaped like the loader's, holding no training data (random features, label 0)."""
    x, y = loader.collate_fn([loader.dataset[0]] * batch_size)
    x = torch.randn_like(x) if x.is_floating_point() else torch.zeros_like(x)
    return x.to(device), torch.zeros_like(y).to(device)


# ---- the wrapper the task's own loop runs on ------------------------------------------------


class _ClippingLoss:
    """A loss-clipping mode's loss wrapper (:data:`LOSS_CLIPPING_MODES`) that remembers whether its
    clipping backward ran.

    Under ghost or bk clipping a plain ``loss.backward()`` leaves the *unclipped* gradient sum in
    ``p.grad``, which the optimizer would then noise and release; the trainer refuses such a step.
    """

    def __init__(self, loss: Callable[..., Any], mode: str) -> None:
        self.loss, self.mode = loss, mode
        self.clipped = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        wrapped = self.loss(*args, **kwargs)
        backward = wrapped.backward

        def clipped_backward(*b_args: Any, **b_kwargs: Any) -> None:
            backward(*b_args, **b_kwargs)
            self.clipped = True

        wrapped.backward = clipped_backward
        return wrapped

    def consume(self) -> None:
        if not self.clipped:
            raise DPSGDError(
                f"DP-SGD: grad-sample mode {self.mode!r} needs Task.train to compute its loss with "
                "settings.criterion (the clipping loss); this step's gradient was not clipped, so it is not released"
            )
        self.clipped = False


class _PrivateStep(HookedOptimizer):
    """``DPOptimizer`` as the task sees it: ``step()`` clips and noises (Opacus' ``pre_step``), then
    runs the strategy hooks on the private gradient (post-processing), then the plain update."""

    def __init__(
        self, dp_optimizer: DPOptimizer, model: nn.Module, hooks: Sequence[TrainingHook], clipping: _ClippingLoss | None
    ):
        super().__init__(dp_optimizer, model, hooks)
        self.dp = dp_optimizer
        self.clipping = clipping
        self._noise_only = False

    def ready(self) -> bool:
        if self.clipping is not None and not self._noise_only:
            self.clipping.consume()
        return bool(self.dp.pre_step())

    def update(self) -> None:
        self.dp.original_optimizer.step()

    def noise_only_step(self) -> None:
        """The accounted step of an empty Poisson batch: no per-sample gradients, only noise.
        Skipping it would reveal that the batch was empty (and under-count the steps)."""
        self.dp.zero_grad(set_to_none=True)
        for p in self.dp.params:
            if self.clipping is not None:
                p.grad = torch.zeros_like(p)  # the loss-clipping optimizer sums p.grad
            else:
                p.grad_sample = p.new_zeros((0, *p.shape))
        self._noise_only = True
        try:
            self.step()
        finally:
            self._noise_only = False
        self.inner.zero_grad(set_to_none=True)


class _PoissonBatches:
    """The Poisson (or ``BatchMemoryManager``-split) batches; an empty one never reaches the task: its
    noise-only step is taken here, so ``Task.train`` needs no special case."""

    def __init__(self, batches: Iterable[Any], step: _PrivateStep, device: torch.device) -> None:
        self.batches, self.step, self.device = batches, step, device

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        for x, y in self.batches:
            if len(y) == 0:
                self.step.noise_only_step()
                continue
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


class PrivateTrainer:
    """Opacus DP-SGD wired once per client process, wrapped around the task's own training loop.

    As ``opacus.PrivacyEngine.make_private`` does, it wraps model, optimizer and loader once;
    :meth:`train` then runs ``task.train`` on the wrapped ``(module, optimizer, loader)``, so AMP,
    the round's learning rate and epochs and a custom task's loop behave as without DP. Every round
    copies the global weights *in place* into the wrapped module (hooks, ``DPOptimizer`` and
    accountant are reused, memory stays flat) and clears the local optimizer state.

    ``optimizer_factory`` builds the local optimizer from the (DP-fixed) model's parameters, e.g.
    ``lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9)``. ``train_loader`` supplies the
    dataset, batch size and collate function; sampling is re-done by Opacus (Poisson, rate
    ``1/ceil(N/B)``) with a secrets-seeded generator. ``grad_sample_mode`` is one of
    :data:`GRAD_SAMPLE_MODES` or ``"auto"``; ``secure_mode`` is Opacus' (see the module docstring).
    ``max_physical_batch_size`` splits large Poisson batches
    with Opacus' ``BatchMemoryManager`` (same privacy, bounded memory). The loss ``criterion`` must
    reduce with ``"mean"`` or ``"sum"``; batches are ``(x, y)`` pairs. :meth:`with_budget` calibrates
    the noise to an (epsilon, delta) budget; :meth:`epsilon` reports what was spent.
    ``criterion_honoured``: the task's loop computes its loss with ``settings.criterion`` (as
    :class:`SupervisedTask`'s does), so ``"auto"`` times ghost and bk clipping too.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer_factory: OptimizerFactory,
        train_loader: DataLoader,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        criterion: nn.Module,
        device: torch.device | str = "cpu",
        grad_sample_mode: str = "hooks",
        max_physical_batch_size: int | None = None,
        secure_mode: bool = False,
        criterion_honoured: bool = False,
    ) -> None:
        if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
            raise DPSGDError(f"DP-SGD: noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}")
        if not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
            raise DPSGDError(f"DP-SGD: max_grad_norm must be a finite number > 0, got {max_grad_norm!r}")
        if train_loader.batch_size is None:
            raise DPSGDError(
                "DP-SGD: train_loader must be built with batch_size (Poisson sampling replaces its batch sampler)"
            )
        if max_physical_batch_size is not None and max_physical_batch_size < 1:
            raise DPSGDError(f"DP-SGD: max_physical_batch_size must be >= 1, got {max_physical_batch_size}")
        self.device = torch.device(device)
        self.num_examples = len(train_loader.dataset)  # type: ignore[arg-type]
        fixed = dp_compatible(model).to(self.device)

        self.mode_choice: ModeChoice | None = None
        if grad_sample_mode == "auto":
            expected = self.num_examples // steps_per_epoch(self.num_examples, train_loader.batch_size)
            physical = min(expected, max_physical_batch_size or expected)
            batch = _synthetic_batch(train_loader, max(1, physical), self.device)
            candidates = AUTO_MODES_WITH_LOSS_CLIPPING if criterion_honoured else AUTO_MODES
            self.mode_choice = auto_grad_sample_mode(fixed, batch, criterion, self.device, candidates)
            grad_sample_mode = self.mode_choice.mode
        self.grad_sample_mode = grad_sample_mode

        loader = DataLoader(
            train_loader.dataset,
            batch_size=train_loader.batch_size,
            collate_fn=train_loader.collate_fn,
            num_workers=train_loader.num_workers,
            pin_memory=train_loader.pin_memory,
            generator=_secure_generator(torch.device("cpu")),  # inherited by Opacus' Poisson sampler
        )
        self._parts: PrivateParts | None = make_private_parts(
            fixed,
            optimizer_factory(fixed.parameters()),
            loader,
            criterion=criterion,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            grad_sample_mode=grad_sample_mode,
            noise_generator=_secure_generator(self.device),
            secure_mode=secure_mode,
        )
        parts = self._parts
        self._batches: Iterable[Any] = (
            wrap_data_loader(
                data_loader=parts.loader, max_batch_size=max_physical_batch_size, optimizer=parts.optimizer
            )
            if max_physical_batch_size
            else parts.loader
        )
        self._clipping = (
            _ClippingLoss(parts.criterion, grad_sample_mode) if grad_sample_mode in LOSS_CLIPPING_MODES else None
        )
        self._model = fixed  # the wrapped nn.Module: plain state-dict keys, same Parameter objects

    @classmethod
    def with_budget(
        cls,
        model: nn.Module,
        optimizer_factory: OptimizerFactory,
        train_loader: DataLoader,
        *,
        target_epsilon: float,
        target_delta: float,
        epochs: int,
        rounds: int = 1,
        **kwargs: Any,
    ) -> PrivateTrainer:
        """A trainer whose noise multiplier spends exactly ``(target_epsilon, target_delta)`` (PLD
        accountant) over ``rounds`` calls of :meth:`train` with ``epochs`` epochs each."""
        if train_loader.batch_size is None:
            raise DPSGDError("DP-SGD: train_loader must be built with batch_size")
        num_examples = len(train_loader.dataset)  # type: ignore[arg-type]
        q = poisson_sample_rate(num_examples, train_loader.batch_size)
        steps = planned_steps(num_examples, train_loader.batch_size, epochs) * rounds
        sigma = calibrate_noise_multiplier(target_epsilon, target_delta, q, steps)
        return cls(model, optimizer_factory, train_loader, noise_multiplier=sigma, **kwargs)

    # -- what the caller needs to record a DP event ----------------------------------------

    @property
    def parts(self) -> PrivateParts:
        if self._parts is None:
            raise DPSGDError("DP-SGD: this PrivateTrainer was closed")
        return self._parts

    @property
    def module(self) -> nn.Module:
        """The Opacus GradSampleModule (the same object every round)."""
        return self.parts.module

    @property
    def accountant(self) -> Any:
        """Opacus' PRV accountant: history of (noise_multiplier, sample_rate, steps)."""
        return self.parts.engine.accountant

    @property
    def noise_multiplier(self) -> float:
        return float(self.parts.optimizer.noise_multiplier)  # type: ignore[attr-defined]

    @property
    def max_grad_norm(self) -> float:
        return float(self.parts.optimizer.max_grad_norm)  # type: ignore[attr-defined]

    @property
    def sample_rate(self) -> float:
        return float(self.parts.loader.sample_rate)  # type: ignore[attr-defined]

    @property
    def steps_per_epoch(self) -> int:
        return len(self.parts.loader)

    @property
    def expected_batch_size(self) -> int:
        """The fixed denominator of the noisy mean: ``floor(N·q)``."""
        return int(self.parts.optimizer.expected_batch_size)  # type: ignore[attr-defined]

    def accounted_steps(self) -> int:
        """Steps recorded by the accountant since this trainer was built."""
        return sum(steps for _, _, steps in self.accountant.history)

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far at ``delta``, by fedvault's PLD accountant over the steps taken."""
        events = [
            DPEvent.dp_sgd(noise_multiplier=z, sample_rate=q, steps=steps, round=0, party="trainer")
            for z, q, steps in self.accountant.history
        ]
        return epsilon(events, delta) if events else 0.0

    # -- per round ---------------------------------------------------------------------------

    def load_global(self, state_dict: Mapping[str, Any]) -> None:
        """Copy global weights in place; keys may carry Opacus' ``_module.`` prefix."""
        state = {
            key.removeprefix("_module."): value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
            for key, value in state_dict.items()
        }
        expected = set(self._model.state_dict())
        missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
        if missing or unexpected:
            raise DPSGDError(
                f"DP-SGD: global weights do not fit the DP model (missing {missing[:5]}, unexpected "
                f"{unexpected[:5]}); build the global model with fedvault.privacy.dp_sgd.dp_compatible"
            )
        try:
            self._model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[-1].strip()
            raise DPSGDError(f"DP-SGD: global weights do not fit the DP model: {first}") from None

    @property
    def model(self) -> nn.Module:
        """The trained nn.Module (plain state-dict keys; the same Parameters Opacus updates)."""
        return self._model

    def train(
        self,
        task: Task,
        epochs: int,
        *,
        global_state: Mapping[str, Any] | None = None,
        learning_rate: float | None = None,
        make_hooks: Callable[[nn.Module], Sequence[TrainingHook]] | None = None,
        amp: bool = False,
    ) -> TrainResult:
        """One round: load ``global_state`` (when given), run ``task.train`` for ``epochs`` epochs on the
        wrapped module, optimizer and loader, at ``learning_rate`` (when given).

        ``make_hooks(model)`` builds the strategy's client steps on :attr:`model` once it holds
        ``global_state``; they run inside every logical step, after clipping and noising. The
        result's ``steps`` counts logical steps, empty Poisson batches included (each is accounted).
        """
        if epochs < 1:
            raise DPSGDError(f"DP-SGD: epochs must be >= 1, got {epochs}")
        parts = self.parts
        if global_state is not None:
            self.load_global(global_state)
        hooks = list(make_hooks(self._model)) if make_hooks is not None else []
        original = parts.optimizer.original_optimizer  # type: ignore[attr-defined]
        original.state.clear()
        if learning_rate is not None:
            for group in original.param_groups:
                group["lr"] = learning_rate
        step = _PrivateStep(parts.optimizer, self._model, hooks, self._clipping)
        settings = TrainSettings(epochs=epochs, device=self.device, amp=amp, criterion=self._clipping)
        result = task.train(parts.module, _PoissonBatches(self._batches, step, self.device), step, settings)
        parts.optimizer.zero_grad(set_to_none=True)  # drop per-sample gradients between rounds
        return TrainResult(loss=result.loss, steps=step.steps)

    def close(self) -> None:
        """Remove Opacus' hooks and per-sample attributes; the trainer is unusable afterwards."""
        if self._parts is not None:
            self._parts.module.cleanup()  # type: ignore[operator]
            self._parts = None

    def __enter__(self) -> PrivateTrainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

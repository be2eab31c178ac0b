"""Empirical privacy audits: lower bounds / estimates of epsilon from canaries planted in one run.

Sample level — Steinke, Nasr, Jagielski, "Privacy Auditing with One (1) Training Run" (NeurIPS
2023, arXiv 2305.08846). ``m`` canaries are each included independently with probability 1/2;
after training the auditor scores every canary, guesses "in" for the ``k+`` highest scores and
"out" for the ``k-`` lowest and abstains on the rest. If the mechanism is (ε, δ)-DP, the number
``W`` of correct guesses among the ``r = k+ + k-`` made is stochastically dominated by
``Binomial(r, q)``, ``q = e^ε / (1 + e^ε)``, up to a δ term (their main theorem for (ε, δ)-DP and
the p-value procedure of their appendix):

    p(ε, δ) = β + 2·m·δ·α,   β = P[Bin(r, q) ≥ v],   α = max_{1 ≤ i ≤ v} (P[Bin(r, q) ≥ v − i] − β) / i

for ``v`` observed correct guesses. The audited lower bound at confidence ``c`` is the largest ε
with ``p(ε, δ) < 1 − c``: an (ε', δ) claim with ε' below it is rejected at level ``1 − c``. The
numpy/scipy arithmetic follows the reference implementation, ``jax_privacy/auditing.py``
(``_one_run_p_value``, ``_epsilon_one_run``) of google-deepmind/jax_privacy; JAX is not needed.

The theorem holds for guess counts fixed before looking at the scores. Sweeping ``(k+, k-)`` and
keeping the best is a multiple test: :func:`audit_one_run` then tests every candidate at
``(1 − c) / G`` for ``G`` candidates (Bonferroni), as the reference does by default
(``CanaryScoreAuditor.epsilon_one_run(threshold_strategy=Bonferroni())``). The best value without
that correction is reported as well, labelled as *not* a valid bound.

Black-box (:func:`audit_dp_sgd`): input-space canaries, the final model only, scored by the log-
probability of their label. White-box (:func:`audit_dp_sgd_white_box`, the paper's gradient-space
setting: canary gradients, every iterate observed): :class:`GradientCanaries` adds ``C·u_c`` to
Opacus' sum of clipped per-sample gradients at each step where canary ``c`` is Poisson-sampled,
before the noise, and scores ``s_c = Σ_t ⟨G_t, u_c⟩`` over the released noisy sums ``G_t``. The
bound is the same theorem on those scores. With ``δ > 0`` no audit passes
:func:`one_run_ceiling` (every guess right), roughly ``log((1 − c) / (2δG))`` for ``G`` guess
counts: at ``δ = 1e-5`` it stays near 5 for any ``m`` (4.96 at m = 1000, at most 5.2), so a
claim above it cannot be refuted by this bound, however broken the mechanism.

Client level — Andrew, Kairouz, Oh, Oprea, McMahan, Suriyakumar, "One-shot Empirical Privacy
Estimation for Federated Learning" (ICLR 2024, arXiv 2302.03098). Canary clients send a fixed
random unit direction each time they are sampled; the statistic is the cosine between a canary's
direction and the final model delta (or, as the paper also does, the maximum over rounds of the
cosine with each round's aggregated delta). Never-inserted random directions give the null
cosines. Gaussians ``N(μ₀, σ₀²)`` (null) and ``N(μ₁, σ₁²)`` (inserted) are fitted and the
estimate is the ε at which the pair is (ε, δ)-indistinguishable, computed exactly for two
Gaussians of different variances (Steinke 2022, arXiv 2210.00597, as the paper's code
``epsilon_two_gaussians`` in google-research/federated does). This is an *estimate*, not a
bound with a confidence level.

Randomness: canary inclusion, canary construction and directions come from
``numpy.random.default_rng(seed)`` with ``seed = secrets.randbits(128)`` unless given; the seed is
recorded in the result so the planting can be reproduced (DP noise stays secrets-seeded).
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import scipy.optimize
import scipy.special
import scipy.stats

from fedvault.errors import FedvaultError

_EPS_CAP = 50.0  # a bound above this is reported as the cap (q = 1 − 2e-22 is numerically 1)


class EmpiricalAuditError(FedvaultError, ValueError):
    """Invalid audit input: mismatched lengths, a probability outside its range, too few canaries."""


# ---- validation -------------------------------------------------------------------------------


def _check_open_unit(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise EmpiricalAuditError(f"empirical audit: {name} must be in (0, 1), got {value!r}")
    return float(value)


def _check_delta(delta: float, allow_zero: bool = False) -> float:
    if allow_zero and delta == 0:
        return 0.0
    return _check_open_unit("delta", delta)


def _check_counts(m: int, guesses: int, correct: int) -> None:
    if not (0 <= correct <= guesses <= m) or m < 1:
        raise EmpiricalAuditError(
            f"empirical audit: need 0 <= correct <= guesses <= m and m >= 1, got m={m}, "
            f"guesses={guesses}, correct={correct}"
        )


def _new_seed(seed: int | None) -> int:
    return secrets.randbits(128) if seed is None else int(seed)


# ---- Steinke, Nasr, Jagielski: the one-run bound ------------------------------------------------


def one_run_p_value(m: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """``p(ε, δ) = β + 2mδα`` (module docstring): the probability, under an (ε, δ)-DP mechanism, of at
    least ``correct`` right guesses out of ``guesses`` on ``m`` canaries (Steinke et al. 2023)."""
    _check_counts(m, guesses, correct)
    _check_delta(delta, allow_zero=True)
    if epsilon < 0:
        raise EmpiricalAuditError(f"empirical audit: epsilon must be >= 0, got {epsilon!r}")
    q = float(scipy.special.expit(epsilon))
    beta = float(scipy.stats.binom.sf(correct - 1, guesses, q))
    if delta == 0 or correct == 0:
        return beta
    i = np.arange(1, correct + 1)
    alpha = float(np.max((scipy.stats.binom.sf(correct - i - 1, guesses, q) - beta) / i, initial=0.0))
    return min(beta + alpha * delta * 2 * m, 1.0)


def one_run_epsilon(m: int, guesses: int, correct: int, delta: float, significance: float = 0.05) -> float:
    """Largest ε with ``p(ε, δ) < significance`` (0 when even ε = 0 is not rejected), by bracketing and
    Brent's method to 1e-6; capped at 50."""
    _check_counts(m, guesses, correct)
    _check_open_unit("significance", significance)

    def objective(eps: float) -> float:  # > 0 while the (eps, delta) claim is rejected
        return significance - one_run_p_value(m, guesses, correct, eps, delta)

    if guesses == 0 or objective(0.0) <= 0:
        return 0.0
    lo, hi = 0.0, 1.0
    while objective(hi) > 0:
        lo, hi = hi, 2 * hi
        if hi > _EPS_CAP:
            return _EPS_CAP
    return float(scipy.optimize.brentq(objective, lo, hi, xtol=1e-6))


def guess(scores: Sequence[float] | np.ndarray, k_plus: int, k_minus: int) -> np.ndarray:
    """+1 ("in") for the ``k_plus`` highest scores, −1 ("out") for the ``k_minus`` lowest, 0 otherwise
    (ties broken by position, stably)."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1 or not np.all(np.isfinite(s)):
        raise EmpiricalAuditError("empirical audit: scores must be a 1-D array of finite numbers")
    if k_plus < 0 or k_minus < 0 or k_plus + k_minus > len(s):
        raise EmpiricalAuditError(
            f"empirical audit: need k_plus, k_minus >= 0 and k_plus + k_minus <= {len(s)} canaries, "
            f"got {k_plus} and {k_minus}"
        )
    order = np.argsort(-s, kind="stable")
    out = np.zeros(len(s), dtype=np.int8)
    out[order[:k_plus]] = 1
    if k_minus:
        out[order[len(s) - k_minus :]] = -1
    return out


def default_guess_grid(m: int) -> list[tuple[int, int]]:
    """Candidate ``(k+, k-)``: ``k`` in {1, 2, 5}·10^j up to m/2 (and m/2 itself), one-sided ``(k, 0)``
    and two-sided ``(k, k)`` (Steinke et al. let the auditor guess both ways)."""
    ks = sorted({k for j in range(7) for f in (1, 2, 5) if (k := f * 10**j) <= m // 2} | {m // 2})
    ks = [k for k in ks if k >= 1]
    return [(k, 0) for k in ks] + [(k, k) for k in ks]


class _ClaimCheck:
    """What both audit results share: the measured epsilon against the claim, and their JSON form."""

    claimed_epsilon: float | None
    seed: int | None

    @property
    def measured(self) -> float:
        """The audited lower bound (one run) or the estimate (one shot)."""
        raise NotImplementedError

    @property
    def flagged(self) -> bool:
        """The measurement refutes the claim: it exceeds the claimed epsilon."""
        return self.claimed_epsilon is not None and self.measured > self.claimed_epsilon

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)  # type: ignore[call-overload]  # every subclass is a dataclass
        data["seed"] = None if self.seed is None else str(self.seed)  # 128-bit: keep exact in JSON
        data["flagged"] = self.flagged
        return data


@dataclass(frozen=True)
class OneRunAudit(_ClaimCheck):
    """A one-run audit (Steinke et al. 2023). ``epsilon_lower_bound`` holds at ``confidence`` after
    the Bonferroni correction over ``candidates`` guess counts; ``uncorrected_best`` is the same
    sweep without correction (informative only, not a valid bound)."""

    claimed_epsilon: float | None
    epsilon_lower_bound: float
    delta: float
    confidence: float
    canaries: int
    included: int
    k_plus: int
    k_minus: int
    guesses: int
    correct: int
    candidates: int
    uncorrected_best: float
    seed: int | None
    details: dict[str, Any] | None = None

    @property
    def measured(self) -> float:
        return self.epsilon_lower_bound


def audit_one_run(
    scores: Sequence[float] | np.ndarray,
    included: Sequence[bool] | np.ndarray,
    *,
    delta: float,
    confidence: float = 0.95,
    guess_counts: Sequence[tuple[int, int]] | None = None,
    claimed_epsilon: float | None = None,
    seed: int | None = None,
) -> OneRunAudit:
    """Audit from canary ``scores`` (higher = "more likely trained on") and the true ``included`` bits.

    ``guess_counts`` lists the ``(k+, k-)`` to try (default :func:`default_guess_grid`); one pair is
    the paper's fixed-in-advance test, several are tested at ``(1 − confidence) / len`` each and the
    best is reported (Bonferroni; module docstring). ``seed`` is the inclusion seed, recorded only.
    """
    s = np.asarray(scores, dtype=np.float64)
    inc = np.asarray(included)
    if s.ndim != 1 or inc.ndim != 1 or len(s) != len(inc):
        raise EmpiricalAuditError(
            f"empirical audit: scores and included must be 1-D of the same length, got shapes {s.shape} and {inc.shape}"
        )
    if len(s) < 2:
        raise EmpiricalAuditError(f"empirical audit: need at least 2 canaries, got {len(s)}")
    if not np.isin(inc, (0, 1)).all():
        raise EmpiricalAuditError("empirical audit: included must hold booleans (0/1)")
    _check_delta(delta)
    significance = 1 - _check_open_unit("confidence", confidence)
    grid = list(guess_counts) if guess_counts is not None else default_guess_grid(len(s))
    if not grid:
        raise EmpiricalAuditError("empirical audit: guess_counts is empty")
    truth = np.where(inc.astype(bool), 1, -1)
    level = significance / len(grid)
    best: tuple[float, int, int, int, int] = (-1.0, 0, 0, 0, 0)
    uncorrected = 0.0
    for k_plus, k_minus in grid:
        g = guess(s, k_plus, k_minus)
        made, right = int(np.count_nonzero(g)), int(np.sum(g == truth))
        eps = one_run_epsilon(len(s), made, right, delta, level)
        if eps > best[0]:
            best = (eps, k_plus, k_minus, made, right)
        if len(grid) > 1:
            uncorrected = max(uncorrected, one_run_epsilon(len(s), made, right, delta, significance))
        else:
            uncorrected = eps
    eps, k_plus, k_minus, made, right = best
    return OneRunAudit(
        claimed_epsilon=claimed_epsilon,
        epsilon_lower_bound=eps,
        delta=delta,
        confidence=confidence,
        canaries=len(s),
        included=int(inc.astype(bool).sum()),
        k_plus=k_plus,
        k_minus=k_minus,
        guesses=made,
        correct=right,
        candidates=len(grid),
        uncorrected_best=uncorrected,
        seed=seed,
    )


# ---- Andrew et al.: epsilon of two Gaussians ----------------------------------------------------


def _log_mass_where_loss_exceeds(mu_p: float, sd_p: float, mu_q: float, sd_q: float, eps: float) -> tuple[float, float]:
    """``log P[L > ε]`` under P and under Q, for the privacy loss ``L(y) = log p(y)/q(y)`` of
    ``P = N(mu_p, sd_p²)`` vs ``Q = N(mu_q, sd_q²)``. ``L`` is the quadratic ``a y² + b y + c``, so
    ``{L > ε}`` is a half-line, an interval or the complement of one."""
    a = 0.5 * (sd_q**-2 - sd_p**-2)
    b = mu_p / sd_p**2 - mu_q / sd_q**2
    c = 0.5 * ((mu_q / sd_q) ** 2 - (mu_p / sd_p) ** 2) + math.log(sd_q / sd_p)
    logcdf, logsf = scipy.stats.norm.logcdf, scipy.stats.norm.logsf

    def log_masses(lo: float, hi: float, inside: bool) -> tuple[float, float]:
        out = []
        for mu, sd in ((mu_p, sd_p), (mu_q, sd_q)):
            if inside:  # P[lo < Y < hi]
                left, right = float(logcdf(lo, mu, sd)), float(logcdf(hi, mu, sd))
                out.append(right + math.log(-math.expm1(left - right)) if right > left else -math.inf)
            else:  # P[Y < lo] + P[Y > hi]
                out.append(float(np.logaddexp(logcdf(lo, mu, sd), logsf(hi, mu, sd))))
        return out[0], out[1]

    if a == 0:
        if b == 0:
            return (0.0, 0.0) if c > eps else (-math.inf, -math.inf)
        t = (eps - c) / b
        if b > 0:  # L > eps  <=>  y > t
            return float(logsf(t, mu_p, sd_p)), float(logsf(t, mu_q, sd_q))
        return float(logcdf(t, mu_p, sd_p)), float(logcdf(t, mu_q, sd_q))
    disc = b * b - 4 * a * (c - eps)
    if disc <= 0:  # a y² + b y + c − ε never changes sign
        return (0.0, 0.0) if a > 0 else (-math.inf, -math.inf)
    r1, r2 = sorted(((-b - math.sqrt(disc)) / (2 * a), (-b + math.sqrt(disc)) / (2 * a)))
    return log_masses(r1, r2, inside=a < 0)


def _log_delta(mu_p: float, sd_p: float, mu_q: float, sd_q: float, eps: float) -> float:
    """``log δ_{P‖Q}(ε)`` with ``δ_{P‖Q}(ε) = P[L > ε] − e^ε Q[L > ε]`` (the hockey-stick divergence)."""
    log_p, log_q = _log_mass_where_loss_exceeds(mu_p, sd_p, mu_q, sd_q, eps)
    if log_p == -math.inf or eps + log_q >= log_p:
        return -math.inf
    return log_p + math.log(-math.expm1(eps + log_q - log_p))


def epsilon_two_gaussians(mu0: float, sd0: float, mu1: float, sd1: float, delta: float) -> float:
    """Smallest ε with ``max(δ_{P‖Q}(ε), δ_{Q‖P}(ε)) ≤ δ`` for ``N(mu0, sd0²)`` and ``N(mu1, sd1²)``:
    Andrew et al.'s estimate (exact, after Steinke 2022, arXiv 2210.00597). Capped at 50."""
    _check_delta(delta)
    for name, sd in (("sd0", sd0), ("sd1", sd1)):
        if not (math.isfinite(sd) and sd > 0):
            raise EmpiricalAuditError(f"empirical audit: {name} must be a finite number > 0, got {sd!r}")
    if not (math.isfinite(mu0) and math.isfinite(mu1)):
        raise EmpiricalAuditError("empirical audit: the Gaussian means must be finite")
    log_target = math.log(delta)

    def excess(eps: float) -> float:
        return max(_log_delta(mu0, sd0, mu1, sd1, eps), _log_delta(mu1, sd1, mu0, sd0, eps)) - log_target

    if excess(0.0) <= 0:
        return 0.0
    lo, hi = 0.0, 1.0
    while excess(hi) > 0:
        lo, hi = hi, 2 * hi
        if hi > _EPS_CAP:
            return _EPS_CAP
    return float(scipy.optimize.brentq(excess, lo, hi, xtol=1e-8))


@dataclass(frozen=True)
class OneShotEstimate(_ClaimCheck):
    """A one-shot client-level estimate (Andrew et al. 2024): Gaussians fitted to the cosines of the
    inserted canaries (``mean_inserted``, ``std_inserted``) and of never-inserted directions."""

    claimed_epsilon: float | None
    epsilon_estimate: float
    delta: float
    canaries: int
    null_directions: int
    mean_inserted: float
    std_inserted: float
    mean_null: float
    std_null: float
    statistic: str
    seed: int | None
    details: dict[str, Any] | None = None

    @property
    def measured(self) -> float:
        return self.epsilon_estimate


def one_shot_estimate(
    inserted_cosines: Sequence[float] | np.ndarray,
    null_cosines: Sequence[float] | np.ndarray,
    *,
    delta: float,
    claimed_epsilon: float | None = None,
    statistic: str = "final",
    seed: int | None = None,
) -> OneShotEstimate:
    """Fit ``N(μ₁, σ₁²)`` to the inserted canaries' cosines and ``N(μ₀, σ₀²)`` to the null cosines
    (sample mean, unbiased std) and return the ε of the pair at ``delta`` (Andrew et al., § 3)."""
    ins, null = np.asarray(inserted_cosines, dtype=np.float64), np.asarray(null_cosines, dtype=np.float64)
    if ins.ndim != 1 or null.ndim != 1 or len(ins) < 2 or len(null) < 2:
        raise EmpiricalAuditError("empirical audit: need 1-D inserted and null cosines, at least 2 of each")
    if not (np.all(np.isfinite(ins)) and np.all(np.isfinite(null))):
        raise EmpiricalAuditError("empirical audit: cosines must be finite")
    _check_delta(delta)
    mu1, sd1, mu0, sd0 = float(ins.mean()), float(ins.std(ddof=1)), float(null.mean()), float(null.std(ddof=1))
    tiny = 1e-12  # a degenerate (constant) sample: the estimate is then the cap, as it should be
    eps = epsilon_two_gaussians(mu0, max(sd0, tiny), mu1, max(sd1, tiny), delta)
    return OneShotEstimate(
        claimed_epsilon=claimed_epsilon,
        epsilon_estimate=eps,
        delta=delta,
        canaries=len(ins),
        null_directions=len(null),
        mean_inserted=mu1,
        std_inserted=sd1,
        mean_null=mu0,
        std_null=sd0,
        statistic=statistic,
        seed=seed,
    )


# ---- sample level: plant canaries, train with DP-SGD, audit -------------------------------------


def make_canaries(
    train_x: np.ndarray, num_classes: int, count: int, kind: str, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``count`` input-space canaries with uniformly random labels (Steinke et al. use such input-space
    canaries in the black-box setting). ``kind="noise"``: out-of-distribution inputs, i.i.d. uniform
    over the training features' range; ``"mislabeled"``: copies of random training inputs (with
    replacement) under a uniformly random label (which may by chance equal the true one)."""
    if count < 2:
        raise EmpiricalAuditError(f"empirical audit: need at least 2 canaries, got {count}")
    if kind == "noise":
        lo, hi = float(train_x.min()), float(train_x.max())
        x = rng.uniform(lo, hi, size=(count, *train_x.shape[1:])).astype(train_x.dtype)
    elif kind == "mislabeled":
        x = train_x[rng.integers(0, len(train_x), size=count)].copy()
    else:
        raise EmpiricalAuditError(f"empirical audit: canary kind must be 'noise' or 'mislabeled', got {kind!r}")
    return x, rng.integers(0, num_classes, size=count).astype(np.int64)


def canary_scores(model: Any, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Score = log-probability of the planted label (= −cross-entropy loss): high if memorised."""
    import torch

    model.eval()
    with torch.no_grad():
        logits = model(torch.as_tensor(x, dtype=torch.float32))
        logp = torch.log_softmax(logits.double(), dim=1)
        return logp[torch.arange(len(y)), torch.as_tensor(y)].numpy()


def audit_dp_sgd(
    task: Any = "digits",
    *,
    target_epsilon: float,
    delta: float = 1e-5,
    num_canaries: int = 1000,
    canary: str = "noise",
    epochs: int = 30,
    batch_size: int = 256,
    learning_rate: float = 2.0,
    momentum: float = 0.9,
    max_grad_norm: float = 1.0,
    confidence: float = 0.95,
    guess_counts: Sequence[tuple[int, int]] | None = None,
    seed: int | None = None,
    broken_mechanism_for_testing: bool = False,
) -> OneRunAudit:
    """Plant ``num_canaries`` canaries (:func:`make_canaries`), include each with probability 1/2 in the
    task's training pool, train one model centrally with fedvault's :class:`PrivateTrainer` calibrated
    to ``(target_epsilon, delta)`` over ``epochs`` epochs, score the canaries (:func:`canary_scores`)
    and audit (:func:`audit_one_run`, black-box: last model only).

    ``broken_mechanism_for_testing=True`` is a **test/benchmark control only**: it trains with noise
    multiplier 0 and (effectively) no clipping, yet the result still claims ``target_epsilon``, so a
    working audit must flag it. Never use it to train a model.
    """
    import torch

    from fedvault.privacy.dp_sgd import PrivateTrainer
    from fedvault.tasks import ArrayDataset, load_task, make_loader

    _check_delta(delta)
    seed = _new_seed(seed)
    rng = np.random.default_rng(seed)
    task = load_task(task) if isinstance(task, str) else task
    data = task.load_data(seed=0)
    cx, cy = make_canaries(data.train.x, data.num_classes, num_canaries, canary, rng)
    included = rng.random(num_canaries) < 0.5
    train = ArrayDataset(np.concatenate([data.train.x, cx[included]]), np.concatenate([data.train.y, cy[included]]))
    loader = make_loader(train, batch_size, shuffle=False)
    torch.manual_seed(int(rng.integers(2**62)))
    model = task.build_model()
    optimizer = lambda params: torch.optim.SGD(params, lr=learning_rate, momentum=momentum)  # noqa: E731
    start = time.perf_counter()
    if broken_mechanism_for_testing:
        trainer = PrivateTrainer(
            model, optimizer, loader, noise_multiplier=0.0, max_grad_norm=1e9, criterion=task.criterion()
        )
    else:
        trainer = PrivateTrainer.with_budget(
            model,
            optimizer,
            loader,
            target_epsilon=target_epsilon,
            target_delta=delta,
            epochs=epochs,
            max_grad_norm=max_grad_norm,
            criterion=task.criterion(),
        )
    with trainer:
        trainer.train(task, epochs)
        spent = None if broken_mechanism_for_testing else trainer.epsilon(delta)
        noise = trainer.noise_multiplier
        scores = canary_scores(trainer.model, cx, cy)
        test = make_loader(data.test, 1024, shuffle=False)
        accuracy = task.evaluate(trainer.model, test, torch.device("cpu"))["accuracy"]
    audit = audit_one_run(
        scores,
        included,
        delta=delta,
        confidence=confidence,
        guess_counts=guess_counts,
        claimed_epsilon=target_epsilon,
        seed=seed,
    )
    details = {
        "task": task.name,
        "canary": canary,
        "mechanism": "broken (no noise, no clipping)" if broken_mechanism_for_testing else "dp-sgd",
        "accounted_epsilon": spent,
        "noise_multiplier": noise,
        "epochs": epochs,
        "batch_size": batch_size,
        "train_examples": len(train),
        "test_accuracy": accuracy,
        "train_seconds": time.perf_counter() - start,
    }
    return OneRunAudit(**{**asdict(audit), "details": details})


# ---- sample level, white-box: gradient canaries, scores from every step -------------------------


def one_run_ceiling(
    m: int, *, delta: float, confidence: float = 0.95, guess_counts: Sequence[tuple[int, int]] | None = None
) -> float:
    """The largest bound :func:`audit_one_run` can return with ``m`` canaries: every guess right, for
    the luckiest split (m/2 included). No audit with ``m`` canaries can refute a claim above it: the
    ``2mδα`` term of ``p(ε, δ)`` keeps it near ``log((1 − c) / (2δG))`` however many canaries are used."""
    if m < 2:
        raise EmpiricalAuditError(f"empirical audit: need at least 2 canaries, got {m}")
    included = np.arange(m) < m // 2
    return audit_one_run(
        included.astype(float), included, delta=delta, confidence=confidence, guess_counts=guess_counts
    ).epsilon_lower_bound


class GradientCanaries:
    """``m`` gradient canaries planted in an Opacus ``DPOptimizer`` (Steinke et al. 2023, white-box).

    Canary ``c`` is in the run (``included[c]``) with probability 1/2; at every logical step each
    included canary is Poisson-sampled with the trainer's rate ``q``, as a training example is, and
    when sampled adds ``C·u_c`` to the sum of clipped per-sample gradients (``C`` the clip bound,
    ``u_c`` a unit vector in parameter space), before Opacus adds ``N(0, σ²C²I)``. Its score is
    ``s_c = Σ_t ⟨G_t, u_c⟩`` over every step ``t``, ``G_t`` the released noisy sum: an included
    canary scores ``C·n_c`` more on average (``n_c ~ Bin(T, q)`` the times it was sampled), against
    noise of standard deviation ``σC√T``: a separation of ``q√T/σ``, about the run's Gaussian-DP
    ``μ = q√(T(e^{1/σ²} − 1))`` (Bu et al. 2020's CLT, large σ), the most any score can reach.

    ``kind="dirac"``: ``u_c`` is a coordinate vector ``e_j``, redrawn every step, the ``m``
    canaries on distinct coordinates (``m ≤`` the parameter count): canaries never overlap, and the
    data gradients' share of a canary's score averages over coordinates and steps instead of
    accumulating along one coordinate. ``kind="gaussian"``: one fixed uniformly random unit vector
    per canary (an ``m × d`` matrix); canaries overlap by about ``1/√d``.

    Randomness (inclusion, sampling, directions) comes from ``rng``, the caller's seeded generator.
    """

    def __init__(
        self,
        optimizer: Any,
        count: int,
        *,
        sample_rate: float,
        kind: Literal["dirac", "gaussian"],
        rng: np.random.Generator,
    ) -> None:
        import torch

        self.params = [p for p in optimizer.params if p.requires_grad]
        self.sizes = [p.numel() for p in self.params]
        self.dim = sum(self.sizes)
        if kind not in ("dirac", "gaussian"):
            raise EmpiricalAuditError(f"empirical audit: canary gradients are 'dirac' or 'gaussian', got {kind!r}")
        if count < 2 or (kind == "dirac" and count > self.dim):
            raise EmpiricalAuditError(
                f"empirical audit: need 2 <= canaries <= {self.dim} (the parameter count) for 'dirac', got {count}"
            )
        self.optimizer, self.count, self.kind, self.rng = optimizer, count, kind, rng
        self.sample_rate = _check_open_unit("sample_rate", sample_rate)
        self.norm = float(optimizer.max_grad_norm)
        self.included = rng.random(count) < 0.5
        self.scores = np.zeros(count)
        self.participations = np.zeros(count, dtype=np.int64)
        self.steps = 0
        self.directions: Any = None
        if kind == "gaussian":
            rows = torch.as_tensor(_unit_rows(rng, count, self.dim), dtype=torch.float32)
            self.directions = rows.to(self.params[0].device)
        self._coords = np.zeros(count, dtype=np.int64)
        self._original = optimizer.add_noise

    def __enter__(self) -> GradientCanaries:
        self.optimizer.add_noise = self._add_noise  # an instance attribute shadows DPOptimizer.add_noise
        return self

    def __exit__(self, *exc: object) -> None:
        del self.optimizer.add_noise

    def _flat(self, values: Any) -> Any:
        import torch

        return torch.cat([v.reshape(-1) for v in values]).double()

    def _add_noise(self) -> None:
        """Opacus calls ``add_noise`` once per logical step, with ``p.summed_grad`` the complete sum of
        clipped per-sample gradients: add the sampled canaries to it, let Opacus noise it, score."""
        import torch

        sampled = self.included & (self.rng.random(self.count) < self.sample_rate)
        self.participations += sampled
        device, dtype = self.params[0].device, self.params[0].dtype
        if self.kind == "dirac":
            self._coords = self.rng.permutation(self.dim)[: self.count]
            canary = torch.zeros(self.dim, dtype=dtype, device=device)
            canary[torch.as_tensor(self._coords[sampled], device=device)] = self.norm
        else:
            assert self.directions is not None
            weights = torch.as_tensor(sampled, dtype=self.directions.dtype, device=device) * self.norm
            canary = (weights @ self.directions).to(dtype)
        for p, part in zip(self.params, torch.split(canary, self.sizes), strict=True):
            p.summed_grad.add_(part.view_as(p.summed_grad))
        self._original()
        released = self._flat(p.grad for p in self.params)  # the noisy sum G_t, before scale_grad
        if self.kind == "dirac":
            step_scores = released[torch.as_tensor(self._coords, device=device)]
        else:
            assert self.directions is not None
            step_scores = self.directions.double() @ released
        self.scores += step_scores.cpu().numpy()
        self.steps += 1


def audit_dp_sgd_white_box(
    task: Any = "digits",
    *,
    target_epsilon: float,
    delta: float = 1e-5,
    num_canaries: int = 1000,
    canary_gradient: Literal["dirac", "gaussian"] = "dirac",
    epochs: int = 30,
    batch_size: int = 256,
    learning_rate: float = 2.0,
    momentum: float = 0.9,
    max_grad_norm: float = 1.0,
    confidence: float = 0.95,
    guess_counts: Sequence[tuple[int, int]] | None = None,
    seed: int | None = None,
    broken_mechanism_for_testing: bool = False,
) -> OneRunAudit:
    """White-box one-run audit of fedvault's DP-SGD (Steinke et al. 2023's gradient-space setting:
    gradient canaries, every iterate observed): train the task's model on its training pool with :class:`PrivateTrainer`
    calibrated to ``(target_epsilon, delta)`` over ``epochs`` epochs, with ``num_canaries``
    :class:`GradientCanaries` in its ``DPOptimizer``, and audit their scores with
    :func:`audit_one_run`. ``details["ceiling"]`` is :func:`one_run_ceiling` for the canary count.

    ``broken_mechanism_for_testing=True`` is a **test/benchmark control only**: noise multiplier 0
    (clipping kept), while the result still claims ``target_epsilon``. Never use it to train a model.
    """
    import torch

    from fedvault.privacy.dp_sgd import PrivateTrainer
    from fedvault.tasks import load_task, make_loader

    _check_delta(delta)
    seed = _new_seed(seed)
    rng = np.random.default_rng(seed)
    task = load_task(task) if isinstance(task, str) else task
    data = task.load_data(seed=0)
    loader = make_loader(data.train, batch_size, shuffle=False)
    torch.manual_seed(int(rng.integers(2**62)))
    model = task.build_model()
    optimizer = lambda params: torch.optim.SGD(params, lr=learning_rate, momentum=momentum)  # noqa: E731
    kwargs = {"max_grad_norm": max_grad_norm, "criterion": task.criterion()}
    start = time.perf_counter()
    if broken_mechanism_for_testing:
        trainer = PrivateTrainer(model, optimizer, loader, noise_multiplier=0.0, **kwargs)
    else:
        trainer = PrivateTrainer.with_budget(
            model, optimizer, loader, target_epsilon=target_epsilon, target_delta=delta, epochs=epochs, **kwargs
        )
    with trainer:
        canaries = GradientCanaries(
            trainer.parts.optimizer, num_canaries, sample_rate=trainer.sample_rate, kind=canary_gradient, rng=rng
        )
        with canaries:
            result = trainer.train(task, epochs)
        spent = None if broken_mechanism_for_testing else trainer.epsilon(delta)
        noise, q = trainer.noise_multiplier, trainer.sample_rate
        test = make_loader(data.test, 1024, shuffle=False)
        accuracy = task.evaluate(trainer.model, test, torch.device("cpu"))["accuracy"]
    if canaries.steps != result.steps:
        raise EmpiricalAuditError(
            f"empirical audit: canaries saw {canaries.steps} of the run's {result.steps} steps; scores incomplete"
        )
    audit = audit_one_run(
        canaries.scores,
        canaries.included,
        delta=delta,
        confidence=confidence,
        guess_counts=guess_counts,
        claimed_epsilon=target_epsilon,
        seed=seed,
    )
    details = {
        "task": task.name,
        "canary": f"gradient ({canary_gradient})",
        "setting": "white-box (gradient canaries, all steps)",
        "mechanism": "broken (no noise)" if broken_mechanism_for_testing else "dp-sgd",
        "accounted_epsilon": spent,
        "noise_multiplier": noise,
        "sample_rate": q,
        "steps": canaries.steps,
        "parameters": canaries.dim,
        "mean_participations": float(canaries.participations[canaries.included].mean()),
        "ceiling": one_run_ceiling(num_canaries, delta=delta, confidence=confidence, guess_counts=guess_counts),
        "epochs": epochs,
        "batch_size": batch_size,
        "test_accuracy": accuracy,
        "train_seconds": time.perf_counter() - start,
    }
    return OneRunAudit(**{**asdict(audit), "details": details})


# ---- client level: DP-FedAvg with canary clients, one-shot estimate -----------------------------


def _unit_rows(rng: np.random.Generator, count: int, dim: int) -> np.ndarray:
    rows = rng.standard_normal((count, dim))
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def _cosines(directions: np.ndarray, delta_vec: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(delta_vec))
    return directions @ delta_vec / norm if norm > 0 else np.zeros(len(directions))


def audit_dp_fedavg(
    *,
    target_epsilon: float,
    delta: float = 1e-5,
    rounds: int = 50,
    honest_clients: int = 200,
    canary_clients: int = 500,
    null_directions: int = 2000,
    dim: int = 20_000,
    sample_rate: float = 0.1,
    clip_norm: float = 1.0,
    honest_norm: float = 3.0,
    statistic: Literal["final", "max-round"] = "final",
    seed: int | None = None,
    broken_mechanism_for_testing: bool = False,
) -> OneShotEstimate:
    """Run ``rounds`` of DP-FedAvg with fedvault's :class:`DPFedAvgAggregator` (flat clipping to
    ``clip_norm``, Gaussian noise, fixed denominator) on a flat ``dim``-parameter model, over
    simulated honest clients plus canary clients, and return Andrew et al.'s one-shot estimate.

    Every client (honest or canary) is Poisson-sampled each round with ``sample_rate``; the noise
    multiplier is calibrated so the run spends ``(target_epsilon, delta)`` (PLD accountant, ``rounds``
    sampled Gaussian steps). Honest clients send a shared per-round drift direction plus their own
    noise, scaled to norm ``honest_norm`` (clipped); a canary client always sends ``clip_norm`` times
    its own fixed random unit direction. ``statistic="final"``: cosine of each direction with the final
    model delta; ``"max-round"``: the maximum over rounds of the cosine with that round's aggregated
    delta (the paper's all-iterates variant). ``null_directions`` random directions are never inserted.
    A maximum over rounds is not Gaussian, so the "max-round" fit is noisier and can land above the
    claim for a correct mechanism (benchmarks/results/empirical_audit.md); "final" is the default.

    ``broken_mechanism_for_testing=True`` is a **test/benchmark control only**: noise multiplier 0,
    while the result still claims ``target_epsilon``.
    """
    from fedvault.privacy.accountants import calibrate_noise_multiplier
    from fedvault.privacy.client_level import DPFedAvgAggregator

    _check_delta(delta)
    _check_open_unit("sample_rate", sample_rate)
    if statistic not in ("final", "max-round"):
        raise EmpiricalAuditError(f"empirical audit: statistic must be 'final' or 'max-round', got {statistic!r}")
    if min(rounds, canary_clients, null_directions, dim) < 2 or honest_clients < 0:
        raise EmpiricalAuditError("empirical audit: rounds, canaries, null directions and dim must be >= 2")
    seed = _new_seed(seed)
    rng = np.random.default_rng(seed)
    population = honest_clients + canary_clients
    z = 0.0 if broken_mechanism_for_testing else calibrate_noise_multiplier(target_epsilon, delta, sample_rate, rounds)
    aggregator = DPFedAvgAggregator(noise_multiplier=z, clip_norm=clip_norm, expected_clients=sample_rate * population)
    canaries, nulls = _unit_rows(rng, canary_clients, dim), _unit_rows(rng, null_directions, dim)
    model = np.zeros(dim)
    best_canary = np.full(canary_clients, -np.inf)
    best_null = np.full(null_directions, -np.inf)
    participations = np.zeros(canary_clients, dtype=np.int64)
    for _ in range(rounds):
        drift = _unit_rows(rng, 1, dim)[0]
        honest = np.flatnonzero(rng.random(honest_clients) < sample_rate)
        sampled_canaries = np.flatnonzero(rng.random(canary_clients) < sample_rate)
        participations[sampled_canaries] += 1
        updates = [honest_norm * _unit_rows(rng, 1, dim)[0] * 0.5 + honest_norm * drift for _ in honest]
        updates += [clip_norm * canaries[k] for k in sampled_canaries]
        released = aggregator.aggregate([model], [[model + u] for u in updates])
        step = released.arrays[0] - model
        model = released.arrays[0]
        if statistic == "max-round":
            best_canary = np.maximum(best_canary, _cosines(canaries, step))
            best_null = np.maximum(best_null, _cosines(nulls, step))
    if statistic == "final":
        best_canary, best_null = _cosines(canaries, model), _cosines(nulls, model)
    estimate = one_shot_estimate(
        best_canary, best_null, delta=delta, claimed_epsilon=target_epsilon, statistic=statistic, seed=seed
    )
    details = {
        "mechanism": "broken (no noise)" if broken_mechanism_for_testing else "dp-fedavg",
        "noise_multiplier": z,
        "rounds": rounds,
        "sample_rate": sample_rate,
        "honest_clients": honest_clients,
        "dim": dim,
        "clip_norm": clip_norm,
        "mean_canary_participations": float(participations.mean()),
    }
    return OneShotEstimate(**{**asdict(estimate), "details": details})

"""Epsilon of a DP event history, by three accountants; noise calibration.

An event history is replayed (composed), never summed: the events of one privacy unit (one
party, one kind) are grouped by identical ``(noise_multiplier, sample_rate)`` and composed with

* ``"pld"`` — privacy loss distributions, Google ``dp-accounting`` (Meiser & Mohammadi, CCS
  2018; Doroshenko, Ghazi, Kamath, Kumar, Manurangsi, "Connect the Dots", PETS 2022), with
  pessimistic connect-the-dots discretisation: an upper bound. **This backs every claim**
  (budgets, calibration, the audit's "remaining").
* ``"prv"`` — privacy loss random variables (Gopi, Lee, Wutschitz, NeurIPS 2021), Opacus'
  ``PRVAccountant``, reporting its upper bound; a cross-check that agrees with PLD to ~0.01.
* ``"rdp"`` — Rényi DP of the subsampled Gaussian (Mironov, Talwar, Zhang 2019), ``dp-accounting``
  ``RdpAccountant`` with conversion by Balle et al. 2020; valid but looser (5-70% higher).

GDP (Bu, Dong, Long, Su) is refused: it is a CLT approximation that can under-count epsilon.
All three assume add/remove-one neighbours; ``sampling="none"`` composes the plain Gaussian
(for "pld" merged exactly into one Gaussian, see :func:`_pld_epsilon`).
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from functools import lru_cache

import dp_accounting
import numpy as np
from dp_accounting.pld import privacy_loss_distribution as pld_lib
from opacus.accountants import PRVAccountant

from fedvault.errors import FedvaultError
from fedvault.privacy.events import DPEvent

METHODS = ("pld", "prv", "rdp")
CLAIM_METHOD = "pld"
PLD_DISCRETIZATION = 1e-3
"""PLD ``value_discretization_interval``; pessimistic, so coarser only over-counts
(MNIST row: 2.3905 vs 2.3817 at 1e-4)."""
PRV_EPS_ERROR = 0.01
MIN_NOISE_MULTIPLIER = 0.1
MAX_NOISE_MULTIPLIER = 1e4

Group = tuple[float, float, int]
"""(noise_multiplier, sample_rate, steps); sample_rate 1.0 means no amplification."""


def _drop_rdp_convergence_notice(record: logging.LogRecord) -> bool:
    """dp-accounting's RDP logs a warning per fractional order whose series does not converge
    and excludes that order; excluding orders only raises epsilon, so the bound stays valid and
    the notice (dozens per audit at large sample rates) is dropped."""
    return "failed to converge" not in record.getMessage()


class AccountingError(FedvaultError, ValueError):
    """An accountant was asked something it cannot answer soundly (bad method, delta, history)."""


def _check_method(method: str) -> None:
    if method == "gdp":
        raise AccountingError(
            "accountant 'gdp' is refused: Gaussian DP (CLT) can under-count epsilon; use pld, prv or rdp"
        )
    if method not in METHODS:
        raise AccountingError(f"unknown accountant {method!r}; choose one of {', '.join(METHODS)}")


def _check_delta(delta: float) -> None:
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
        raise AccountingError(f"delta must be a number in (0, 1), got {delta!r}")


def _groups(events: Sequence[DPEvent]) -> tuple[Group, ...]:
    """Validate one privacy unit and merge identical mechanisms (composition is commutative)."""
    steps: dict[tuple[float, float], int] = defaultdict(int)
    units = set()
    for i, event in enumerate(events):
        if not isinstance(event, DPEvent):
            raise AccountingError(f"events[{i}] is a {type(event).__name__}, not a DPEvent")
        units.add((event.party, event.kind))
        steps[(event.noise_multiplier, event.sample_rate)] += event.steps
    if len(units) > 1:
        shown = ", ".join(f"{p!r}/{k}" for p, k in sorted(units))
        raise AccountingError(f"events mix privacy units ({shown}); compose each party's events of one kind separately")
    return tuple(sorted((z, q, n) for (z, q), n in steps.items()))


@lru_cache(maxsize=256)
def _pld(noise_multiplier: float, sample_rate: float, steps: int) -> pld_lib.PrivacyLossDistribution:
    """Pessimistic PLD of ``steps`` compositions of the (Poisson-subsampled) Gaussian."""
    if sample_rate == 1.0:  # plain Gaussian: k compositions = one with std z / sqrt(k), exactly
        return pld_lib.from_gaussian_mechanism(
            noise_multiplier / math.sqrt(steps), value_discretization_interval=PLD_DISCRETIZATION
        )
    return pld_lib.from_gaussian_mechanism(
        noise_multiplier, value_discretization_interval=PLD_DISCRETIZATION, sampling_prob=sample_rate
    ).self_compose(steps)


def _compose_pld(groups: Sequence[Group]) -> pld_lib.PrivacyLossDistribution:
    composed = _pld(*groups[0])
    for group in groups[1:]:
        composed = composed.compose(_pld(*group))
    return composed


_GAUSSIAN_XTOL = 1e-10


def _pld_epsilon(groups: tuple[Group, ...], delta: float) -> float:
    """PLD epsilon; the unamplified part is merged exactly into one Gaussian first.

    ``n`` releases of a Gaussian with multiplier ``z`` (summed over groups) are one Gaussian with
    std ``(sum n / z^2)^(-1/2)``. Without subsampled groups its epsilon is the exact analytic
    Gaussian bound (Balle & Wang, ICML 2018), raised by the root-finder's tolerance so it is never
    below the true value; this also avoids a huge PLD grid for long unamplified histories.
    """
    plain = [(z, n) for z, q, n in groups if q == 1.0]
    sampled = [group for group in groups if group[1] < 1.0]
    if plain:
        std = sum(n / z**2 for z, n in plain) ** -0.5
        if not sampled:
            exact = dp_accounting.get_epsilon_gaussian(std, delta, tol=_GAUSSIAN_XTOL)
            return float(exact) + _GAUSSIAN_XTOL
        sampled.append((std, 1.0, 1))
    return float(_compose_pld(sampled).get_epsilon_for_delta(delta))


def _prv_epsilon(groups: tuple[Group, ...], delta: float) -> float:
    accountant = PRVAccountant()
    accountant.history = [(z, q, n) for z, q, n in groups]
    with np.errstate(divide="ignore"):  # log(1 - q) = -inf at q = 1 is handled by Opacus' masks
        return float(accountant.get_epsilon(delta, eps_error=PRV_EPS_ERROR))


def _rdp_epsilon(groups: tuple[Group, ...], delta: float) -> float:
    absl = logging.getLogger("absl")
    absl.addFilter(_drop_rdp_convergence_notice)  # only while fedvault asks: importing changes no logger
    try:
        accountant = dp_accounting.rdp.RdpAccountant()
        for z, q, n in groups:  # dp-accounting computes the orders (and may log) while composing
            gaussian = dp_accounting.GaussianDpEvent(z)
            accountant.compose(gaussian if q == 1.0 else dp_accounting.PoissonSampledDpEvent(q, gaussian), n)
        return float(accountant.get_epsilon(delta))
    finally:
        absl.removeFilter(_drop_rdp_convergence_notice)


@lru_cache(maxsize=4096)
def _epsilon(groups: tuple[Group, ...], delta: float, method: str) -> float:
    if not groups:
        return 0.0
    try:
        if method == "pld":
            return _pld_epsilon(groups, delta)
        if method == "prv":
            return _prv_epsilon(groups, delta)
        return _rdp_epsilon(groups, delta)
    except (ValueError, FloatingPointError, OverflowError) as exc:
        raise AccountingError(f"{method} accountant failed on history {groups} at delta {delta}: {exc}") from exc


def epsilon(events: Sequence[DPEvent], delta: float, method: str = CLAIM_METHOD) -> float:
    """Epsilon spent by the events of one privacy unit at ``delta`` (0.0 for no events)."""
    _check_method(method)
    _check_delta(delta)
    return _epsilon(_groups(events), float(delta), method)


def epsilon_after(events: Sequence[DPEvent], extra_event: DPEvent, delta: float, method: str = CLAIM_METHOD) -> float:
    """Projected epsilon if ``extra_event`` were spent after ``events`` (nothing is recorded)."""
    return epsilon([*events, extra_event], delta, method)


def _common_prefix(a: tuple[Group, ...], b: tuple[Group, ...]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def cumulative_epsilons(histories: Mapping[str, Sequence[DPEvent]], delta: float) -> dict[str, list[tuple[int, float]]]:
    """PLD epsilon of each party after each of its rounds: ``{party: [(round, epsilon), ...]}``.

    Composes incrementally, one PLD composition per event. Parties are visited sorted by their
    mechanism sequence and the composed prefix shared with the next party is kept, so 20 clients
    with the same per-round mechanism cost little more than one. The composition order differs
    from :func:`epsilon`'s grouping, so a curve's last point can differ from it by the
    discretisation error (both are upper bounds).
    """
    _check_delta(delta)
    plans: dict[str, tuple[tuple[Group, ...], list[int]]] = {}
    for party, events in histories.items():
        _groups(events)  # validates one privacy unit
        ordered = sorted(events, key=lambda e: e.round)
        plans[party] = (
            tuple((e.noise_multiplier, e.sample_rate, e.steps) for e in ordered),
            [e.round for e in ordered],
        )
    order = sorted(plans, key=lambda p: plans[p][0])
    kept: list[pld_lib.PrivacyLossDistribution] = []  # prefix compositions shared with the next party
    kept_eps: list[float | None] = []
    curves: dict[str, list[tuple[int, float]]] = {}
    for index, party in enumerate(order):
        mechanisms, rounds = plans[party]
        share_next = _common_prefix(mechanisms, plans[order[index + 1]][0]) if index + 1 < len(order) else 0
        composed = None
        curve = []
        for i, mechanism in enumerate(mechanisms):
            if i < len(kept):
                composed = kept[i]
            else:
                step = _pld(*mechanism)
                composed = step if composed is None else composed.compose(step)
                if i < share_next:
                    kept.append(composed)
                    kept_eps.append(None)
            if i + 1 < len(rounds) and rounds[i + 1] == rounds[i]:
                continue  # report once per round, after its last event
            eps = kept_eps[i] if i < len(kept_eps) else None
            if eps is None:
                eps = float(composed.get_epsilon_for_delta(delta))
                if i < len(kept_eps):
                    kept_eps[i] = eps
            curve.append((rounds[i], eps))
        curves[party] = curve
        del kept[share_next:], kept_eps[share_next:]
    return {party: curves[party] for party in histories}


def _calibration_event(noise_multiplier: float, sample_rate: float, steps: int) -> DPEvent:
    return DPEvent(
        kind="sample",
        noise_multiplier=noise_multiplier,
        sample_rate=sample_rate,
        steps=steps,
        sampling="none" if sample_rate == 1.0 else "poisson",
        round=0,
        party="calibration",
    )


@lru_cache(maxsize=256)
def calibrate_noise_multiplier(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, method: str = CLAIM_METHOD, rtol: float = 1e-3
) -> float:
    """Smallest noise multiplier (to relative tolerance ``rtol``) with epsilon <= ``target_epsilon``.

    Geometric bracketing from sigma = 1 by factors of 2, then bisection in log(sigma). The
    returned sigma is always the upper end of the bracket, whose epsilon by the SAME accountant
    was computed and is <= target, so it never over-spends; claims are backed by ``"pld"``.
    Results are cached, so calling it every round with the same arguments is free. Searches
    sigma in [MIN_NOISE_MULTIPLIER, MAX_NOISE_MULTIPLIER]: if even the minimum meets the
    target it is returned; if the maximum does not, :class:`AccountingError` is raised.
    """
    _check_method(method)
    _check_delta(delta)
    if not (isinstance(target_epsilon, (int, float)) and 0 < target_epsilon < math.inf):
        raise AccountingError(f"target_epsilon must be a finite number > 0, got {target_epsilon!r}")
    if not 0 < rtol < 1:
        raise AccountingError(f"rtol must be in (0, 1), got {rtol!r}")
    _calibration_event(1.0, sample_rate, steps)  # validates sample_rate and steps

    def fits(sigma: float) -> bool:
        return epsilon([_calibration_event(sigma, sample_rate, steps)], delta, method) <= target_epsilon

    lo, hi = 1.0, 1.0
    if fits(hi):
        while fits(lo):
            hi = lo
            if lo <= MIN_NOISE_MULTIPLIER:
                return hi
            lo = max(lo / 2, MIN_NOISE_MULTIPLIER)
    else:
        while not fits(hi):
            lo = hi
            if hi >= MAX_NOISE_MULTIPLIER:
                raise AccountingError(
                    f"no noise multiplier <= {MAX_NOISE_MULTIPLIER:g} reaches epsilon {target_epsilon} "
                    f"at delta {delta} with sample_rate {sample_rate} over {steps} steps"
                )
            hi = min(hi * 2, MAX_NOISE_MULTIPLIER)
    while hi / lo > 1 + rtol:  # invariant: fits(hi) and not fits(lo)
        mid = math.sqrt(lo * hi)
        if fits(mid):
            hi = mid
        else:
            lo = mid
    return hi

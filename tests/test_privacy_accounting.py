"""Accountants, calibration, budgets and DP events, checked against the libraries used directly."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld import pld_privacy_accountant
from opacus.accountants import PRVAccountant, RDPAccountant
from scipy import optimize, stats

from fedvault.privacy.accountants import AccountingError, calibrate_noise_multiplier, epsilon, epsilon_after
from fedvault.privacy.budget import Budget, projected_epsilon, remaining
from fedvault.privacy.events import DPEvent, DPEventError
from fedvault.privacy.ledger import LEDGER_FILENAME, Ledger, events_by_party

MNIST_Q = 256 / 60000
MNIST_STEPS = int(60 / MNIST_Q)  # 60 epochs of Poisson batches of expected size 256
DELTA = 1e-5


def sample_event(z: float, q: float, steps: int, rnd: int, party: str = "client-1") -> DPEvent:
    return DPEvent("sample", z, q, steps, "poisson" if q < 1 else "none", rnd, party)


def library_pld(history: list[tuple[float, float, int]], delta: float) -> float:
    """dp-accounting's own PLDAccountant (library default discretisation), event by event."""
    accountant = pld_privacy_accountant.PLDAccountant()
    for z, q, steps in history:
        gaussian = dp_accounting.GaussianDpEvent(z)
        accountant.compose(gaussian if q == 1 else dp_accounting.PoissonSampledDpEvent(q, gaussian), steps)
    return accountant.get_epsilon(delta)


def opacus_epsilon(accountant_cls, history: list[tuple[float, float, int]], delta: float) -> float:
    """Opacus accountants fed through their public ``step`` API, one optimizer step at a time."""
    accountant = accountant_cls()
    for z, q, steps in history:
        for _ in range(steps):
            accountant.step(noise_multiplier=z, sample_rate=q)
    with np.errstate(divide="ignore"):  # Opacus' PRV takes log(1 - q) = -inf at q = 1, then masks it
        return accountant.get_epsilon(delta)


def test_mnist_row_from_the_ledger_matches_the_libraries_and_the_notes(tmp_path):
    ledger = Ledger(tmp_path / LEDGER_FILENAME)
    ledger.append(sample_event(1.1, MNIST_Q, MNIST_STEPS, 1))
    events = events_by_party(Ledger(tmp_path / LEDGER_FILENAME).entries())["client-1"]
    history = [(1.1, MNIST_Q, MNIST_STEPS)]

    pld = epsilon(events, DELTA, "pld")
    prv = epsilon(events, DELTA, "prv")
    rdp = epsilon(events, DELTA, "rdp")
    assert pld == pytest.approx(library_pld(history, DELTA), rel=0.01)
    assert prv == pytest.approx(opacus_epsilon(PRVAccountant, history, DELTA), rel=0.01)
    assert rdp == pytest.approx(opacus_epsilon(RDPAccountant, history, DELTA), rel=0.01)
    # the table in shared/notes/privacy.md §4
    assert pld == pytest.approx(2.39, rel=0.01)
    assert rdp == pytest.approx(2.60, rel=0.01)
    assert pld < rdp


def test_heterogeneous_history_composes_like_the_libraries():
    history = [(1.1, 0.01, 300), (0.9, 0.02, 150), (1.1, 0.01, 300), (2.0, 1.0, 3)]
    events = [sample_event(z, q, n, rnd) for rnd, (z, q, n) in enumerate(history, start=1)]
    assert epsilon(events, DELTA, "pld") == pytest.approx(library_pld(history, DELTA), rel=0.01)
    assert epsilon(events, DELTA, "prv") == pytest.approx(opacus_epsilon(PRVAccountant, history, DELTA), rel=0.01)
    assert epsilon(events, DELTA, "rdp") == pytest.approx(opacus_epsilon(RDPAccountant, history, DELTA), rel=0.01)
    assert epsilon(events, DELTA) > epsilon(events[:3], DELTA) > epsilon(events[:1], DELTA)


def exact_gaussian_epsilon(sigma: float, delta: float) -> float:
    """Analytic Gaussian mechanism (Balle & Wang, ICML 2018, Thm. 8), sensitivity 1."""

    def delta_of(eps: float) -> float:
        return stats.norm.cdf(0.5 / sigma - eps * sigma) - math.exp(eps) * stats.norm.cdf(-0.5 / sigma - eps * sigma)

    return optimize.brentq(lambda e: delta_of(e) - delta, 0.0, 100.0, xtol=1e-12)


def test_no_amplification_is_the_exact_gaussian_bound_from_above():
    events = [DPEvent("client", 2.0, 1.0, 1, "none", rnd, "server") for rnd in range(1, 11)]
    exact = exact_gaussian_epsilon(2.0 / math.sqrt(10), DELTA)  # 10 compositions = one with sigma/sqrt(10)
    for method in ("pld", "prv", "rdp"):
        assert epsilon(events, DELTA, method) >= exact * (1 - 1e-6)
    assert epsilon(events, DELTA, "pld") == pytest.approx(exact, rel=0.01)


def test_gdp_unknown_methods_and_mixed_privacy_units_are_refused():
    event = sample_event(1.0, 0.01, 10, 1)
    with pytest.raises(AccountingError, match="gdp.*under-count"):
        epsilon([event], DELTA, "gdp")
    with pytest.raises(AccountingError, match="unknown accountant"):
        epsilon([event], DELTA, "moments")
    with pytest.raises(AccountingError, match="delta"):
        epsilon([event], 0.0)
    with pytest.raises(AccountingError, match="mix privacy units"):
        epsilon([event, sample_event(1.0, 0.01, 10, 1, party="client-2")], DELTA)
    with pytest.raises(AccountingError, match="mix privacy units"):
        epsilon([event, DPEvent("client", 1.0, 0.01, 1, "poisson", 2, "client-1")], DELTA)
    assert epsilon([], DELTA) == 0.0


def test_epsilon_after_projects_without_recording():
    events = [sample_event(1.0, 0.01, 100, rnd) for rnd in range(1, 4)]
    extra = sample_event(1.0, 0.01, 100, 4)
    assert epsilon_after(events, extra, DELTA) == pytest.approx(epsilon([*events, extra], DELTA))
    assert epsilon_after(events, extra, DELTA) > epsilon(events, DELTA)


@pytest.mark.parametrize("method", ["pld", "rdp"])
def test_calibration_meets_target_from_below_and_is_near_smallest(method):
    target, rtol = 3.0, 1e-3
    sigma = calibrate_noise_multiplier(target, DELTA, MNIST_Q, MNIST_STEPS, method=method, rtol=rtol)
    spent = epsilon([sample_event(sigma, MNIST_Q, MNIST_STEPS, 1)], DELTA, method)
    assert spent <= target
    assert spent >= 0.97 * target
    below = sigma / (1 + 2 * rtol)
    assert epsilon([sample_event(below, MNIST_Q, MNIST_STEPS, 1)], DELTA, method) > target
    if method == "pld":  # and the library itself agrees the claim holds
        assert library_pld([(sigma, MNIST_Q, MNIST_STEPS)], DELTA) <= target * 1.001


def test_calibration_without_amplification_and_impossible_targets():
    sigma = calibrate_noise_multiplier(8.0, DELTA, 1.0, 10)
    assert epsilon([DPEvent("sample", sigma, 1.0, 10, "none", 1, "c")], DELTA) <= 8.0
    with pytest.raises(AccountingError, match="no noise multiplier"):
        calibrate_noise_multiplier(1e-6, DELTA, 1.0, 100_000)
    with pytest.raises(AccountingError, match="gdp"):
        calibrate_noise_multiplier(1.0, DELTA, 0.01, 100, method="gdp")


def test_budget_refuses_the_round_that_would_cross_the_cap_and_allows_the_rest():
    rounds, q, steps = 10, 0.01, 100
    budget = Budget(epsilon=2.0, delta=DELTA)
    sigma = calibrate_noise_multiplier(budget.epsilon, budget.delta, q, steps * rounds)
    history: list[DPEvent] = []
    for rnd in range(1, rounds + 1):
        event = sample_event(sigma, q, steps, rnd)
        assert projected_epsilon(history, event, budget) <= budget.epsilon
        history.append(event)
    assert 0 <= remaining(history, budget) < 0.03 * budget.epsilon
    one_more = sample_event(sigma, q, steps, rounds + 1)
    assert projected_epsilon(history, one_more, budget) > budget.epsilon
    assert remaining(history, budget) == pytest.approx(
        budget.epsilon - library_pld([(sigma, q, steps * rounds)], DELTA), abs=0.02
    )


def test_budget_validation():
    with pytest.raises(ValueError, match="epsilon"):
        Budget(0.0, DELTA)
    with pytest.raises(ValueError, match="delta"):
        Budget(1.0, 1.5)
    assert remaining([], Budget(math.inf, DELTA)) == math.inf


def test_dp_event_round_trip_and_field_errors():
    event = sample_event(1.1, MNIST_Q, 5, 3)
    assert DPEvent.from_dict(event.to_dict()) == event
    bad = {**event.to_dict(), "sample_rate": 1.5}
    with pytest.raises(DPEventError, match="'sample_rate'"):
        DPEvent.from_dict(bad)
    with pytest.raises(DPEventError, match="'sample_rate'.*'none'"):
        DPEvent("sample", 1.0, 0.5, 1, "none", 1, "client-1")
    with pytest.raises(DPEventError, match="'steps'"):
        DPEvent.from_dict({**event.to_dict(), "steps": 2.5})
    with pytest.raises(DPEventError, match="'kind'"):
        DPEvent.from_dict({**event.to_dict(), "kind": "user"})
    with pytest.raises(DPEventError, match="'noise_multiplier'"):
        DPEvent.from_dict({**event.to_dict(), "noise_multiplier": 0})
    with pytest.raises(DPEventError, match="'party' is missing"):
        DPEvent.from_dict({k: v for k, v in event.to_dict().items() if k != "party"})
    with pytest.raises(DPEventError, match="'extra' is unknown"):
        DPEvent.from_dict({**event.to_dict(), "extra": 1})


def test_rdp_cross_check_keeps_dp_accountings_convergence_notices_off_the_console(caplog):
    """README's main job (z 1.337, q 1/9, 270 steps) makes dp-accounting log one notice per
    fractional order it excludes, while composing; the audit's RDP column must not print them."""
    history = [(1.33695, 1 / 9, 270)]
    caplog.set_level("WARNING")
    bare = dp_accounting.rdp.RdpAccountant()
    bare.compose(dp_accounting.PoissonSampledDpEvent(1 / 9, dp_accounting.GaussianDpEvent(1.33695)), 270)
    assert any("failed to converge" in r.getMessage() for r in caplog.records)
    caplog.clear()
    eps = epsilon([sample_event(z, q, n, rnd=1) for z, q, n in history], 1e-5, method="rdp")
    assert 8.0 < eps < 9.5
    assert not [r for r in caplog.records if "failed to converge" in r.getMessage()]

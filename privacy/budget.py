"""Hard (epsilon, delta) budgets for one privacy unit, checked BEFORE a release.

Decision: the check uses the PLD accountant alone (the accountant that backs every claim and
that :func:`~fedvault.privacy.accountants.calibrate_noise_multiplier` uses), with no tolerance:
a release is refused when its projected PLD epsilon is strictly above the cap. It never
under-counts because dp-accounting's PLD is built with pessimistic connect-the-dots
discretisation and adds every truncated tail mass to the infinity bucket (Doroshenko et al.,
PETS 2022), so discretisation only raises epsilon. Taking ``max(PLD, PRV)`` would add no
soundness (PRV's upper bound is also a bound, within ~0.01 of PLD) but would make a sigma
calibrated to exactly spend the budget be refused on its last round.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fedvault.errors import FedvaultError
from fedvault.privacy.accountants import CLAIM_METHOD, epsilon, epsilon_after
from fedvault.privacy.events import DPEvent


class BudgetError(FedvaultError, ValueError):
    """A budget is malformed (epsilon not > 0, delta not in (0, 1))."""


@dataclass(frozen=True)
class Budget:
    """An (epsilon, delta) cap for one privacy unit; epsilon may be ``math.inf`` (track only)."""

    epsilon: float
    delta: float

    def __post_init__(self) -> None:
        if isinstance(self.epsilon, bool) or not isinstance(self.epsilon, (int, float)) or not self.epsilon > 0:
            raise BudgetError(f"budget epsilon must be a number > 0, got {self.epsilon!r}")
        if isinstance(self.delta, bool) or not isinstance(self.delta, (int, float)) or not 0 < self.delta < 1:
            raise BudgetError(f"budget delta must be a number in (0, 1), got {self.delta!r}")


def projected_epsilon(events: Sequence[DPEvent], next_event: DPEvent, budget: Budget) -> float:
    """PLD epsilon at the budget's delta if ``next_event`` were spent after ``events``."""
    return epsilon_after(events, next_event, budget.delta, CLAIM_METHOD)


def remaining(events: Sequence[DPEvent], budget: Budget) -> float:
    """Cap minus PLD epsilon spent so far (negative if already over; inf for an infinite cap)."""
    return budget.epsilon - epsilon(events, budget.delta, CLAIM_METHOD)

"""Poisson client sampling from a cryptographically secure source.

Privacy amplification by subsampling for client-level DP (DP-FedAvg, McMahan et al. 2018,
arXiv 1710.06963) is proved for *Poisson* sampling under the add/remove-one neighbouring
relation: every member of a fixed, enrolled population is included in a round independently
with probability ``q`` (Mironov, Talwar, Zhang 2019, "Rényi Differential Privacy of the Sampled
Gaussian Mechanism", arXiv 1908.10530; Balle, Barthe, Gaboardi 2018, "Privacy Amplification by
Subsampling", arXiv 1807.01647, which pairs each sampler with its neighbouring relation). The
accountant's amplified epsilon assumes exactly this, and that the sample stays secret.

Flower 1.41 samples with ``random.sample(all_nodes, sample_size)``
(``flwr/serverapp/strategy/strategy_utils.py::sample_nodes``). That does not justify the
Poisson-amplified bound, for three reasons:

* it draws a *fixed* number of nodes without replacement, whose analysis is the
  replace-one relation (sum sensitivity 2C, a different and weaker amplification bound), not
  add/remove with independent inclusion;
* it samples from the nodes *currently connected*, a set that changes with availability and
  may be influenced by an adversary, so there is no fixed population and no known ``q``;
* ``random`` is a Mersenne Twister usually seeded from the run's seed: anyone knowing the seed
  can predict who was sampled, and amplification needs the sample to be hidden.

:func:`poisson_sample` draws each inclusion from :class:`secrets.SystemRandom`
(``os.urandom``), so the realised sample size is random (Binomial(N, q)) and may be zero; the
round must then still release a noised (empty) aggregate and be accounted.
"""

from __future__ import annotations

import math
import random
import secrets
from collections.abc import Sequence

from fedvault.errors import FedvaultError


class SamplingError(FedvaultError, ValueError):
    """Invalid client-sampling input (rate outside [0, 1], duplicate population members)."""


def poisson_sample(population: Sequence[int], q: float, rng: random.Random | None = None) -> list[int]:
    """Include each member of ``population`` independently with probability ``q``.

    Returns the included members in population order. ``rng`` defaults to the operating
    system's CSPRNG; pass another :class:`random.Random` only in tests.
    """
    if not isinstance(q, (int, float)) or isinstance(q, bool) or not math.isfinite(q) or not 0.0 <= q <= 1.0:
        raise SamplingError(f"poisson_sample: sampling rate q must be a number in [0, 1], got {q!r}")
    if len(set(population)) != len(population):
        raise SamplingError("poisson_sample: population contains duplicate members")
    draw = rng or secrets.SystemRandom()
    return [member for member in population if draw.random() < q]

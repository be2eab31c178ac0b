"""The DP event: the unit of privacy spend that ledgers store and accountants replay.

As in Opacus' accountants, epsilon is never stored as a running total: it is always derived
by composing the recorded events of one privacy unit (one client for sample-level DP-SGD, the
run's population for client-level DP-FedAvg) with an accountant of the caller's choice.

One event is ``steps`` self-compositions of the (Poisson-subsampled) Gaussian mechanism with
noise multiplier ``noise_multiplier`` (noise std / L2 sensitivity) under the add/remove-one
neighbouring relation:

* ``sampling="poisson"``: each record (sample-level) or client (client-level) is included
  independently with probability ``sample_rate`` at every step, which allows amplification
  by sampling (Abadi et al., CCS 2016; Mironov, Talwar, Zhang 2019).
* ``sampling="none"``: no amplification is claimed; ``sample_rate`` must be 1.0. Use it for
  shuffled fixed-size batches or for Flower's fixed-size ``random.sample`` of clients.

Adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy, NeurIPS 2021, arXiv 1905.03871) needs
no extra field: the update is noised with ``z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)`` and the
clipped-count with std ``sigma_b``, and together they are one Gaussian mechanism with noise
multiplier ``z`` (Thm. 1). The caller records ``z``, the multiplier the accountant must use, not
``z_delta`` (``fedvault.privacy.client_level.adaptive_update_noise_multiplier`` computes ``z_delta``).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from fedvault.errors import FedvaultError

KINDS = ("sample", "client")
SAMPLINGS = ("poisson", "none")
#: The party whose budget client-level DP-FedAvg events spend (the run's whole population).
SERVER_PARTY = "server"


class DPEventError(FedvaultError, ValueError):
    """A DP event field is missing or invalid; the message names the field and the value."""


def _bad(field: str, rule: str, value: Any) -> DPEventError:
    return DPEventError(f"DP event field '{field}' {rule}, got {value!r}")


def _real(field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise _bad(field, "must be a finite number", value)
    return float(value)


@dataclass(frozen=True)
class DPEvent:
    """``steps`` compositions of a Gaussian mechanism, optionally Poisson-subsampled.

    ``kind`` is "sample" (DP-SGD inside a client: one record is the privacy unit) or "client"
    (DP-FedAvg at the server: one client's whole data is the unit). ``party`` is whose budget
    it spends: a client id such as "client-3", or "server" for client-level events.
    """

    kind: Literal["sample", "client"]
    noise_multiplier: float
    sample_rate: float
    steps: int
    sampling: Literal["poisson", "none"]
    round: int
    party: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise _bad("kind", f"must be one of {', '.join(KINDS)}", self.kind)
        if self.sampling not in SAMPLINGS:
            raise _bad("sampling", f"must be one of {', '.join(SAMPLINGS)}", self.sampling)
        z = _real("noise_multiplier", self.noise_multiplier)
        if z <= 0:
            raise _bad("noise_multiplier", "must be > 0 (a release without noise has no DP guarantee)", z)
        q = _real("sample_rate", self.sample_rate)
        if not 0 < q <= 1:
            raise _bad("sample_rate", "must be in (0, 1]", q)
        if self.sampling == "none" and q != 1.0:
            raise _bad("sample_rate", "must be 1.0 when sampling is 'none' (no amplification)", q)
        for name in ("steps", "round"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise _bad(name, "must be an integer", value)
            object.__setattr__(self, name, int(value))
        if self.steps < 1:
            raise _bad("steps", "must be >= 1", self.steps)
        if self.round < 0:
            raise _bad("round", "must be >= 0", self.round)
        if not isinstance(self.party, str) or not self.party.strip():
            raise _bad("party", "must be a non-empty string", self.party)
        object.__setattr__(self, "noise_multiplier", z)
        object.__setattr__(self, "sample_rate", q)

    @classmethod
    def dp_sgd(cls, *, noise_multiplier: float, sample_rate: float, steps: int, round: int, party: str) -> DPEvent:
        """``steps`` Poisson-sampled DP-SGD steps of one client (Abadi et al. 2016)."""
        return cls("sample", noise_multiplier, sample_rate, steps, "poisson", round, party)

    @classmethod
    def dp_fedavg(cls, *, noise_multiplier: float, sample_rate: float, round: int, poisson: bool = True) -> DPEvent:
        """One round of client-level DP-FedAvg at the server (McMahan et al., ICLR 2018), spent by SERVER_PARTY."""
        return cls("client", noise_multiplier, sample_rate, 1, "poisson" if poisson else "none", round, SERVER_PARTY)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict with exactly the dataclass fields."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> DPEvent:
        """Validate and build; raises :class:`DPEventError` naming a missing, unknown or bad field."""
        if not isinstance(data, dict):
            raise DPEventError(f"DP event must be a JSON object, got {type(data).__name__}")
        names = {f.name for f in fields(cls)}
        missing = sorted(names - data.keys())
        if missing:
            raise DPEventError(f"DP event field '{missing[0]}' is missing")
        unknown = sorted(data.keys() - names)
        if unknown:
            raise DPEventError(f"DP event field '{unknown[0]}' is unknown")
        return cls(**data)

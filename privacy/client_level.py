"""Client-level DP on the server: DP-FedAvg with fixed or adaptive clipping (numpy only).

A model update is a list of numpy arrays. Each round (McMahan, Ramage, Talwar, Zhang 2018,
"Learning Differentially Private Recurrent Language Models", arXiv 1710.06963, Alg. 1):

1. every sampled client's update ``Δ_k = new_k - global`` is clipped to flat L2 norm ``C``
   (one norm over all arrays): ``Δ_k · min(1, C / ‖Δ_k‖)``;
2. the clipped updates are summed with **uniform weights** and Gaussian noise ``N(0, (z·C)²)``
   is added to every coordinate of the sum;
3. the noised sum is divided by the **fixed** denominator ``M = q·N`` (expected clients per
   round), never by the realised count, and added to the global model.

Under Poisson client sampling (:mod:`fedvault.privacy.sampling`) and the add/remove-one
relation the sum has L2 sensitivity ``C``, so a round is the sampled Gaussian mechanism with
noise multiplier ``z`` and rate ``q``; step 3 is post-processing. Weighting clients by their
number of examples would let one client move the sum by more than ``C`` and void that bound,
and dividing by the realised count would make the output depend on the (private) participation
count: both are therefore excluded here.

Adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy 2021, "Differentially Private Learning
with Adaptive Clipping", arXiv 1905.03871): each client contributes ``b_k = 1[‖Δ_k‖ ≤ C]``. The
server releases ``Σ(b_k − ½) + N(0, σ_b²)`` (centred bits: sensitivity ½, as in TF Privacy's
``QuantileEstimatorQuery``), estimates ``b̄ = noised / M + ½`` clamped to [0, 1], and updates
``C ← C·exp(−η_C (b̄ − γ))`` for the next round. The update sum then gets noise multiplier
``z_Δ = (z⁻² − (2σ_b)⁻²)^(−½)`` so that the joint release (update sum, bit count) is one
Gaussian mechanism with multiplier ``z`` (Andrew et al., Thm. 1): the accountant records ``z``.

Randomness: each call draws a fresh 128-bit seed from :mod:`secrets` for a numpy
``Generator(PCG64DXSM)``. PCG is not a cryptographic generator, and ``numpy``'s Gaussian
sampler works in float64: as Mironov 2012 ("On Significance of the Least Significant Bits for
Differential Privacy", CCS) showed for Laplace noise and Jin et al. 2021 (arXiv 2107.10138) for
Gaussian noise, the low-order bits of a floating-point noisy value can leak the unnoised value.
This implementation does not defend against that attack (a discrete Gaussian on a fixed grid,
Canonne, Kamath, Steinke 2020, arXiv 2004.00010, would); it is the usual research-grade guarantee.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedvault.errors import FedvaultError

Arrays = Sequence[np.ndarray]


class ClientLevelDPError(FedvaultError, ValueError):
    """Invalid client-level DP parameter or update (shape, dtype, non-finite values)."""


def _fresh_generator() -> np.random.Generator:
    return np.random.Generator(np.random.PCG64DXSM(secrets.randbits(128)))


def _check_positive(name: str, value: float, allow_zero: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ClientLevelDPError(f"DP-FedAvg: {name} must be a finite number {bound}, got {value!r}")
    return float(value)


def update_norm(update: Arrays) -> float:
    """Flat L2 norm over all arrays of an update (computed in float64)."""
    return math.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in update))


def clip_update(update: Arrays, clip_norm: float) -> tuple[list[np.ndarray], float]:
    """Scale ``update`` by ``min(1, clip_norm / ‖update‖)``; return (clipped float64 arrays, norm)."""
    clip_norm = _check_positive("clip_norm", clip_norm)
    norm = update_norm(update)
    if not math.isfinite(norm):
        raise ClientLevelDPError("clip_update: update contains non-finite values")
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return [np.asarray(a, dtype=np.float64) * scale for a in update], norm


def adaptive_update_noise_multiplier(noise_multiplier: float, clipped_count_stddev: float) -> float:
    """``z_Δ = (z⁻² − (2σ_b)⁻²)^(−½)``: the update-sum multiplier keeping the joint release at ``z``."""
    if noise_multiplier == 0:
        return 0.0
    if 2 * clipped_count_stddev <= noise_multiplier:
        raise ClientLevelDPError(
            f"adaptive clipping: clipped_count_stddev={clipped_count_stddev} is too small for "
            f"noise_multiplier={noise_multiplier} (needs 2*clipped_count_stddev > noise_multiplier)"
        )
    return (noise_multiplier**-2 - (2 * clipped_count_stddev) ** -2) ** -0.5


@dataclass(frozen=True)
class DPRound:
    """What one DP-FedAvg round released.

    ``noise_multiplier`` is what the accountant must record for this round (with the caller's
    sampling rate q); ``unclipped_fraction`` is the *noised* estimate (adaptive mode only) and
    is safe to log. Raw per-client norms and counts are deliberately not returned.
    """

    arrays: list[np.ndarray]
    noise_multiplier: float
    clip_norm: float
    next_clip_norm: float
    update_noise_stddev: float
    num_clients: int
    unclipped_fraction: float | None


class DPFedAvgAggregator:
    """Server-side DP-FedAvg (fixed denominator, uniform weights), optionally with adaptive clipping.

    ``expected_clients`` is ``q·N``: sampling rate times enrolled population. In adaptive mode
    ``clipped_count_stddev`` defaults to ``expected_clients / 20`` (Andrew et al.'s suggestion).
    """

    def __init__(
        self,
        noise_multiplier: float,
        clip_norm: float,
        expected_clients: float,
        adaptive: bool = False,
        target_quantile: float = 0.5,
        clip_lr: float = 0.2,
        clipped_count_stddev: float | None = None,
    ) -> None:
        self.noise_multiplier = _check_positive("noise_multiplier", noise_multiplier, allow_zero=True)
        self._clip_norm = _check_positive("clip_norm", clip_norm)
        self.expected_clients = _check_positive("expected_clients", expected_clients)
        self.adaptive = bool(adaptive)
        if not 0.0 <= target_quantile <= 1.0:
            raise ClientLevelDPError(f"DP-FedAvg: target_quantile must be in [0, 1], got {target_quantile!r}")
        self.target_quantile = float(target_quantile)
        self.clip_lr = _check_positive("clip_lr", clip_lr, allow_zero=True)
        if clipped_count_stddev is None:
            clipped_count_stddev = self.expected_clients / 20
        self.clipped_count_stddev = _check_positive("clipped_count_stddev", clipped_count_stddev, allow_zero=True)
        self.update_noise_multiplier = (
            adaptive_update_noise_multiplier(self.noise_multiplier, self.clipped_count_stddev)
            if self.adaptive
            else self.noise_multiplier
        )

    @property
    def clip_norm(self) -> float:
        """The clip norm the next round will use."""
        return self._clip_norm

    def aggregate(self, global_arrays: Arrays, client_arrays: Sequence[Arrays]) -> DPRound:
        """New global arrays from the sampled clients' new arrays (an empty list is a valid round)."""
        _check_layout(global_arrays, client_arrays)
        rng = _fresh_generator()
        clip = self._clip_norm
        global64 = [np.asarray(g, dtype=np.float64) for g in global_arrays]
        total = [np.zeros_like(g) for g in global64]
        unclipped = 0
        for new in client_arrays:
            update = [np.asarray(n, dtype=np.float64) - g for n, g in zip(new, global64)]
            clipped, norm = clip_update(update, clip)
            unclipped += norm <= clip
            for acc, c in zip(total, clipped):
                acc += c
        stddev = self.update_noise_multiplier * clip
        arrays = [
            (g64 + (acc + rng.normal(0.0, stddev, size=acc.shape)) / self.expected_clients).astype(np.asarray(g).dtype)
            for g, g64, acc in zip(global_arrays, global64, total)
        ]
        fraction = None
        if self.adaptive:
            centred = unclipped - len(client_arrays) / 2 + rng.normal(0.0, self.clipped_count_stddev)
            fraction = min(1.0, max(0.0, centred / self.expected_clients + 0.5))
            self._clip_norm = clip * math.exp(-self.clip_lr * (fraction - self.target_quantile))
        return DPRound(
            arrays=arrays,
            noise_multiplier=self.noise_multiplier,
            clip_norm=clip,
            next_clip_norm=self._clip_norm,
            update_noise_stddev=stddev,
            num_clients=len(client_arrays),
            unclipped_fraction=fraction,
        )

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs (the current clip norm); the noise seed is never saved."""
        return {"clip_norm": self._clip_norm}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "clip_norm" not in state:
            raise ClientLevelDPError("DP-FedAvg state: missing key 'clip_norm'")
        self._clip_norm = _check_positive("clip_norm (from state)", state["clip_norm"])


def _check_layout(global_arrays: Arrays, client_arrays: Sequence[Arrays]) -> None:
    for i, g in enumerate(global_arrays):
        if not np.issubdtype(np.asarray(g).dtype, np.floating):
            raise ClientLevelDPError(
                f"DP-FedAvg: global array {i} has dtype {np.asarray(g).dtype}; only floating arrays can be noised"
            )
    for k, new in enumerate(client_arrays):
        if len(new) != len(global_arrays):
            raise ClientLevelDPError(
                f"DP-FedAvg: client {k} sent {len(new)} arrays, the global model has {len(global_arrays)}"
            )
        for i, (n, g) in enumerate(zip(new, global_arrays)):
            if np.shape(n) != np.shape(g):
                raise ClientLevelDPError(
                    f"DP-FedAvg: client {k} array {i} has shape {np.shape(n)}, expected {np.shape(g)}"
                )
            if not np.all(np.isfinite(n)):
                raise ClientLevelDPError(f"DP-FedAvg: client {k} array {i} contains non-finite values")

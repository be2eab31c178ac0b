"""Client profiles: what kind of device a simulated client is, and the virtual clock it keeps.

A profile gives a device's training throughput, link speeds, availability, failure rate, device
name and power draw. ``federation.profiles`` assigns them to a simulation's clients as a mix
(``datacenter-gpu:0.2,edge-phone:0.8``, or a preset such as ``mixed``); user-defined profiles come
from ``federation.profile-file`` (a TOML table per profile, the fields below as keys).

The virtual clock of a client's round is deterministic and does not depend on the machine that
runs the simulation, so a 2-core machine can simulate a federation of GPUs and phones and a rerun
(or a resumed run) sees the same times:

    download = instruction bytes * 8 / downlink,  compute = examples trained / examples-per-second,
    upload = reply bytes * 8 / uplink,  energy = power * (download + compute + upload).

Only public quantities enter it (sizes of what was sent, the number of examples trained on, which a
reply carries anyway), so under DP-SGD it releases nothing the client's epsilon does not cover.
Whether a client is online in a round, and whether it fails after training, are seeded draws from
``(seed, partition, round)``: reproducible, and independent of the data.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from fedvault.errors import ConfigError


@dataclass(frozen=True)
class Profile:
    """One kind of client device."""

    name: str
    #: Training throughput on the run's model, examples per second (a built-in task's small CNN).
    examples_per_second: float
    uplink_mbps: float
    downlink_mbps: float
    #: Probability of being online in a round (sampled but offline: no answer, no training).
    availability: float = 1.0
    #: Probability of failing after training, before the reply arrives (the spend is made all the same).
    failure_rate: float = 0.0
    device: str = "cpu"
    power_watts: float = 0.0

    def __post_init__(self) -> None:
        for key in ("examples_per_second", "uplink_mbps", "downlink_mbps"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"profile {self.name!r}: {_key(key)} must be > 0, got {getattr(self, key)}")
        for key in ("availability", "failure_rate"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(
                    f"profile {self.name!r}: {_key(key)} must be between 0 and 1, got {getattr(self, key)}"
                )
        if self.power_watts < 0:
            raise ConfigError(f"profile {self.name!r}: power-watts must be >= 0, got {self.power_watts}")

    def transfer_seconds(self, received_bytes: int, sent_bytes: int) -> tuple[float, float]:
        """Seconds to download ``received_bytes`` and upload ``sent_bytes`` on this profile's links."""
        return received_bytes * 8 / (self.downlink_mbps * 1e6), sent_bytes * 8 / (self.uplink_mbps * 1e6)

    def compute_seconds(self, examples: int) -> float:
        return examples / self.examples_per_second


#: Built-in profiles. Throughputs are for the built-in tasks' small models: a data-center GPU is
#: bound by the input pipeline, a phone's CPU runs a few hundred examples a second; links are a
#: data-center network, home broadband and a mobile uplink; power is the device's draw while busy.
BUILTIN_PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile("datacenter-gpu", 20000.0, 10000.0, 10000.0, 0.99, 0.01, "cuda", 300.0),
        Profile("datacenter-cpu", 2000.0, 1000.0, 1000.0, 0.99, 0.01, "cpu", 150.0),
        Profile("edge-laptop", 500.0, 20.0, 100.0, 0.8, 0.05, "cpu", 30.0),
        Profile("edge-phone", 150.0, 5.0, 30.0, 0.7, 0.1, "cpu", 3.0),
        Profile("edge-iot", 30.0, 1.0, 5.0, 0.5, 0.1, "cpu", 1.0),
    )
}

#: Mixes by name: ``mixed`` is 20 % data-center, 80 % edge (about 30 % of the edge offline per round).
PRESET_MIXES: dict[str, str] = {
    "mixed": "datacenter-gpu:0.2,edge-laptop:0.2,edge-phone:0.6",
    "datacenter": "datacenter-gpu:0.5,datacenter-cpu:0.5",
    "edge": "edge-laptop:0.2,edge-phone:0.6,edge-iot:0.2",
}


def _key(field_name: str) -> str:
    return field_name.replace("_", "-")


def load_profile_file(path: str | Path) -> dict[str, Profile]:
    """User-defined profiles: a TOML table per profile, keys as the :class:`Profile` fields (hyphenated)."""
    try:
        tables = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"federation.profile-file {path}: {exc}") from exc
    known = {_key(f.name): f.name for f in dataclasses.fields(Profile) if f.name != "name"}
    profiles = {}
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise ConfigError(f"federation.profile-file {path}: {name!r} is not a table of profile fields")
        unknown = sorted(set(table) - set(known))
        if unknown:
            raise ConfigError(
                f"federation.profile-file {path}: profile {name!r}: unknown keys {unknown} (known: {sorted(known)})"
            )
        missing = sorted(k for k in ("examples-per-second", "uplink-mbps", "downlink-mbps") if k not in table)
        if missing:
            raise ConfigError(f"federation.profile-file {path}: profile {name!r} needs {missing}")
        try:
            profiles[name] = Profile(name, **{known[k]: v for k, v in table.items()})
        except TypeError as exc:
            raise ConfigError(f"federation.profile-file {path}: profile {name!r}: {exc}") from exc
    return profiles


def parse_mix(text: str, known: Mapping[str, Profile]) -> list[tuple[Profile, float]]:
    """``name:fraction,...`` (or a preset name) as ``(profile, fraction)``; fractions must sum to 1."""
    spec = PRESET_MIXES.get(text.strip(), text)
    mix = []
    for part in spec.split(","):
        name, sep, fraction = part.strip().partition(":")
        if not sep:
            raise ConfigError(
                f"federation.profiles: {part.strip()!r} is not NAME:FRACTION (presets: {', '.join(PRESET_MIXES)})"
            )
        if name not in known:
            raise ConfigError(f"federation.profiles: unknown profile {name!r} (known: {', '.join(sorted(known))})")
        try:
            share = float(fraction)
        except ValueError:
            raise ConfigError(f"federation.profiles: fraction of {name!r} is not a number: {fraction!r}") from None
        if not 0 < share <= 1:
            raise ConfigError(f"federation.profiles: fraction of {name!r} must be in (0, 1], got {share}")
        mix.append((known[name], share))
    if not math.isclose(sum(share for _, share in mix), 1.0, abs_tol=1e-6):
        raise ConfigError(f"federation.profiles: fractions sum to {sum(s for _, s in mix):g}, not 1")
    return mix


def assign_profiles(mix: list[tuple[Profile, float]], num_clients: int, seed: int) -> list[Profile]:
    """Profile of each partition: each profile's share of ``num_clients`` (largest remainder), over a
    seeded shuffle of the partitions."""
    quotas = [share * num_clients for _, share in mix]
    counts = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(mix)), key=lambda i: quotas[i] - counts[i], reverse=True)
    for i in by_remainder[: num_clients - sum(counts)]:
        counts[i] += 1
    order = np.random.default_rng(np.random.SeedSequence([seed, 0x9F1E])).permutation(num_clients)
    profiles: list[Profile] = [mix[0][0]] * num_clients
    start = 0
    for (profile, _), count in zip(mix, counts):
        for partition in order[start : start + count]:
            profiles[int(partition)] = profile
        start += count
    return profiles


def known_profiles(profile_file: str) -> dict[str, Profile]:
    """The built-in profiles, and those of ``profile_file`` (which may redefine a built-in)."""
    return {**BUILTIN_PROFILES, **(load_profile_file(profile_file) if profile_file else {})}


@cache
def federation_profiles(profiles: str, profile_file: str, num_clients: int, seed: int) -> tuple[Profile, ...] | None:
    """Each partition's profile under ``federation.profiles`` / ``profile-file``; None when there are none."""
    if not profiles:
        return None
    return tuple(assign_profiles(parse_mix(profiles, known_profiles(profile_file)), num_clients, seed))


def draw(seed: int, partition: int, server_round: int, stream: int) -> float:
    """A uniform draw in [0, 1) for one client's round; ``stream`` separates independent draws."""
    return float(np.random.default_rng(np.random.SeedSequence([seed, partition, server_round, stream])).random())


ONLINE_STREAM, FAILURE_STREAM = 1, 2

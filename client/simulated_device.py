"""A simulated client's device: its profile decides whether it is online in a round, whether it fails
after training, and the virtual clock its reply carries (:mod:`fedvault.profiles`).

Only a simulation's clients act out a profile (the config's author runs every party there); a deployed
client is a real device, and the server measures its times.
"""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import ConfigRecord, RecordDict

from fedvault.config import RunConfig
from fedvault.profiles import FAILURE_STREAM, ONLINE_STREAM, Profile, draw, federation_profiles
from fedvault.protocol import CLOCK, DP_EVENT, FAILED, OFFLINE, refusal


def array_bytes(content: RecordDict) -> int:
    """Bytes of the arrays ``content`` carries (what a link moves)."""
    return sum(record.count_bytes() for record in content.array_records.values())


@dataclass(frozen=True)
class SimulatedDevice:
    """The profile of partition ``partition`` in a run seeded ``seed``."""

    profile: Profile
    seed: int
    partition: int

    @classmethod
    def of(cls, cfg: RunConfig, partition: int, num_partitions: int) -> SimulatedDevice | None:
        """This partition's device, or None when the federation has no profiles."""
        federation = cfg.federation
        profiles = federation_profiles(federation.profiles, federation.profile_file, num_partitions, cfg.seed)
        return None if profiles is None else cls(profiles[partition], cfg.seed, partition)

    def offline(self, server_round: int) -> RecordDict | None:
        """The reply of a client offline this round (it trains nothing), or None when it is online."""
        if draw(self.seed, self.partition, server_round, ONLINE_STREAM) < self.profile.availability:
            return None
        return refusal(OFFLINE, f"{self.profile.name} offline in round {server_round}")

    def finish(self, server_round: int, instruction: RecordDict, reply: RecordDict, examples: int) -> RecordDict:
        """``reply`` with its virtual clock; or, when the device fails after training, what a failure
        leaves: the spend it made (its ``dp-event``, if any) and its clock without the upload."""
        download, upload = self.profile.transfer_seconds(array_bytes(instruction), array_bytes(reply))
        if draw(self.seed, self.partition, server_round, FAILURE_STREAM) < self.profile.failure_rate:
            out = refusal(FAILED, f"{self.profile.name} failed after training in round {server_round}")
            if (paid := reply.config_records.get(DP_EVENT)) is not None:
                out[DP_EVENT] = paid
            upload = 0.0
        else:
            out = RecordDict(dict(reply.items()))
        out[CLOCK] = ConfigRecord(
            {
                "profile": self.profile.name,
                "download-s": download,
                "compute-s": self.profile.compute_seconds(examples),
                "upload-s": upload,
                "power-w": self.profile.power_watts,
            }
        )
        return out

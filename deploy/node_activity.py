"""What a deployed client did, as lines for ``fedvault client``'s console.

The ClientApps run in processes the SuperNode starts for each message; what they answered is in
the node's answered-rounds record (:class:`fedvault.client.policy.AnsweredRounds`: one JSON file
per run, the highest round answered per message type, written before the reply leaves). This
watcher reads those files and reports each change: a round answered, and the run's final
``query`` when the server sends one (it delivers the receipts of the last spends: the run is over).
"""

from __future__ import annotations

import json
from pathlib import Path

_KINDS = ("train", "evaluate")


class NodeActivity:
    """Lines describing what changed in ``answered_dir`` since the last :meth:`poll`."""

    def __init__(self, answered_dir: Path) -> None:
        self.answered_dir = answered_dir
        self._seen: dict[str, dict[str, int]] = {run: rounds for run, rounds in self._runs()}

    def poll(self) -> list[str]:
        """One line per newly answered round or finished run, in run order."""
        lines = []
        for run, rounds in self._runs():
            before = self._seen.get(run, {})
            for kind in _KINDS:
                if rounds.get(kind, 0) > before.get(kind, 0):
                    lines.append(f"run {run}: answered {kind} round {rounds[kind]}")
            if "query" in rounds and "query" not in before:
                lines.append(f"run {run}: finished (the server collected this node's last receipts)")
            self._seen[run] = rounds
        return lines

    def _runs(self) -> list[tuple[str, dict[str, int]]]:
        """``(run id, {kind: highest round})`` per readable record file; a file being replaced or
        malformed is skipped this time (the ClientApp itself refuses to run on a malformed one)."""
        runs = []
        for path in sorted(self.answered_dir.glob("run-*.json")):
            try:
                stored = json.loads(path.read_text())
                rounds = {str(kind): int(value) for kind, value in stored.items()}
            except (OSError, ValueError, TypeError, AttributeError):
                continue
            runs.append((path.stem.removeprefix("run-"), rounds))
        return runs

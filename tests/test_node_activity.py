"""``fedvault client``'s console lines from the node's answered-rounds record."""

import json

from fedvault.deploy.node_activity import NodeActivity


def _answered(directory, run: int, **rounds: int) -> None:
    (directory / f"run-{run}.json").write_text(json.dumps(rounds))


def test_each_answered_round_and_the_runs_end_are_said_once(tmp_path):
    _answered(tmp_path, 7, train=3)  # a run from before this client started: not repeated
    activity = NodeActivity(tmp_path)
    assert activity.poll() == []
    _answered(tmp_path, 7, train=4)
    _answered(tmp_path, 9, train=1, evaluate=1)
    assert activity.poll() == [
        "run 7: answered train round 4",
        "run 9: answered train round 1",
        "run 9: answered evaluate round 1",
    ]
    assert activity.poll() == []
    _answered(tmp_path, 9, train=1, evaluate=1, query=2)
    assert activity.poll() == ["run 9: finished (the server collected this node's last receipts)"]


def test_a_missing_directory_or_a_malformed_record_says_nothing(tmp_path):
    assert NodeActivity(tmp_path / "none").poll() == []
    (tmp_path / "run-3.json").write_text("{not json")
    (tmp_path / "run-4.json").write_text("[1, 2]")
    assert NodeActivity(tmp_path).poll() == []

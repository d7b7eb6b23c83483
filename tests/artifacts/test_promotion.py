"""One promotion policy: the evaluate step's gate and the registry's gate decide alike, ties included."""

from __future__ import annotations

import pytest

from vembed.artifacts.promotion import decide, decide_version
from vembed.artifacts.registry import VersionInfo
from vembed.pipeline.steps.evaluate import gate

EVAL_SET = "e" * 64


def _version(version: str, score: float) -> VersionInfo:
    return VersionInfo(version, [], "ndcg@10", score, EVAL_SET, None, None)


def _full(score: float) -> dict[str, dict[str, float]]:
    return {"full": {"ndcg@10": score}}


@pytest.mark.parametrize(
    ("tuned", "champion", "min_delta", "passed"),
    [
        (0.70, 0.68, 0.02, True),  # exactly champion + min_delta (0.7000000000000001 in floats): promote
        (0.60, 0.60, 0.0, True),  # a plain tie with min_delta 0: promote
        (0.69, 0.68, 0.02, False),  # short of the margin: hold
        (0.30, 0.10, 0.2, True),  # 0.1 + 0.2 is 0.30000000000000004 in floats
    ],
)
def test_evaluate_step_and_registry_agree(tuned: float, champion: float, min_delta: float, passed: bool) -> None:
    step = gate({"tuned": _full(tuned), "champion": _full(champion)}, "ndcg@10", min_delta)
    # The registry compares the new version's stored score with the champion's on the same eval set.
    promoted, reason = decide_version(_version("2", tuned), _version("1", champion), min_delta, None, None)
    # ...or with the champion's score the evaluate step measured on this eval set.
    measured, _ = decide_version(_version("2", tuned), _version("1", 0.0), min_delta, champion, None)
    assert step["passed"] is promoted is measured is passed
    assert decide(tuned, {"champion": champion}, "ndcg@10", min_delta).passed is passed
    assert ("champion stays v1" in reason) is not passed


def test_decision_names_the_strongest_baseline() -> None:
    d = decide(0.7, {"base": 0.6, "champion": 0.65}, "ndcg@10", 0.01)
    assert d.passed and d.best_baseline == "champion" and d.baseline_score == 0.65
    assert d.to_dict()["decision"] == "promote" and "champion 0.6500" in d.reason
    lone = decide(0.1, {}, "ndcg@10")
    assert lone.passed and lone.best_baseline is None and "no baseline" in lone.reason

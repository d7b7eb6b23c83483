"""The one promotion policy: a candidate passes when its metric is at least the best baseline's plus `min_delta`.

Both the evaluate step (tuned vs base and champion on one eval split) and the registry (candidate vs the
champion version) decide through `decide`, so the pipeline's branch and the registry's alias never disagree.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vembed.errors import ConfigError

METRIC_KEYS = ("recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10")
DEFAULT_METRIC = "ndcg@10"
# 0.68 + 0.02 is 0.7000000000000001 in floats; a margin met exactly must pass.
FLOAT_SLACK = 1e-9


def check_metric(metric: str) -> str:
    """`metric` if it is a metric the gate knows, else a one-line ConfigError."""
    if metric not in METRIC_KEYS:
        raise ConfigError(f"promotion_metric: unknown metric {metric!r}; choose one of {', '.join(METRIC_KEYS)}")
    return metric


@dataclass(frozen=True)
class GateDecision:
    """The outcome of the gate for one candidate score against named baseline scores."""

    passed: bool
    metric: str
    tuned: float
    min_delta: float
    best_baseline: str | None  # the name of the strongest baseline, None when there was none
    baseline_score: float | None
    threshold: float
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """The evaluate step's JSON shape (kept stable: the pipeline and the register step read it)."""
        return {
            "passed": self.passed,
            "decision": "promote" if self.passed else "hold",
            "promotion_metric": self.metric,
            "min_delta": self.min_delta,
            "tuned": self.tuned,
            "best_baseline": self.best_baseline,
            "threshold": self.threshold,
            "reason": self.reason,
        }


def decide(
    tuned: float,
    baselines: Mapping[str, float],
    metric: str = DEFAULT_METRIC,
    min_delta: float = 0.0,
    candidate: str = "tuned",
) -> GateDecision:
    """Pass when `tuned` >= max(baselines) + min_delta (within FLOAT_SLACK); no baseline passes.

    baselines: {name: score} on the same eval set, e.g. {"base": 0.61, "champion": 0.66}.
    """
    tuned, min_delta = float(tuned), float(min_delta)
    scores = {name: float(score) for name, score in baselines.items()}
    best = max(scores, key=scores.__getitem__) if scores else None
    baseline = scores[best] if best is not None else None
    threshold = (baseline if baseline is not None else float("-inf")) + min_delta
    passed = tuned >= threshold - FLOAT_SLACK
    if best is None:
        reason = f"no baseline to beat; {candidate} {metric} = {tuned:.4f}"
    else:
        op = ">=" if passed else "<"
        reason = f"{candidate} {metric} {tuned:.4f} {op} {best} {baseline:.4f} + min_delta {min_delta:g}"
    return GateDecision(passed, metric, tuned, min_delta, best, baseline, threshold, reason)

"""The one promotion policy: a candidate passes when its metric is at least the best baseline's plus `min_delta`.

Both the evaluate step (tuned vs base and champion on one eval split) and the registry (candidate vs the
champion version) decide through `decide`, so the pipeline's branch and the registry's alias never disagree.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vembed.errors import ConfigError

METRIC_KEYS = ("recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10")
DEFAULT_METRIC = "ndcg@10"
ROLES = ("tuned", "base", "champion")  # the models the evaluate step scores, in report order
# The one shape of evaluation results everywhere: {role: {dim: {metric: value}}}, dim "full" or "256".
Results = dict[str, dict[str, dict[str, float]]]
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


def flat_metrics(results: Mapping[str, Mapping[str, Mapping[str, float]]]) -> dict[str, float]:
    """Results as flat names for metric loggers (KFP, MLflow): `tuned/ndcg@10`, `base/dim256/ndcg@10`."""
    return {
        f"{role}/{name}" if dim == "full" else f"{role}/dim{dim}/{name}": float(value)
        for role, by_dim in results.items()
        for dim, metrics in by_dim.items()
        for name, value in metrics.items()
    }


def results_of(metrics: Mapping[str, Any]) -> Results:
    """Results from what a caller holds: the evaluate step's output (`results` inside), results
    themselves, their `flat_metrics` (other keys such as `gate/passed` are ignored), or a bare
    {"ndcg@10": x} (the candidate's full-dimension scores). Non-numbers are dropped."""
    node = metrics.get("results", metrics)
    out: Results = {}
    for key, value in node.items():
        if isinstance(value, Mapping):  # nested: {role: {dim: {metric: value}}}
            for dim, scores in value.items():
                for name, v in (scores.items() if isinstance(scores, Mapping) else ()):
                    if is_score(v):
                        out.setdefault(str(key), {}).setdefault(str(dim), {})[str(name)] = float(v)
            continue
        parts = str(key).split("/")
        parts = ["tuned", *parts] if len(parts) == 1 else parts
        if is_score(value) and parts[0] in ROLES and len(parts) in (2, 3):
            dim = parts[1].removeprefix("dim") if len(parts) == 3 else "full"
            out.setdefault(parts[0], {}).setdefault(dim, {})[parts[-1]] = float(value)
    return out


def score_of(results: Mapping[str, Any], metric: str, role: str = "tuned") -> float | None:
    """`role`'s full-dimension score on `metric`, None when it was not measured."""
    value = results.get(role, {}).get("full", {}).get(metric)
    return float(value) if is_score(value) else None


def is_score(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def decide_version(
    cand: Any, champ: Any | None, min_delta: float, champion_score: float | None, eval_gate_passed: bool | None
) -> tuple[bool, str]:
    """The registry's gate for a new model version against the champion version (both vembed.artifacts.registry
    VersionInfo: version, metric, score, eval_set_sha256). Scores are compared only on the same eval
    set, or with `champion_score`, the champion measured on the candidate's eval set."""
    metric, v = cand.metric or DEFAULT_METRIC, cand.version
    if champ is not None and champ.version == v:
        return True, f"version {v} is already champion"
    if eval_gate_passed is False:
        return False, "evaluation gate did not pass (see the evaluate step); champion unchanged"
    if cand.score is None:
        return False, f"version {v} has no {metric} score; champion unchanged"
    if champ is None:
        return True, f"no champion yet; version {v} ({metric} {cand.score:.4f}) becomes champion"
    if champion_score is not None:
        baseline, basis = float(champion_score), "measured on this eval set"
    elif champ.metric == metric and champ.eval_set_sha256 == cand.eval_set_sha256 and champ.score is not None:
        baseline, basis = champ.score, "same eval set"
    else:
        return False, (
            f"cannot compare with champion v{champ.version}: it was scored with {champ.metric} on eval set "
            f"{(champ.eval_set_sha256 or '?')[:12]}, this version with {metric} on "
            f"{(cand.eval_set_sha256 or '?')[:12]}; pass the champion's score on the same eval set"
        )
    gate = decide(cand.score, {f"champion v{champ.version}": baseline}, metric, min_delta, f"version {v}")
    reason = f"{gate.reason} ({basis})"
    return gate.passed, reason if gate.passed else f"{reason}; champion stays v{champ.version}"

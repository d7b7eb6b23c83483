"""The plain step functions behind the components: gate, reports, metric round trips, input checks."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from pipelines.cron import validate_cron
from vembed.artifacts.promotion import flat_metrics
from vembed.artifacts.promotion import results_of as unflatten_metrics
from vembed.errors import ConfigError, DataError
from vembed.pipeline.steps.evaluate import eval_set_sha256, gate, mrl_dims_of, render_markdown
from vembed.pipeline.steps.train import render_report
from vembed.pipeline.steps.train import train as train_step


def scores(ndcg: float, recall1: float = 0.5) -> dict[str, dict[str, float]]:
    metrics = {"recall@1": recall1, "recall@5": 0.8, "recall@10": 0.9, "mrr@10": 0.6, "ndcg@10": ndcg}
    return {"full": metrics, "128": {k: v / 2 for k, v in metrics.items()}}


@pytest.mark.parametrize(
    ("tuned", "base", "champion", "min_delta", "passed", "best"),
    [
        (0.70, 0.60, None, 0.0, True, "base"),
        (0.70, 0.60, 0.72, 0.0, False, "champion"),  # better than base is not enough
        (0.70, 0.60, 0.69, 0.02, False, "champion"),  # not by min_delta
        (0.70, 0.60, 0.68, 0.02, True, "champion"),  # exactly by min_delta
        (0.60, 0.60, None, 0.0, True, "base"),  # a tie passes with min_delta 0
        (0.55, 0.60, 0.50, 0.0, False, "base"),  # the base model is the better baseline
    ],
)
def test_gate_needs_the_best_baseline_plus_min_delta(tuned, base, champion, min_delta, passed, best) -> None:
    results = {"tuned": scores(tuned), "base": scores(base)}
    if champion is not None:
        results["champion"] = scores(champion)
    decision = gate(results, "ndcg@10", min_delta)
    assert decision["passed"] is passed
    assert decision["decision"] == ("promote" if passed else "hold")
    assert decision["best_baseline"] == best


def test_gate_uses_the_chosen_metric_and_refuses_unknown_ones() -> None:
    results = {"tuned": scores(0.5, recall1=0.9), "base": scores(0.6, recall1=0.4)}
    assert gate(results, "recall@1")["passed"] is True
    assert gate(results, "ndcg@10")["passed"] is False
    with pytest.raises(ConfigError, match="ndcg@5"):
        gate(results, "ndcg@5")


def test_markdown_report_has_every_model_metric_and_dim() -> None:
    results = {"tuned": scores(0.71), "base": scores(0.62), "champion": scores(0.65)}
    decision = gate(results, "ndcg@10", 0.01)
    md = render_markdown(results, decision)
    assert "| metric | tuned | base | champion |" in md
    assert "| ndcg@10 **(gate)** | 0.7100 | 0.6200 | 0.6500 |" in md
    assert "### dim 128" in md and "**Gate: PROMOTE**" in md


def test_flat_metrics_round_trip() -> None:
    results = {"tuned": scores(0.71), "base": scores(0.62)}
    flat = flat_metrics(results)
    assert flat["tuned/ndcg@10"] == 0.71 and flat["base/dim128/ndcg@10"] == 0.31
    assert unflatten_metrics({**flat, "gate/passed": 1.0}) == results
    # Every other shape a caller may hold reads as the same results (vembed.artifacts.promotion.results_of).
    assert unflatten_metrics({"results": results, "decision": {"passed": True}}) == results
    assert unflatten_metrics({"ndcg@10": 0.5, "note": "x"}) == {"tuned": {"full": {"ndcg@10": 0.5}}}


def test_mrl_dims_are_read_from_the_adapter_config(tmp_path: Path) -> None:
    (tmp_path / "vembed_config.yaml").write_text("use_mrl: true\nmrl_dims: [256, 128]\n")
    assert mrl_dims_of(tmp_path) == [256, 128]
    (tmp_path / "vembed_config.yaml").write_text("use_mrl: false\nmrl_dims: [256, 128]\n")
    assert mrl_dims_of(tmp_path) is None


def test_a_damaged_adapter_config_is_one_line_naming_it(tmp_path: Path) -> None:
    from vembed.pipeline.steps.evaluate import evaluate

    (tmp_path / "vembed_config.yaml").write_text("use_mrl: true\nmrl_dims: [256, 128\n")
    (tmp_path / "eval.jsonl").write_text('{"query": "q", "positive": "p"}\n')
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(tmp_path / 'vembed_config.yaml'))}:3: invalid YAML: [^\n]+$"):
        evaluate(tmp_path, tmp_path / "eval.jsonl", base_model="unused")


def test_eval_set_hash_is_the_eval_file_hash(tmp_path: Path) -> None:
    (tmp_path / "eval.jsonl").write_text('{"query": "q", "positive": "p"}\n')
    assert eval_set_sha256(tmp_path) == hashlib.sha256((tmp_path / "eval.jsonl").read_bytes()).hexdigest()


def test_train_report_is_self_contained_html() -> None:
    summary = {
        "final_loss": 0.25,
        "global_step": 20,
        "history": [{"step": 10, "loss": 0.5}, {"step": 20, "loss": 0.25}],
        "config": {"model_name": "tiny", "lora_r": 8},
    }
    page = render_report(summary)
    assert page.startswith("<!doctype html>") and "data:image/png;base64," in page
    assert "<th>lora_r</th><td>8</td>" in page and "0.2500" in page
    assert "No loss was logged" in render_report({**summary, "history": []})


def test_train_step_refuses_keys_it_owns(tmp_path: Path) -> None:
    (tmp_path / "train.jsonl").write_text('{"query": "q", "positive": "p"}\n')
    with pytest.raises(ConfigError, match="'output_dir' is set by the train step"):
        train_step(tmp_path, tmp_path / "out", config_overrides=["output_dir=/elsewhere"])
    with pytest.raises(ConfigError, match="lora_r"):
        train_step(tmp_path, tmp_path / "out", config_overrides=["lora_rank=8"])


def test_train_step_refuses_a_model_name_override_that_base_model_would_replace(tmp_path: Path) -> None:
    (tmp_path / "train.jsonl").write_text('{"query": "q", "positive": "p"}\n')
    with pytest.raises(ConfigError, match=r"^config_overrides: model_name=/models/b conflicts with base_model /models/a;"):
        train_step(tmp_path, tmp_path / "out", base_model="/models/a", config_overrides=["model_name=/models/b"])
    assert not (tmp_path / "out").exists()


def test_the_pipelines_default_base_model_keeps_the_configs_model_name(tmp_path: Path) -> None:
    """`--param config_path=examples/production.yaml` must train the config's model, not a default the
    user never chose: the train component runs the step with the pipeline's base_model `or None`."""
    from pipelines.cli import build_parser
    from pipelines.compile import COMPILED_PATH
    from pipelines.params import read_pipeline_parameters
    from tests.conftest import write_pairs
    from tests.support.tiny_models import make_tiny_bert

    model = make_tiny_bert(tmp_path / "tiny-bert")
    (tmp_path / "data").mkdir()
    write_pairs(tmp_path / "data" / "train.jsonl", n=8)
    config = tmp_path / "config.yaml"
    config.write_text(f"model_name: {model}\nmax_steps: 1\nbatch_size: 4\nlora_target_modules: [query, value]\n")
    default = read_pipeline_parameters(COMPILED_PATH)["base_model"]["default"]
    summary = train_step(tmp_path / "data", tmp_path / "out", base_model=default or None, config_path=config)
    assert summary["config"]["model_name"] == str(model)
    assert build_parser().parse_args(["run", "--local"]).base_model in (None, "")  # `vembed pipeline run` alike


def test_train_step_needs_a_prepared_dataset(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no train.jsonl"):
        train_step(tmp_path, tmp_path / "out")


@pytest.mark.parametrize(
    "expr", ["0 0 3 * * *", "*/30 * * * * ?", "0 15 2 1-7 * MON", "0 0 0 1 JAN-MAR *", "0 0 3 ? * *", "@daily", "@every 6h"]
)
def test_valid_kfp_cron(expr: str) -> None:
    assert validate_cron(expr) == expr


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("0 3 * * *", "for the same schedule write '0 0 3 * * *'"),
        ("0 0 3 * *  * *", "has 7 fields"),
        ("0 0 25 * * *", "hours: 25 is outside 0-23"),
        ("0 0 3 * * 9", "day of week: 9 is outside 0-6"),
        ("0 0 5-3 * * *", "runs backwards"),
        ("0 */0 * * * *", "step '0'"),
        ("? 0 3 * * *", "'?' is only allowed"),
        ("@sometimes", "unknown descriptor"),
    ],
)
def test_invalid_cron_is_explained(expr: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_cron(expr)

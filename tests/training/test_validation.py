"""Validation during training: metrics in the log and the checkpoint, best checkpoint kept through
rotation, early stopping, exact resume with evaluation, and the figures reaching MLflow."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import write_pairs
from vembed.config import load_config
from vembed.errors import ConfigError
from vembed.training import train


def cfg_for(model, data, out, **kw):
    base = {
        "model_name": model,
        "data_path": data,
        "output_dir": str(out),
        "batch_size": 8,
        "learning_rate": 3e-3,
        "logging_steps": 1,
        "save_steps": 100,
        "max_seq_length": 32,
        "lora_dropout": 0.1,
    }
    return load_config(None, {**base, **kw})


def adapter(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / "adapter_model.safetensors"))


def state(ckpt: Path) -> dict:
    return json.loads((ckpt / "trainer_state.json").read_text())


def eval_lines(out: Path) -> list[str]:
    return [ln for ln in (out / "training_log.txt").read_text().splitlines() if ln.startswith("eval ")]


# A direction the run moves away from: training lowers the loss on its own data, so with
# greater_is_better the first evaluation stays the best, and later ones count towards patience.
AWAY = {"metric_for_best_model": "loss", "greater_is_better": True}


def test_val_metrics_in_log_history_and_match_an_independent_evaluation(tiny_bert, pairs_file, tmp_path):
    from vembed.data import read_records
    from vembed.inference.evaluation import evaluate_retrieval
    from vembed.inference.predictor import Predictor

    eval_file = write_pairs(tmp_path / "eval.jsonl", n=16, seed=1)
    out = tmp_path / "o"
    result = train(cfg_for(tiny_bert, pairs_file, out, eval_data_path=eval_file, eval_steps=2, max_steps=4))
    lines = eval_lines(out)
    assert [ln.split()[1] for ln in lines] == ["step=2", "step=4"]
    for key in ("val_loss=", "val_ndcg@10=", "val_recall@10="):
        assert all(key in ln for ln in lines), key
    evals = result.eval_history
    assert [h["step"] for h in evals] == [2, 4]
    assert state(result.checkpoint_dir)["eval_history"] == json.loads(json.dumps(evals))
    assert all("loss" in h for h in result.history)  # training steps stay apart from evaluations
    # The last figures equal vembed.inference.evaluation's on the final checkpoint, computed the usual way.
    independent = evaluate_retrieval(Predictor(str(result.checkpoint_dir)), list(read_records(eval_file)))["full"]
    for metric in ("ndcg@10", "recall@10", "mrr@10"):
        assert evals[-1][f"val_{metric}"] == pytest.approx(independent[metric], abs=1e-6), metric
    assert 0 < evals[-1]["val_loss"] < 10


def test_corpus_path_adds_its_documents_to_validation(tiny_bert, pairs_file, tmp_path):
    from vembed.data import read_records
    from vembed.inference.evaluation import evaluate_retrieval, read_corpus
    from vembed.inference.predictor import Predictor

    eval_file = write_pairs(tmp_path / "eval.jsonl", n=16, seed=1)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"an unrelated passage, number {i}"}) + "\n" for i in range(40)))
    cfg = cfg_for(tiny_bert, pairs_file, tmp_path / "o", eval_data_path=eval_file, corpus_path=str(corpus), max_steps=2)
    result = train(cfg)
    predictor, records = Predictor(str(result.checkpoint_dir)), list(read_records(eval_file))
    with_corpus = evaluate_retrieval(predictor, records, read_corpus(corpus))["full"]["ndcg@10"]
    assert with_corpus != evaluate_retrieval(predictor, records)["full"]["ndcg@10"]  # the extra documents count here
    assert result.eval_history[-1]["val_ndcg@10"] == pytest.approx(with_corpus, abs=1e-6)


def test_evaluating_does_not_change_training(tiny_bert, pairs_file, tmp_path):
    plain = train(cfg_for(tiny_bert, pairs_file, tmp_path / "a", max_steps=4))
    evaluated = train(
        cfg_for(tiny_bert, pairs_file, tmp_path / "b", max_steps=4, eval_data_path=pairs_file, eval_steps=2)
    )
    a, b = adapter(plain.checkpoint_dir), adapter(evaluated.checkpoint_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # dropout on: evaluation must not move the RNG


def test_best_checkpoint_survives_rotation(tiny_bert, pairs_file, tmp_path):
    out = tmp_path / "o"
    eval_file = write_pairs(tmp_path / "eval.jsonl", n=16, seed=1)
    result = train(
        cfg_for(tiny_bert, pairs_file, out, eval_data_path=eval_file, eval_steps=1, save_steps=2,
                save_total_limit=1, max_steps=6, **AWAY)
    )  # fmt: skip
    evals = result.eval_history
    best_step = max(evals, key=lambda h: h["val_loss"])["step"]
    assert result.best_checkpoint == out / f"checkpoint-{best_step}"
    assert result.best_metric == max(h["val_loss"] for h in evals)
    assert best_step < result.global_step  # otherwise rotation would not have been tested
    # save_total_limit 1 keeps the newest checkpoint, plus the protected best one
    assert sorted(p.name for p in out.glob("checkpoint-*")) == sorted({f"checkpoint-{best_step}", "checkpoint-6"})
    recorded = state(result.checkpoint_dir)["best"]
    assert recorded["best_checkpoint"] == f"checkpoint-{best_step}" and recorded["metric"] == "loss"
    assert f"best_checkpoint={out / f'checkpoint-{best_step}'}" in (out / "training_log.txt").read_text()


def test_early_stopping_after_patience(tiny_bert, pairs_file, tmp_path):
    out = tmp_path / "o"
    eval_file = write_pairs(tmp_path / "eval.jsonl", n=16, seed=1)
    result = train(
        cfg_for(tiny_bert, pairs_file, out, eval_data_path=eval_file, eval_steps=1, epochs=3,
                early_stopping_patience=2, **AWAY)
    )  # fmt: skip
    evals = result.eval_history
    best_step = max(evals, key=lambda h: h["val_loss"])["step"]
    assert result.stopped_early
    assert result.global_step == best_step + 2 < 18  # two evaluations without improvement, long before the end
    assert f"early stop at step={result.global_step}" in (out / "training_log.txt").read_text()
    assert state(result.checkpoint_dir)["best"]["evals_without_improvement"] == 2
    # A retry of the finished job (resume: latest) keeps the early stop its checkpoint records
    # instead of training on from it.
    again = train(
        cfg_for(tiny_bert, pairs_file, out, eval_data_path=eval_file, eval_steps=1, epochs=3,
                early_stopping_patience=2, resume_from_checkpoint="latest", **AWAY)
    )  # fmt: skip
    assert again.stopped_early and again.global_step == result.global_step
    assert again.checkpoint_dir == result.checkpoint_dir and again.eval_history == result.eval_history


def test_eval_split_holds_out_training_records(tiny_bert, pairs_file, tmp_path):
    out = tmp_path / "o"
    result = train(cfg_for(tiny_bert, pairs_file, out, eval_split=0.25, epochs=1))
    header = (out / "training_log.txt").read_text().splitlines()[0]
    trained = int(header.split("examples=")[1].split()[0])
    assert 0 < trained < 48 and result.global_step == -(-trained // 8)
    assert [h["step"] for h in result.eval_history] == [result.global_step]  # at the end


def test_resume_with_eval_and_patience_is_exact(tiny_bert, pairs_file, tmp_path):
    eval_file = write_pairs(tmp_path / "eval.jsonl", n=16, seed=1)
    cfg = {"eval_data_path": eval_file, "eval_steps": 1, "save_steps": 2, "epochs": 3, "early_stopping_patience": 3}
    full = train(cfg_for(tiny_bert, pairs_file, tmp_path / "a", **cfg, **AWAY))
    assert full.stopped_early and full.global_step > 2
    shutil.copytree(tmp_path / "a" / "checkpoint-2", tmp_path / "b" / "checkpoint-2")
    resumed = train(cfg_for(tiny_bert, pairs_file, tmp_path / "b", resume_from_checkpoint="latest", **cfg, **AWAY))
    # The patience count and the best value came back from checkpoint-2: it stops at the same step.
    assert resumed.stopped_early and resumed.global_step == full.global_step
    timeless = [[{k: v for k, v in h.items() if k != "samples_per_s"} for h in r.history] for r in (full, resumed)]
    assert timeless[0] == timeless[1] and resumed.eval_history == full.eval_history
    assert state(resumed.checkpoint_dir)["best"] == state(full.checkpoint_dir)["best"]
    a, b = adapter(full.checkpoint_dir), adapter(resumed.checkpoint_dir)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    log = (tmp_path / "b" / "training_log.txt").read_text().splitlines()
    assert log[0].endswith("resumed from checkpoint-2 at step=2") and log[1].startswith("step=3 ")


def test_val_metrics_reach_mlflow(tiny_bert, pairs_file, tmp_path, monkeypatch):
    """The register step logs a checkpoint's history (trainer_state.json): evaluations become val/ metrics."""
    from mlflow import MlflowClient

    from vembed.artifacts.registry import Registry
    from vembed.pipeline.steps.register import _from_checkpoint

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    eval_file = write_pairs(tmp_path / "eval.jsonl", n=8, seed=1)
    result = train(cfg_for(tiny_bert, pairs_file, tmp_path / "o", eval_data_path=eval_file, eval_steps=1, max_steps=2))
    config, history = _from_checkpoint(result.checkpoint_dir)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = Registry(uri).log_training_run(run_key="k" * 16, config=config, history=history)
    client = MlflowClient(tracking_uri=uri)
    for name, key in (("val/loss", "val_loss"), ("val/ndcg_at_10", "val_ndcg@10"), ("val/recall_at_10", "val_recall@10")):
        got = sorted((m.step, m.value) for m in client.get_metric_history(run_id, name))
        want = [(h["step"], h[key]) for h in result.eval_history]
        assert [s for s, _ in got] == [s for s, _ in want] == [1, 2], name
        assert [v for _, v in got] == pytest.approx([v for _, v in want]), name
    assert sorted(m.step for m in client.get_metric_history(run_id, "train/loss")) == [1, 2]
    assert not client.get_metric_history(run_id, "train/val_loss")


def test_validation_settings_are_checked(tiny_bert):
    with pytest.raises(ConfigError, match="metric_for_best_model: needs validation data"):
        load_config(None, {"model_name": tiny_bert, "metric_for_best_model": "ndcg@10"})
    with pytest.raises(ConfigError, match="early_stopping_patience: needs metric_for_best_model"):
        load_config(None, {"eval_split": 0.1, "early_stopping_patience": 2})
    with pytest.raises(ConfigError, match="not both"):
        load_config(None, {"eval_split": 0.1, "eval_data_path": "x.jsonl"})


def test_grad_cache_chunk_not_below_batch_warns(tiny_bert, pairs_file, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="vembed.training.grad_cache")
    train(cfg_for(tiny_bert, pairs_file, tmp_path / "a", use_gradient_cache=True, gradient_cache_chunk_size=4, max_steps=1))
    assert not [r for r in caplog.records if "GradCache saves no memory" in r.getMessage()]
    train(cfg_for(tiny_bert, pairs_file, tmp_path / "b", use_gradient_cache=True, gradient_cache_chunk_size=8, max_steps=1))
    warned = [r.getMessage() for r in caplog.records if "GradCache saves no memory" in r.getMessage()]
    assert warned == [
        "use_gradient_cache: gradient_cache_chunk_size 8 >= batch_size 8 (per process): each batch is one chunk, "
        "so GradCache saves no memory and only adds a forward pass; set gradient_cache_chunk_size below "
        "batch_size, or use_gradient_cache: false"
    ]

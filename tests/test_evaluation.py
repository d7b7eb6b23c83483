import json

import numpy as np
import pytest

from vembed.data import Record
from vembed.evaluation import (
    METRICS,
    build_retrieval_set,
    compare_models,
    format_table,
    read_corpus,
    retrieval_metrics,
)


def ranx_metrics(scores, qrels):
    from ranx import Qrels, Run, evaluate

    q = Qrels({f"q{i}": {f"d{d}": 1 for d in rel} for i, rel in enumerate(qrels)})
    r = Run({f"q{i}": {f"d{j}": float(s) for j, s in enumerate(row)} for i, row in enumerate(scores)})
    names = ["recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10"]
    out = evaluate(q, r, names)
    return dict(zip(names, (float(out[n]) for n in names), strict=True))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_ranx(seed):
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(40, 60))
    # one to three relevant documents per query
    qrels = [set(rng.choice(60, size=rng.integers(1, 4), replace=False).tolist()) for _ in range(40)]
    ours = retrieval_metrics(scores, qrels)
    ref = ranx_metrics(scores, qrels)
    for m in METRICS:
        assert ours[m] == pytest.approx(ref[m], abs=1e-9), m


def test_perfect_and_worst_rankings():
    scores = np.eye(12)
    assert all(v == 1.0 for v in retrieval_metrics(scores, [{i} for i in range(12)]).values())
    worst = retrieval_metrics(-np.eye(12), [{i} for i in range(12)])  # relevant doc ranked last of 12
    assert worst == {m: 0.0 for m in METRICS}


def test_retrieval_set_groups_queries_and_dedups_docs():
    recs = [Record(query="a", positive="x"), Record(query="a", positive="y"), Record(query="b", positive="x")]
    queries, docs, qrels = build_retrieval_set(recs, corpus=["z", "x"])
    assert [q.text for q in queries] == ["a", "b"]
    assert [d.text for d in docs] == ["x", "y", "z"]
    assert qrels == [{0, 1}, {0}]


def test_corpus_errors_name_line(tmp_path):
    from vembed.errors import DataError

    p = tmp_path / "c.jsonl"
    p.write_text('{"text": "ok"}\n{"txt": "bad"}\n')
    with pytest.raises(DataError, match=rf"{p}:2:"):
        read_corpus(p)


def test_compare_base_vs_model_and_cli(tiny_bert, tmp_path, capsys):
    from vembed.cli import main

    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"query": f"q{i} word", "positive": f"doc {i} text"}) + "\n" for i in range(12)))
    results = compare_models({"base": tiny_bert, "tuned": tiny_bert}, data, dims=[16])
    assert results["base"] == results["tuned"]
    assert set(results["base"]) == {"full", "16"}
    assert "ndcg@10" in format_table(results)
    out = tmp_path / "m.json"
    assert main(["evaluate", tiny_bert, "--data", str(data), "--dims", "16", "--output", str(out)]) == 0
    assert "recall@1" in capsys.readouterr().out
    assert set(json.loads(out.read_text())["tuned"]) == {"full", "16"}

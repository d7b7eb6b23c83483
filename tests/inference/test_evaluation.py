import json

import numpy as np
import pytest

from vembed.data import Record
from vembed.inference.evaluation import (
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


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        # both were tracebacks: a RecursionError here, a TypeError from the tokenizer once the model had loaded
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"text": "a\\ud800"}', "field 'text' holds a lone surrogate escape"),
    ],
    ids=["nested too deeply", "lone surrogate"],
)
def test_corpus_odd_json_names_line(tmp_path, line, reason):
    from vembed.errors import DataError

    p = tmp_path / "c.jsonl"
    p.write_bytes(b'{"text": "ok"}\n' + line + b"\n")
    with pytest.raises(DataError, match=rf"^{p}:2: .*{reason}"):
        read_corpus(p)


PAIRS = [
    ("how do I sort a list", "Use sorted() to order the items of a list."),
    ("read a text file", "open() the file and call read() to get its contents."),
    ("parse a JSON string", "json.loads turns a JSON document into Python objects."),
    ("current date and time", "datetime.now() returns the local date and time."),
    ("make an HTTP request", "urllib.request.urlopen fetches a URL over HTTP."),
    ("generate a random number", "random.randint picks a random integer in a range."),
    ("remove duplicates from a list", "Build a set from the list to drop repeated items."),
    ("join path components", "os.path.join combines directory and file names."),
    ("run a shell command", "subprocess.run starts a program and waits for it."),
    ("compress a file with gzip", "gzip.open writes a compressed .gz file."),
    ("measure elapsed time", "time.perf_counter gives a clock for timing code."),
    ("copy a directory tree", "shutil.copytree copies a folder and everything in it."),
]


def test_compare_two_models_and_cli(tiny_bert, minilm_path, tmp_path, capsys):
    """A trained sentence encoder (MiniLM) against a random tiny BERT on paired questions/answers: the
    results and the table show each model's own scores and the difference between them."""
    from vembed.cli import main

    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"query": q, "positive": p}) + "\n" for q, p in PAIRS))
    results = compare_models({"random": tiny_bert, "minilm": minilm_path}, data, dims=[16])
    assert set(results["random"]) == set(results["minilm"]) == {"full", "16"}
    random_ndcg, minilm_ndcg = results["random"]["full"]["ndcg@10"], results["minilm"]["full"]["ndcg@10"]
    # 12 documents: a random model ranks the answer anywhere (measured 0.65); MiniLM finds every one (1.0).
    assert minilm_ndcg > 0.9 and minilm_ndcg - random_ndcg > 0.2, results
    assert results["minilm"]["full"]["recall@1"] > results["random"]["full"]["recall@1"]

    rows = {tuple(cell.strip() for cell in line.split("│")[1:3]): line for line in format_table(results).splitlines()
            if line.count("│") >= 5}  # fmt: skip
    cells = [c.strip() for c in rows[("full", "ndcg@10")].split("│")[3:6]]
    assert cells == [f"{random_ndcg:.4f}", f"{minilm_ndcg:.4f}", f"{minilm_ndcg - random_ndcg:+.4f}"]
    assert "minilm - random" in format_table(results)

    # The CLI: the model against a --base, side by side, and the metrics file with both.
    out = tmp_path / "m.json"
    argv = ["evaluate", minilm_path, "--base", tiny_bert, "--data", str(data), "--dims", "16", "--output", str(out)]
    assert main(argv) == 0
    shown = capsys.readouterr().out
    assert f"{random_ndcg:.4f}" in shown and f"{minilm_ndcg:.4f}" in shown and f"{minilm_ndcg - random_ndcg:+.4f}" in shown
    saved = json.loads(out.read_text())
    assert saved["tuned"]["full"]["ndcg@10"] == pytest.approx(minilm_ndcg)
    assert saved["base"]["full"]["ndcg@10"] == pytest.approx(random_ndcg)
    # Run again: the file is replaced only with --overwrite, whole (nothing temporary left beside it).
    out.write_text("{}")
    assert main([*argv, "--no-base"]) == 2 and out.read_text() == "{}"
    assert main([*argv, "--no-base", "--overwrite"]) == 0
    assert "base" not in json.loads(out.read_text()) and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("name, content", [("embedder.json", '{"family": "text"}'), ("adapter_config.json", "{bad")])
def test_base_model_of_a_bad_adapter_checkpoint_is_one_line_naming_the_file(tmp_path, name, content):
    from vembed.errors import CheckpointError
    from vembed.inference.evaluation import base_model_of

    (tmp_path / "adapter_config.json").write_text('{"base_model_name_or_path": "base"}')
    (tmp_path / name).write_text(content)
    with pytest.raises(CheckpointError, match=rf"^{tmp_path / name}: "):
        base_model_of(str(tmp_path))

import json

import pytest
from kfp import dsl

from components.prepare.component import prepare


def test_splits_raw_jsonl_into_a_dataset(artifact, no_services, tmp_path) -> None:
    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(json.dumps({"query": f"q{i}", "positive": f"p{i}"}) + "\n" for i in range(20)))
    dataset = artifact(dsl.Dataset, "dataset")
    summary = json.loads(prepare.python_func(raw_uri=str(raw), dataset=dataset, eval_fraction=0.25))
    train = (tmp_path / "dataset" / "train.jsonl").read_text().splitlines()
    evals = (tmp_path / "dataset" / "eval.jsonl").read_text().splitlines()
    assert len(train) + len(evals) == 20 and evals
    assert dataset.metadata["dataset_sha256"] == summary["dataset_sha256"]


def test_a_bad_record_ends_the_step_with_one_line(artifact, no_services, tmp_path) -> None:
    raw = tmp_path / "raw.jsonl"
    raw.write_text('{"query": "q", "positive": "p"}\n{"query": \n')
    with pytest.raises(SystemExit, match=r"^error: .*raw\.jsonl:2: "):
        prepare.python_func(raw_uri=str(raw), dataset=artifact(dsl.Dataset, "dataset"))

"""Hard-negative mining: exact chunked top-k, the rank window, the positive-aware margin, determinism."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from vembed.cli import main as cli_main
from vembed.data import Record, read_records
from vembed.data.mining import MiningSettings, chunked_topk, mine_negatives
from vembed.errors import ConfigError


@pytest.mark.parametrize("chunk", [1, 7, 50, 1000])
def test_chunked_topk_equals_full_topk(chunk):
    g = torch.Generator().manual_seed(0)
    q, c = torch.randn(13, 16, generator=g), torch.randn(200, 16, generator=g)
    scores, idx = chunked_topk(q, (c[i : i + chunk] for i in range(0, 200, chunk)), k=25)
    full_s, full_i = (q @ c.T).topk(25, dim=1)
    assert torch.equal(idx, full_i)
    torch.testing.assert_close(scores, full_s)


def test_chunked_topk_with_fewer_candidates_than_k():
    q, c = torch.eye(3), torch.eye(3)[:2]
    scores, idx = chunked_topk(q, [c[:1], c[1:]], k=10)
    assert idx.shape == (3, 2) and idx[0, 0] == 0 and idx[1, 0] == 1


def unit(score: float) -> list[float]:
    """A 2-d unit vector whose cosine with (1, 0) is `score`."""
    return [score, math.sqrt(1 - score * score)]


def fixed_encoder(vectors: dict[str, list[float]]):
    def encode(items, is_query):
        return np.array([vectors[item.text] for item in items], dtype=np.float32)

    return encode


# The query's positive scores 0.80; candidates c0 (best) .. c9 score from 0.99 down.
CANDIDATE_SCORES = [0.99, 0.9, 0.85, 0.79, 0.77, 0.75, 0.7, 0.6, 0.5, 0.4]
VECTORS = {"q": [1.0, 0.0], "P": unit(0.80), **{f"c{i}": unit(s) for i, s in enumerate(CANDIDATE_SCORES)}}
CANDIDATES = [f"c{i}" for i in range(10)]


def mine(**settings):
    records = [Record(query="q", positive="P", negatives=("c8",))]
    return mine_negatives(records, fixed_encoder(VECTORS), MiningSettings(**settings), CANDIDATES)


def test_a_query_with_several_positives_never_gets_one_of_them_as_a_negative():
    """Records (q, x) and (q, y): y was mined as a hard negative of (q, x), a labelled positive."""
    vectors = {"q": [1.0, 0.0], "x": unit(0.9), "y": unit(0.5), "z": unit(0.3), "r": [0.0, 1.0], "w": unit(0.2)}
    records = [Record(query="q", positive="x"), Record(query="q", positive="y"), Record(query="r", positive="z"),
               Record(query="r", positive="w")]
    mined, _ = mine_negatives(records, fixed_encoder(vectors), MiningSettings(rank_start=0, rank_end=3))
    assert [r.negatives for r in mined] == [("z",), ("z",), ("y",), ("y",)]


def test_rank_window_and_margin():
    # ranks without the positive: c0 c1 c2 c3 ...; window [1, 6) = c1..c5; margin 0.95 * 0.80 = 0.76
    # drops c1 (0.9), c2 (0.85), c3 (0.79), c4 (0.77): c5 is the first that is left
    out, stats = mine(rank_start=1, rank_end=6, num_negatives=2, margin=0.95)
    assert out[0].negatives == ("c8", "c5")  # existing negative kept, one mined (the window had no more)
    assert stats.skipped_margin == 4 and stats.negatives == 1 and stats.mined == 1
    # margin 1.0 keeps what scores up to the positive's score: c3 (0.79) first
    out, _ = mine(rank_start=1, rank_end=6, num_negatives=2, margin=1.0)
    assert out[0].negatives == ("c8", "c3", "c4")
    # a window past every candidate mines nothing
    out, stats = mine(rank_start=20, rank_end=30)
    assert out[0].negatives == ("c8",) and stats.mined == 0


def test_positive_is_never_its_own_negative():
    out, _ = mine(rank_start=0, rank_end=11, num_negatives=20, margin=1.0)
    assert "P" not in out[0].negatives
    assert len(out[0].negatives) == len(set(out[0].negatives))


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="rank_start"):
        MiningSettings(rank_start=5, rank_end=5)
    with pytest.raises(ConfigError, match="margin"):
        MiningSettings(margin=0)


def write_pairs(path: Path, n: int = 24) -> Path:
    rows = [{"query": f"how do I run job {i}?", "positive": f"Job {i} runs with tool {i % 5} on host {i % 3}."} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cli_mine_is_deterministic_and_never_overwrites(tiny_bert, tmp_path, capsys):
    data = write_pairs(tmp_path / "train.jsonl")
    args = ["--model", tiny_bert, "--rank-start", "2", "--rank-end", "8", "--num-negatives", "2", "--margin", "1.0"]
    assert cli_main(["mine", str(data), str(tmp_path / "a.jsonl"), *args]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert cli_main(["mine", str(data), str(tmp_path / "b.jsonl"), *args]) == 0
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    mined = list(read_records(str(tmp_path / "a.jsonl")))
    assert summary["negatives"] == sum(len(r.negatives) for r in mined) > 0
    assert all(len(r.negatives) <= 2 for r in mined)
    positives = {r.positive for r in mined}
    assert all(r.positive not in r.negatives and set(r.negatives) <= positives for r in mined)
    capsys.readouterr()
    assert cli_main(["mine", str(data), str(tmp_path / "a.jsonl"), *args]) == 2
    assert "already exists" in capsys.readouterr().err


def test_prepare_mines_the_train_split_only(tiny_bert, tmp_path):
    from vembed.pipeline.steps.prepare import prepare

    raw = write_pairs(tmp_path / "raw.jsonl", n=40)
    summary = prepare(str(raw), str(tmp_path / "ds"), eval_fraction=0.25, mine_negatives=tiny_bert)
    train = list(read_records(str(tmp_path / "ds" / "train.jsonl")))
    evals = list(read_records(str(tmp_path / "ds" / "eval.jsonl")))
    assert summary["mining"]["negatives"] == sum(len(r.negatives) for r in train) > 0
    assert summary["mining"]["model"] == tiny_bert
    assert not any(r.negatives for r in evals)

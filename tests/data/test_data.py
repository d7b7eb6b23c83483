import json
import re
from pathlib import Path

import pytest

from vembed.data import ReadStats, Record, read_records, split_records, split_to_files
from vembed.errors import DataError

GOOD = {"query": "q", "positive": "p"}


def write_lines(tmp_path: Path, lines: list, name: str = "d.jsonl") -> Path:
    p = tmp_path / name
    with p.open("wb") as fh:
        for line in lines:
            if isinstance(line, bytes):
                fh.write(line + b"\n")
            elif isinstance(line, str):
                fh.write(line.encode() + b"\n")
            else:
                fh.write(json.dumps(line).encode() + b"\n")
    return p


def test_reads_all_fields(tmp_path):
    rec = {
        "query": "a cat",
        "positive": "a photo of a cat",
        "negatives": ["a dog", "a car"],
        "instruction": "Find the caption",
        "query_image": "img/q.png",
        "positive_image": "img/p.png",
    }
    [r] = list(read_records(write_lines(tmp_path, [rec])))
    assert r.negatives == ("a dog", "a car")
    assert r.to_json() == rec


BAD_CASES = [
    ("invalid json", b'{"query": "q", "positive": ', "invalid JSON"),
    ("missing field", {"query": "q"}, "missing field 'positive'"),
    ("empty field", {"query": "  ", "positive": "p"}, "field 'query' is empty"),
    ("wrong type", {"query": 3, "positive": "p"}, "field 'query' must be a string"),
    ("wrong negatives", {"query": "q", "positive": "p", "negatives": "n"}, "'negatives' must be a list of strings"),
    ("empty negative", {"query": "q", "positive": "p", "negatives": [""]}, "'negatives' contains an empty string"),
    ("not an object", [1, 2], "expected a JSON object"),
    ("invalid utf8", b'{"query": "\xff\xfe", "positive": "p"}', "invalid UTF-8"),
    # valid JSON, but no text that can be written back as UTF-8 (prepare crashed writing train.jsonl)
    ("lone surrogate", b'{"query": "a\\ud800", "positive": "p"}', "field 'query' holds a lone surrogate"),
    ("lone surrogate negative", b'{"query": "q", "positive": "p", "negatives": ["\\udfff"]}', "'negatives' holds a lone"),
    ("nul in image path", {"query": "q", "positive_image": "a\x00.png"}, "'positive_image': an image path with a NUL"),
    ("nul in negative image", {"query": "q", "positive": "p", "negative_images": ["n\x00"]}, "'negative_images': an image"),
    ("nested too deeply", b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),  # was a RecursionError traceback
]


@pytest.mark.parametrize(("name", "bad", "reason"), BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_record_names_path_and_line(tmp_path, name, bad, reason):
    p = write_lines(tmp_path, [GOOD, "", GOOD, bad, GOOD])  # blank line 2 still counts
    with pytest.raises(DataError) as exc:
        list(read_records(p))
    assert str(exc.value).startswith(f"{p}:4: ")
    assert reason in str(exc.value)


@pytest.mark.parametrize(("name", "bad", "reason"), BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_skip_mode_counts(tmp_path, name, bad, reason):
    p = write_lines(tmp_path, [GOOD, bad, {"query": "q2", "positive": "p2"}])
    stats = ReadStats()
    recs = list(read_records(p, on_bad_record="skip", stats=stats))
    assert len(recs) == 2
    assert stats.skipped_total == 1
    assert stats.examples[0].startswith(f"{p}:2: ")
    assert "1 skipped" in stats.summary()


def test_empty_file(tmp_path):
    p = tmp_path / "e.jsonl"
    p.write_bytes(b"")
    with pytest.raises(DataError, match=rf"^{p}:1: file is empty"):
        list(read_records(p))


def test_blank_file(tmp_path):
    p = tmp_path / "b.jsonl"
    p.write_bytes(b"\n   \n\t\n")
    with pytest.raises(DataError, match=rf"^{p}:3: file is entirely blank"):
        list(read_records(p))


def test_bom_accepted(tmp_path):
    p = tmp_path / "bom.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n")
    assert [r.query for r in read_records(p)] == ["q"]


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        list(read_records(tmp_path / "nope.jsonl"))


def test_streaming_reads_lazily(tmp_path):
    # The reader yields before it reaches a bad tail: it does not load the whole file first.
    p = write_lines(tmp_path, [GOOD, b"{broken"])
    it = read_records(p)
    assert next(it).query == "q"
    with pytest.raises(DataError, match=":2: invalid JSON"):
        next(it)


def recs(n):
    return [Record(query=f"q{i}", positive=f"p{i}") for i in range(n)]


def test_split_is_deterministic_and_dedups():
    data = recs(500)
    a = split_records(data + data[:7], eval_fraction=0.2, seed=1)
    b = split_records(list(reversed(data)), eval_fraction=0.2, seed=1)
    assert a.duplicates == 7
    assert {r.query for r in a.eval} == {r.query for r in b.eval}
    assert 50 < len(a.eval) < 150  # ~100 expected
    assert not {r.query for r in a.eval} & {r.query for r in a.train}


def test_split_same_query_same_side():
    data = [Record(query="same", positive=f"p{i}") for i in range(20)]
    s = split_records(data, eval_fraction=0.5)
    assert len(s.train) in (0, 20)


def test_split_to_files_matches_in_memory(tmp_path):
    data = recs(200)
    counts = split_to_files(data, tmp_path / "train.jsonl", tmp_path / "eval.jsonl", 0.25, seed=3)
    mem = split_records(data, 0.25, seed=3)
    assert counts.train == len(mem.train) and counts.eval == len(mem.eval)
    assert [r.query for r in read_records(tmp_path / "eval.jsonl")] == [r.query for r in mem.eval]


def test_the_demo_records_hold_no_memory_address():
    from vembed.data.demo_data import docstring_pairs

    # `fallback=<object object at 0x7f...>` would make the data, and every run on it, differ per process.
    records = list(docstring_pairs())
    assert len(records) > 1000
    assert not [r.positive for r in records if re.search(r" at 0x[0-9a-fA-F]+", r.positive)]
    assert any("=<object object>" in r.positive for r in records)  # such defaults are still shown

"""The prepare step: raw JSONL (local or s3://) -> validated, deduplicated, split dataset directory."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import S3Server, assert_manifest_covers, put_object
from vembed.artifacts import storage
from vembed.cli import main as cli_main
from vembed.errors import ConfigError, DataError
from vembed.pipeline.steps.prepare import latest_snapshot, prepare


def pairs(start: int, n: int) -> list[dict[str, str]]:
    return [{"query": f"how do I do task {i}?", "positive": f"Task {i} is done with tool {i % 7}."} for i in range(start, start + n)]


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def dataset_rows(out: Path) -> tuple[list[dict], list[dict]]:
    return read_jsonl(out / "train.jsonl"), read_jsonl(out / "eval.jsonl")


@pytest.fixture
def bucket(s3_env: S3Server) -> str:
    name = f"prep-{uuid.uuid4().hex[:12]}"
    s3_env.client().create_bucket(Bucket=name)
    return name


def test_local_file(tmp_path: Path) -> None:
    rows = pairs(0, 120)
    dups = [rows[3], rows[50], rows[50]]
    raw = tmp_path / "raw.jsonl"
    raw.write_text(jsonl(rows[:60] + dups + rows[60:]))

    stats = prepare(str(raw), str(tmp_path / "ds"), eval_fraction=0.2, seed=1)

    out = tmp_path / "ds"
    assert sorted(p.name for p in out.iterdir()) == ["eval.jsonl", "manifest.json", "stats.json", "train.jsonl"]
    assert_manifest_covers(out)  # manifest covers every file
    train, held = dataset_rows(out)
    assert stats["records"] == len(rows) + len(dups)
    assert stats["duplicates"] == len(dups)
    assert (stats["train"], stats["eval"]) == (len(train), len(held))
    assert stats["train"] + stats["eval"] + stats["duplicates"] == stats["records"]
    assert sorted(map(json.dumps, train + held)) == sorted(map(json.dumps, rows))  # every unique record, once
    assert 0 < len(held) < len(train)
    assert stats["source_sha256"] == hashlib.sha256(raw.read_bytes()).hexdigest()
    assert stats["skipped"] == {} and stats["skipped_total"] == 0
    on_disk = json.loads((out / "stats.json").read_text())
    assert on_disk == {k: v for k, v in stats.items() if k not in ("output", "dataset_sha256")}
    assert stats["dataset_sha256"] == storage.manifest_sha256(str(out))


def test_split_is_deterministic(tmp_path: Path) -> None:
    raw = tmp_path / "raw.jsonl"
    raw.write_text(jsonl(pairs(0, 200)))
    prepare(str(raw), str(tmp_path / "a"), eval_fraction=0.25, seed=7)
    prepare(str(raw), str(tmp_path / "b"), eval_fraction=0.25, seed=7)
    prepare(str(raw), str(tmp_path / "c"), eval_fraction=0.25, seed=8)
    for name in ("train.jsonl", "eval.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    # The seed is what decides: another seed moves records (so the check above can fail).
    assert (tmp_path / "a" / "eval.jsonl").read_bytes() != (tmp_path / "c" / "eval.jsonl").read_bytes()


def test_rerun_into_the_raw_folder_does_not_read_its_own_output(tmp_path: Path, bucket: str) -> None:
    """An output inside the raw folder/prefix: the rerun read the first run's train/eval.jsonl as raw data
    (records and duplicates doubled, another source_sha256; mined negatives would have become new records)."""
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.jsonl").write_text(jsonl(pairs(0, 40)))
    put_object(f"s3://{bucket}/raw/a.jsonl", jsonl(pairs(0, 40)).encode())
    for raw_uri, out in ((str(raw), str(raw / "ds")), (f"s3://{bucket}/raw/", f"s3://{bucket}/raw/ds")):
        first = prepare(raw_uri, out, eval_fraction=0.2)
        again = prepare(raw_uri, out, eval_fraction=0.2)
        assert [f["uri"] for f in again["source_files"]] == [f["uri"] for f in first["source_files"]]
        assert (again["records"], again["duplicates"]) == (first["records"], first["duplicates"]) == (40, 0)
        assert again["dataset_sha256"] == first["dataset_sha256"]


def test_s3_prefix_of_several_files(bucket: str, tmp_path: Path) -> None:
    parts = {"raw/part-0.jsonl": pairs(0, 40), "raw/part-1.jsonl": pairs(40, 40) + pairs(0, 5), "raw/sub/part-2.jsonl": pairs(80, 30)}
    body = {key: jsonl(rows).encode() for key, rows in parts.items()}
    for key, data in body.items():
        put_object(f"s3://{bucket}/{key}", data)
    put_object(f"s3://{bucket}/raw/_SUCCESS", b"")  # not JSONL: ignored
    put_object(f"s3://{bucket}/raw-old/part-9.jsonl", b"{not json")  # another prefix: ignored

    stats = prepare(f"s3://{bucket}/raw", f"s3://{bucket}/datasets/v1", eval_fraction=0.2, seed=3)

    assert [f["uri"] for f in stats["source_files"]] == [f"s3://{bucket}/{k}" for k in sorted(parts)]
    assert stats["records"] == sum(len(r) for r in parts.values())
    assert stats["duplicates"] == 5
    ordered = b"".join(body[k] for k in sorted(parts))
    assert stats["source_sha256"] == hashlib.sha256(ordered).hexdigest()

    local = storage.materialize(f"s3://{bucket}/datasets/v1", cache_dir=tmp_path / "cache")
    train, held = dataset_rows(local)
    assert (len(train), len(held)) == (stats["train"], stats["eval"])

    # The same files prepared from a local directory give the very same split.
    for key, data in body.items():
        (tmp_path / "raw-local" / key).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "raw-local" / key).write_bytes(data)
    prepare(str(tmp_path / "raw-local" / "raw"), str(tmp_path / "ds"), eval_fraction=0.2, seed=3)
    assert dataset_rows(tmp_path / "ds") == (train, held)


def test_bad_records_error_names_s3_uri_and_line_and_writes_nothing(bucket: str) -> None:
    rows = jsonl(pairs(0, 3)).splitlines()
    put_object(f"s3://{bucket}/raw/a.jsonl", jsonl(pairs(10, 20)))
    put_object(f"s3://{bucket}/raw/b.jsonl", "\n".join([rows[0], rows[1], '{"query": "no positive"}', rows[2]]) + "\n")
    prepare(f"s3://{bucket}/raw/a.jsonl", f"s3://{bucket}/ds")  # an existing dataset
    before = storage.read_bytes(f"s3://{bucket}/ds/manifest.json")

    with pytest.raises(DataError) as exc:
        prepare(f"s3://{bucket}/raw", f"s3://{bucket}/ds")
    message = str(exc.value)
    assert message.startswith(f"s3://{bucket}/raw/b.jsonl:3: missing field 'positive'"), message
    assert "\n" not in message
    assert storage.read_bytes(f"s3://{bucket}/ds/manifest.json") == before  # the old dataset is untouched


def test_skip_mode_counts_by_reason(bucket: str) -> None:
    good = pairs(0, 30)
    lines = [json.dumps(r) for r in good[:10]]
    lines += ["{broken json", '{"query": "q"}', '{"query": 5, "positive": "p"}', '["a list"]', '{"query": " ", "positive": "p"}']
    lines += [json.dumps(r) for r in good[10:]]
    put_object(f"s3://{bucket}/raw/a.jsonl", "\n".join(lines) + "\n")
    put_object(f"s3://{bucket}/raw/b.jsonl", b"")  # an empty part file, as Spark writes them

    stats = prepare(f"s3://{bucket}/raw", f"s3://{bucket}/ds", on_bad_record="skip")

    assert stats["records"] == len(good)
    assert stats["skipped"] == {"wrong type": 2, "invalid JSON": 1, "missing field": 1, "empty field": 1, "empty file": 1}
    assert stats["skipped_total"] == 6
    assert stats["skipped_examples"][0] == f"s3://{bucket}/raw/a.jsonl:11: invalid JSON: Expecting property name enclosed in double quotes (column 2)"
    assert all(e.startswith(f"s3://{bucket}/raw/") for e in stats["skipped_examples"])

    with pytest.raises(DataError, match=r"/raw/a\.jsonl:11: invalid JSON"):
        prepare(f"s3://{bucket}/raw", f"s3://{bucket}/ds2")  # error mode (the default) stops at the first one
    with pytest.raises(DataError, match=r"/raw/b\.jsonl:1: file is empty"):
        prepare(f"s3://{bucket}/raw/b.jsonl", f"s3://{bucket}/ds2")
    assert not storage.exists(f"s3://{bucket}/ds2")


def test_latest_snapshot_local_and_s3(bucket: str, tmp_path: Path) -> None:
    for day, start in (("dt=2024-01-01", 0), ("dt=2024-02-10", 100), ("dt=2023-12-31", 200)):
        (tmp_path / "raw" / day).mkdir(parents=True)
        (tmp_path / "raw" / day / "part-0.jsonl").write_text(jsonl(pairs(start, 20)))
        put_object(f"s3://{bucket}/raw/{day}/part-0.jsonl", jsonl(pairs(start, 20)))
    (tmp_path / "raw" / "tmp-backfill").mkdir()  # not a snapshot name
    put_object(f"s3://{bucket}/raw/zzz/part-0.jsonl", "{bad")

    assert latest_snapshot(str(tmp_path / "raw")) == str(tmp_path / "raw" / "dt=2024-02-10")
    assert latest_snapshot(f"s3://{bucket}/raw") == f"s3://{bucket}/raw/dt=2024-02-10/"

    stats = prepare(f"s3://{bucket}/raw/latest", str(tmp_path / "ds"))
    assert stats["source"] == f"s3://{bucket}/raw/dt=2024-02-10/"
    assert stats["records"] == 20
    train, held = dataset_rows(tmp_path / "ds")
    assert {r["query"] for r in train + held} == {r["query"] for r in pairs(100, 20)}

    local = prepare(str(tmp_path / "raw" / "latest"), str(tmp_path / "ds2"))
    assert local["source"] == str(tmp_path / "raw" / "dt=2024-02-10")

    with pytest.raises(DataError, match="no dt=YYYY-MM-DD/ snapshot"):
        latest_snapshot(str(tmp_path / "raw" / "dt=2024-01-01"))


def test_local_images_are_copied_into_the_dataset(bucket: str, tmp_path: Path) -> None:
    rows = [{"query": f"a photo of {i}", "positive_image": f"img/{i}.png"} for i in range(6)]
    (tmp_path / "raw" / "img").mkdir(parents=True)
    for i in range(6):
        Image.new("RGB", (4, 4), (i, 0, 0)).save(tmp_path / "raw" / "img" / f"{i}.png")
    (tmp_path / "raw" / "data.jsonl").write_text(jsonl(rows))
    put_object(f"s3://{bucket}/raw/data.jsonl", jsonl(rows))

    local = prepare(str(tmp_path / "raw" / "data.jsonl"), str(tmp_path / "ds"), eval_fraction=0.0)
    assert local["images_rebased"] == len(rows)
    train, _ = dataset_rows(tmp_path / "ds")
    # dataset-relative copies: the dataset stays valid wherever it is stored
    copied = sorted((tmp_path / "ds" / r["positive_image"]).read_bytes() for r in train)
    assert copied == sorted((tmp_path / "raw" / "img" / f"{i}.png").read_bytes() for i in range(6))
    assert all(r["positive_image"].startswith("images/") for r in train)
    assert_manifest_covers(str(tmp_path / "ds"))  # the copies are in the manifest

    prepare(f"s3://{bucket}/raw/data.jsonl", str(tmp_path / "ds-s3"), eval_fraction=0.0)
    train, _ = dataset_rows(tmp_path / "ds-s3")
    assert sorted(r["positive_image"] for r in train) == sorted(f"s3://{bucket}/raw/{r['positive_image']}" for r in rows)


def test_absolute_image_path_in_an_s3_data_file_names_line(bucket: str, tmp_path: Path) -> None:
    """It became s3://BUCKET//abs/x.png, and prepare succeeded; training failed on it later."""
    rows = [{"query": "q", "positive_image": "img/0.png"}, {"query": "r", "positive_image": "/abs/x.png"}]
    put_object(f"s3://{bucket}/raw/data.jsonl", jsonl(rows))
    with pytest.raises(DataError, match=rf"^s3://{bucket}/raw/data\.jsonl:2: .*'/abs/x\.png' is a local absolute path"):
        prepare(f"s3://{bucket}/raw/data.jsonl", str(tmp_path / "ds"))
    assert not (tmp_path / "ds").exists()


def test_s3_image_uri_in_an_s3_data_file_stays_as_it_is(bucket: str, tmp_path: Path) -> None:
    """It was joined to the data file's prefix: s3://BUCKET/raw/s3:/other/img/0.png."""
    put_object(f"s3://{bucket}/raw/data.jsonl", jsonl([{"query": "q", "positive_image": "s3://other/img/0.png"}]))
    prepare(f"s3://{bucket}/raw/data.jsonl", str(tmp_path / "ds"), eval_fraction=0.0)
    assert [r["positive_image"] for r in read_jsonl(tmp_path / "ds" / "train.jsonl")] == ["s3://other/img/0.png"]


def test_missing_or_escaping_image_names_line(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    (tmp_path / "secret.png").write_bytes(b"x")
    Image.new("RGB", (4, 4)).save(raw / "a.png")
    (raw / "text.png").write_text("not pixels")  # passed prepare; the training step failed on it
    # a name too long was a StorageError naming neither the data file nor its line
    for bad, reason in (("missing.png", "not found"), ("../secret.png", "outside"), ("a" * 300 + ".png", "cannot be read"),
                        ("text.png", "not an image file")):
        (raw / "d.jsonl").write_text(jsonl([{"query": "q", "positive_image": "a.png"}, {"query": "r", "positive_image": bad}]))
        with pytest.raises(DataError, match=rf"d\.jsonl:2: .*{reason}"):
            prepare(str(raw / "d.jsonl"), str(tmp_path / "ds"))
        assert not (tmp_path / "ds").exists()


def test_a_complete_directory_that_is_not_a_dataset_is_not_replaced(tmp_path: Path, bucket: str) -> None:
    """A merged model (or any directory with a manifest) given as the output was replaced by the dataset."""
    from vembed.artifacts.integrity import write_manifest
    from vembed.errors import StorageError

    model = tmp_path / "merged"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights")
    write_manifest(model)
    storage.upload_dir(str(model), f"s3://{bucket}/models/merged")
    raw = tmp_path / "raw.jsonl"
    raw.write_text(jsonl(pairs(0, 5)))
    for out in (str(model), f"s3://{bucket}/models/merged"):
        with pytest.raises(StorageError, match=rf"^{out}: .*not a prepared dataset"):
            prepare(str(raw), out)
        assert sorted(e["path"] for e in storage.read_manifest(out)["files"]) == ["model.safetensors"]
    assert sorted(p.name for p in model.iterdir()) == ["manifest.json", "model.safetensors"]


def test_skip_mode_counts_missing_images_by_reason(tmp_path: Path) -> None:
    """Counted as 'rejected' in stats.json, where the training reader says 'missing image'."""
    raw = tmp_path / "raw"
    raw.mkdir()
    Image.new("RGB", (4, 4)).save(raw / "a.png")
    Image.new("RGB", (4, 4), (9, 9, 9)).save(raw / "b.png")
    rows = [{"query": "q", "positive_image": "a.png"}, {"query": "r", "positive_image": "gone.png"},
            {"query_image": "b.png", "positive_image": "gone.png"}]
    (raw / "d.jsonl").write_text(jsonl(rows))
    stats = prepare(str(raw / "d.jsonl"), str(tmp_path / "ds"), eval_fraction=0.0, on_bad_record="skip")
    assert (stats["train"], stats["skipped"]) == (1, {"missing image": 2})
    # the skipped record's query image (b.png) was copied into the dataset too, used by no record
    [kept] = read_jsonl(tmp_path / "ds" / "train.jsonl")
    assert [p.name for p in (tmp_path / "ds" / "images").iterdir()] == [Path(kept["positive_image"]).name]


def test_argument_and_input_errors(tmp_path: Path) -> None:
    raw = tmp_path / "raw.jsonl"
    raw.write_text(jsonl(pairs(0, 5)))
    with pytest.raises(ConfigError, match="eval_fraction"):
        prepare(str(raw), str(tmp_path / "ds"), eval_fraction=1.0)
    with pytest.raises(ConfigError, match="on_bad_record"):
        prepare(str(raw), str(tmp_path / "ds"), on_bad_record="ignore")
    with pytest.raises(DataError, match="raw data not found"):
        prepare(str(tmp_path / "missing.jsonl"), str(tmp_path / "ds"))
    (tmp_path / "empty-dir").mkdir()
    with pytest.raises(DataError, match=r"no \*\.jsonl files"):
        prepare(str(tmp_path / "empty-dir"), str(tmp_path / "ds"))
    assert not (tmp_path / "ds").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty-dir", "raw.jsonl"]  # no temp dirs left


def test_cli_prepare(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = tmp_path / "raw.jsonl"
    raw.write_text(jsonl(pairs(0, 50)) + "not json\n")
    assert cli_main(["prepare", str(raw), str(tmp_path / "ds"), "--on-bad-record", "skip", "--seed", "2"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["records"] == 50 and printed["skipped"] == {"invalid JSON": 1}
    assert cli_main(["prepare", str(raw), str(tmp_path / "ds2")]) == 2
    assert f"{raw}:51: invalid JSON" in capsys.readouterr().err

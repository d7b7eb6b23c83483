"""Image data: path resolution and escapes, bad images reported as path:line, decompression
bombs, retrieval modes, s3:// images, and the synthetic image-caption set."""

import io
import json
import os
import struct
import warnings
import zlib

import pytest
from PIL import Image

from tests.support.synthetic_images import COLOURS, write_image_caption_set
from vembed.data import ReadStats, Record, read_records
from vembed.data.images import (
    ImageError,
    RecordImages,
    apply_retrieval_mode,
    check_image,
    detect_retrieval_mode,
    load_image,
    resolve_image_path,
)
from vembed.errors import DataError


def save_png(path, size=(16, 16), colour=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels and holds none: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def truncated(image_format: str) -> bytes:
    buf = io.BytesIO()
    Image.effect_noise((128, 128), 64).convert("RGB").save(buf, image_format)
    data = buf.getvalue()
    return data[: int(len(data) * 0.7)]


def test_image_paths_resolve_relative_to_the_data_file(tmp_path):
    save_png(tmp_path / "data" / "imgs" / "a.png")
    data = write_jsonl(tmp_path / "data" / "train.jsonl", [{"query": "red", "positive_image": "imgs/a.png"}])
    [record] = read_records(data, transform=RecordImages(data.parent))
    assert record.positive_image == str(tmp_path / "data" / "imgs" / "a.png")
    assert resolve_image_path("s3://bucket/x.png", tmp_path) == "s3://bucket/x.png"


@pytest.mark.parametrize("image_path", ["../../etc/passwd", "/etc/passwd", "imgs/../../secret.png", "link.png"])
def test_image_path_escaping_the_data_root_is_refused_with_its_line(tmp_path, image_path):
    root = tmp_path / "data"
    save_png(tmp_path / "secret.png")
    save_png(root / "ok.png")
    os.symlink(tmp_path / "secret.png", root / "link.png")  # a link inside that points outside
    data = write_jsonl(root / "train.jsonl", [{"query": "fine", "positive_image": "ok.png"},
                                              {"query": "escape", "positive_image": image_path}])
    with pytest.raises(DataError, match=rf"train.jsonl:2: image '{image_path}' is outside the data directory"):
        list(read_records(data, transform=RecordImages(root)))


def test_image_symlink_loop_is_reported_with_its_line(tmp_path):
    """Was a 'RuntimeError: Symlink loop' traceback, in the training reader and in prepare."""
    from vembed.pipeline.steps.prepare import prepare

    root = tmp_path / "data"
    save_png(root / "ok.png")
    os.symlink("loop.png", root / "loop.png")
    data = write_jsonl(root / "train.jsonl", [{"query": "fine", "positive_image": "ok.png"},
                                              {"query": "loop", "positive_image": "loop.png"}])
    with pytest.raises(DataError, match=rf"^{data}:2: image 'loop.png' cannot be resolved"):
        list(read_records(data, transform=RecordImages(root)))
    with pytest.raises(DataError, match=rf"^{data}:2: image 'loop.png' cannot be resolved"):
        prepare(str(data), str(tmp_path / "ds"))


def test_eval_split_of_image_queries_does_not_depend_on_where_the_data_lives(tmp_path):
    """eval_split hashed the resolved absolute image path: a moved data directory (another machine, a
    resumed run) held out other records, so eval records leaked into training."""
    import shutil

    from vembed.data.split import is_eval

    first = tmp_path / "a" / "data"
    for i in range(40):
        save_png(first / "img" / f"{i}.png", colour=(i, 0, 0))
    write_jsonl(first / "train.jsonl", [{"query_image": f"img/{i}.png", "positive": f"caption {i}"} for i in range(40)])
    moved = shutil.copytree(first, tmp_path / "moved" / "elsewhere")

    def held_out(root):
        records = read_records(root / "train.jsonl", transform=RecordImages(root))
        return [r.positive for r in records if is_eval(r, 0.25, seed=0, root=root)]

    assert 0 < len(held_out(first)) < 40
    assert held_out(first) == held_out(moved)


def test_images_outside_the_data_root_when_the_config_allows_it(tmp_path):
    outside = save_png(tmp_path / "shared" / "a.png")
    root = tmp_path / "data"
    root.mkdir()
    data = write_jsonl(root / "train.jsonl", [{"query": "a", "positive_image": "../shared/a.png"},
                                              {"query": "b", "positive_image": str(outside)}])
    records = list(read_records(data, transform=RecordImages(root, allow_outside=True)))
    assert [r.positive_image for r in records] == [str(outside), str(outside)]


@pytest.mark.parametrize(
    "name, content, reason",
    [
        ("gone.png", None, "not found"),
        ("notes.png", b"just some text, not pixels", "is not an image file"),
        ("cut.png", truncated("PNG"), "is corrupt or truncated"),
        ("cut.jpg", truncated("JPEG"), "is corrupt or truncated"),
        ("bomb.png", png_header_only(100_000, 100_000), "decompression bomb"),
        ("a" * 300 + ".png", None, r"cannot be read \(File name too long\)"),  # was an OSError traceback
    ],
)
def test_bad_images_are_reported_with_the_data_file_line(tmp_path, name, content, reason):
    save_png(tmp_path / "ok.png")
    if content is not None:
        (tmp_path / name).write_bytes(content)
    data = write_jsonl(tmp_path / "train.jsonl", [{"query": "fine", "positive_image": "ok.png"},
                                                  {"query": "bad", "positive_image": name}])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clear error, never PIL's DecompressionBombWarning
        with pytest.raises(DataError, match=rf"^{data}:2: image '{name}' .*{reason}"):
            list(read_records(data, transform=RecordImages(tmp_path)))


def test_bad_images_are_skipped_and_counted_in_skip_mode(tmp_path):
    save_png(tmp_path / "ok.png")
    (tmp_path / "notes.png").write_text("text")
    data = write_jsonl(tmp_path / "train.jsonl", [
        {"query": "a", "positive_image": "ok.png"},
        {"query": "b", "positive_image": "gone.png"},
        {"query": "c", "positive_image": "notes.png"},
        {"query": "d", "positive_image": "../escape.png"},
    ])
    stats = ReadStats()
    records = list(read_records(data, on_bad_record="skip", stats=stats, transform=RecordImages(tmp_path)))
    assert [r.query for r in records] == ["a"]
    assert stats.skipped == {"missing image": 1, "not an image": 1, "image outside data root": 1}
    assert stats.examples[0].startswith(f"{data}:2: ")


def test_decoding_checks_the_pixel_limit_before_pixels_are_decoded(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_only(9000, 9000))  # under PIL's own warning limit, over ours
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageError, match="9000x9000 = 81000000 pixels, more than the limit"):
            load_image(str(bomb))
    small = save_png(tmp_path / "small.png", size=(20, 10))
    with pytest.raises(ImageError, match="more than the limit of 100"):
        check_image(str(small), max_pixels=100)
    with pytest.raises(ImageError, match="more than the limit of 100"):
        load_image(Image.open(small), max_pixels=100)
    assert load_image(str(small)).mode == "RGB"


def test_truncated_jpeg_also_fails_at_decode_time(tmp_path):
    (tmp_path / "cut.jpg").write_bytes(truncated("JPEG"))
    with pytest.raises(ImageError, match="corrupt or truncated"):
        load_image(str(tmp_path / "cut.jpg"))


ALL_FIELDS = Record(query="caption", query_image="q.png", positive="caption text", positive_image="p.png",
                    negatives=("other text",), negative_images=("n.png",))


@pytest.mark.parametrize(
    "mode, kept",
    [
        ("t2t", {"query", "positive", "negatives"}),
        ("t2i", {"query", "positive_image", "negative_images"}),
        ("i2t", {"query_image", "positive", "negatives"}),
        ("i2i", {"query_image", "positive_image", "negative_images"}),
        ("auto", {"query", "query_image", "positive", "positive_image", "negatives", "negative_images"}),
    ],
)
def test_retrieval_mode_keeps_the_fields_it_uses(mode, kept):
    assert set(apply_retrieval_mode(ALL_FIELDS, mode).to_json()) == kept


def test_retrieval_mode_detected_from_fields_and_missing_fields_reported(tmp_path):
    assert detect_retrieval_mode(Record(query="q", positive_image="p.png")) == "t2i"
    assert detect_retrieval_mode(Record(query_image="q.png", positive="p")) == "i2t"
    assert detect_retrieval_mode(Record(query="q", positive="p")) == "t2t"
    assert detect_retrieval_mode(Record(query="q", query_image="q.png", positive="p")) == "mixed"
    data = write_jsonl(tmp_path / "train.jsonl", [{"query": "text only", "positive": "also text"}])
    with pytest.raises(DataError, match=r"train.jsonl:1: retrieval_mode t2i needs field 'positive_image'"):
        list(read_records(data, transform=RecordImages(tmp_path, retrieval_mode="t2i")))


def test_s3_images_are_kept_as_uris_and_read_through_storage(s3_env, tmp_path):
    client = s3_env.client()
    client.create_bucket(Bucket="images")
    buf = io.BytesIO()
    Image.new("RGB", (12, 8), (0, 0, 255)).save(buf, "PNG")
    client.put_object(Bucket="images", Key="set/blue.png", Body=buf.getvalue())
    client.put_object(Bucket="images", Key="set/notes.png", Body=b"not an image")
    data = write_jsonl(tmp_path / "train.jsonl", [{"query": "blue", "positive_image": "s3://images/set/blue.png"}])
    [record] = read_records(data, transform=RecordImages(tmp_path))
    assert record.positive_image == "s3://images/set/blue.png"
    image = load_image(record.positive_image)
    assert image.size == (12, 8) and image.getpixel((0, 0)) == (0, 0, 255)
    with pytest.raises(ImageError, match="s3://images/set/notes.png' is not an image file"):
        load_image("s3://images/set/notes.png")
    # relative paths under an s3:// data root stay under it
    assert resolve_image_path("a/b.png", "s3://images/set") == "s3://images/set/a/b.png"
    with pytest.raises(ImageError, match="outside the data directory"):
        resolve_image_path("../../other/x.png", "s3://images/set")


def test_synthetic_image_caption_set_draws_what_the_captions_say(tmp_path):
    info = write_image_caption_set(tmp_path, per_caption=2, size=32, seed=3)
    train = [json.loads(line) for line in info["train"].read_text().splitlines()]
    held_out = [json.loads(line) for line in info["eval"].read_text().splitlines()]
    assert (info["n_train"], info["n_eval"]) == (96, 48)
    assert len({r["query"] for r in held_out}) == 48  # one image per caption: chance Recall@1 is 1/48
    assert not {r["positive_image"] for r in train} & {r["positive_image"] for r in held_out}
    for record in held_out:
        image = Image.open(tmp_path / record["positive_image"]).convert("RGB")
        assert image.size == (32, 32)
        colour = next(c for c in COLOURS if f" {c} " in record["query"])
        # the most saturated pixel sits in the described half and has the described hue
        x, y, pixel = max(((x, y, image.getpixel((x, y))) for x in range(32) for y in range(32)),
                          key=lambda t: max(t[2]) - min(t[2]))
        target = COLOURS[colour]
        assert sum(abs(a - b) for a, b in zip(pixel, target, strict=True)) < 80, (record, pixel)
        if "left" in record["query"]:
            assert x < 16
        elif "right" in record["query"]:
            assert x >= 16
        elif "top" in record["query"]:
            assert y < 16
        else:
            assert y >= 16

"""A synthetic image-caption retrieval set drawn with PIL: coloured shapes at positions, and
captions that describe them ("a red circle on the left").

4 colours x 3 shapes x 4 positions = 48 captions. Each image is drawn with its own jitter (size,
exact place, background tint, noise), so the held-out eval images are new drawings of the
captions seen in training. Eval has one image per caption, so t2i Recall@1 by chance is 1/48.

    python -m tests.support.synthetic_images OUT_DIR [--per-caption 4] [--size 32] [--all-fields]
"""

from __future__ import annotations

import argparse
import random
from itertools import product
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from vembed.data.records import Record, write_records

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 205, 30)}
SHAPES = ("circle", "square", "triangle")
# Where the shape's centre goes, as fractions of the image size.
POSITIONS = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73)}


def captions() -> list[tuple[str, str, str]]:
    return list(product(COLOURS, SHAPES, POSITIONS))


def caption_text(colour: str, shape: str, position: str) -> str:
    where = f"on the {position}" if position in ("left", "right") else f"at the {position}"
    return f"a {colour} {shape} {where}"


def draw(colour: str, shape: str, position: str, size: int = 32, rng: random.Random | None = None) -> Image.Image:
    rng = rng or random.Random(0)
    grey = rng.randint(200, 245)
    image = Image.new("RGB", (size, size), (grey, grey + rng.randint(-8, 8), grey + rng.randint(-8, 8)))
    pixels = image.load()
    for _ in range(size * size // 8):  # speckle noise, so no two drawings are identical
        x, y = rng.randrange(size), rng.randrange(size)
        v = rng.randint(150, 255)
        pixels[x, y] = (v, v, v)
    fx, fy = POSITIONS[position]
    cx = fx * size + rng.uniform(-0.05, 0.05) * size
    cy = fy * size + rng.uniform(-0.05, 0.05) * size
    r = size * rng.uniform(0.15, 0.21)
    fill = tuple(min(255, max(0, c + rng.randint(-20, 20))) for c in COLOURS[colour])
    pen = ImageDraw.Draw(image)
    if shape == "circle":
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        pen.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return image


def write_image_caption_set(
    out_dir: str | Path, per_caption: int = 4, size: int = 32, seed: int = 0, all_fields: bool = False
) -> dict[str, Any]:
    """images/*.png, train.jsonl (`per_caption` drawings of each caption) and eval.jsonl (one new
    drawing per caption). Records are {"query": caption, "positive_image": "images/..."};
    `all_fields` adds "positive" (the caption) and "query_image" (another drawing), so that
    retrieval_mode can pick t2i, i2t, i2i or t2t from one file."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    counter = 0

    def image_path(colour: str, shape: str, position: str) -> str:
        nonlocal counter
        counter += 1
        name = f"images/{counter:05d}_{colour}_{shape}_{position}.png"
        draw(colour, shape, position, size, rng).save(out / name)
        return name

    def record(colour: str, shape: str, position: str) -> Record:
        text = caption_text(colour, shape, position)
        extra = {"positive": text, "query_image": image_path(colour, shape, position)} if all_fields else {}
        return Record(query=text, positive_image=image_path(colour, shape, position), **extra)

    train = [record(*c) for c in captions() for _ in range(per_caption)]
    rng.shuffle(train)
    held_out = [record(*c) for c in captions()]
    n_train = write_records(train, out / "train.jsonl")
    n_eval = write_records(held_out, out / "eval.jsonl")
    return {"train": out / "train.jsonl", "eval": out / "eval.jsonl", "n_train": n_train, "n_eval": n_eval}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="write a synthetic image-caption retrieval set")
    parser.add_argument("out_dir")
    parser.add_argument("--per-caption", type=int, default=4, help="training drawings per caption")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--all-fields", action="store_true", help="also write positive text and a query image")
    args = parser.parse_args(argv)
    info = write_image_caption_set(args.out_dir, args.per_caption, args.size, args.seed, args.all_fields)
    print(f"{info['n_train']} train / {info['n_eval']} eval pairs in {args.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

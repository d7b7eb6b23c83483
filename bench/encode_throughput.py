"""Encoding throughput: vembed's Predictor.encode_text vs SentenceTransformer.encode.

    .venv/bin/python -m bench.encode_throughput [--repeats 3] [--texts 5000] [--batch-size 32]

Same model (all-MiniLM-L6-v2, its own max_seq_length 256), same texts (mixed length, from the
demo data), same batch size, 2 threads; each run a fresh process, alternating A B A B. Checks that
the embeddings agree (max abs diff) and writes bench/results/encode_throughput.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from bench.common import (
    alternate,
    entry,
    machine,
    md_table,
    median,
    minilm_path,
    peak_rss_mib,
    report,
)


def mixed_texts(n: int) -> list[str]:
    """Queries (short), documents (long) and their pieces, in a fixed shuffled order."""
    import random

    from vembed.data.demo_data import docstring_pairs

    pool: list[str] = []
    for r in docstring_pairs():
        words = r.positive.split()
        signature = r.positive.split(":", 1)[0]
        pool += [r.query, r.positive, signature, " ".join(words[: len(words) // 3]), f"{r.query} {r.positive} {r.positive}"]
    random.Random(0).shuffle(pool)
    if len(pool) < n:
        raise SystemExit(f"only {len(pool)} texts available, asked for {n}")
    return pool[:n]


def padded_tokens(token_counts: list[int], key: Callable[[int], float], batch_size: int) -> int:
    """Tokens the model computes, padding included, when batches follow the texts sorted by `key`."""
    order = sorted(range(len(token_counts)), key=key)
    return sum(
        max(token_counts[i] for i in order[k : k + batch_size]) * len(order[k : k + batch_size])
        for k in range(0, len(order), batch_size)
    )


def child(tool: str, texts_file: str, batch_size: int, save: str) -> dict[str, Any]:
    """Encode the texts in `texts_file` (a JSON list) with `tool`; the embeddings go to `save` (.npy)."""
    import numpy as np

    # One list for both contenders: some signatures show object addresses, which differ per process.
    texts = json.loads(Path(texts_file).read_text())
    model = minilm_path()
    start = time.perf_counter()
    if tool == "vembed":
        from vembed.inference.predictor import Predictor

        predictor = Predictor(model, device="cpu")
        encode, max_len = predictor.encode_text, predictor.spec.max_seq_length
    else:
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(model, device="cpu")
        encode, max_len = partial(st.encode, convert_to_numpy=True), st.max_seq_length
    loaded = time.perf_counter()
    emb = encode(texts, batch_size=batch_size)
    done = time.perf_counter()
    np.save(save, emb)
    return {
        "texts_per_s": len(texts) / (done - loaded),
        "encode_s": done - loaded,
        "load_s": loaded - start,
        "peak_rss_mib": peak_rss_mib(),
        "max_seq_length": max_len,
        "dim": int(emb.shape[1]),
    }


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--texts", type=int, default=5000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--name", default="encode_throughput")
    a = p.parse_args(argv)
    import numpy as np
    from transformers import AutoTokenizer

    info = machine()
    texts = mixed_texts(a.texts)
    tok = AutoTokenizer.from_pretrained(minilm_path())
    token_counts = [len(ids) for ids in tok(texts, truncation=True, max_length=256)["input_ids"]]
    lengths = sorted(token_counts)
    orders = {"by tokens (vembed)": lambda i: -token_counts[i], "by characters (sentence-transformers)": lambda i: -len(texts[i])}
    padded = {label: padded_tokens(token_counts, key, a.batch_size) for label, key in orders.items()}
    out = Path(tempfile.mkdtemp(prefix="encode-bench-"))
    (out / "texts.json").write_text(json.dumps(texts))
    common = {"texts_file": str(out / "texts.json"), "batch_size": a.batch_size}
    contenders = {tool: {"tool": tool, **common, "save": str(out / f"{tool}.npy")} for tool in ("vembed", "st")}
    print(f"encoding throughput, {a.repeats} x (vembed, sentence-transformers), {a.texts} texts")
    runs = alternate("bench.encode_throughput", contenders, a.repeats)
    diff = float(np.abs(np.load(out / "vembed.npy") - np.load(out / "st.npy")).max())
    shutil.rmtree(out, ignore_errors=True)
    v, s = runs["vembed"], runs["st"]
    rows = [
        [label, median(r, "texts_per_s"), median(r, "encode_s"), median(r, "peak_rss_mib"), r[0]["max_seq_length"]]
        for label, r in (("vembed Predictor.encode_text", v), ("SentenceTransformer.encode", s))
    ]
    speed = median(v, "texts_per_s") / median(s, "texts_per_s")
    pct = [lengths[int(q * (len(lengths) - 1))] for q in (0.1, 0.5, 0.9)]
    report(
        a.name,
        [
            f"{a.texts} texts, tokens per text: 10th percentile {pct[0]}, median {pct[1]}, 90th percentile "
            f"{pct[2]}, max {lengths[-1]} (truncated at 256); batch size {a.batch_size}. "
            f"Medians of {a.repeats} alternating runs.",
            md_table(["encoder", "texts/s", "encode s", "peak RSS MiB", "max_seq_length"], rows),
            f"**vembed / sentence-transformers: {speed:.2f}x texts/s; max abs difference of the embeddings "
            f"{diff:.2e}.**",
            "Why: both sort the texts by length before batching, sentence-transformers by characters and "
            "vembed by tokens. Tokens computed per pass, padding included (real tokens: "
            f"{sum(token_counts)}):",
            md_table(["sorted", "tokens computed", "padding share"], [[k, v, f"{100 * (1 - sum(token_counts) / v):.1f}%"] for k, v in padded.items()]),
            "Each run:",
            md_table(
                ["run", "vembed texts/s", "ST texts/s", "load avg"],
                [[i + 1, x["texts_per_s"], y["texts_per_s"], y["load_avg_1m"]] for i, (x, y) in enumerate(zip(v, s, strict=True))],
            ),
        ],
        {"runs": runs, "speed_ratio": speed, "max_abs_diff": diff, "padded": padded},
        info,
    )


if __name__ == "__main__":
    entry(main, child)

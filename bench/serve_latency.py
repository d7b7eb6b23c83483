"""Serving latency and throughput: `vembed serve` (OpenAI client over HTTP) vs in-process
Predictor.encode_text vs SentenceTransformer.encode, all on all-MiniLM-L6-v2.

    nice -n 15 .venv/bin/python -m bench.serve_latency [--singles 200] [--batches 20] [--clients 4]

- Single texts: `--singles` sequential calls with one text each (after 10 warm-up calls); p50 and
  p99 latency per call.
- Batches: `--clients` concurrent clients (threads), each sending `--batches` batches of 32 texts;
  throughput in texts/s over the whole run.
Every contender gets 2 torch threads: the server in its own process (`vembed serve`, loopback),
the in-process ones in this process. Texts are the demo data's queries and documents.
Writes bench/results/serve_latency.{md,json}.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from bench.common import CHILD_ENV, REPO, THREADS, child_setup, machine, md_table, minilm_path, report

BATCH = 32


def texts_pool(n: int) -> list[str]:
    import random

    from vembed.data.demo_data import docstring_pairs

    pool = [t for r in docstring_pairs() for t in (r.query, r.positive)]
    random.Random(0).shuffle(pool)
    return (pool * (n // len(pool) + 1))[:n]


def measure(encode: Callable[[list[str]], object], texts: list[str], singles: int, batches: int, clients: int) -> dict:
    for t in texts[:10]:  # warm-up
        encode([t])
    lat = []
    for t in texts[:singles]:
        start = time.perf_counter()
        encode([t])
        lat.append((time.perf_counter() - start) * 1000)
    work = [texts[(i * BATCH) % len(texts) :][:BATCH] for i in range(batches * clients)]
    work = [w if len(w) == BATCH else texts[:BATCH] for w in work]

    def client(k: int) -> None:
        for w in work[k::clients]:
            encode(w)

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    elapsed = time.perf_counter() - start
    return {
        "p50_ms": statistics.median(lat),
        "p99_ms": statistics.quantiles(lat, n=100, method="inclusive")[98],
        "mean_ms": statistics.fmean(lat),
        "batch_texts_per_s": len(work) * BATCH / elapsed,
        "batch_s": elapsed,
    }


def start_server(model: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:  # a free port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, **CHILD_ENV, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "vembed.cli", "serve", model, "--port", str(port), "--device", "cpu"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"vembed serve exited: {proc.stderr.read()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("vembed serve did not become healthy in 180 s")


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--singles", type=int, default=200)
    p.add_argument("--batches", type=int, default=20, help="batches of 32 per client")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--name", default="serve_latency")
    a = p.parse_args(argv)
    child_setup()
    import numpy as np
    from openai import OpenAI
    from sentence_transformers import SentenceTransformer

    from vembed.inference.predictor import Predictor

    info = machine()
    model = minilm_path()
    texts = texts_pool(max(a.singles + 10, a.batches * a.clients * BATCH))
    results: dict[str, dict] = {}

    def run(name: str, encode: Callable[[list[str]], object]) -> None:
        print(f"{name} ...", flush=True)
        results[name] = measure(encode, texts, a.singles, a.batches, a.clients)

    proc, url = start_server(model)
    try:
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)

        def via_server(batch: list[str]) -> np.ndarray:
            return np.array([d.embedding for d in client.embeddings.create(model="minilm", input=batch).data])

        run("vembed serve + openai client", via_server)
        served = via_server(texts[:BATCH])
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    predictor = Predictor(model, device="cpu")
    run("Predictor.encode_text (in process)", lambda b: predictor.encode_text(b, batch_size=BATCH))
    diff = float(np.abs(served - predictor.encode_text(texts[:BATCH])).max())
    st = SentenceTransformer(model, device="cpu")
    run("SentenceTransformer.encode (in process)", lambda b: st.encode(b, batch_size=BATCH, convert_to_numpy=True))

    text = (f"all-MiniLM-L6-v2 on CPU, {THREADS} torch threads each. Single texts: {a.singles} sequential calls "
            f"(after 10 warm-up calls). Batches: {a.clients} concurrent clients x {a.batches} batches of {BATCH} "
            "texts each. The server runs in its own process on loopback, and the client is the official `openai` "
            "package (base64 floats, as it asks by default).")  # fmt: skip
    header = ["contender", "single text p50 (ms)", "single text p99 (ms)", f"batches of {BATCH}, {a.clients} clients (texts/s)"]
    rows = [[name, r["p50_ms"], r["p99_ms"], r["batch_texts_per_s"]] for name, r in results.items()]
    path = report(a.name, [
        "## Serving: `vembed serve` vs in-process Predictor vs SentenceTransformer.encode", text,
        md_table(header, rows), f"Served embeddings vs Predictor: max abs diff {diff:.2e}.",
        f"Reproduce: `nice -n 15 .venv/bin/python -m bench.serve_latency --singles {a.singles} "
        f"--batches {a.batches} --clients {a.clients}`",
    ], {"args": vars(a), "results": results, "max_abs_diff": diff}, info)  # fmt: skip
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main(sys.argv[1:])

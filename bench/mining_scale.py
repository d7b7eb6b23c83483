"""Memory and time of mining's exact chunked top-k, per 100k passages (synthetic unit vectors).

    nice -n 15 .venv/bin/python -m bench.mining_scale [--passages 100000,300000] [--queries 2000]

Each corpus size runs in a fresh child process: random unit vectors of dim 384 (all-MiniLM-L6-v2's),
`--queries` queries against the corpus on one torch thread, top-51 (ranks 10-50 plus the query's own positive), 16,384
passages per chunk and 1,024 queries per block (vembed.data.mining's defaults). Reports the search
time, the peak RSS and the corpus embeddings' own size. Encoding the passages is the model's
encoding throughput (the encoding section above). Writes bench/results/mining_scale.{md,json}.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from bench.common import emit, machine, machine_line, md_table, peak_rss_mib, run_child, save_report

DIM = 384


def child(passages: int, queries: int) -> None:
    import torch

    from vembed.data.mining import MiningSettings, chunked_topk

    torch.set_num_threads(1)  # one thread: the machine these figures come from is shared
    s = MiningSettings()
    g = torch.Generator().manual_seed(0)
    corpus = torch.nn.functional.normalize(torch.randn(passages, DIM, generator=g), dim=-1)
    q = torch.nn.functional.normalize(torch.randn(queries, DIM, generator=g), dim=-1)
    base_rss = peak_rss_mib()
    start = time.perf_counter()
    for b in range(0, queries, s.query_block):
        chunks = (corpus[i : i + s.chunk_size] for i in range(0, passages, s.chunk_size))
        chunked_topk(q[b : b + s.query_block], chunks, s.rank_end + 1)
    seconds = time.perf_counter() - start
    emit({"passages": passages, "queries": queries, "search_s": seconds, "peak_rss_mib": peak_rss_mib(),
          "rss_before_search_mib": base_rss, "corpus_mib": passages * DIM * 4 / 2**20})


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", action="store_true")
    p.add_argument("--passages", default="100000,300000")
    p.add_argument("--queries", type=int, default=2000)
    a = p.parse_args(argv)
    if a.child:
        child(int(a.passages), a.queries)
        return
    info = machine()
    rows, runs = [], []
    for n in (int(x) for x in a.passages.split(",")):
        r = run_child("bench.mining_scale", ["--passages", str(n), "--queries", str(a.queries)], timeout=3600)
        runs.append(r)
        per = r["search_s"] / (n / 1e5) / (a.queries / 1e3)
        rows.append([n, a.queries, r["search_s"], per, r["corpus_mib"], r["peak_rss_mib"] - r["rss_before_search_mib"], r["peak_rss_mib"]])
        print(rows[-1], flush=True)
    md = "\n\n".join([
        md_table(["passages", "queries", "search s", "s per 100k passages per 1k queries", "corpus embeddings MiB",
                  "extra peak RSS during search MiB", "peak RSS MiB"], rows),
        machine_line(info, os.getloadavg()),
    ])
    print(md)
    save_report("mining_scale", md, {"machine": info, "runs": runs})


if __name__ == "__main__":
    main(sys.argv[1:])

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
import time
from typing import Any

from bench.common import alternate, entry, machine, md_table, proc_rss_mib, report

DIM = 384


def _reset_peak() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM (the peak RSS) to the current RSS."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def child(passages: int, queries: int) -> dict[str, Any]:
    import torch

    from vembed.data.mining import MiningSettings, chunked_topk

    torch.set_num_threads(1)  # one thread: the machine these figures come from is shared
    s = MiningSettings()
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(queries, DIM, generator=g), dim=-1)
    start_rss = proc_rss_mib()
    corpus = torch.empty(passages, DIM)
    for i in range(0, passages, 10_000):  # filled in place: no full-size temporaries
        block = corpus[i : i + 10_000]
        block.normal_(generator=g)
        block.div_(block.norm(dim=-1, keepdim=True))
    base_rss = proc_rss_mib()
    _reset_peak()
    start = time.perf_counter()
    for b in range(0, queries, s.query_block):
        chunks = (corpus[i : i + s.chunk_size] for i in range(0, passages, s.chunk_size))
        chunked_topk(q[b : b + s.query_block], chunks, s.rank_end + 1)
    seconds = time.perf_counter() - start
    return {"passages": passages, "queries": queries, "search_s": seconds, "peak_rss_mib": proc_rss_mib("VmHWM"),
            "rss_before_search_mib": base_rss, "rss_before_corpus_mib": start_rss, "corpus_mib": passages * DIM * 4 / 2**20}  # fmt: skip


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--passages", default="100000,300000")
    p.add_argument("--queries", type=int, default=2000)
    a = p.parse_args(argv)
    info = machine(threads=1)
    sizes = {n: {"passages": n, "queries": a.queries} for n in map(int, a.passages.split(","))}
    runs = [r[0] for r in alternate("bench.mining_scale", sizes, 1, timeout=3600).values()]
    rows = []
    for r in runs:
        n = r["passages"]
        per = r["search_s"] / (n / 1e5) / (a.queries / 1e3)
        corpus_rss = r["rss_before_search_mib"] - r["rss_before_corpus_mib"]
        search_rss = r["peak_rss_mib"] - r["rss_before_search_mib"]
        rows.append([n, a.queries, r["search_s"], per, r["corpus_mib"], corpus_rss, search_rss, r["peak_rss_mib"]])
    report("mining_scale", [
        md_table(["passages", "queries", "search s", "s per 100k passages per 1k queries", "corpus embeddings MiB",
                  "RSS growth for the corpus MiB", "peak RSS growth during search MiB", "peak RSS MiB"], rows),
    ], {"runs": runs}, info)  # fmt: skip


if __name__ == "__main__":
    entry(main, child)

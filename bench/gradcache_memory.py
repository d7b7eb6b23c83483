"""GradCache memory: peak memory and time per sample at batch 32 vs 512 (chunk 32) on all-MiniLM-L6-v2.

    .venv/bin/python -m bench.gradcache_memory [--seq 64] [--plain-512]
    .venv/bin/python -m bench.gradcache_memory --chunk-sweep [--repeats 1]   # chunk sizes at batch 32

Every configuration runs one training step (after one warm-up step for the small batches) in a fresh
child process through vembed's own step functions (vembed.training.step / vembed.training.grad_cache). Memory
is the child's peak RSS (getrusage ru_maxrss: it sees torch's CPU allocations, which tracemalloc
does not) and the growth of that peak over the RSS once the model and the batches are ready, which
is what training itself needed. Timings on a shared 2-core machine are noisy; memory is the point.

The plain step at batch 512 is left out unless --plain-512: it keeps every activation of 1024
sequences and is estimated instead from the measured plain steps at batch 32 and 128.
Writes bench/results/gradcache_memory.{md,json}.

--chunk-sweep measures the guide's LoRA + GradCache recipe (batch 32) with chunk sizes 4, 8, 16 and 32
against the plain step, each in a fresh process, and writes bench/results/gradcache_chunks.{md,json}:
the figures behind the default `gradient_cache_chunk_size`.
"""

from __future__ import annotations

import argparse
import statistics
import time

from bench.common import (
    child_setup,
    demo_data,
    emit,
    entry,
    machine,
    md_table,
    minilm_path,
    proc_rss_mib,
    report,
    run_child,
)

CHUNK = 32


def child(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--grad-cache", action="store_true")
    p.add_argument("--chunk", type=int, default=CHUNK)
    p.add_argument("--seq", type=int, required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--model", required=True)
    a = p.parse_args(argv)
    child_setup()
    import tempfile

    import torch

    from bench.common import peak_rss_mib
    from vembed.config import TrainConfig
    from vembed.training.data import PairCollator, PairDataset, load_records
    from vembed.training.loop import build_accelerator, build_embedder
    from vembed.training.losses import build_loss
    from vembed.training.step import make_step

    cfg = TrainConfig(
        model_name=a.model,
        data_path=a.data,
        output_dir=tempfile.mkdtemp(prefix="vembed-gcmem-"),
        torch_dtype="float32",
        max_seq_length=a.seq,
        batch_size=a.batch,
        use_gradient_cache=a.grad_cache,
        gradient_cache_chunk_size=a.chunk,
    )
    accelerator, dtype = build_accelerator(cfg)
    embedder = build_embedder(cfg, dtype)
    records, _ = load_records(cfg.data_path, "skip")
    dataset = PairDataset(records, embedder)
    collate = PairCollator(embedder)
    warmup = 1 if a.batch <= 128 else 0
    batches = [collate([dataset[(s * a.batch + i) % len(dataset)] for i in range(a.batch)]) for s in range(warmup + 1)]
    tokens = int(sum(b[g]["attention_mask"].sum() for b in batches[-1:] for g in ("query", "positive")))
    optimizer = torch.optim.AdamW([p for p in embedder.parameters() if p.requires_grad], lr=1e-4)
    model, optimizer = accelerator.prepare(embedder, optimizer)
    step = make_step(cfg, accelerator, model, build_loss(cfg, embedder.dim))
    model.train()
    ready_rss = proc_rss_mib()
    for batch in batches[:warmup]:
        step(batch)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    start, cpu_start = time.perf_counter(), time.process_time()
    loss = step(batches[-1])
    optimizer.step()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    emit(
        {
            "batch": a.batch,
            "grad_cache": a.grad_cache,
            "chunk": a.chunk if a.grad_cache else None,
            "seq": a.seq,
            "loss": float(loss),
            "tokens": tokens,
            "step_s": elapsed,
            "ms_per_sample": 1000 * elapsed / a.batch,
            # CPU seconds of this process: less sensitive than wall time to other jobs on a shared machine
            "cpu_ms_per_sample": 1000 * cpu / a.batch,
            "ready_rss_mib": ready_rss,
            "peak_rss_mib": peak_rss_mib(),
            "training_mib": peak_rss_mib() - ready_rss,
        }
    )


def run_configs(seq: int, configs: list[tuple[int, int | None]], repeats: int = 1) -> tuple[list[dict], dict]:
    """Each (batch, GradCache chunk or None for the plain step) in a fresh child, alternating over
    `repeats` rounds so that load from other jobs on the shared machine falls on all of them."""
    info = demo_data()
    data, model = info["train"], minilm_path()
    start_info = machine()
    runs = []
    for _ in range(repeats):
        for batch, chunk in configs:
            args = ["--batch", str(batch), "--seq", str(seq), "--data", data, "--model", model]
            args += ["--grad-cache", "--chunk", str(chunk)] if chunk else []
            r = run_child("bench.gradcache_memory", args, timeout=1800)
            print(f"batch {batch} chunk {chunk}: peak {r['peak_rss_mib']:.0f} MiB, "
                  f"training {r['training_mib']:.0f} MiB, {r['ms_per_sample']:.1f} ms/sample", flush=True)  # fmt: skip
            runs.append(r)
    return runs, start_info


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=64, help="max_seq_length (demo positives fill it)")
    p.add_argument("--plain-512", action="store_true", help="also run the plain step at batch 512")
    p.add_argument("--chunk-sweep", action="store_true", help="batch 32: plain vs chunk 4, 8, 16, 32")
    p.add_argument("--repeats", type=int, default=1, help="--chunk-sweep: runs per configuration")
    a = p.parse_args(argv)
    if a.chunk_sweep:
        return chunk_sweep(a.seq, repeats=a.repeats)
    configs = [(32, None), (32, CHUNK), (128, None), (128, CHUNK), (512, CHUNK)] + ([(512, None)] if a.plain_512 else [])
    runs, info = run_configs(a.seq, configs)
    plain = {r["batch"]: r for r in runs if not r["grad_cache"]}
    # Plain-step memory is linear in the batch: extrapolate 512 from the two measured sizes.
    slope = (plain[128]["training_mib"] - plain[32]["training_mib"]) / (128 - 32)
    estimate_512 = plain[128]["training_mib"] + slope * (512 - 128)
    rows = [
        [r["batch"], f"GradCache, chunk {r['chunk']}" if r["grad_cache"] else "plain", round(r["peak_rss_mib"]),
         round(r["training_mib"]), r["ms_per_sample"]]
        for r in runs
    ]  # fmt: skip
    if not a.plain_512:
        rows.append([512, "plain (not run: estimated)", "-", f"~{estimate_512:.0f}", "-"])
    table = md_table(["batch", "step", "peak RSS MiB", "training MiB (peak - ready)", "ms / sample"], rows)
    text = (f"all-MiniLM-L6-v2, LoRA r=16 on query/value, fp32 on CPU, max_seq_length {a.seq} (demo data), "
            "one step per fresh process (`python -m bench.gradcache_memory`).")  # fmt: skip
    report("gradcache_memory", ["## GradCache memory", "", text, "", table, ""],
           {"runs": runs, "plain_512_estimate_mib": estimate_512}, info, sep="\n")  # fmt: skip


def chunk_sweep(seq: int, batch: int = 32, chunks: tuple[int, ...] = (4, 8, 16, 32), repeats: int = 1) -> None:
    """Peak memory and step time of the guide's batch 32 for several chunk sizes (and the plain step),
    the median of `repeats` alternating runs. The CPU time column is the steadier figure when other
    jobs share the machine."""
    variants: list[int | None] = [None, *chunks]
    runs, info = run_configs(seq, [(batch, c) for c in variants], repeats)

    def med(chunk: int | None, key: str) -> float | str:
        values = [r[key] for r in runs if r["chunk"] == chunk and key in r]
        return statistics.median(values) if values else "-"

    keys = ("ms_per_sample", "cpu_ms_per_sample")
    rows = [
        ["plain" if c is None else f"GradCache, chunk {c}", round(med(c, "peak_rss_mib")),
         round(med(c, "training_mib")), *(med(c, k) for k in keys)]
        for c in variants
    ]  # fmt: skip
    header = ["step (batch 32)", "peak RSS MiB", "training MiB (peak - ready)", "wall ms / sample", "CPU ms / sample"]
    text = (f"all-MiniLM-L6-v2, LoRA r=16 on query/value, fp32 on CPU, max_seq_length {seq} (demo data), "
            f"batch {batch}, one step (after a warm-up step) per fresh process, median of {repeats} alternating run(s) "
            "(`python -m bench.gradcache_memory --chunk-sweep`).")  # fmt: skip
    report("gradcache_chunks", ["## GradCache chunk size at the guide's batch 32", "", text, "", md_table(header, rows), ""],
           {"runs": runs}, info, sep="\n")  # fmt: skip


if __name__ == "__main__":
    entry(main, child)

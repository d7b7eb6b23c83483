"""GradCache memory: peak memory and time per sample at batch 32 vs 512 (chunk 32) on all-MiniLM-L6-v2.

    .venv/bin/python -m bench.gradcache_memory [--seq 64] [--plain-512] [--repeats 1]
    .venv/bin/python -m bench.gradcache_memory --chunk-sweep [--repeats 1]   # chunk sizes at batch 32

Every configuration runs one training step (after one warm-up step for the small batches) in a fresh
child process through vembed's own step functions (vembed.training.step / vembed.training.grad_cache). Memory
is the child's peak RSS (getrusage ru_maxrss: it sees torch's CPU allocations, which tracemalloc
does not) and the growth of that peak over the RSS once the model and the batches are ready, which
is what training itself needed. Timings on a shared 2-core machine are noisy; memory is the point,
and the CPU time column is the steadier of the two timings. Each figure is the median of `--repeats`
alternating runs.

The plain step at batch 512 is left out unless --plain-512: it keeps every activation of 1024
sequences and is estimated instead from the measured plain steps at batch 32 and 128.
Writes bench/results/gradcache_memory.{md,json}.

--chunk-sweep measures the guide's LoRA + GradCache recipe (batch 32) with chunk sizes 4, 8, 16 and 32
against the plain step, and writes bench/results/gradcache_chunks.{md,json}: the figures behind the
default `gradient_cache_chunk_size`.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from bench.common import (
    alternate,
    demo_data,
    entry,
    machine,
    md_table,
    median,
    minilm_path,
    peak_rss_mib,
    proc_rss_mib,
    report,
)

CHUNK = 32
HEADER = ["batch", "step", "peak RSS MiB", "training MiB (peak - ready)", "wall ms / sample", "CPU ms / sample"]


def child(batch: int, seq: int, data: str, model: str, chunk: int | None = None) -> dict[str, Any]:
    """One step at `batch`: GradCache with chunks of `chunk`, or the plain step when None."""
    import torch

    from vembed.config import TrainConfig
    from vembed.training.data import PairCollator, PairDataset, load_records
    from vembed.training.loop import build_accelerator, build_embedder
    from vembed.training.losses import build_loss
    from vembed.training.step import make_step

    cfg = TrainConfig(
        model_name=model,
        data_path=data,
        torch_dtype="float32",
        max_seq_length=seq,
        batch_size=batch,
        use_gradient_cache=chunk is not None,
        gradient_cache_chunk_size=chunk or CHUNK,
    )
    accelerator, dtype = build_accelerator(cfg)
    embedder = build_embedder(cfg, dtype)
    records, _ = load_records(cfg.data_path, "skip")
    dataset = PairDataset(records, embedder)
    collate = PairCollator(embedder)
    warmup = 1 if batch <= 128 else 0
    batches = [collate([dataset[(s * batch + i) % len(dataset)] for i in range(batch)]) for s in range(warmup + 1)]
    tokens = int(sum(batches[-1][g]["attention_mask"].sum() for g in ("query", "positive")))
    optimizer = torch.optim.AdamW([p for p in embedder.parameters() if p.requires_grad], lr=1e-4)
    model, optimizer = accelerator.prepare(embedder, optimizer)
    step = make_step(cfg, accelerator, model, build_loss(cfg, embedder.dim))
    model.train()
    ready_rss = proc_rss_mib()
    for b in batches[:warmup]:
        step(b)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    start, cpu_start = time.perf_counter(), time.process_time()
    loss = step(batches[-1])
    optimizer.step()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return {
        "batch": batch,
        "grad_cache": chunk is not None,
        "chunk": chunk,
        "seq": seq,
        "loss": float(loss),
        "tokens": tokens,
        "step_s": elapsed,
        "ms_per_sample": 1000 * elapsed / batch,
        # CPU seconds of this process: less sensitive than wall time to other jobs on a shared machine
        "cpu_ms_per_sample": 1000 * cpu / batch,
        "ready_rss_mib": ready_rss,
        "peak_rss_mib": peak_rss_mib(),
        "training_mib": peak_rss_mib() - ready_rss,
    }


def step_label(chunk: int | None) -> str:
    return "plain" if chunk is None else f"GradCache, chunk {chunk}"


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=64, help="max_seq_length (demo positives fill it)")
    p.add_argument("--plain-512", action="store_true", help="also run the plain step at batch 512")
    p.add_argument("--chunk-sweep", action="store_true", help="batch 32: plain vs chunk 4, 8, 16, 32")
    p.add_argument("--repeats", type=int, default=1, help="runs per configuration")
    a = p.parse_args(argv)
    if a.chunk_sweep:
        configs = [(32, chunk) for chunk in (None, 4, 8, 16, 32)]
    else:
        configs = [(32, None), (32, CHUNK), (128, None), (128, CHUNK), (512, CHUNK)] + ([(512, None)] if a.plain_512 else [])
    info, data, model = machine(), demo_data()["train"], minilm_path()
    contenders = {f"batch {b}, {step_label(c)}": {"batch": b, "seq": a.seq, "data": data, "model": model, "chunk": c}
                  for b, c in configs}  # fmt: skip
    runs = alternate("bench.gradcache_memory", contenders, a.repeats, timeout=1800)
    rows = [[r[0]["batch"], step_label(r[0]["chunk"]), round(median(r, "peak_rss_mib")), round(median(r, "training_mib")),
             median(r, "ms_per_sample"), median(r, "cpu_ms_per_sample")] for r in runs.values()]  # fmt: skip
    extra = {}
    if not a.chunk_sweep and not a.plain_512:
        # Plain-step memory is linear in the batch: extrapolate 512 from the two measured sizes.
        plain = {b: median(runs[f"batch {b}, plain"], "training_mib") for b in (32, 128)}
        extra["plain_512_estimate_mib"] = plain[128] + (plain[128] - plain[32]) / (128 - 32) * (512 - 128)
        rows.append([512, "plain (not run: estimated)", "-", f"~{extra['plain_512_estimate_mib']:.0f}", "-", "-"])
    title = "## GradCache chunk size at the guide's batch 32" if a.chunk_sweep else "## GradCache memory"
    text = (f"all-MiniLM-L6-v2, LoRA r=16 on query/value, fp32 on CPU, max_seq_length {a.seq} (demo data), one step "
            f"(after a warm-up step up to batch 128) per fresh process, median of {a.repeats} alternating run(s) "
            f"(`python -m bench.gradcache_memory{' --chunk-sweep' if a.chunk_sweep else ''}`).")  # fmt: skip
    name = "gradcache_chunks" if a.chunk_sweep else "gradcache_memory"
    report(name, [title, text, md_table(HEADER, rows)], {"runs": runs, **extra}, info)


if __name__ == "__main__":
    entry(main, child)

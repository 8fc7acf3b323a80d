"""Benchmark of the streaming engine (llfc.engine.measure_pair).

For K α values and N samples it measures
  * the engine against the compute floor, the (K + 2) plain forward passes (θ_A, θ_B and every
    θ_α) over the same batches without any metric. They are run alternately in one process
    (floor, floor under the engine's malloc settings, engine, ...: ``--reps`` times), each timed
    by CPU time (``time.process_time``, the number to compare on a shared machine), wall time and
    minor page faults (``resource.getrusage``); the ratio is min(engine CPU) / min(floor CPU), the
    floor's minimum taken over both variants (plain forward passes fault on fresh pages as the
    allocator hands memory back; under llfc's malloc settings, :mod:`llfc._malloc`, they do not,
    and are faster: the stricter floor);
  * the engine's memory: the largest resident set size sampled after every batch of the pass,
    minus the size before the pass (a fresh child process per configuration).

Batches are synthetic (drawn per batch from a seeded generator) so that the data set itself does
not occupy memory. The load average (1 min) is recorded before and after each configuration.
Prints a table and writes JSON (default benchmarks/results/engine.json), which
``python benchmarks/report.py`` turns into docs/benchmarks.md.

    python benchmarks/engine.py [--models mlp,resnet20,vgg16_bn] [--n 512] [--reps 2]
        [--alphas 11] [--batch 256] [--threads 1] [--memory-budget 2e9] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

MODELS = {
    "mlp": ("mlp", {"input_shape": [1, 28, 28], "num_classes": 10, "widths": [512, 512, 512]}),
    "lenet": ("lenet", {"input_shape": [1, 28, 28], "num_classes": 10}),
    "resnet20": ("resnet20", {"input_shape": [3, 32, 32], "num_classes": 10}),
    "vgg16_bn": ("vgg16_bn", {"input_shape": [3, 32, 32], "num_classes": 10, "width": 0.25}),
    "vgg16_bn_paper": ("vgg16_bn", {"input_shape": [3, 32, 32], "num_classes": 10}),
}


def _batches(shape, n, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    done = 0
    while done < n:
        b = min(batch, n - done)
        yield torch.randn(b, *shape, generator=g), torch.randint(0, 10, (b,), generator=g)
        done += b


def _rss_mb() -> float:
    """Current resident set size (Linux /proc), MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _sampled(batches, samples: list):
    for b in batches:
        yield b
        samples.append(_rss_mb())  # after the previous batch was folded in


def _timed(fn) -> dict:
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return {"wall_s": time.perf_counter() - w0, "cpu_s": time.process_time() - c0,
            "minor_faults": r1.ru_minflt - r0.ru_minflt}


def child(model_key: str, n: int, k: int, batch: int, conditions: bool, reps: int,
          kinds: list[str] | None, budget: float | None) -> dict:
    from llfc._malloc import retain_freed_memory
    from llfc.engine import measure_pair
    from llfc.interpolate import default_alphas, lerp_state_dict
    from llfc.metrics import fused
    from llfc.models import create_model

    load0 = os.getloadavg()[0]
    torch.manual_seed(0)
    name, kwargs = MODELS[model_key]
    m = create_model(name, **kwargs).eval()
    sd_a = {k_: v.clone() for k_, v in m.state_dict().items()}
    torch.manual_seed(1)
    sd_b = create_model(name, **kwargs).state_dict()
    alphas = default_alphas(k)
    shape = kwargs["input_shape"]
    # the floor as defined since the first version: θ_A, θ_B and all K θ_α (the engine itself runs
    # K forward passes per batch, reusing A's and B's features at α = 1 and 0)
    states = [sd_a, sd_b] + [lerp_state_dict(sd_a, sd_b, a) for a in alphas]

    def engine(samples=None):
        b = _batches(shape, n, batch)
        return measure_pair(m, sd_a, sd_b, b if samples is None else _sampled(b, samples), alphas,
                            conditions=conditions, kinds=kinds, memory_budget=budget)

    def floor():  # (K + 2) plain forward passes over the same batches
        with torch.no_grad():
            for x, _ in _batches(shape, n, batch):
                for s in states:
                    torch.func.functional_call(m, s, (x,))

    def floor_tuned():  # the same, under the malloc settings the engine runs with
        with retain_freed_memory():
            floor()

    # warm-up (allocator, fx tracing) on one batch
    measure_pair(m, sd_a, sd_b, _batches(shape, batch, batch), alphas, conditions=conditions,
                 kinds=kinds, memory_budget=budget)
    rss0 = _rss_mb()
    samples: list[float] = []
    runs_e, runs_f = [], []
    for r in range(reps):
        runs_f.append(dict(_timed(floor), malloc_tuned=False))
        runs_f.append(dict(_timed(floor_tuned), malloc_tuned=True))
        runs_e.append(_timed(lambda first=(r == 0): engine(samples if first else None)))
    e = min(x["cpu_s"] for x in runs_e)
    f = min(x["cpu_s"] for x in runs_f)
    from llfc._malloc import malloc_tuning_available
    from llfc.engine import FeatureExtractor

    fx = FeatureExtractor(m, kinds=kinds)
    return {"model": model_key, "model_args": kwargs, "N": n, "K": len(alphas),
            "forward_passes_per_batch": len(states), "batch": batch, "conditions": conditions,
            "kinds": kinds or "all", "probes": len(fx.probes), "memory_budget": budget,
            "malloc_tuning": malloc_tuning_available(), "fused_kernels": fused.available(),
            "engine": runs_e, "floor": runs_f, "ratio_cpu": e / f,
            "ratio_wall": min(x["wall_s"] for x in runs_e) / min(x["wall_s"] for x in runs_f),
            "rss_before_mb": rss0, "peak_rss_during_mb": max(samples),
            "peak_rss_growth_mb": max(samples) - rss0, "load_before": load0,
            "load_after": os.getloadavg()[0], "threads": torch.get_num_threads()}


def profile(model_key: str, batch: int, k: int, conditions: bool) -> None:
    """Print torch.profiler's self-CPU table of the engine on two batches (after a warm-up)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from llfc.engine import measure_pair
    from llfc.interpolate import default_alphas
    from llfc.models import create_model

    name, kwargs = MODELS[model_key]
    torch.manual_seed(0)
    m = create_model(name, **kwargs).eval()
    sd_a = {k_: v.clone() for k_, v in m.state_dict().items()}
    torch.manual_seed(1)
    sd_b = create_model(name, **kwargs).state_dict()
    data = list(_batches(kwargs["input_shape"], 2 * batch, batch))
    alphas = default_alphas(k)
    measure_pair(m, sd_a, sd_b, data[:1], alphas, conditions=conditions)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        measure_pair(m, sd_a, sd_b, data, alphas, conditions=conditions)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="mlp,resnet20,vgg16_bn")
    ap.add_argument("--alphas", type=int, default=11)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--n", type=int, default=512, help="samples per timed pass")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--kinds", default=None, help="comma-separated probe kinds (default: all)")
    ap.add_argument("--memory-budget", type=float, default=2e9)
    ap.add_argument("--conditions", default="0,1", help="0: without, 1: with the conditions")
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "engine.json"))
    ap.add_argument("--profile", metavar="MODEL", help="print the engine's op profile for MODEL and exit")
    ap.add_argument("--child", nargs=3, metavar=("N", "CONDITIONS", "MODEL"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kinds = args.kinds.split(",") if args.kinds else None
    if args.profile:
        profile(args.profile, args.batch, args.alphas, args.conditions.split(",")[-1] == "1")
        return
    if args.child:
        n, cond, model = int(args.child[0]), args.child[1] == "1", args.child[2]
        print(json.dumps(child(model, n, args.alphas, args.batch, cond, args.reps, kinds,
                               args.memory_budget)))
        return
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"),
                                         env.get("PYTHONPATH", "")])
    rows = []
    print(f"engine vs (K+2) forward passes: K = {args.alphas} α values, batch {args.batch}, "
          f"N = {args.n}, {args.threads} torch thread(s), {args.reps} alternating repetitions")
    print(f"{'model':<15} {'probes':>6} {'cond':>5} {'floor cpu s':>11} {'engine cpu s':>12} "
          f"{'ratio cpu':>9} {'ratio wall':>10} {'faults floor':>12} {'faults engine':>13} "
          f"{'peak RSS +MB':>12} {'load':>9}")
    for model in args.models.split(","):
        for cond in args.conditions.split(","):
            cmd = [sys.executable, __file__, "--alphas", str(args.alphas), "--batch", str(args.batch),
                   "--reps", str(args.reps), "--threads", str(args.threads),
                   "--memory-budget", str(args.memory_budget), "--child", str(args.n), cond, model]
            if kinds:
                cmd += ["--kinds", args.kinds]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
            r = json.loads(out.strip().splitlines()[-1])
            rows.append(r)
            print(f"{model:<15} {r['probes']:>6} {str(r['conditions']):>5} "
                  f"{min(x['cpu_s'] for x in r['floor']):>11.2f} "
                  f"{min(x['cpu_s'] for x in r['engine']):>12.2f} {r['ratio_cpu']:>9.2f} "
                  f"{r['ratio_wall']:>10.2f} {min(x['minor_faults'] for x in r['floor']):>12} "
                  f"{min(x['minor_faults'] for x in r['engine']):>13} "
                  f"{r['peak_rss_growth_mb']:>12.0f} {r['load_before']:>4.1f}-{r['load_after']:<4.1f}",
                  flush=True)
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(path.read_text()) if path.exists() else {}
    keep = [r for r in old.get("rows", []) if (r["model"], r["conditions"], r.get("kinds"), r["N"])
            not in {(x["model"], x["conditions"], x["kinds"], x["N"]) for x in rows}]
    path.write_text(json.dumps({"benchmark": "engine", "machine": machine(), "rows": keep + rows},
                               indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

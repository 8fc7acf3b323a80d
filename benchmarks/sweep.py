"""Benchmark of llfc.sweep: the sweep's own overhead, and what a k-sweep costs.

* **overhead**: CPU time of the whole ``run_sweep`` call (``jobs=1``: every job runs in this process)
  minus the summed CPU time of its jobs (parent runs and pairs), i.e. expanding the grid (which reads
  the training set once to count steps per epoch), checking the folder, scheduling, aggregation
  (sweep.csv/json, means, co-occurrence) and the three sweep figures, as a percentage of the pairs'
  CPU time. Target: < 5 %. CPU time, not wall time, because the benchmark machine is shared.
* **k-sweep cost**: the sweep trains ONE parent to the largest k, saving its full training state at
  every k; the alternative, one parent per k (what ``llfc run --spawn-epoch k`` does for each k),
  trains Σ_k k iterations. Both are measured here the same way (``llfc.train.train`` without test
  evaluation: ``stop_iteration=max k, save_at_iterations=ks`` against ``stop_iteration=k`` per k). The
  children cost the same either way (the sweep's measured children CPU time is printed with both).

An MLP on MNIST (default 784-128-128-10), one seed, k over iterations, 1 thread.

    python benchmarks/sweep.py [--dataset mnist] [--widths 128,128] [--epochs 2] [--ks 0,50,200,469,700] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--ks", default="0,50,200,469,700", help="spawn points in iterations")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--widths", default="128,128", help="MLP hidden widths")
    ap.add_argument("--json", help="output JSON (default benchmarks/results/sweep-<model>.json)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from llfc.data import dataset_info, get_dataset
    from llfc.seeding import derive_seed, seed_everything
    from llfc.sweep import SweepConfig, run_sweep
    from llfc.train import ModelSpec, TrainConfig, train

    ks = [int(k) for k in args.ks.split(",")]
    widths = [int(w) for w in args.widths.split(",")]
    tag = "mlp " + "-".join(map(str, widths))
    train_cfg = {"epochs": args.epochs, "batch_size": 128, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9,
                 "weight_decay": 0.0, "schedule": "constant", "augment": False, "eval_batch_size": 2000}
    base = {"name": "bench", "dataset": args.dataset, "model": "mlp", "model_args": {"widths": widths},
            "alphas": 11, "train": train_cfg,
            "measure": {"test_samples": 2000, "train_samples": 1000, "angles_k": 0}}
    sc = SweepConfig.from_dict({"name": "bench", "base": base, "point_figures": True,
                                "grid": {"spawn_iteration": ks, "seed": [0], "pair": ["spawn"]}})
    with tempfile.TemporaryDirectory() as tmp:
        t0, c0 = time.perf_counter(), _cpu()
        agg = run_sweep(sc, Path(tmp) / "s", jobs=1, threads=1, progress=False, log=lambda s: None)
        wall, cpu = time.perf_counter() - t0, _cpu() - c0
    tm = agg["timing"]
    jobs_cpu = tm["parents_job_cpu_seconds"] + tm["pairs_job_cpu_seconds"]
    overhead = cpu - jobs_cpu
    info = dataset_info(args.dataset)
    tr = get_dataset(args.dataset, "train")
    spec = ModelSpec("mlp", {"input_shape": list(info.input_shape), "num_classes": info.num_classes,
                             "widths": widths})
    tcfg = TrainConfig.from_dict(train_cfg)

    def parent(stop, save=(), out=None):
        seed_everything(derive_seed(0, "spawn", "init"))
        m = spec()
        c = time.process_time()
        train(m, tr, None, tcfg, data_seed=derive_seed(0, "spawn", "data_parent"), stop_iteration=stop,
              save_at_iterations=save, out_dir=out, progress=False)
        return time.process_time() - c

    with tempfile.TemporaryDirectory() as tmp:
        one = parent(max(ks), ks, Path(tmp) / "p")
    per_k = {k: parent(k) for k in ks}
    children = tm["pairs_train_cpu_seconds"]
    res = {
        "benchmark": "sweep", "dataset": args.dataset, "model": tag, "epochs": args.epochs,
        "ks_iterations": ks, "torch": torch.__version__, "threads": 1, "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0], "unit": "CPU seconds (user + sys)",
        "sweep_cpu_s": cpu, "sweep_wall_s": wall, "jobs_cpu_s": jobs_cpu,
        "pairs_job_cpu_s": tm["pairs_job_cpu_seconds"], "overhead_cpu_s": overhead,
        "overhead_pct_of_pairs": 100 * overhead / tm["pairs_job_cpu_seconds"],
        "one_parent_cpu_s": one, "parent_per_k_cpu_s": per_k, "parent_per_k_total_cpu_s": sum(per_k.values()),
        "children_train_cpu_s": children,
        "ksweep_training_cpu_s": one + children, "naive_training_cpu_s": sum(per_k.values()) + children,
    }
    print(f"sweep of {len(ks)} spawned pairs (k = {ks} iterations), {args.dataset} {tag}, "
          f"{args.epochs} epochs, 1 thread; CPU seconds")
    print(f"{'sweep (run_sweep, jobs=1)':<46} {cpu:8.1f} s   (wall {wall:.1f} s on a shared machine)")
    print(f"{'  its jobs (parents + pairs)':<46} {jobs_cpu:8.1f} s")
    print(f"{'  overhead (grid, scheduling, aggregate, figs)':<46} {overhead:8.1f} s = "
          f"{res['overhead_pct_of_pairs']:.1f} % of the pairs' {tm['pairs_job_cpu_seconds']:.1f} s")
    print(f"{'k-sweep: one parent to max k + children':<46} {one:8.1f} + {children:.1f} = "
          f"{res['ksweep_training_cpu_s']:.1f} s")
    print(f"{'one parent per k + children':<46} {sum(per_k.values()):8.1f} + {children:.1f} = "
          f"{res['naive_training_cpu_s']:.1f} s   (parents: "
          + ", ".join(f"k={k}: {v:.1f}" for k, v in per_k.items()) + ")")
    path = Path(args.json) if args.json else Path(__file__).parent / "results" / f"sweep-{tag.replace(' ', '-')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=2) + "\n")
    print(f"→ {path}")


if __name__ == "__main__":
    main()

"""Benchmark of llfc.sweep: the sweep's own overhead, and what a k-sweep costs.

* **overhead**: wall time of ``run_sweep`` minus the summed wall time of its jobs (parent runs and
  pairs, run one after another with ``jobs=1``), i.e. expanding the grid, checking the folder,
  scheduling, aggregation (sweep.csv/json, means, co-occurrence) and the sweep figures, as a
  percentage of the pairs' compute (the jobs' seconds). Target: < 5 %.
* **k-sweep cost**: the sweep trains ONE parent to the largest k, saving its full training state at
  every k, then the two children of every k. The alternative, one parent per k (what `llfc run
  --spawn-epoch k` does for each k), costs Σ_k (time to train a parent to k): measured here by
  training those parents (``llfc.train.train(stop_iteration=k)``). Both are printed.

MLP on MNIST (or the bundled digits with ``--dataset digits``), one seed, k over iterations.

    python benchmarks/sweep.py [--dataset mnist] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--ks", default="0,50,200,469,700", help="spawn points in iterations")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--json", help="output JSON (default benchmarks/results/sweep.json)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from llfc.data import get_dataset
    from llfc.seeding import derive_seed, seed_everything
    from llfc.sweep import SweepConfig, run_sweep
    from llfc.train import ModelSpec, TrainConfig, train

    ks = [int(k) for k in args.ks.split(",")]
    train_cfg = {"epochs": args.epochs, "batch_size": 128, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9,
                 "weight_decay": 0.0, "schedule": "constant", "augment": False, "eval_batch_size": 2000}
    base = {"name": "bench", "dataset": args.dataset, "model": "mlp", "model_args": {"widths": [128, 128]},
            "alphas": 11, "train": train_cfg,
            "measure": {"test_samples": 2000, "train_samples": 1000, "angles_k": 0}}
    sc = SweepConfig.from_dict({"name": "bench", "base": base, "point_figures": True,
                                "grid": {"spawn_iteration": ks, "seed": [0], "pair": ["spawn"]}})
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        agg = run_sweep(sc, Path(tmp) / "s", jobs=1, threads=1, progress=False, log=lambda s: None)
        wall = time.perf_counter() - t0
        tm = agg["timing"]
        jobs_s = tm["parents_job_seconds"] + tm["pairs_job_seconds"]
        overhead = wall - jobs_s
        # the alternative: one parent per k, each trained from scratch to k
        tr = get_dataset(args.dataset, "train")
        from llfc.data import dataset_info

        info = dataset_info(args.dataset)
        spec = ModelSpec("mlp", {"input_shape": list(info.input_shape), "num_classes": info.num_classes,
                                 "widths": [128, 128]})
        per_k = {}
        for k in ks:
            seed_everything(derive_seed(0, "spawn", "init"))
            m = spec()
            t1 = time.perf_counter()
            train(m, tr, None, TrainConfig.from_dict(train_cfg), data_seed=derive_seed(0, "spawn", "data_parent"),
                  stop_iteration=k, progress=False)
            per_k[k] = time.perf_counter() - t1
    one_parent = tm["parents_job_seconds"]
    children = tm["pairs_train_seconds"]
    res = {
        "benchmark": "sweep", "dataset": args.dataset, "model": "mlp 128-128", "epochs": args.epochs,
        "ks_iterations": ks, "torch": torch.__version__, "threads": 1, "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "sweep_wall_s": wall, "jobs_s": jobs_s, "pairs_job_s": tm["pairs_job_seconds"],
        "overhead_s": overhead, "aggregate_s": tm["aggregate_wall"],
        "overhead_pct_of_pairs": 100 * overhead / tm["pairs_job_seconds"],
        "one_parent_s": one_parent, "children_train_s": children, "measure_s": tm["pairs_measure_seconds"],
        "parent_per_k_s": per_k, "parent_per_k_total_s": sum(per_k.values()),
        "ksweep_training_s": one_parent + children,
        "naive_training_s": sum(per_k.values()) + children,
    }
    print(f"sweep of {len(ks)} spawned pairs (k = {ks} iterations), {args.dataset} MLP 128-128, "
          f"{args.epochs} epochs, 1 thread")
    print(f"{'sweep wall time':<44} {wall:9.1f} s")
    print(f"{'  jobs (parents + pairs)':<44} {jobs_s:9.1f} s")
    print(f"{'  overhead (grid, scheduling, aggregate, figs)':<44} {overhead:9.1f} s = "
          f"{res['overhead_pct_of_pairs']:.1f} % of the pairs' {tm['pairs_job_seconds']:.1f} s")
    print(f"{'k-sweep training: one parent + children':<44} {one_parent:9.1f} + {children:.1f} = "
          f"{res['ksweep_training_s']:.1f} s")
    print(f"{'one parent per k + children':<44} {sum(per_k.values()):9.1f} + {children:.1f} = "
          f"{res['naive_training_s']:.1f} s   (parents: "
          + ", ".join(f"k={k}: {v:.1f}s" for k, v in per_k.items()) + ")")
    path = Path(args.json) if args.json else Path(__file__).parent / "results" / "sweep.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=2) + "\n")
    print(f"→ {path}")


if __name__ == "__main__":
    main()

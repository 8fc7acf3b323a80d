"""Benchmark of llfc's training loop (``llfc.train.train``) against a plain PyTorch loop.

Both sides train the same model from the same initial weights with the same optimiser, learning
rate schedule, batch size and batch order, on the same data held in memory (an
``llfc.data.ArrayDataset`` of synthetic uint8 images of the dataset's shape, no augmentation).
The plain loop indexes a pre-normalised float tensor per batch and runs forward, cross-entropy,
``zero_grad(set_to_none=True)``, backward and the optimiser step, nothing else. llfc's loop
additionally normalises each batch from uint8, keeps the running loss/accuracy sums for its log,
steps its scheduler and checks its progress hook. The two are run alternately in one process
(plain, llfc, plain, llfc, ...: ``--reps`` times); each is timed by CPU time
(``time.process_time``, the number to compare on a shared machine) and wall time. The reported
throughput ratio is min(plain CPU) / min(llfc CPU): 1.0 means llfc trains as fast as the plain
loop (issue 11 asks for ≥ 0.95).

    PYTHONPATH=src python benchmarks/training.py [--models mlp,resnet20] [--steps 60] [--reps 3]
        [--threads 1] [--json benchmarks/results/training.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# (model name, model kwargs, input shape, recipe) — the recipes of configs/cpu/mnist-mlp.yaml and
# configs/cpu/cifar10-resnet20-spawn.yaml without augmentation
MODELS = {
    "mlp": ("mlp", {"widths": [512, 512, 512]}, (1, 28, 28),
            {"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0, "batch_size": 500, "schedule": "constant"}),
    "resnet20": ("resnet20", {"width": 0.5}, (3, 32, 32),
                 {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "batch_size": 128,
                  "schedule": "constant"}),
}


def run(model_key: str, steps: int, reps: int) -> dict:
    from llfc.data import ArrayDataset
    from llfc.models import create_model
    from llfc.train import TrainConfig, _epoch_batches, build_optimizer, build_scheduler, steps_per_epoch, train

    name, kwargs, shape, recipe = MODELS[model_key]
    cfg = TrainConfig(epochs=1, augment=False, **recipe)
    n = steps * cfg.batch_size
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    mean, std = (0.5,) * shape[0], (0.25,) * shape[0]
    ds = ArrayDataset(images, labels, mean, std)
    x_all = ds._to_float(images)  # the plain loop's pre-normalised copy (the same floats)
    torch.manual_seed(0)
    init = create_model(name, input_shape=list(shape), num_classes=10, **kwargs).state_dict()
    batches = _epoch_batches(n, cfg, 0, 0, steps_per_epoch(n, cfg))

    def model():
        m = create_model(name, input_shape=list(shape), num_classes=10, **kwargs)
        m.load_state_dict(init)
        return m

    def plain():
        m = model().train()
        opt = build_optimizer(m, cfg)
        sched = build_scheduler(opt, cfg, len(batches))
        for b in batches:
            idx = torch.as_tensor(b)
            x, y = x_all[idx], labels[idx]
            loss = F.cross_entropy(m(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        return m

    def llfc():
        return train(model(), ds, None, cfg, data_seed=0, progress=False).model

    def timed(fn):
        w0, c0 = time.perf_counter(), time.process_time()
        m = fn()
        return {"wall_s": time.perf_counter() - w0, "cpu_s": time.process_time() - c0}, m

    timed(plain)  # warm-up (allocator, kernels)
    timed(llfc)
    runs_p, runs_l = [], []
    load0 = os.getloadavg()[0]
    for _ in range(reps):
        t, mp = timed(plain)
        runs_p.append(t)
        t, ml = timed(llfc)
        runs_l.append(t)
    # the same weights: both loops took the same steps (float rounding aside)
    diff = max((a - b).abs().max().item() for a, b in zip(mp.state_dict().values(), ml.state_dict().values())
               if a.is_floating_point())
    p = min(r["cpu_s"] for r in runs_p)
    lc = min(r["cpu_s"] for r in runs_l)
    return {"model": model_key, "model_args": kwargs, "recipe": recipe, "steps": len(batches),
            "batch": cfg.batch_size, "plain": runs_p, "llfc": runs_l, "throughput_ratio_cpu": p / lc,
            "throughput_ratio_wall": min(r["wall_s"] for r in runs_p) / min(r["wall_s"] for r in runs_l),
            "max_weight_difference": diff, "load_before": load0, "load_after": os.getloadavg()[0],
            "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="mlp,resnet20")
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps per timed run")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "training.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"llfc.train.train vs a plain loop: {args.steps} steps, {args.threads} torch thread(s), "
          f"{args.reps} alternating repetitions")
    print(f"{'model':<10} {'batch':>5} {'plain cpu s':>11} {'llfc cpu s':>10} {'throughput cpu':>14} "
          f"{'throughput wall':>15} {'max |Δw|':>9} {'load':>9}")
    rows = []
    for key in args.models.split(","):
        r = run(key, args.steps, args.reps)
        rows.append(r)
        print(f"{key:<10} {r['batch']:>5} {min(x['cpu_s'] for x in r['plain']):>11.2f} "
              f"{min(x['cpu_s'] for x in r['llfc']):>10.2f} {r['throughput_ratio_cpu']:>14.3f} "
              f"{r['throughput_ratio_wall']:>15.3f} {r['max_weight_difference']:>9.1e} "
              f"{r['load_before']:>4.1f}-{r['load_after']:<4.1f}")
    out = {"threads": args.threads, "cpu_count": os.cpu_count(), "torch": torch.__version__,
           "python": platform.python_version(), "rows": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    print(f"written {args.json}")


if __name__ == "__main__":
    main()

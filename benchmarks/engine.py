"""Benchmark of the streaming engine (llfc.engine.measure_pair).

For K α values and N samples it measures
  * the engine's wall time against the compute floor: the time of (K + 2) plain forward passes
    (θ_A, θ_B and every θ_α) over the same batches, without any metric;
  * the engine's memory: the largest resident set size sampled after every batch of the pass,
    minus the size before the pass (a fresh child process per configuration), for N = 1,000 and
    N = 10,000: it must be flat, since nothing that grows with N is kept.

Batches are synthetic (drawn per batch from a seeded generator) so that the data set itself does
not occupy memory. Prints a table and writes JSON (default benchmarks/results/engine.json).

    python benchmarks/engine.py [--model mlp|lenet|resnet20] [--alphas 11] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

MODELS = {
    "mlp": ("mlp", {"input_shape": [1, 28, 28], "num_classes": 10, "widths": [512, 512, 512]}),
    "lenet": ("lenet", {"input_shape": [1, 28, 28], "num_classes": 10}),
    "resnet20": ("resnet20", {"input_shape": [3, 32, 32], "num_classes": 10}),
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


def child(model_key: str, n: int, k: int, batch: int, conditions: bool) -> dict:
    from llfc.engine import measure_pair
    from llfc.interpolate import default_alphas, lerp_state_dict
    from llfc.models import create_model

    torch.manual_seed(0)
    name, kwargs = MODELS[model_key]
    m = create_model(name, **kwargs).eval()
    sd_a = {k_: v.clone() for k_, v in m.state_dict().items()}
    torch.manual_seed(1)
    sd_b = create_model(name, **kwargs).state_dict()
    alphas = default_alphas(k)
    shape = kwargs["input_shape"]
    # warm-up (allocator, fx tracing) on a small batch
    measure_pair(m, sd_a, sd_b, _batches(shape, batch, batch), alphas, conditions=conditions)
    rss0 = _rss_mb()
    samples: list[float] = []
    t0 = time.perf_counter()
    measure_pair(m, sd_a, sd_b, _sampled(_batches(shape, n, batch), samples), alphas,
                 conditions=conditions)
    t_engine = time.perf_counter() - t0
    # the floor: (K + 2) plain forward passes over the same batches
    states = [sd_a, sd_b] + [lerp_state_dict(sd_a, sd_b, a) for a in alphas]
    t0 = time.perf_counter()
    with torch.no_grad():
        for x, _ in _batches(shape, n, batch):
            for s in states:
                torch.func.functional_call(m, s, (x,))
    t_floor = time.perf_counter() - t0
    return {"model": model_key, "N": n, "K": len(alphas), "batch": batch, "conditions": conditions,
            "engine_s": t_engine, "floor_s": t_floor, "ratio": t_engine / t_floor,
            "rss_before_mb": rss0, "peak_rss_during_mb": max(samples),
            "peak_rss_growth_mb": max(samples) - rss0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="mlp", choices=sorted(MODELS))
    ap.add_argument("--alphas", type=int, default=11)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--json", help="output JSON (default benchmarks/results/engine-<model>.json)")
    ap.add_argument("--child", nargs=3, metavar=("N", "CONDITIONS", "MODEL"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        n, cond, model = int(args.child[0]), args.child[1] == "1", args.child[2]
        print(json.dumps(child(model, n, args.alphas, args.batch, cond)))
        return
    rows = []
    for n in (1000, 10000):
        for cond in (False, True):
            out = subprocess.run([sys.executable, __file__, "--alphas", str(args.alphas), "--batch",
                                  str(args.batch), "--child", str(n), "1" if cond else "0", args.model],
                                 check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"engine vs (K+2) forward passes: model {args.model}, K = {rows[0]['K']} α values, "
          f"batch {args.batch}, {torch.get_num_threads()} threads")
    print(f"{'N':>6} {'conditions':>10} {'engine s':>9} {'floor s':>8} {'ratio':>6} {'peak RSS during pass MB':>24}")
    for r in rows:
        print(f"{r['N']:>6} {str(r['conditions']):>10} {r['engine_s']:9.2f} {r['floor_s']:8.2f} "
              f"{r['ratio']:6.2f} {r['peak_rss_during_mb']:24.1f}")
    path = Path(args.json) if args.json else Path(__file__).parent / "results" / f"engine-{args.model}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"benchmark": "engine", "torch": torch.__version__,
                                "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                                "rows": rows}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

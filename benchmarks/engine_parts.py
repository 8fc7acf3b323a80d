"""The streaming engine's parts: fused kernels against torch operations, and the cost per pass.

1. Kernels: each function of ``llfc.metrics.fused`` on synthetic float32 (B, D) rows, once through
   the numba kernel and once through the torch path (``LLFC_FUSED=0``, writing into a reused
   buffer as the engine does), alternating, CPU time per call (best of ``--reps`` rounds of 20
   calls), and the largest relative error of each against a float64 recomputation.
2. Fixed cost per pass: ``measure_pair`` on the MLP of benchmarks/engine.py over 1 and over 8
   batches of 256 (best of ``--reps``); the slope is the cost per batch, the intercept the cost per
   pass (tracing, building the θ_α, first-touch page faults). The floor's cost per batch ((K + 2)
   plain forward passes) is measured beside it.
3. Compilation: the first call of the four kernels in a fresh process, with an empty and with a
   filled numba cache.

Prints a table and two lines, and writes JSON (default benchmarks/results/engine-parts.json), which
``python benchmarks/report.py`` adds to docs/benchmarks.md.

    python benchmarks/engine_parts.py [--threads 1] [--reps 5] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

SHAPES = [(256, 16 * 32 * 32), (256, 64 * 8 * 8), (256, 512)]  # ResNet-20's first stage, last stage, an MLP layer


def _cpu_per_call(fn, calls: int = 20) -> float:
    fn()
    c = time.process_time()
    for _ in range(calls):
        fn()
    return (time.process_time() - c) / calls


def kernels(reps: int) -> list[dict]:
    from llfc.metrics import fused

    rows = []
    g = torch.Generator().manual_seed(0)
    for B, D in SHAPES:
        A, Bm = torch.randn(B, D, generator=g), torch.randn(B, D, generator=g)
        X = 0.3 * A + 0.7 * Bm + 0.01 * torch.randn(B, D, generator=g)
        w0, w1 = torch.empty_like(A), torch.empty_like(A)
        A64, B64, X64 = A.double(), Bm.double(), X.double()
        f_int = 0.3 * A64 + 0.7 * B64
        u = f_int.relu()
        refs = {
            "interp_sq": torch.stack([(X64 * X64).sum(1), ((X64 - f_int) ** 2).sum(1)], 1),
            "pair_sq": torch.stack([(A64**2).sum(1), (B64**2).sum(1), ((A64 - B64) ** 2).sum(1)], 1),
            "relu_interp_sq": torch.stack(
                [(u * u).sum(1), ((0.3 * A64.relu() + 0.7 * B64.relu() - u) ** 2).sum(1)], 1
            ),
            "sign_agreement_rows": (A64 * B64 >= 0).double().mean(1),
        }
        rA, rB = A.relu(), Bm.relu()  # relu_interp_sq's r = σ(g), made outside the timing
        calls = {
            "interp_sq": lambda: fused.interp_sq(X, A, Bm, 0.3, work=w0),
            "pair_sq": lambda: fused.pair_sq(A, Bm, work=w0),
            "relu_interp_sq": lambda: fused.relu_interp_sq(A, Bm, rA, rB, 0.3, work=(w0, w1)),
            "sign_agreement_rows": lambda: fused.sign_agreement_rows(A, Bm, work=w0),
        }
        for name, fn in calls.items():
            t = {"1": [], "0": []}
            err = {}
            for _ in range(reps):
                for mode in ("1", "0"):
                    os.environ["LLFC_FUSED"] = mode
                    t[mode].append(_cpu_per_call(fn))
            for mode in ("1", "0"):
                os.environ["LLFC_FUSED"] = mode
                ref = refs[name]
                err[mode] = float(((fn() - ref).abs() / ref.abs().clamp_min(1e-300)).max())
            os.environ.pop("LLFC_FUSED")
            rows.append({"function": name, "rows": B, "dim": D, "fused_ms": min(t["1"]) * 1e3,
                         "torch_ms": min(t["0"]) * 1e3, "speedup": min(t["0"]) / min(t["1"]),
                         "fused_rel_err": err["1"], "torch_rel_err": err["0"]})
    return rows


_FIRST_CALLS = """
import time, torch
c = time.process_time()
from llfc.metrics import fused
x = torch.ones(4, 8)
fused.pair_sq(x, x); fused.interp_sq(x, x, x, 0.5); fused.relu_interp_sq(x, x, x, x, 0.5)
fused.sign_agreement_rows(x, x)
print(time.process_time() - c, fused.available())
"""


def compile_cost() -> dict:
    """CPU seconds of the first float32 call of all four kernels in a fresh process (numba and its
    compiler loaded, kernels compiled), with an empty numba cache (``NUMBA_CACHE_DIR``, a new
    folder) and again with that cache filled."""
    import subprocess
    import tempfile

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    out = {}
    with tempfile.TemporaryDirectory() as cache:
        env["NUMBA_CACHE_DIR"] = cache
        for label in ("empty_cache_s", "filled_cache_s"):
            r = subprocess.run([sys.executable, "-c", _FIRST_CALLS], env=env, check=True,
                               capture_output=True, text=True).stdout.split()
            assert r[1] == "True", "the fused kernels were not available"
            out[label] = float(r[0])
    return out


def fixed_cost(reps: int) -> dict:
    import engine as E

    from llfc._malloc import retain_freed_memory
    from llfc.engine import measure_pair
    from llfc.interpolate import default_alphas, lerp_state_dict
    from llfc.models import create_model

    name, kw = E.MODELS["mlp"]
    torch.manual_seed(0)
    m = create_model(name, **kw).eval()
    sd_a = {k: v.clone() for k, v in m.state_dict().items()}
    torch.manual_seed(1)
    sd_b = create_model(name, **kw).state_dict()
    alphas = default_alphas(11)
    d1 = list(E._batches(kw["input_shape"], 256, 256))
    d8 = list(E._batches(kw["input_shape"], 8 * 256, 256))
    states = [sd_a, sd_b] + [lerp_state_dict(sd_a, sd_b, a) for a in alphas]

    def floor():
        with retain_freed_memory(), torch.no_grad():
            for x, _ in d8:
                for s in states:
                    torch.func.functional_call(m, s, (x,))

    import warnings

    warnings.simplefilter("ignore")
    measure_pair(m, sd_a, sd_b, d1, alphas, conditions=False)
    t1, t8, tf = [], [], []
    for _ in range(reps):
        for d, t in ((d1, t1), (d8, t8)):
            c = time.process_time()
            measure_pair(m, sd_a, sd_b, d, alphas, conditions=False)
            t.append(time.process_time() - c)
        c = time.process_time()
        floor()
        tf.append(time.process_time() - c)
    per_batch = (min(t8) - min(t1)) / 7
    return {"model": "mlp", "model_args": kw, "K": len(alphas), "batch": 256, "one_batch_s": min(t1),
            "eight_batches_s": min(t8), "per_batch_s": per_batch, "per_pass_s": min(t1) - per_batch,
            "floor_per_batch_s": min(tf) / 8}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "engine-parts.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()[0]
    k = kernels(args.reps)
    print(f"fused kernels vs torch operations, float32 rows, {args.threads} thread(s), CPU ms per call")
    print(f"{'function':<20} {'rows × dim':>12} {'fused ms':>9} {'torch ms':>9} {'speedup':>8} "
          f"{'fused rel err':>13} {'torch rel err':>13}")
    for r in k:
        print(f"{r['function']:<20} {str(r['rows']) + ' × ' + str(r['dim']):>12} {r['fused_ms']:>9.3f} "
              f"{r['torch_ms']:>9.3f} {r['speedup']:>8.2f} {r['fused_rel_err']:>13.1e} {r['torch_rel_err']:>13.1e}")
    f = fixed_cost(args.reps)
    print(f"\nmeasure_pair on the MLP, K = {f['K']}, batches of 256: 1 batch {f['one_batch_s']:.3f} s, "
          f"8 batches {f['eight_batches_s']:.3f} s -> {f['per_batch_s']:.4f} s per batch "
          f"(floor {f['floor_per_batch_s']:.4f} s) + {f['per_pass_s']:.4f} s per pass")
    comp = compile_cost()
    print(f"first call of the four kernels in a fresh process: {comp['empty_cache_s']:.2f} CPU s with an "
          f"empty numba cache, {comp['filled_cache_s']:.2f} s with it filled")
    from engine import machine

    out = {"benchmark": "engine-parts", "machine": machine(), "threads": args.threads, "kernels": k,
           "fixed_cost": f, "compile": comp, "load_before": load0, "load_after": os.getloadavg()[0]}
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

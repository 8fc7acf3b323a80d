"""One process vs. ``torchrun --nproc_per_node 2`` (gloo, CPU) on digits: how equal are the results?

    python benchmarks/distributed.py [--out benchmarks/results/distributed.json]

Runs ``llfc run`` (spawned, independent and both permuted pairs; 2 epochs, MLP width 16) and then
``llfc analyze`` on the independent pair's checkpoints, each once in one process and once under
torchrun with 2 processes, and prints the largest relative difference between the two results.json
files over every float (LMC, LLFC, weak additivity, commutativity, stitching, training logs),
per part of the results, ignoring wall-clock times and, for relative differences, values below
1e-9 in magnitude (floating-point noise around an exact 0). ``llfc.other`` / ``weak_additivity.other``
hold standard deviations and scale factors, whose values near an exact constant are rounding noise.
Every run gets ``OMP_NUM_THREADS=1``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SKIP = {"seconds", "created", "environment", "time_s", "checkpoints", "config"}
RUN = ["--epochs", "2", "--widths", "16", "--train-samples", "100", "--no-progress", "--spawn-epoch", "1",
       "--pairs", "spawn,independent,permutation-weight,permutation-activation"]


def _floats(x, y, path=""):
    if isinstance(x, dict):
        for k in x:
            if k not in SKIP:
                yield from _floats(x[k], y[k], f"{path}.{k}")
    elif isinstance(x, list):
        assert len(x) == len(y), path
        for i, (u, v) in enumerate(zip(x, y)):
            yield from _floats(u, v, f"{path}[{i}]")
    elif isinstance(x, float):
        yield path, x, y
    else:
        assert x == y, (path, x, y)  # counts, names, ints: identical


def compare(a: Path, b: Path) -> dict:
    """Per part of the results (lmc, llfc, weak_additivity, ...): floats compared, how many are
    bit-identical, the largest relative difference and where it is."""
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    parts: dict[str, dict] = {}
    for path, x, y in _floats(ra["pairs"], rb["pairs"]):
        part = path.split(".")[2].split("[")[0]
        if part == "llfc" or part == "weak_additivity":  # per-sample means (stds of ~0 are noise)
            part += ".mean" if ".mean" in path else ".other"
        p = parts.setdefault(part, {"floats": 0, "bit_identical": 0, "max_rel_diff": 0.0, "at": ""})
        p["floats"] += 1
        p["bit_identical"] += x == y
        if x == y or not (math.isfinite(x) and math.isfinite(y)) or max(abs(x), abs(y)) < 1e-9:
            continue
        r = abs(x - y) / max(abs(x), abs(y))
        if r > p["max_rel_diff"]:
            p["max_rel_diff"], p["at"] = r, path
    return parts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/distributed.json")
    args = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    one = [sys.executable, "-m", "llfc"]
    two = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "llfc"]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        for name, cmd in (("one", one), ("two", two)):
            subprocess.run([*cmd, "run", *RUN, "--out", str(t / f"run-{name}")], env=env, check=True)
        rows["llfc run (trains, then measures)"] = compare(t / "run-one" / "results.json",
                                                           t / "run-two" / "results.json")
        ck = t / "run-one" / "pairs" / "independent"
        for name, cmd in (("one", one), ("two", two)):
            subprocess.run([*cmd, "analyze", str(ck / "a" / "final"), str(ck / "b" / "final"),
                            "--train-samples", "100", "--no-progress", "--out", str(t / f"an-{name}")],
                           env=env, check=True, stdout=subprocess.DEVNULL)
        rows["llfc analyze (same checkpoints)"] = compare(t / "an-one" / "results.json",
                                                          t / "an-two" / "results.json")
    print(f"{'command':<34} {'part':<22} {'floats':>7} {'bit-identical':>14} {'max rel. diff':>14}")
    for k, parts in rows.items():
        for part, r in sorted(parts.items()):
            print(f"{k:<34} {part:<22} {r['floats']:>7} {r['bit_identical']:>14} {r['max_rel_diff']:>14.3e}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"world_size": 2, "backend": "gloo", "dataset": "digits",
                                          "threads": 1, "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()

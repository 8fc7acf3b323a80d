"""Write docs/benchmarks.md from the benchmark JSON files (nothing is measured here).

    python benchmarks/report.py [--results benchmarks/results] [--out docs/benchmarks.md]

Reads ``engine.json`` (benchmarks/engine.py), ``matching.json`` (benchmarks/matching.py),
``training.json`` (benchmarks/training.py) and, when present, ``matching-vgg16_bn_paper.json``,
``engine-parts.json``, ``engine-no-fused.json`` and ``engine-no-malloc-tuning.json``. Every number in the written document comes from those files; the prose
around the tables is fixed text in this script, written for the measurements it introduces.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

NAMES = {"mlp": "MLP 784-512-512-512-10", "resnet20": "ResNet-20 (×1, BN)",
         "vgg16_bn": "VGG-16-BN, width 0.25", "vgg16_bn_paper": "VGG-16-BN, paper width",
         "lenet": "LeNet"}


def _load(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


ENGINE_TITLE = ("## Streaming engine (`python benchmarks/engine.py --n 2048`, then `--models mlp --n 10000` and "
                "`--models vgg16_bn_paper --n 256 --alphas 5 --conditions 0`)")


def engine_section(e: dict, title: str = ENGINE_TITLE,
                   intro: bool = True) -> list[str]:
    m = e["machine"]
    rows = e["rows"]
    r0 = rows[0]
    loads = [x for r in rows for x in (r["load_before"], r["load_after"])]
    head = [
        f"Machine: {m['cpu']}, {m['cpu_count']} cores, torch {m['torch']}, Python {m['python']}; "
        f"{r0['threads']} torch thread. **The machine was shared with other jobs**: the 1-minute "
        f"load average was {min(loads):.1f}–{max(loads):.1f} during these runs (on 2 cores), so "
        "wall times are meaningless and only the CPU-time ratios, measured in one process with the "
        "floor and the engine alternating, are reported as results. Memory-bound work (the metric "
        "arithmetic) suffers more from a loaded machine than the convolutions do, so the ratios "
        "are if anything pessimistic.",
        "",
        "The floor is (K + 2) plain forward passes over the same batches (θ_A, θ_B and all K θ_α; "
        f"the engine itself runs K, reusing A's and B's features at α = 1 and 0), timed both as "
        "they are and under the malloc settings the engine runs with (`llfc._malloc`), and the "
        "faster of the two is the floor (rows measured since the fused kernels; earlier rows had "
        "only the first variant); K α values, "
        f"batches of {r0['batch']}, N synthetic samples per timed pass, "
        f"{'–'.join(sorted({str(len(r['engine'])) for r in rows}))} alternating repetitions (ratio = min engine CPU / min floor CPU). "
        "Minor page faults (`getrusage`) of the best repetition of each side. Peak RSS: the "
        "largest resident set sampled after each batch of the engine pass, minus the size before.",
        "",
    ]
    out = [title, ""] + (head if intro else []) + [
        "| model | probes | N | K | conditions | fused kernels | floor CPU s | engine CPU s | **ratio (CPU)** | "
        "minor faults floor | minor faults engine | peak RSS growth | memory budget | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fl = min(r["floor"], key=lambda x: x["cpu_s"])
        en = min(r["engine"], key=lambda x: x["cpu_s"])
        kinds = "" if r["kinds"] == "all" else f" ({','.join(r['kinds'])})"
        out.append(
            f"| {NAMES.get(r['model'], r['model'])}{kinds} | {r['probes']} | "
            f"{r['N']:,} | {r['K']} | {'yes' if r['conditions'] else 'no'} | "
            f"{'yes' if r.get('fused_kernels') else 'no'} | {fl['cpu_s']:.2f} | {en['cpu_s']:.2f} | "
            f"**{r['ratio_cpu']:.2f}** | {fl['minor_faults']:,} | {en['minor_faults']:,} | "
            f"{r['peak_rss_growth_mb']:.0f} MB | {r['memory_budget'] / 1e9:.0f} GB | "
            f"{r['load_before']:.1f}–{r['load_after']:.1f} |")
    return out


def engine_parts_section(ep: dict | None) -> list[str]:
    if not ep:
        return []
    f = ep["fixed_cost"]
    out = ["### Fused kernels and the cost per pass (`python benchmarks/engine_parts.py`)", "",
           f"Each function of `llfc.metrics.fused` on synthetic float32 rows, numba kernel against "
           f"the torch path (`LLFC_FUSED=0`, writing into a reused buffer as the engine does), "
           f"alternating, {ep['threads']} torch thread, CPU ms per call (best of 5 rounds of 20 "
           f"calls); relative error: the largest against a float64 recomputation. Load "
           f"{ep['load_before']:.1f}–{ep['load_after']:.1f}.", "",
           "| function | rows × dim | fused ms | torch ms | **speedup** | fused rel. error | torch rel. error |",
           "|---|---|---|---|---|---|---|"]
    for r in ep["kernels"]:
        out.append(f"| `{r['function']}` | {r['rows']} × {r['dim']:,} | {r['fused_ms']:.3f} | "
                   f"{r['torch_ms']:.3f} | **{r['speedup']:.2f}** | {r['fused_rel_err']:.0e} | "
                   f"{r['torch_rel_err']:.0e} |")
    out += ["", f"Cost per pass: `measure_pair` on the MLP (K = {f['K']}, batches of {f['batch']}, no "
            f"conditions) over 1 batch took {f['one_batch_s']:.3f} CPU s and over 8 batches "
            f"{f['eight_batches_s']:.3f} s: **{f['per_batch_s'] * 1e3:.1f} ms per batch** (the floor's "
            f"(K + 2) forward passes: {f['floor_per_batch_s'] * 1e3:.1f} ms) **plus "
            f"{f['per_pass_s'] * 1e3:.1f} ms per pass**.", ""]
    c = ep.get("compile")
    if c:
        out += [f"Compilation: the first call of the four kernels in a fresh process took "
                f"**{c['empty_cache_s']:.2f} CPU s** with an empty numba cache and "
                f"**{c['filled_cache_s']:.2f} s** with it filled (both include loading numba and its "
                "compiler).", ""]
    return out


def matching_section(mt: dict | None, paper: dict | None) -> list[str]:
    out = ["## Permutation alignment (`python benchmarks/matching.py`)", ""]
    if mt:
        out += [f"Two independently initialised models (no training), {mt['threads']} torch threads, "
                "restarts = 1 (`benchmarks/results/matching.json`, measured on the idle machine "
                "before this round; see also [permutation.md](permutation.md)).", "",
                "| model | params | groups | weight matching s | CPU s | sweeps |", "|---|---|---|---|---|---|"]
        for r in mt["weight_matching"]:
            out.append(f"| {r['model']} | {r['params_M']:.2f}M | {r['groups']} | "
                       f"{r['weight_matching_s']:.2f} | {r['weight_matching_cpu_s']:.2f} | {r['sweeps']} |")
        out.append("")
    if paper:
        r = paper["weight_matching"][0]
        out += ["The paper's VGG-16-BN (`python benchmarks/matching.py --threads 1 --models "
                "vgg16_bn_paper --am-samples '' --out benchmarks/results/matching-vgg16_bn_paper.json`; "
                f"{r['params_M']:.1f}M parameters, 512-4096-4096-10 classifier, {r['groups']} groups, "
                f"{paper['threads']} torch thread, 1-minute load {r['load_average_1min_before']:.1f} before and "
                f"{paper['load_average_1min_at_end']:.1f} after on {paper['cpu_count']} shared cores, so only "
                f"the CPU time counts; wall {r['weight_matching_s']:.0f} s): "
                f"**{r['weight_matching_cpu_s']:.0f} CPU s, {r['sweeps']} sweeps**, objective "
                f"{r['objective']:.2f} ({r['objective_gain']:.2f} above the identity). Of the CPU time, "
                f"{r['cpu_products_s']:.0f} s formed similarities ({r['products_full']} terms in full, "
                f"{r['products_low_rank']} by low-rank updates), {r['cpu_assignments_s']:.0f} s went to "
                f"`linear_sum_assignment` and {r['cpu_objective_s']:.0f} s to J after each sweep. Target "
                "(issue 11): < 15 s and ≤ 10 sweeps at an objective at least as good: **not "
                "reached**, see the analysis below.", ""]
    return out


def training_section(t: dict | None) -> list[str]:
    if not t:
        return []
    out = ["## Training loop (`python benchmarks/training.py`)", "",
           f"`llfc.train.train` against a plain PyTorch loop (same model, initial weights, optimiser, "
           f"batch order; data in memory), {t['threads']} torch thread, {t['cpu_count']} cores, torch "
           f"{t['torch']}; the two alternate in one process, {len(t['rows'][0]['plain'])} repetitions "
           "each, throughput ratio = min plain CPU / min llfc CPU (1.0: as fast as the plain loop; "
           "issue 11's target ≥ 0.95). The weights after training are compared too.", "",
           "| model | batch | steps | plain CPU s | llfc CPU s | **throughput (CPU)** | throughput (wall) | "
           "max \|Δw\| | load |", "|---|---|---|---|---|---|---|---|---|"]
    for r in t["rows"]:
        name = (f"ResNet-20 (×{r['model_args']['width']}, BN)" if r["model"] == "resnet20"
                else NAMES.get(r["model"], r["model"]))
        out.append(f"| {name} | {r['batch']} | {r['steps']} | "
                   f"{min(x['cpu_s'] for x in r['plain']):.2f} | {min(x['cpu_s'] for x in r['llfc']):.2f} | "
                   f"**{r['throughput_ratio_cpu']:.3f}** | {r['throughput_ratio_wall']:.3f} | "
                   f"{r['max_weight_difference']:.0e} | {r['load_before']:.1f}–{r['load_after']:.1f} |")
    return out + [""]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--notes", default=str(ROOT / "benchmarks" / "notes.md"),
                    help="hand-written analysis appended after the tables")
    args = ap.parse_args(argv)
    res = Path(args.results)
    lines = ["# Benchmarks", "",
             "Generated by `python benchmarks/report.py` from the JSON under `benchmarks/results/` "
             "(do not edit by hand; the analysis at the end comes from `benchmarks/notes.md`).", ""]
    e = _load(res / "engine.json")
    if e:
        lines += engine_section(e) + [""]
    lines += engine_parts_section(_load(res / "engine-parts.json"))
    variants = [  # (JSON, title): the same benchmark with one of the engine's means switched off
        ("engine-no-fused.json", "### The same without the fused kernels (`LLFC_FUSED=0 python "
         "benchmarks/engine.py --models mlp,resnet20 --n 2048 --json benchmarks/results/engine-no-fused.json`)"),
        ("engine-no-malloc-tuning.json", "### The same without llfc's malloc tuning (`LLFC_MALLOC_TUNING=0 "
         "python benchmarks/engine.py --models resnet20 --conditions 0 --json "
         "benchmarks/results/engine-no-malloc-tuning.json`)"),
    ]
    for name, title in variants:
        v = _load(res / name)
        if v:
            lines += engine_section(v, title, intro=False) + [""]
    lines += matching_section(_load(res / "matching.json"), _load(res / "matching-vgg16_bn_paper.json"))
    lines += training_section(_load(res / "training.json"))
    notes = Path(args.notes)
    if notes.exists():
        lines += [notes.read_text().rstrip(), ""]
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

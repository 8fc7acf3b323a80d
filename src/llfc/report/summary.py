"""The short summary table printed at the end of a run."""

from __future__ import annotations

LLFC_ALPHAS = (0.25, 0.5, 0.75)


def worst_layer(pair: dict, alphas=LLFC_ALPHAS, kinds=("pre", "norm", "post", "residual")) -> dict | None:
    """The hidden layer with the largest ratio E[1−cos_α] / E[1−cos_AB] over ``alphas``
    (the acceptance criterion R_ℓ(α) of paper-digest §8). None without LLFC results."""
    best = None
    for ly in pair.get("llfc", []):
        if ly["kind"] not in kinds:
            continue
        base = ly["baseline"]["mean"]
        for i, a in enumerate(pair["alphas"]):
            if not any(abs(a - t) < 1e-9 for t in alphas):
                continue
            d = ly["distance"]["mean"][i]
            ratio = d / base if base > 0 else (0.0 if d == 0 else float("inf"))
            if best is None or ratio > best["ratio"]:
                best = {"layer": ly["name"], "alpha": a, "distance": d, "baseline": base, "ratio": ratio}
    return best


def summary_table(pairs: dict) -> str:
    """A fixed-width table: one line per pair with endpoint errors, barriers, worst-layer LLFC."""
    head = (f"{'pair':<22} {'err A':>7} {'err B':>7} {'err barrier':>12} {'loss barrier':>13}  "
            f"{'worst hidden layer LLFC (α∈.25/.5/.75)':<40}")
    lines = [head, "-" * len(head)]
    for name, pr in pairs.items():
        t = pr["lmc"]["test"]
        i1, i0 = pr["alphas"].index(1.0), pr["alphas"].index(0.0)
        b = t["barriers"]
        w = worst_layer(pr)
        wtxt = (f"{w['layer']} @α={w['alpha']:g}: {w['distance']:.2e} vs {w['baseline']:.2e} "
                f"(×{w['ratio']:.3f})" if w else "-")
        lines.append(f"{name:<22} {100 * t['error'][i1]:6.2f}% {100 * t['error'][i0]:6.2f}% "
                     f"{100 * b['error_barrier_frankle']:9.2f} pp {b['loss_barrier_entezari']:13.4f}  {wtxt}")
    for name, pr in pairs.items():
        st = [r for r in pr.get("stitching", []) if r["role"] == "stitched"]
        if st:
            ends = [r["error"] for r in pr["stitching"] if r["role"] == "endpoint"]
            worst = max(st, key=lambda r: r["error"])
            lines.append(f"{name:<22} identity stitching: stitched error {100 * min(r['error'] for r in st):.2f}–"
                         f"{100 * worst['error']:.2f}% (worst at {worst['layer']}); endpoints "
                         f"{100 * ends[0]:.2f}% / {100 * ends[1]:.2f}%")
    lines.append("err barrier: Frankle et al. 2020, max_α Err(θ_α) − mean of endpoints (test set); "
                 "loss barrier: Entezari et al. 2022.")
    return "\n".join(lines)

"""The short summary table printed at the end of a run."""

from __future__ import annotations

from llfc import criteria
from llfc.criteria import worst_layer  # re-exported: llfc.report.worst_layer

__all__ = ["dry_run_note", "summary_table", "worst_layer"]


def dry_run_note(results: dict) -> str | None:
    """The DRY RUN warning shown above the summary table and at the top of report.html when results.json
    says ``"dry_run": true`` (``llfc reproduce --dry-run``, docs/results.md), else None."""
    if not results.get("dry_run"):
        return None
    return (
        "DRY RUN: every stage ran for a few batches only (llfc reproduce --dry-run); these "
        "numbers check that the pipeline works and are not results."
    )


def _verdict(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "no")


def summary_table(pairs: dict, note: str | None = None) -> str:
    """A fixed-width table: one line per pair with endpoint errors, barriers, worst-layer LLFC
    and whether LMC and LLFC hold by the criteria of :mod:`llfc.criteria` (stated below the
    table, with the number of hidden layers the LLFC verdict covers). ``note`` (e.g. "dry run: ...")
    is printed above the table."""
    head = (
        f"{'pair':<22} {'err A':>7} {'err B':>7} {'err barrier':>12} {'loss barrier':>13} "
        f"{'LMC':>4} {'LLFC':>5}  {'worst hidden layer LLFC (α∈.25/.5/.75)':<40}"
    )
    lines = ([note] if note else []) + [head, "-" * len(head)]
    any_at_end = False
    for name, pr in pairs.items():
        t = pr["lmc"]["test"]
        i1, i0 = pr["alphas"].index(1.0), pr["alphas"].index(0.0)
        b = t["barriers"]
        w = worst_layer(pr)
        wtxt = (
            f"{w['layer']} @α={w['alpha']:g}: {w['distance']:.2e} vs {w['baseline']:.2e} "
            f"(×{w['ratio']:.3f}; max {w['max_distance']:.2e})"
            if w
            else "-"
        )
        at_end = b.get("error_barrier_interior", b["error_barrier_frankle"]) < b["error_barrier_frankle"]
        any_at_end = any_at_end or at_end
        lines.append(
            f"{name:<22} {100 * t['error'][i1]:6.2f}% {100 * t['error'][i0]:6.2f}% "
            f"{100 * b['error_barrier_frankle']:8.2f}{'*' if at_end else ' '} pp {b['loss_barrier_entezari']:13.4f} "
            f"{_verdict(criteria.lmc_holds(pr)):>4} {_verdict(criteria.llfc_holds(pr)):>5}  {wtxt}"
        )
    for name, pr in pairs.items():
        st = [r for r in pr.get("stitching", []) if r["role"] == "stitched"]
        if st:
            ends = [r["error"] for r in pr["stitching"] if r["role"] == "endpoint"]
            worst = max(st, key=lambda r: r["error"])
            lines.append(
                f"{name:<22} identity stitching: stitched error {100 * min(r['error'] for r in st):.2f}–"
                f"{100 * worst['error']:.2f}% (worst at {worst['layer']}); endpoints "
                f"{100 * ends[0]:.2f}% / {100 * ends[1]:.2f}%"
            )
    lines.append(
        "err barrier: Frankle et al. 2020, max_α Err(θ_α) − mean of endpoints (test set); "
        "loss barrier: Entezari et al. 2022."
    )
    if any_at_end:
        lines.append(
            "*: the maximum is at an endpoint (the worse model), not on the path between them; "
            "error_barrier_interior in results.json excludes the endpoints."
        )
    lines.append(criteria.describe())
    counts = {name: sum(ly["kind"] in criteria.HIDDEN_KINDS for ly in pr.get("llfc", [])) for name, pr in pairs.items()}
    counts = {name: n for name, n in counts.items() if pairs[name].get("llfc")}
    if counts:  # a verdict over one hand-picked layer (--probes) says less than one over all of them
        ns = set(counts.values())
        lines.append(
            f"LLFC is judged over the {ns.pop()} hidden layer(s) measured."
            if len(ns) == 1
            else "LLFC is judged over the hidden layers measured: "
            + ", ".join(f"{name} {n}" for name, n in counts.items())
            + "."
        )
    return "\n".join(lines)

"""Tables, figures and summary of a ``finetune`` run (Cross-Task Linearity; :mod:`llfc.finetune`).

Every function takes the whole results.json dict of that run (``results["pairs"]``: pair name →
:func:`llfc.finetune.measure_finetune_pair` output plus ``label``, ``pretrain_epochs``, ``verdict``).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import cast

import numpy as np

from llfc import criteria
from llfc.checkpoint import atomic_write_text
from llfc.report.plots import _COLORS, _save, plt
from llfc.report.summary import dry_run_note

FLOOR = 1e-4  # log-scale figures draw smaller distances (e.g. an exact 0) at this value
CTL_COLUMNS = (
    "pair",
    "layer",
    "kind",
    "alpha",
    "beta",
    "d_target_mean",
    "d_target_std",
    "d_target_whole",
    "coef_target_mean",
    "coef_target_whole",
    "d_A_mean",
    "d_B_mean",
    "baseline_mean",
    "baseline_whole",
)


def _point_index(pair: dict, a: float, b: float):
    for i, (pa, pb) in enumerate(pair["points"]):
        if abs(pa - a) < 1e-9 and abs(pb - b) < 1e-9:
            return i
    return None


def write_ctl_table(results: dict, out: Path) -> Path:
    """``ctl.csv``: one row per pair, probe and (α, β) (columns :data:`CTL_COLUMNS`)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CTL_COLUMNS)
    for name, pr in results["pairs"].items():
        for ly in pr["ctl"]:
            for i, (a, b) in enumerate(pr["points"]):
                t = ly["target"]
                w.writerow(
                    [
                        name,
                        ly["name"],
                        ly["kind"],
                        a,
                        b,
                        t["distance"]["mean"][i],
                        t["distance"]["std"][i],
                        t["distance"]["whole"][i],
                        t["coef"]["mean"][i],
                        t["coef"]["whole"][i],
                        ly["A"]["distance"]["mean"][i],
                        ly["B"]["distance"]["mean"][i],
                        ly["baseline"]["distance"]["mean"],
                        ly["baseline"]["distance"]["whole"],
                    ]
                )
    return atomic_write_text(Path(out) / "ctl.csv", buf.getvalue())


def _pct(v: float) -> str:
    return f"{100 * v:.1f}"


def summary_ctl(results: dict) -> str:
    """A plain-text table: per pair the endpoint and merged (α = β = ½) task errors and the CTL verdict,
    below the DRY RUN warning of a dry run (:func:`llfc.report.summary.dry_run_note`)."""
    t1, t2 = results["tasks"][1]["name"], results["tasks"][2]["name"]
    note = dry_run_note(results)
    lines = ([note] if note else []) + [
        f"{'pair':<16} {'k':>3} {'A on ' + t1:>12} {'B on ' + t2:>12} {'½A+½B on ' + t1:>16} "
        f"{'½A+½B on ' + t2:>16} {'worst layer':>14} {'E[1-cos]':>9} {'baseline':>9} {'CTL holds':>9}"
    ]
    for name, pr in results["pairs"].items():
        i = _point_index(pr, 0.5, 0.5)
        e = pr["errors"]
        m = e["points"][i] if i is not None else {t1: float("nan"), t2: float("nan")}
        v = pr["verdict"]["worst"] or {}
        holds = pr["verdict"]["holds"]
        lines.append(
            f"{name:<16} {pr['pretrain_epochs']:>3} {_pct(e['A'][t1]):>12} {_pct(e['B'][t2]):>12} "
            f"{_pct(m[t1]):>16} {_pct(m[t2]):>16} {v.get('layer', '-'):>14} "
            f"{v.get('distance', float('nan')):>9.4f} {v.get('baseline', float('nan')):>9.4f} "
            f"{'yes' if holds else 'no' if holds is not None else '-':>9}"
        )
    lines.append(
        "errors in %; worst layer: largest E[1−cos(f_αβ, αf_A+βf_B)] / E[1−cos(f_A, f_B)] over hidden "
        "layers and α+β=1 points. " + criteria.describe_llfc("CTL holds (LLFC thresholds)")
    )
    return "\n".join(lines)


def _main(results: dict):
    for name, pr in results["pairs"].items():
        if pr.get("main"):
            return name, pr
    return next(iter(results["pairs"].items()))


def plot_layers(results: dict, path: Path, point=(0.5, 0.5)) -> Path:
    """Per layer: CTL distance E[1−cos(f_αβ, αf_A+βf_B)] at ``point`` for the main pair and the control
    (solid), the baseline E[1−cos(f_A, f_B)] (dashed) and E[1−cos(f_αβ, f_A)] (dotted), log scale."""
    show = [(n, p) for n, p in results["pairs"].items() if p.get("main") or p["kind"] == "finetune-control"]
    names = [ly["name"] for ly in show[0][1]["ctl"]]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(8, 0.45 * len(names) + 4), 4.2))
    for c, (_, pr) in enumerate(show):
        i = _point_index(pr, *point)
        col = _COLORS[c % len(_COLORS)]
        d = [ly["target"]["distance"]["mean"][i] for ly in pr["ctl"]]
        base = [ly["baseline"]["distance"]["mean"] for ly in pr["ctl"]]
        da = [ly["A"]["distance"]["mean"][i] for ly in pr["ctl"]]
        who = (
            "control (different parents)"
            if pr["kind"] == "finetune-control"
            else f"one parent, pretrained {pr['pretrain_epochs']} ep."
        )
        ax.plot(x, np.maximum(d, FLOOR), "-o", color=col, ms=4, label=f"{who}: f_αβ vs αf_A + βf_B")
        ax.plot(x, np.maximum(base, FLOOR), "--s", color=col, ms=3, alpha=0.7, label=f"{who}: f_A vs f_B")
        ax.plot(x, np.maximum(da, FLOOR), ":", color=col, alpha=0.7, label=f"{who}: f_αβ vs f_A")
    ax.axhline(criteria.LLFC_MAX_DISTANCE, color="grey", lw=0.8)
    ax.text(
        x[0] + 0.1,
        criteria.LLFC_MAX_DISTANCE * 1.1,
        f"threshold {criteria.LLFC_MAX_DISTANCE:g}",
        va="bottom",
        ha="left",
        fontsize=7,
        color="grey",
    )
    ax.set_yscale("log")
    ax.set_ylim(bottom=FLOOR / 1.5)
    ax.set_xticks(x, names, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("E_x[1 − cos]")
    ax.set_title(
        f"Cross-Task Linearity per layer at α = {point[0]:g}, β = {point[1]:g}  (values below "
        f"{FLOOR:g} drawn at {FLOOR:g}: a first layer is linear in θ, distance 0)",
        fontsize=9,
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return _save(fig, path)


def _lambda_panel(results: dict, key: str, path: Path, title: str, ylabel: str) -> Path | None:
    _name, pr = _main(results)
    rows = [r for r in pr[key] if "invalid" not in r]  # invalid networks (e.g. negative BN variance) are not drawn
    if not rows:
        return None
    lams = [r["lambda"] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for c, ly in enumerate(pr["ctl"]):
        j = next(i for i, l2 in enumerate(rows[0]["ctl"]) if l2["name"] == ly["name"])
        d = [r["ctl"][j]["target"]["distance"]["mean"][0] for r in rows]
        a1.plot(
            lams,
            np.maximum(d, FLOOR),
            "-o",
            ms=3,
            color=plt.cm.viridis(c / max(1, len(pr["ctl"]) - 1)),
            label=ly["name"],
        )
    a1.set_yscale("log")
    a1.set_xlabel("λ")
    a1.set_ylabel(ylabel)
    a1.grid(alpha=0.3, which="both")
    if len(pr["ctl"]) <= 8:
        a1.legend(fontsize=6, ncol=2)
    else:  # many layers: colour encodes depth
        a1.set_title(f"{len(pr['ctl'])} layers; colour: first (dark) → last (yellow)", fontsize=8)
    for c, t in enumerate(rows[0]["errors"]):
        a2.plot(lams, [100 * r["errors"][t] for r in rows], "-o", ms=3, color=_COLORS[c], label=f"test error on {t}")
    a2.set_xlabel("λ")
    a2.set_ylabel("error (%)")
    a2.grid(alpha=0.3)
    a2.legend(fontsize=7)
    skipped = [r["lambda"] for r in pr[key] if "invalid" in r]
    fig.suptitle(
        title
        + (f"\n(λ = {', '.join(f'{v:g}' for v in skipped)}: no valid network, see results.json)" if skipped else ""),
        fontsize=10,
    )
    fig.tight_layout()
    return _save(fig, path)


def plot_stitching(results: dict, path: Path) -> Path:
    """Task errors of the merged model with layer ℓ replaced by α H_A + β H_B (main pair and control);
    the unstitched merged model's errors as horizontal lines."""
    show = [
        (n, p)
        for n, p in results["pairs"].items()
        if (p.get("main") or p["kind"] == "finetune-control") and p.get("stitching")
    ]
    fig, axes = plt.subplots(1, len(show), figsize=(5.5 * len(show), 3.6), squeeze=False)
    for ax, (_, pr) in zip(axes[0], show):
        st = pr["stitching"][0]
        rows = st["rows"][1:]
        x = np.arange(len(rows))
        for c, t in enumerate(st["rows"][0]["errors"]):
            ax.plot(x, [100 * r["errors"][t] for r in rows], "-o", ms=3, color=_COLORS[c], label=f"stitched, on {t}")
            ax.axhline(100 * st["rows"][0]["errors"][t], color=_COLORS[c], ls=":", lw=1, label=f"merged, on {t}")
        ax.set_xticks(x, [r["layer"] for r in rows], rotation=45, ha="right", fontsize=7)
        ax.set_ylabel("test error (%)")
        ax.set_title(
            f"{pr['label']}\nα H_A + β H_B inserted, (α, β) = ({st['point'][0]:g}, {st['point'][1]:g})", fontsize=8
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    return _save(fig, path)


def plot_sweep(results: dict, path: Path) -> Path:
    """Pretraining length k vs the worst hidden layer's CTL distance and baseline (α = β = ½), and the
    merged model's task errors."""
    pairs = sorted(
        [p for p in results["pairs"].values() if p["kind"] == "finetune"], key=lambda p: p["pretrain_epochs"]
    )
    ks = [p["pretrain_epochs"] for p in pairs]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.4))
    worst = [p["verdict"]["worst"] for p in pairs]
    a1.plot(ks, [w["max_distance"] for w in worst], "-o", color=_COLORS[0], label="max over layers of E[1−cos] (CTL)")
    a1.plot(
        ks,
        [max(ly["baseline"]["distance"]["mean"] for ly in p["ctl"] if ly["kind"] != "logits") for p in pairs],
        "--s",
        color=_COLORS[1],
        label="max over layers of baseline",
    )
    a1.axhline(criteria.LLFC_MAX_DISTANCE, color="grey", lw=0.8, label=f"threshold {criteria.LLFC_MAX_DISTANCE:g}")
    a1.set_yscale("log")
    a1.set_xticks(ks)
    a2.set_xticks(ks)
    a1.set_xlabel("pretraining epochs k")
    a1.set_ylabel("E_x[1 − cos]")
    a1.grid(alpha=0.3, which="both")
    a1.legend(fontsize=7)
    t = [x["name"] for x in results["tasks"][1:]]
    for c, tn in enumerate(t):
        i = [_point_index(p, 0.5, 0.5) for p in pairs]
        a2.plot(
            ks,
            [100 * p["errors"]["points"][j][tn] for p, j in zip(pairs, i)],
            "-o",
            color=_COLORS[c],
            label=f"½θ_A+½θ_B on {tn}",
        )
        a2.plot(
            ks,
            [100 * p["errors"]["A" if c == 0 else "B"][tn] for p in pairs],
            ":",
            color=_COLORS[c],
            label=f"child fine-tuned on {tn}",
        )
    a2.set_xlabel("pretraining epochs k")
    a2.set_ylabel("test error (%)")
    a2.grid(alpha=0.3)
    a2.legend(fontsize=7)
    fig.suptitle("CTL vs length of pretraining (one parent forked at every k)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_ctl(results: dict, out: Path) -> list[Path]:
    """Write every figure of a finetune run into ``out``; returns the paths."""
    out = Path(out)
    paths: list[Path | None] = [plot_layers(results, out / "ctl_layers.png")]
    _name, main = _main(results)
    if main.get("arithmetic"):
        paths += [
            _lambda_panel(
                results,
                "arithmetic",
                out / "ctl_arithmetic.png",
                "Task arithmetic θ_0 + λ(τ_A + τ_B) vs ½f(θ_0 + 2λτ_A) + ½f(θ_0 + 2λτ_B)",
                "E[1 − cos] per layer",
            ),
            _lambda_panel(
                results,
                "negation",
                out / "ctl_negation.png",
                "Negation: f(θ_0 − λτ_A) vs 2f(θ_0) − f(θ_0 + λτ_A)",
                "E[1 − cos] per layer",
            ),
        ]
        paths = [p for p in paths if p is not None]
    if main.get("stitching"):
        paths.append(plot_stitching(results, out / "ctl_stitching.png"))
    if sum(p["kind"] == "finetune" for p in results["pairs"].values()) > 1:
        paths.append(plot_sweep(results, out / "ctl_sweep.png"))
    return cast(list[Path], paths)  # the None of _lambda_panel are filtered out above

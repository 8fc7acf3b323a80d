"""Figures of a run (matplotlib, Agg backend). Each function takes the ``pairs`` mapping of
results.json (pair name → pair results, docs/results.md) and writes one PNG atomically."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from llfc.checkpoint import atomic_target  # noqa: E402

_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
LLFC_ALPHAS = (0.25, 0.5, 0.75)


def _save(fig, path: Path) -> Path:
    path = Path(path)
    try:
        with atomic_target(path) as tmp:
            fig.savefig(tmp, dpi=130, bbox_inches="tight", format="png")
    finally:
        plt.close(fig)
    return path


def _std(values) -> np.ndarray:
    """Standard deviations over samples as a float array for ``yerr``: NaN where the std is undefined
    (one sample: null in results.json, NaN in memory), which matplotlib draws without an error bar."""
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def _label(name: str, pair: dict) -> str:
    return pair.get("label", name)


def plot_lmc(pairs: dict, path: Path) -> Path:
    """Loss and error along the path (α weights A) per pair: test solid, train dashed; the
    straight line between the endpoints (the Entezari reference) dotted. The loss panels share
    one y-scale and the error panels another, so a barrier's size compares across pairs (an
    autoscaled axis makes a 0.3 pp bump look as large as a 20 pp one)."""
    n = len(pairs)
    fig, axes = plt.subplots(n, 2, figsize=(9, 2.8 * n), squeeze=False, sharey="col")
    for row, (name, pr) in enumerate(pairs.items()):
        al = np.array(pr["alphas"])
        ends = [_alpha_index(pr["alphas"], a) for a in (0.0, 1.0)]  # not the grid's ends under extrapolation
        for col, key in enumerate(("loss", "error")):
            ax = axes[row, col]
            for split, style, color in (("test", "-", _COLORS[0]), ("train", "--", _COLORS[1])):
                lmc = pr["lmc"].get(split)
                if not lmc:
                    continue
                v = np.array(lmc[key]) * (100 if key == "error" else 1)
                ax.plot(al, v, style, marker="o", ms=3, color=color, label=split)
                ax.plot([0, 1], v[ends], ":", color=color, lw=1)
            ax.set_xlabel("α  (θ_α = α·θ_A + (1−α)·θ_B)")
            ax.set_ylabel("error (%)" if key == "error" else "cross-entropy loss")
            b = pr["lmc"]["test"]["barriers"]
            title = (
                f"{_label(name, pr)}: test error barrier {100 * b['error_barrier_frankle']:.2f} pp"
                if key == "error"
                else f"{_label(name, pr)}: test loss barrier {b['loss_barrier_entezari']:.3f}"
            )
            ax.set_title(title, fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(
        "Linear mode connectivity along the path (dotted: endpoints' interpolation; one y-scale per column)",
        fontsize=10,
    )
    fig.tight_layout()
    return _save(fig, path)


def _alpha_index(alphas, a):
    for i, v in enumerate(alphas):
        if abs(v - a) < 1e-9:
            return i
    return None


def plot_llfc(pairs: dict, path: Path, alphas=LLFC_ALPHAS, per_row: int = 24) -> Path:
    """Per layer, E[1 − cos(f(θ_α), α f_A + (1−α) f_B)] at α ∈ {0.25, 0.5, 0.75} next to the
    baseline E[1 − cos(f_A, f_B)]; error bars: std over samples (LLFC paper Figs. 2–4), none where it
    is undefined (one sample). Deep networks are wrapped onto as few rows as hold at most
    ``per_row`` layers each, of equal length (26 layers: two rows of 13, not 24 and 2)."""
    pairs = {k: v for k, v in pairs.items() if v.get("llfc")}
    panels = []  # (pair name, pair, slice of layers)
    for name, pr in pairs.items():
        nl = len(pr["llfc"])
        size = -(-nl // -(-nl // per_row))  # ceil(nl / number of rows)
        for start in range(0, nl, size):
            panels.append((name, pr, slice(start, min(start + size, nl))))
    longest = max(sl.stop - sl.start for _, _, sl in panels)
    width = max(7, 0.55 * longest + 3)
    fig, axes = plt.subplots(len(panels), 1, figsize=(width, 3.0 * len(panels)), squeeze=False)
    for row, (name, pr, sl) in enumerate(panels):
        ax = axes[row, 0]
        layers = pr["llfc"][sl]
        x = np.arange(len(layers))
        idx = [(a, _alpha_index(pr["alphas"], a)) for a in alphas]
        idx = [(a, i) for a, i in idx if i is not None]
        w = 0.8 / (len(idx) + 1)
        top = 1e-12  # the highest bar (mean + std; no std: the mean alone), distances and baselines alike
        for j, (a, i) in enumerate(idx):
            m = [ly["distance"]["mean"][i] for ly in layers]
            s = _std(ly["distance"]["std"][i] for ly in layers)
            top = max(top, float(np.max(np.array(m) + np.nan_to_num(s))))
            ax.bar(
                x + j * w, m, w, yerr=s, capsize=1.5, color=_COLORS[j % 3 + 2], label=f"α = {a:g}", error_kw={"lw": 0.6}
            )
        m = [ly["baseline"]["mean"] for ly in layers]
        s = _std(ly["baseline"]["std"] for ly in layers)
        ax.bar(
            x + len(idx) * w, m, w, yerr=s, capsize=1.5, color="0.6", label="A vs B (baseline)", error_kw={"lw": 0.6}
        )
        top = max(top, float(np.max(np.array(m) + np.nan_to_num(s))))
        for xi, ly in zip(x, layers):  # worst ratio over the plotted α, written above the layer
            base = ly["baseline"]["mean"]
            r = max((ly["distance"]["mean"][i] for _, i in idx), default=0.0) / base if base > 0 else 0.0
            label = "exact" if r < 1e-8 else f"×{r:.2g}"  # e.g. the first layer: linear in θ
            ax.text(xi + w * len(idx) / 2, top * 1.04, label, ha="center", va="bottom", fontsize=6)
        ax.set_ylim(0, top * 1.35)
        ax.set_xlim(-0.5, longest - 0.2)  # one scale for every row
        ax.set_xticks(x + w * len(idx) / 2)
        ax.set_xticklabels([f"{ly['name']}\n({ly['kind']})" for ly in layers], rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("E[1 − cos]")
        part = "" if sl.start == 0 and sl.stop == len(pr["llfc"]) else f" (layers {sl.start + 1}–{sl.stop})"
        ax.set_title(f"{_label(name, pr)}: LLFC distance per layer{part}", fontsize=9)
        ax.legend(fontsize=7, ncol=4, loc="upper left")
        ax.grid(axis="y", alpha=0.3)
    fig.text(
        0.99,
        0.0,
        "×r: max over the plotted α of E[1−cos_α] / E[1−cos_AB] (exact: < 1e-8); bars: mean ± std over samples "
        "(no error bar where the std is undefined: one sample)",
        ha="right",
        va="bottom",
        fontsize=6,
        color="0.35",
    )
    fig.tight_layout()
    return _save(fig, path)


def plot_weak_additivity(pairs: dict, path: Path, alpha: float = 0.5) -> Path:
    """Per activation layer (ReLU; GELU in transformers) and pair: weak-additivity violation 1 − cos at α
    (mean ± std over samples; no error bar where the std is undefined) and the sign-agreement rate
    P[g_A·g_B ≥ 0] (LLFC paper Def. 3, Figs. 5–6)."""
    pairs = {k: v for k, v in pairs.items() if v.get("weak_additivity")}
    names = [ly["name"] for ly in next(iter(pairs.values()))["weak_additivity"]]
    x = np.arange(len(names))
    w = 0.8 / max(len(pairs), 1)
    fig, axes = plt.subplots(1, 2, figsize=(max(9, 1.2 * len(names) + 5), 3.4))
    for j, (name, pr) in enumerate(pairs.items()):
        i = _alpha_index(pr["alphas"], alpha)
        m = [ly["distance"]["mean"][i] for ly in pr["weak_additivity"]]
        s = _std(ly["distance"]["std"][i] for ly in pr["weak_additivity"])
        axes[0].bar(
            x + j * w,
            m,
            w,
            yerr=s,
            capsize=1.5,
            color=_COLORS[j % len(_COLORS)],
            label=_label(name, pr),
            error_kw={"lw": 0.6},
        )
        sa = [ly["sign_agreement"]["mean"] for ly in pr["weak_additivity"]]
        axes[1].bar(x + j * w, sa, w, color=_COLORS[j % len(_COLORS)], label=_label(name, pr))
    axes[0].set_title(
        f"weak additivity violation at α = {alpha:g}: 1 − cos(σ(αg_A+(1−α)g_B), ασ(g_A)+(1−α)σ(g_B))", fontsize=8
    )
    axes[1].set_title("sign agreement of pre-activations P[g_A·g_B ≥ 0]", fontsize=8)
    axes[1].set_ylim(0, 1.0)
    axes[0].set_ylim(0, axes[0].get_ylim()[1] * 1.3)
    axes[0].set_ylabel("E[1 − cos] ± std")
    axes[1].set_ylabel("fraction of units")
    for ax in axes:
        ax.set_xticks(x + w * (len(pairs) - 1) / 2)
        ax.set_xticklabels(names, rotation=45, ha="right", fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[1].get_legend_handles_labels()
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=8, frameon=False)
    return _save(fig, path)


def plot_commutativity(pairs: dict, path: Path) -> Path:
    """Per layer and pair: Dist_com against Dist_W and Dist_H (log scale; LLFC paper Fig. 7)."""
    pairs = {k: v for k, v in pairs.items() if v.get("commutativity")}
    n = len(pairs)
    # one shared log axis starting below the smallest value: bars compare across pairs, and a
    # bar's height is not an artefact of where an autoscaled axis happens to start
    fig, axes = plt.subplots(1, n, figsize=(max(4.5 * n, 6), 3.6), squeeze=False, sharey=True)
    vals = [
        max(ly[k], 1e-12)
        for pr in pairs.values()
        for ly in pr["commutativity"]
        for k in ("dist_com", "dist_W", "dist_H")
    ]
    lo, hi = min(vals), max(vals)
    for j, (name, pr) in enumerate(pairs.items()):
        ax = axes[0, j]
        layers = pr["commutativity"]
        x = np.arange(len(layers))
        for k, (key, lab) in enumerate((("dist_com", "Dist_com"), ("dist_W", "Dist_W"), ("dist_H", "Dist_H"))):
            vals = [max(ly[key], 1e-12) for ly in layers]
            ax.bar(x + k * 0.27, vals, 0.27, color=_COLORS[k], label=lab)
        ax.set_yscale("log")
        ax.set_ylim(lo / 3, hi * 4)
        if j == 0:
            ax.set_ylabel("dist(X, Y) = ‖X−Y‖² / (‖X‖‖Y‖)")
        ax.set_xticks(x + 0.27)
        ax.set_xticklabels([ly["name"] for ly in layers], rotation=45, ha="right", fontsize=7)
        ax.set_title(f"{_label(name, pr)}: commutativity", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.tight_layout(rect=(0, 0, 1, 0.9))  # one legend above the panels: it covers no bar
    fig.legend(handles, labels, loc="upper center", ncol=3, fontsize=8, frameon=False)
    return _save(fig, path)


def plot_stitching(pairs: dict, path: Path) -> Path:
    """Test error of B with layer ℓ's output replaced by A's (identity stitching, LLFC paper
    App. B.4, Tables 2–3), per layer, one panel per pair with its own y-scale (a good pair's
    0.5 pp spread is not squashed by an independent pair's 80 pp), against the two endpoints'
    errors (A dashed, B dotted, distinct markers at the left edge)."""
    pairs = {k: v for k, v in pairs.items() if v.get("stitching")}
    n = len(pairs)
    nl = max(len(p["stitching"]) for p in pairs.values())
    fig, axes = plt.subplots(n, 1, figsize=(max(6, 0.5 * nl + 3), 2.9 * n), squeeze=False)
    for j, (name, pr) in enumerate(pairs.items()):
        ax = axes[j, 0]
        rows = pr["stitching"]
        ends = {r["layer"]: 100 * r["error"] for r in rows if r["role"] == "endpoint"}
        st = [r for r in rows if r["role"] == "stitched"]
        c = _COLORS[j % len(_COLORS)]
        x = np.arange(len(st))
        ax.plot(x, [100 * r["error"] for r in st], "-o", ms=4, color=c, label="stitched B")
        ax.axhline(ends["A"], color="k", ls="--", lw=1, label=f"A alone ({ends['A']:.2f}%)")
        ax.axhline(ends["B"], color="0.45", ls=":", lw=1.2, label=f"B alone ({ends['B']:.2f}%)")
        ax.plot([-0.4], [ends["A"]], "s", color="k", ms=6)
        ax.plot([-0.4], [ends["B"]], "^", color="0.45", ms=6)
        vals = [100 * r["error"] for r in st] + list(ends.values())
        lo, hi = min(vals), max(vals)
        pad = max(0.25, 0.15 * (hi - lo))
        ax.set_ylim(max(0.0, lo - pad), hi + pad)
        ax.set_xlim(-0.7, max(len(st) - 0.5, 0.5))
        ax.set_xticks(x)
        ax.set_xticklabels([r["layer"] for r in st], rotation=60, ha="right", fontsize=7)
        ax.set_xlabel("stitched layer ℓ (B's output at ℓ replaced by A's)", fontsize=8)
        ax.set_ylabel("test error (%)")
        ax.set_title(
            f"{_label(name, pr)}: identity stitching, stitched error "
            f"{min(vals[: len(st)], default=0):.2f}–{max(vals[: len(st)], default=0):.2f}%",
            fontsize=9,
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))  # covers no point
    fig.tight_layout()
    return _save(fig, path)


def plot_all(pairs: dict, out_dir: Path, *, missing_only: bool = False) -> list[Path]:
    """Write every figure that the results support into ``out_dir``; returns the paths written.

    Args:
        pairs: the ``pairs`` mapping of results.json.
        out_dir: the run folder.
        missing_only: draw only the supported figures not in ``out_dir`` yet (``llfc report DIR``).
    """
    out_dir = Path(out_dir)
    figures = (  # file, the pair key the figure needs (None: every pair has it), the function
        ("lmc.png", None, plot_lmc),
        ("llfc.png", "llfc", plot_llfc),
        ("weak_additivity.png", "weak_additivity", plot_weak_additivity),
        ("commutativity.png", "commutativity", plot_commutativity),
        ("stitching.png", "stitching", plot_stitching),
    )
    paths = []
    for name, key, plot in figures:
        path = out_dir / name
        if missing_only and path.is_file():
            continue
        if key is None or any(p.get(key) for p in pairs.values()):
            paths.append(plot(pairs, path))
    return paths

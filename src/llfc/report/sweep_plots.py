"""Figures of a sweep (:mod:`llfc.sweep`): barrier and LLFC against the spawn point k, the per-layer
LLFC heatmap over (k, layer), and the barrier-vs-LLFC scatter over every pair."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from llfc import criteria
from llfc.report.plots import _COLORS, _save, plt


def _group_name(r: dict) -> str:
    return f"{r['dataset']} {r['model']} {r['model_args']}"


def _sample_std(vals: list[float]) -> float:
    """The sample std ÷(N−1) of ``vals`` (as :func:`llfc.sweep.seed_means`); 0 (no band) for one value."""
    return float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0


def plot_vs_k(rows: list[dict], path: Path) -> Path:
    """Two panels on a shared k axis (iterations, symlog): the test error barrier (Frankle et al. 2020)
    and the worst hidden-layer LLFC distance E[1 − cos_α] (LLFC paper Def. 2), per architecture: each
    seed as a faint dot, the mean over seeds as a line with a ±1 sample std band (÷(N−1); none where a k has
    one seed). Dashed: the thresholds of
    :mod:`llfc.criteria`. Non-spawn pairs (independent, permuted) are drawn at the right edge."""
    spawn = [r for r in rows if r["pair"] == "spawn"]
    other = [r for r in rows if r["pair"] != "spawn"]
    fig, axes = plt.subplots(2, 1, figsize=(7.5, 6.2), sharex=True)
    groups = sorted({_group_name(r) for r in spawn})
    kmax = max([r["k_iteration"] for r in spawn] or [1])
    xo = max(kmax * 2, 10)
    for ax, col, scale, thr, ylab in (
        (axes[0], "error_barrier_frankle", 100, 100 * criteria.LMC_MAX_ERROR_BARRIER, "test error barrier (pp)"),
        (axes[1], "llfc_worst_distance", 1, criteria.LLFC_MAX_DISTANCE, "worst hidden-layer LLFC\ndistance E[1−cos_α]"),
    ):
        for gi, g in enumerate(groups):
            c = _COLORS[gi % len(_COLORS)]
            rs = [r for r in spawn if _group_name(r) == g and r.get(col) is not None]
            ks = sorted({r["k_iteration"] for r in rs})
            m = np.array([np.mean([scale * r[col] for r in rs if r["k_iteration"] == k]) for k in ks])
            s = np.array([_sample_std([scale * r[col] for r in rs if r["k_iteration"] == k]) for k in ks])
            ax.scatter([r["k_iteration"] for r in rs], [scale * r[col] for r in rs], s=12, color=c, alpha=0.45)
            ax.plot(
                ks,
                m,
                "-o",
                color=c,
                ms=3,
                label=f"spawned: {g}" if len(groups) > 1 else "spawned (mean ± std over seeds)",
            )
            ax.fill_between(ks, m - s, m + s, color=c, alpha=0.18, lw=0)
        for j, kind in enumerate(sorted({r["pair"] for r in other})):
            vals = [scale * r[col] for r in other if r["pair"] == kind and r.get(col) is not None]
            ax.scatter([xo] * len(vals), vals, marker="x", color=_COLORS[(len(groups) + j) % len(_COLORS)], label=kind)
        ax.axhline(thr, ls="--", color="gray", lw=0.8, label="threshold (llfc.criteria)")
        ax.set_ylabel(ylab)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    axes[0].set_yscale("symlog", linthresh=1)
    bars = [100 * r["error_barrier_frankle"] for r in rows]
    axes[0].set_ylim(min(0.0, min(bars)) - 0.1, max(bars) * 1.6 + 0.1)
    axes[1].set_yscale("log")
    axes[1].set_xscale("symlog", linthresh=10)
    axes[1].set_xlim(-1, xo * 1.5)
    axes[1].set_xlabel("spawn point k (iterations; symlog)")
    fig.suptitle("LMC and LLFC against the spawn point k", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_heatmap(cells: list[dict], path: Path) -> Path:
    """Per architecture, a heatmap of the LLFC ratio E[1−cos_0.5] / E[1−cos_AB] (mean over seeds) over
    (k, hidden layer), log colour scale (grey: below 1e-6, i.e. exact); ``cells`` from
    :func:`llfc.sweep._heatmap_rows`."""
    groups = sorted({c["group"] for c in cells}) or [None]
    depth = max([len({c["layer"] for c in cells if c["group"] == g}) for g in groups if g] or [1])
    fig, axes = plt.subplots(
        1, len(groups), figsize=(4.5 * len(groups) + 1, 3.6 + 0.05 * max(0, depth - 24)), squeeze=False
    )
    for ax, g in zip(axes[0], groups):
        cs = [c for c in cells if c["group"] == g]
        if not cs:
            ax.set_axis_off()
            continue
        ks = sorted({c["k_iteration"] for c in cs})
        layers = list(dict.fromkeys(c["layer"] for c in cs))
        mat = np.full((len(layers), len(ks)), np.nan)
        for i, ly in enumerate(layers):
            for j, k in enumerate(ks):
                v = [c["ratio"] for c in cs if c["layer"] == ly and c["k_iteration"] == k]
                if v:
                    mat[i, j] = np.mean(v)
        from matplotlib.colors import LogNorm

        mat = np.where(mat > 1e-6, mat, np.nan)  # exact (a linear map of the input): grey
        pos = mat[np.isfinite(mat)]
        norm = LogNorm(vmin=pos.min(), vmax=max(pos.max(), pos.min() * 10)) if pos.size else None
        cmap = plt.get_cmap("viridis").with_extremes(bad="#dddddd")
        im = ax.imshow(mat, aspect="auto", cmap=cmap, norm=norm)
        ax.set_xticks(range(len(ks)), [str(k) for k in ks], fontsize=7, rotation=45)
        step = max(1, -(-len(layers) // 24))  # at most ~24 labels on deep networks
        ax.set_yticks(range(0, len(layers), step), layers[::step], fontsize=6)
        ax.set_xlabel("spawn point k (iterations)")
        ax.set_title(" ".join(str(x) for x in g)[:60], fontsize=8)
        fig.colorbar(im, ax=ax, label="E[1−cos_0.5] / E[1−cos_AB]\n(grey: < 1e-6, exact)")
    fig.tight_layout()
    return _save(fig, path)


def plot_scatter(rows: list[dict], rho: dict, path: Path) -> Path:
    """Every pair: test error barrier against the worst hidden-layer LLFC distance, coloured by pair kind
    (spawned pairs by k), with the thresholds of :mod:`llfc.criteria` as dashed lines (they cut the plane
    into the four cells of the co-occurrence table) and Spearman's ρ in the title."""
    rs = [r for r in rows if r.get("llfc_worst_distance") is not None]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    sp = [r for r in rs if r["pair"] == "spawn"]
    if sp:
        ks = np.array([r["k_iteration"] for r in sp], dtype=float)
        sc = ax.scatter(
            [r["llfc_worst_distance"] for r in sp],
            [100 * r["error_barrier_frankle"] for r in sp],
            c=np.log10(ks + 1),
            cmap="plasma",
            s=22,
            label="spawned",
        )
        fig.colorbar(sc, ax=ax, label="log10(k + 1), k in iterations")
    for j, kind in enumerate(sorted({r["pair"] for r in rs} - {"spawn"})):
        o = [r for r in rs if r["pair"] == kind]
        ax.scatter(
            [r["llfc_worst_distance"] for r in o],
            [100 * r["error_barrier_frankle"] for r in o],
            marker="x",
            color=_COLORS[j % len(_COLORS)],
            label=kind,
        )
    ax.axhline(100 * criteria.LMC_MAX_ERROR_BARRIER, ls="--", color="gray", lw=0.8)
    ax.axvline(criteria.LLFC_MAX_DISTANCE, ls="--", color="gray", lw=0.8)  # LLFC also needs the ratio test
    ax.set_xscale("log")
    ax.set_xlabel("worst hidden-layer LLFC distance E[1−cos_α]")
    ax.set_ylabel("test error barrier (pp)")
    t = "barrier vs LLFC distance"
    if rho.get("rho") is not None:
        t += f": Spearman ρ = {rho['rho']:.2f} (p = {rho['p']:.1g}, n = {rho['n']})"
    ax.set_title(t, fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)

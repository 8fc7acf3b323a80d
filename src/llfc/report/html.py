"""``report.html``: one self-contained page per run folder (and per sweep folder) that opens offline.

The page is rendered by Jinja2 from the templates shipped in ``llfc/report/templates`` (never from
hand-built HTML strings). Everything it shows comes from the folder's ``results.json`` (schema:
docs/results.md), ``config.yaml`` / ``environment.json`` and its PNG figures, which are embedded as base64
``data:`` URIs, so the file can be mailed, archived or opened from a read-only share: no network, no server,
no script. Verdicts ("LMC holds", "LLFC holds") come from :mod:`llfc.criteria`, the one place where the
thresholds are defined. A dry run's page (``"dry_run": true``) opens with a DRY RUN banner.

Run folder → :func:`render_run_report`; sweep folder → :func:`render_sweep_report`; either →
:func:`write_html_report` (what ``llfc report DIR`` calls).

Sweep folders. A sweep folder is a folder with ``sweep.json``, or one that holds no ``results.json`` of its
own but has run folders (folders with a ``results.json``) below it. The sweep page lists one
row per (run folder, pair) found below the folder — so it does not depend on the sweep's own aggregate
format — with the barriers, the worst hidden layer and both verdicts, links each row to that run's
``report.html`` (written when missing), counts the co-occurrence table (LMC yes/no × LLFC yes/no) with
:func:`llfc.criteria.lmc_holds` / :func:`llfc.criteria.llfc_holds`, and embeds every PNG at the top of
the sweep folder (the aggregate figures). From ``sweep.json`` it reads only optional keys: ``name`` (the
page title; default the folder's name), ``config`` (shown as YAML), ``environment`` (shown as a table; its
``seeds`` as a table of their own), ``created`` and ``llfc_version``; each row's grid
coordinates are taken from the run's ``results.json`` ``"sweep"`` entry (a mapping such as
``{"k": 2, "seed": 1}``), else from the ``"point"`` entry that ``llfc sweep`` writes (spawn point k,
seed, width), else the row shows its folder path only.
"""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup

from llfc import __version__, criteria
from llfc.checkpoint import atomic_write_text, checkpoint_paths
from llfc.errors import ReportError
from llfc.report.summary import dry_run_note

REPORT_NAME = "report.html"
# figures of a run folder (written by llfc.report.plots), in page order: file name → caption
RUN_FIGURES = {
    "lmc.png": "loss and test error along θ_α = α·θ_A + (1−α)·θ_B (test solid, train dashed)",
    "llfc.png": "LLFC distance E[1 − cos(f_α, α f_A + (1−α) f_B)] per layer, against the A-vs-B baseline",
    "weak_additivity.png": "weak additivity of {activation} per layer (LLFC paper Def. 3)",
    "commutativity.png": "commutativity per layer: Dist_com against Dist_W and Dist_H (LLFC paper Def. 4, Fig. 7)",
    "stitching.png": "identity stitching: B with layer ℓ's output taken from A",
}


# ---------------------------------------------------------------------------------------------- formatting
def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _point_grid(point: Any) -> dict[str, Any]:
    """The grid coordinates of an ``llfc sweep`` point (its results.json ``"point"`` entry): the spawn
    point ``k`` (its label, e.g. ``2 ep``), the ``seed`` and, where the sweep varies it, the ``width``."""
    if not isinstance(point, dict):
        return {}
    grid: dict[str, Any] = {}
    if point.get("k_label") is not None:
        grid["k"] = point["k_label"]
    if point.get("seed") is not None:
        grid["seed"] = point["seed"]
    width = (point.get("axes") or {}).get("width")
    if width is not None:
        grid["width"] = width
    return grid


def fmt_num(x: Any, digits: int = 3) -> Markup | str:
    """A number for a table: ``digits`` significant digits, scientific as ``a × 10^b`` (HTML) below 1e-3
    or from 1e5; ``0`` for zero, ``–`` for None, ``∞`` / ``NaN`` spelt out."""
    if x is None:
        return "–"
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "∞" if x > 0 else "−∞"
    if x == 0:
        return "0"
    if 1e-3 <= abs(x) < 1e5:  # '#' keeps trailing zeros (0.700, not 0.7); a bare trailing point is dropped
        text = f"{x:#.{digits}g}"
        if "e" in text:  # ≥ 10**digits after rounding: all integer digits
            text = f"{x:,.0f}"
        return text.rstrip(".").replace("-", "−")
    mant, exp = f"{x:.{digits - 1}e}".split("e")
    return Markup("{} × 10<sup>{}</sup>").format(mant.replace("-", "−"), str(int(exp)).replace("-", "−"))


def fmt_pct(x: Any, decimals: int = 2) -> str:
    """A fraction as a percentage: 0.0222 → ``2.22 %``."""
    return f"{100 * x:.{decimals}f} %" if _finite(x) else fmt_num(x)


def fmt_pp(x: Any, decimals: int = 2) -> str:
    """A difference of fractions in percentage points: 0.0189 → ``1.89 pp``."""
    return f"{100 * x:.{decimals}f} pp".replace("-", "−") if _finite(x) else fmt_num(x)


def fmt_alpha(a: Any) -> str:
    """An interpolation weight as written in the config: 0.25, 0.5, 1."""
    return f"{a:g}".replace("-", "−") if _finite(a) else fmt_num(a)


def _verdict(v: bool | None) -> Markup:
    if v is None:
        return Markup('<span class="verdict na">not measured</span>')
    return Markup('<span class="verdict {}">{}</span>').format("yes" if v else "no", "holds" if v else "fails")


def _env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("llfc.report", "templates"),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(num=fmt_num, pct=fmt_pct, pp=fmt_pp, alpha=fmt_alpha, verdict=_verdict)
    return env


# ----------------------------------------------------------------------------------------------- reading
def _png_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ReportError(
            f"{path} is not valid JSON ({e.msg}, line {e.lineno}); rerun the command that "
            f"wrote it (llfc run / llfc analyze) to rebuild it."
        ) from None


def _yaml(obj: Any) -> str:
    import yaml

    return yaml.safe_dump(obj, sort_keys=False, allow_unicode=True).strip()


def _index(alphas: list[float], a: float) -> int | None:
    for i, x in enumerate(alphas):
        if abs(x - a) < 1e-9:
            return i
    return None


# ------------------------------------------------------------------------------------------- view models
def pair_headline(name: str, pair: dict) -> dict:
    """The headline numbers of one pair of results.json (schema docs/results.md).

    Returns:
        ``name``, ``label``, ``err_a`` / ``err_b`` (test error of θ_A = α 1 and θ_B = α 0, fractions),
        ``error_barrier`` (Frankle et al. 2020, fraction), ``loss_barrier`` (Entezari et al. 2022, nats),
        ``worst`` (:func:`llfc.criteria.worst_layer` or None) and the verdicts ``lmc`` / ``llfc`` of
        :func:`llfc.criteria.lmc_holds` / :func:`llfc.criteria.llfc_holds`.
    """
    test = pair["lmc"]["test"]
    i1, i0 = _index(pair["alphas"], 1.0), _index(pair["alphas"], 0.0)
    return {
        "name": name,
        "label": pair.get("label", name),
        "err_a": test["error"][i1] if i1 is not None else None,
        "err_b": test["error"][i0] if i0 is not None else None,
        "error_barrier": test["barriers"]["error_barrier_frankle"],
        "loss_barrier": test["barriers"]["loss_barrier_entezari"],
        "worst": criteria.worst_layer(pair),
        "lmc": criteria.lmc_holds(pair),
        "llfc": criteria.llfc_holds(pair),
    }


def _llfc_rows(pair: dict) -> tuple[list[float], list[dict]]:
    """Per-layer LLFC distances at the criteria's α values (those measured), with the ratio to baseline."""
    shown = [a for a in criteria.LLFC_ALPHAS if _index(pair["alphas"], a) is not None]
    rows = []
    for ly in pair.get("llfc", []):
        base = ly["baseline"]["mean"]
        dists = [ly["distance"]["mean"][_index(pair["alphas"], a)] for a in shown]
        worst = max(dists) if dists else None
        rows.append(
            {
                "name": ly["name"],
                "kind": ly["kind"],
                "op": ly.get("op"),
                "dim": ly.get("dim"),
                "baseline": base,
                "dists": dists,
                "ratio": None if worst is None else criteria.ratio_to_baseline(worst, base),
                "hidden": ly["kind"] in criteria.HIDDEN_KINDS,
            }
        )
    return shown, rows


def activation_names(pairs: dict) -> str:
    """The activations whose weak additivity the pairs measured, named as ``torch.nn`` classes, in order of
    appearance (``"ReLU"``, ``"GELU"``, ``"ReLU and Tanh"``); ``"the activations"`` when none was measured."""
    from llfc.probe import activation_name

    names = list(
        dict.fromkeys(
            activation_name(ly["activation"]) for pr in pairs.values() for ly in pr.get("weak_additivity", [])
        )
    )
    if not names:
        return "the activations"
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _weak_additivity_rows(pair: dict) -> list[dict]:
    i = _index(pair["alphas"], 0.5)
    return [
        {
            "name": ly["name"],
            "pre": ly.get("pre_activation"),
            "sign": ly["sign_agreement"]["mean"],
            "sign_std": ly["sign_agreement"]["std"],
            "dist": None if i is None else ly["distance"]["mean"][i],
            "dist_max": max(ly["distance"]["mean"]) if ly["distance"]["mean"] else None,
        }
        for ly in pair.get("weak_additivity", [])
    ]


def _commutativity_rows(pair: dict) -> list[dict]:
    rows = []
    for ly in pair.get("commutativity", []):
        parts = min(ly["dist_W"], ly["dist_H"])
        rows.append(
            {
                "name": ly["name"],
                "com": ly["dist_com"],
                "W": ly["dist_W"],
                "H": ly["dist_H"],
                "ratio": criteria.ratio_to_baseline(ly["dist_com"], parts),
            }
        )
    return rows


def _lmc_rows(pairs: dict) -> tuple[list[str], list[dict]]:
    """Test error and loss along the path: one row per α, one column pair per pair."""
    names = list(pairs)
    alphas = sorted({a for p in pairs.values() for a in p["alphas"]}, reverse=True)
    rows = []
    for a in alphas:
        cells = []
        for n in names:
            i = _index(pairs[n]["alphas"], a)
            t = pairs[n]["lmc"]["test"]
            cells.append((None, None) if i is None else (t["error"][i], t["loss"][i]))
        rows.append({"alpha": a, "cells": cells})
    return names, rows


def _pair_links(run_dir: Path, name: str, pair: dict) -> list[dict[str, str | None]]:
    """Links to the files a pair left in the run folder (relative, so the folder can move)."""
    links: list[dict[str, str | None]] = []
    folder = run_dir / "pairs" / pair.get("kind", name)
    if folder.is_dir():
        links.append({"href": f"pairs/{folder.name}/", "text": f"pairs/{folder.name}/"})
        for f in sorted(folder.rglob("*")):
            if f.is_file() and f.suffix in (".json", ".csv", ".safetensors") and not f.name.startswith("last."):
                rel = f.relative_to(run_dir).as_posix()
                links.append({"href": rel, "text": rel})
    for role, path in (pair.get("checkpoints") or {}).items():  # llfc analyze: the measured checkpoints
        files = [p for p in checkpoint_paths(path) if p.is_file()]
        if not files:
            links.append({"href": None, "text": f"{role}: {path} (not found)"})
        for f in files:
            links.append({"href": f.resolve().as_uri(), "text": f"{role}: {f}"})
    return links


def run_context(run_dir: str | Path, results: dict) -> dict:
    """Everything ``run.html.j2`` shows, as plain data (numbers unformatted).

    Args:
        run_dir: the run folder (figures, CSVs, pair folders are looked up there).
        results: its parsed results.json.
    """
    run_dir = Path(run_dir)
    pairs = results.get("pairs", {})
    env_path, cfg_path = run_dir / "environment.json", run_dir / "config.yaml"
    env = results.get("environment") or (_read_json(env_path) if env_path.is_file() else {})
    env = dict(env)
    seeds = env.pop("seeds", None)
    lmc_names, lmc_rows = _lmc_rows(pairs)
    activation = activation_names(pairs)
    details = []
    for name, pr in pairs.items():
        shown, llfc = _llfc_rows(pr)
        details.append(
            {
                "name": name,
                "label": pr.get("label", name),
                "kind": pr.get("kind"),
                "n_samples": pr.get("n_samples"),
                "bn_mode": pr.get("bn_mode"),
                "cosine": pr.get("cosine"),
                "seconds": pr.get("seconds"),
                "spawn_epoch": pr.get("spawn_epoch"),
                "barriers": {s: v["barriers"] for s, v in pr["lmc"].items()},
                "llfc_alphas": shown,
                "llfc": llfc,
                "weak_additivity": _weak_additivity_rows(pr),
                "commutativity": _commutativity_rows(pr),
                "stitching": pr.get("stitching", []),
                "angles": pr.get("principal_angles", []),
                "alignment": pr.get("alignment"),
                "links": _pair_links(run_dir, name, pr),
            }
        )
    csvs = sorted(p.name for p in run_dir.glob("*.csv"))
    return {
        "title": f"llfc {results.get('kind', 'run').removeprefix('llfc.')}: {run_dir.name}",
        "run_dir": run_dir.name,
        "results": results,
        "dry_run_note": dry_run_note(results),
        "criteria": criteria.describe(),
        "headline": [pair_headline(n, p) for n, p in pairs.items()],
        "lmc_names": [pairs[n].get("label", n) for n in lmc_names],
        "lmc_rows": lmc_rows,
        "pairs": details,
        "figures": {
            f: {"uri": _png_uri(run_dir / f), "caption": c.format(activation=activation)}
            for f, c in RUN_FIGURES.items()
            if (run_dir / f).is_file()
        },
        "activation": activation,
        "config_yaml": cfg_path.read_text(encoding="utf-8").strip()
        if cfg_path.is_file()
        else _yaml(results.get("config", {})),
        "environment": env,
        "seeds": seeds,
        "csvs": csvs,
        "generator": f"llfc {__version__}",
    }


def ctl_context(run_dir: str | Path, results: dict) -> dict:
    """What ``ctl.html.j2`` shows for a Cross-Task Linearity run (pair kind ``finetune``,
    :mod:`llfc.finetune`): its summary.txt, every PNG of the folder, config, environment, seeds."""
    run_dir = Path(run_dir)
    env_path, cfg_path, summary = run_dir / "environment.json", run_dir / "config.yaml", run_dir / "summary.txt"
    env = dict(results.get("environment") or (_read_json(env_path) if env_path.is_file() else {}))
    seeds = env.pop("seeds", None)
    return {
        "title": f"llfc finetune: {run_dir.name}",
        "results": results,
        "dry_run_note": dry_run_note(results),
        "summary": summary.read_text(encoding="utf-8").rstrip() if summary.is_file() else "",
        "figures": {p.name: {"uri": _png_uri(p)} for p in sorted(run_dir.glob("*.png"))},
        "config_yaml": cfg_path.read_text(encoding="utf-8").strip()
        if cfg_path.is_file()
        else _yaml(results.get("config", {})),
        "environment": env,
        "seeds": seeds,
        "csvs": sorted(p.name for p in run_dir.glob("*.csv")),
        "generator": f"llfc {__version__}",
    }


def render_run_report(run_dir: str | Path, *, draw_figures: bool = True) -> Path:
    """Write ``report.html`` into a run folder (``llfc run`` / ``llfc analyze`` output); returns its path.

    Each figure missing from the folder that results.json supports is redrawn first
    (:func:`llfc.report.plot_all` with ``missing_only``), unless ``draw_figures`` is False (the page
    then shows the figures the folder has).

    Raises:
        ReportError: the folder has no results.json, or it is not valid JSON.
    """
    run_dir = Path(run_dir)
    path = run_dir / "results.json"
    if not path.is_file():
        raise ReportError(
            f"{run_dir} has no results.json: pass a folder written by `llfc run` or `llfc analyze` "
            f"(or a sweep folder holding such folders)."
        )
    results = _read_json(path)
    if not isinstance(results, dict) or not isinstance(results.get("pairs"), dict):
        raise ReportError(f'{path} has no "pairs" mapping (schema docs/results.md); rerun the command that wrote it.')
    if results.get("kind") == "llfc.finetune":  # Cross-Task Linearity: its own schema and figures
        html = _env().get_template("ctl.html.j2").render(**ctl_context(run_dir, results))
        return atomic_write_text(run_dir / REPORT_NAME, html)
    if draw_figures and results["pairs"]:
        from llfc.report.plots import plot_all

        plot_all(results["pairs"], run_dir, missing_only=True)
    html = _env().get_template("run.html.j2").render(**run_context(run_dir, results))
    return atomic_write_text(run_dir / REPORT_NAME, html)


# ------------------------------------------------------------------------------------------------- sweeps
def find_runs(sweep_dir: str | Path) -> list[Path]:
    """Run folders (holding a results.json) below ``sweep_dir``, in sorted path order, not descending into
    a run folder's own subfolders."""
    sweep_dir = Path(sweep_dir)
    runs = []
    for p in sorted(sweep_dir.rglob("results.json")):
        d = p.parent
        if d != sweep_dir and not any(q in runs for q in d.parents):
            runs.append(d)
    return runs


def sweep_context(sweep_dir: str | Path, sweep: dict | None = None) -> dict:
    """Everything ``sweep.html.j2`` shows (module docstring): one row per (run folder, pair) below the
    sweep folder, the co-occurrence counts, the aggregate figures."""
    sweep_dir = Path(sweep_dir)
    sweep = sweep or {}
    rows = []
    cells = {(True, True): 0, (True, False): 0, (False, True): 0, (False, False): 0}
    unmeasured = 0
    for run in find_runs(sweep_dir):
        res = _read_json(run / "results.json")
        rel = run.relative_to(sweep_dir).as_posix()
        for name, pr in res.get("pairs", {}).items():
            h = pair_headline(name, pr)
            h["folder"], h["href"] = rel, f"{rel}/{REPORT_NAME}"
            h["grid"] = res.get("sweep") or pr.get("sweep") or _point_grid(res.get("point")) or {}
            rows.append(h)
            if h["llfc"] is None:
                unmeasured += 1
            else:
                cells[(h["lmc"], h["llfc"])] += 1
    seen = list(dict.fromkeys(k for r in rows for k in r["grid"]))
    grid_keys = [k for k in ("k", "seed", "width") if k in seen] + [k for k in seen if k not in ("k", "seed", "width")]
    env = dict(sweep.get("environment") or {})
    figures = {
        p.name: {"uri": _png_uri(p), "caption": p.stem.replace("_", " ")} for p in sorted(sweep_dir.glob("*.png"))
    }
    return {
        "title": f"llfc sweep: {sweep.get('name') or sweep_dir.name}",
        "run_dir": sweep_dir.name,
        "sweep": sweep,
        "criteria": criteria.describe(),
        "rows": rows,
        "grid_keys": grid_keys,
        "cooccurrence": cells,
        "unmeasured": unmeasured,
        "figures": figures,
        "config_yaml": _yaml(sweep["config"]) if sweep.get("config") else None,
        "environment": env,
        "seeds": env.pop("seeds", None),
        "csvs": sorted(p.name for p in sweep_dir.glob("*.csv")),
        "generator": f"llfc {__version__}",
    }


def render_sweep_report(sweep_dir: str | Path, *, draw_figures: bool = True) -> Path:
    """Write ``report.html`` into a sweep folder, and into each run folder below it that lacks one (drawing
    that folder's missing figures first unless ``draw_figures`` is False: :func:`render_run_report`).

    Raises:
        ReportError: no run folder (holding a results.json) below ``sweep_dir``.
    """
    sweep_dir = Path(sweep_dir)
    runs = find_runs(sweep_dir)
    if not runs:
        raise ReportError(
            f"{sweep_dir} holds no results.json and no run folders below it: pass a folder "
            f"written by `llfc run`, `llfc analyze` or `llfc sweep`."
        )
    for run in runs:
        if not (run / REPORT_NAME).is_file():
            render_run_report(run, draw_figures=draw_figures)
    sweep = _read_json(sweep_dir / "sweep.json") if (sweep_dir / "sweep.json").is_file() else {}
    html = _env().get_template("sweep.html.j2").render(**sweep_context(sweep_dir, sweep))
    return atomic_write_text(sweep_dir / REPORT_NAME, html)


def write_html_report(folder: str | Path) -> Path:
    """(Re)build ``report.html`` in a run folder or a sweep folder; returns its path (``llfc report DIR``).

    A folder with ``sweep.json``, or without ``results.json``, is a sweep folder (module docstring).

    Raises:
        ReportError: the folder does not exist, or is neither a run folder nor a sweep folder.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ReportError(
            f"{folder} is not a folder: pass the folder `llfc run`, `llfc analyze` or `llfc sweep` wrote (its --out)."
        )
    if (folder / "results.json").is_file() and not (folder / "sweep.json").is_file():
        return render_run_report(folder)
    return render_sweep_report(folder)

"""CSV tables of a run, one row per (pair, ...) — the long format that pandas or a spreadsheet
reads directly. Columns are documented in docs/results.md."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from llfc.checkpoint import atomic_write_text, json_safe


def _write(path: Path, header: list[str], rows: list[list]) -> Path:
    """Undefined values (None, NaN, ±inf) become empty cells, as they are null in results.json."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(json_safe(rows))
    atomic_write_text(path, buf.getvalue())
    return path


def _lmc_rows(pairs: dict) -> list[list]:
    rows = []
    for name, pr in pairs.items():
        for split, lmc in pr["lmc"].items():
            for a, loss, e in zip(pr["alphas"], lmc["loss"], lmc["error"]):
                rows.append([name, split, a, loss, e])
    return rows


def _llfc_rows(pairs: dict) -> list[list]:
    rows = []
    for name, pr in pairs.items():
        for ly in pr.get("llfc", []):
            for i, a in enumerate(pr["alphas"]):
                d, c = ly["distance"], ly["coef"]
                rows.append(
                    [
                        name,
                        ly["name"],
                        ly["kind"],
                        a,
                        d["mean"][i],
                        d["std"][i],
                        d["whole"][i],
                        ly["baseline"]["mean"],
                        ly["baseline"]["std"],
                        ly["baseline"]["whole"],
                        c["mean"][i],
                        c["std"][i],
                        c["whole"][i],
                        ly["c_whole"][i],
                    ]
                )
    return rows


def write_tables(pairs: dict, out_dir: Path) -> list[Path]:
    """Write lmc.csv, barriers.csv, llfc.csv, weak_additivity.csv, commutativity.csv."""
    out = Path(out_dir)
    paths = [
        _write(out / "lmc.csv", ["pair", "split", "alpha", "loss", "error"], _lmc_rows(pairs)),
        _write(
            out / "barriers.csv",
            [
                "pair",
                "split",
                "error_barrier_frankle",
                "error_barrier_interior",
                "error_barrier_entezari",
                "loss_barrier_entezari",
            ],
            [
                [
                    n,
                    s,
                    *[
                        lmc["barriers"].get(k)
                        for k in (
                            "error_barrier_frankle",
                            "error_barrier_interior",
                            "error_barrier_entezari",
                            "loss_barrier_entezari",
                        )
                    ],
                ]
                for n, pr in pairs.items()
                for s, lmc in pr["lmc"].items()
            ],
        ),
        _write(
            out / "llfc.csv",
            [
                "pair",
                "layer",
                "kind",
                "alpha",
                "dist_mean",
                "dist_std",
                "dist_whole",
                "baseline_mean",
                "baseline_std",
                "baseline_whole",
                "coef_mean",
                "coef_std",
                "coef_whole",
                "c_whole",
            ],
            _llfc_rows(pairs),
        ),
        _write(
            out / "weak_additivity.csv",
            [
                "pair",
                "layer",
                "alpha",
                "dist_mean",
                "dist_std",
                "dist_whole",
                "sign_agreement_mean",
                "sign_agreement_std",
            ],
            [
                [
                    n,
                    ly["name"],
                    a,
                    ly["distance"]["mean"][i],
                    ly["distance"]["std"][i],
                    ly["distance"]["whole"][i],
                    ly["sign_agreement"]["mean"],
                    ly["sign_agreement"]["std"],
                ]
                for n, pr in pairs.items()
                for ly in pr.get("weak_additivity", [])
                for i, a in enumerate(pr["alphas"])
            ],
        ),
        _write(
            out / "commutativity.csv",
            ["pair", "layer", "dist_com", "dist_W", "dist_H"],
            [
                [n, ly["name"], ly["dist_com"], ly["dist_W"], ly["dist_H"]]
                for n, pr in pairs.items()
                for ly in pr.get("commutativity", [])
            ],
        ),
        _write(
            out / "stitching.csv",
            ["pair", "layer", "role", "kind", "error", "loss"],
            [
                [n, r["layer"], r["role"], r.get("kind"), r["error"], r["loss"]]
                for n, pr in pairs.items()
                for r in pr.get("stitching", [])
            ],
        ),
        _write(
            out / "principal_angles.csv",
            ["pair", "parameter", "subspace", "rank", "angle_deg"],
            [
                [n, r["name"], side, i + 1, a]
                for n, pr in pairs.items()
                for r in pr.get("principal_angles", [])
                for side in ("left", "right")
                for i, a in enumerate(r[side])
            ],
        ),
    ]
    return paths

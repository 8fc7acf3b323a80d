"""report.html: written by every run, rebuilt by `llfc report DIR`, self-contained, and correct in a real
browser (headless Chromium over the DevTools protocol: no console errors, every image decodes, the headline
numbers on the page equal results.json). The browser tests skip when Chromium or websocket-client is
absent; CI (.ci/run) installs Debian's `chromium`.

Screenshots go to pytest's tmp folder, or to $LLFC_SCREENSHOT_DIR when set (to look at them).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from llfc import criteria
from llfc.cli import main
from llfc.config import ExperimentConfig, MeasureConfig
from llfc.errors import ReportError
from llfc.experiment import analyze_checkpoints, run_experiment
from llfc.report.html import REPORT_NAME, fmt_num, fmt_pct, fmt_pp, write_html_report

try:
    import websocket  # noqa: F401  (websocket-client, test extra)

    from chromium_cdp import Browser, find_chromium

    CHROMIUM = find_chromium()
except ImportError:  # pragma: no cover - depends on the environment
    CHROMIUM = None

needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="headless Chromium (Debian package `chromium`) and websocket-client (pip install -e '.[test]') are needed",
)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny real run: digits, MLP 32-32, 2 epochs, an independent and a weight-matched pair."""
    out = tmp_path_factory.mktemp("report") / "run"
    cfg = ExperimentConfig.from_dict(
        {
            "dataset": "digits",
            "model": "mlp",
            "model_args": {"widths": [32, 32]},
            "pairs": ["independent", "permutation-weight"],
            "alphas": 5,
            "train": {"epochs": 2},
            "measure": {"test_samples": 150, "train_samples": 150},
        }
    )
    run_experiment(cfg, out, progress=False, log=lambda s: None)
    return out


def _shot_path(tmp_path: Path, name: str) -> Path:
    d = os.environ.get("LLFC_SCREENSHOT_DIR")
    if d:
        Path(d).mkdir(parents=True, exist_ok=True)
        return Path(d) / name
    return tmp_path / name


def _parse_number(text: str) -> float:
    """Invert the report's number formatting: '2.22 %', '−1.89 pp', '7.635 × 10−5', '12,346', '∞'."""
    t = text.strip().replace("−", "-").replace(",", "").replace("%", "").replace("pp", "").strip()
    if t == "∞":
        return float("inf")
    m = re.fullmatch(r"(-?[\d.]+) × 10(-?\d+)", t)
    if m:
        return float(m.group(1)) * 10 ** int(m.group(2))
    return float(t)


def _shown_digits_ok(text: str, value: float, percent: bool = False) -> bool:
    """Does ``text`` show ``value`` (a fraction when ``percent``) to the precision it is printed with?"""
    shown = _parse_number(text)
    value = 100 * value if percent else value
    mant = re.sub(r" × 10.*", "", text.strip().replace("−", "-").replace(",", "").split(" ")[0])
    decimals = len(mant.split(".")[1]) if "." in mant else 0
    scale = 10 ** int(re.search(r"10(-?\d+)$", text.replace("−", "-")).group(1)) if "× 10" in text else 1
    return abs(shown - value) <= 0.5 * 10**-decimals * scale * (1 + 1e-9)


def test_number_formatting():
    assert fmt_pct(0.022222) == "2.22 %"
    assert fmt_pp(0.0189) == "1.89 pp"
    assert fmt_pp(-0.0189) == "−1.89 pp"
    assert str(fmt_num(0.7)) == "0.700"  # three significant digits, trailing zeros kept
    assert str(fmt_num(0.0203)) == "0.0203"
    assert str(fmt_num(999.9)) == "1,000"  # rounding up to four integer digits
    assert str(fmt_num(12345.6)) == "12,346"
    assert str(fmt_num(2.93e-4)) == "2.93 × 10<sup>−4</sup>"
    assert str(fmt_num(0.0)) == "0" and str(fmt_num(None)) == "–" and str(fmt_num(float("inf"))) == "∞"
    assert _parse_number("7.635 × 10−5") == pytest.approx(7.635e-5)


def test_run_writes_self_contained_report(run_dir):
    html = (run_dir / REPORT_NAME).read_text(encoding="utf-8")
    # one embedded image per figure the run wrote, no external resources, no script
    pngs = sorted(p.name for p in run_dir.glob("*.png"))
    assert len(pngs) == 5
    assert html.count('src="data:image/png;base64,') == len(pngs)
    assert not re.search(r'(src|href)="(https?:)?//', html)
    assert "<script" not in html
    res = json.loads((run_dir / "results.json").read_text())
    for name in res["pairs"]:
        assert f'data-pair="{name}"' in html
        assert f'href="pairs/{res["pairs"][name]["kind"]}/"' in html
    assert criteria.describe() in html  # the thresholds, stated by llfc.criteria


def test_dry_run_report_opens_with_a_banner(run_dir, tmp_path):
    """A dry run's report.html (results.json "dry_run": true) opens with a DRY RUN banner above the verdicts;
    a real run's has none."""
    html = (run_dir / REPORT_NAME).read_text(encoding="utf-8")
    assert json.loads((run_dir / "results.json").read_text())["dry_run"] is False
    assert 'class="dry-run"' not in html and "DRY RUN" not in html
    d = tmp_path / "dry"
    shutil.copytree(run_dir, d, ignore=shutil.ignore_patterns(REPORT_NAME, "pairs"))
    res = json.loads((d / "results.json").read_text())
    res["dry_run"] = True
    (d / "results.json").write_text(json.dumps(res))
    html = write_html_report(d).read_text(encoding="utf-8")
    banner = html.index('<div class="dry-run" role="alert">DRY RUN: every stage ran for a few batches only')
    assert banner < html.index('<section id="summary">') < html.index('class="verdict')


def test_analyze_report_links_the_checkpoints(run_dir, tmp_path):
    a, b = run_dir / "pairs" / "independent" / "a" / "final", run_dir / "pairs" / "independent" / "b" / "final"
    out = tmp_path / "analysis"
    analyze_checkpoints(
        a,
        b,
        out,
        measure=MeasureConfig(test_samples=100, conditions=False, stitching=False),
        alphas=[0, 0.25, 0.5, 0.75, 1],
        progress=False,
        log=lambda s: None,
    )
    html = (out / REPORT_NAME).read_text(encoding="utf-8")
    for f in (a.with_suffix(".safetensors"), b.with_suffix(".json")):
        assert f'href="{f.resolve().as_uri()}"' in html
    assert "llfc analyze: analysis" in html
    assert "Weak additivity was not measured" in html  # sections without data say so


def test_weak_additivity_names_the_activation_and_the_module(run_dir, tmp_path):
    """The section, its figure caption and the pre-activation column name what was measured: the activation
    (GELU in a transformer, not always "ReLU") and the pre-activation's module path (layers.0, not layers_0)."""
    html = (run_dir / REPORT_NAME).read_text(encoding="utf-8")
    assert "<h2>Weak additivity of ReLU</h2>" in html and "weak additivity of ReLU per layer" in html
    assert "<td><code>layers.1</code></td><td><code>layers.0</code></td>" in html and "layers_0" not in html
    d = tmp_path / "gelu"
    shutil.copytree(run_dir, d, ignore=shutil.ignore_patterns(REPORT_NAME, "pairs"))
    res = json.loads((d / "results.json").read_text())
    for pr in res["pairs"].values():
        for ly in pr["weak_additivity"]:
            ly["activation"] = "GELU"
    (d / "results.json").write_text(json.dumps(res))
    html = write_html_report(d).read_text(encoding="utf-8")
    assert "<h2>Weak additivity of GELU</h2>" in html and "weak additivity of GELU per layer" in html
    assert "of ReLU" not in html


def test_llfc_report_rebuilds_and_refuses_bad_folders(run_dir, tmp_path, capsys):
    d = tmp_path / "copy"
    shutil.copytree(run_dir, d, ignore=shutil.ignore_patterns("*.png", REPORT_NAME, "pairs"))
    assert main(["report", str(d)]) == 0
    assert (d / REPORT_NAME).is_file() and (d / "lmc.png").is_file()  # figures redrawn from results.json
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="no results.json"):
        write_html_report(tmp_path / "empty")


def _check_page(b: Browser, path: Path) -> list[dict]:
    b.goto(path.resolve().as_uri())
    assert b.errors == [], b.errors
    imgs = b.eval(
        "[...document.images].map(i => ({alt: i.alt, w: i.naturalWidth, h: i.naturalHeight, complete: i.complete}))"
    )
    assert all(i["complete"] and i["w"] > 0 and i["h"] > 0 for i in imgs), imgs
    return imgs


@needs_chromium
def test_report_in_chromium(run_dir, tmp_path):
    res = json.loads((run_dir / "results.json").read_text())
    with Browser(CHROMIUM) as b:
        imgs = _check_page(b, run_dir / REPORT_NAME)
        assert sorted(i["alt"] for i in imgs) == sorted(p.name for p in run_dir.glob("*.png"))
        cards = b.eval("""[...document.querySelectorAll('.headline')].map(c => ({
            pair: c.dataset.pair, verdicts: [...c.querySelectorAll('.verdict')].map(v => v.textContent),
            metrics: Object.fromEntries([...c.querySelectorAll('[data-metric]')]
                                        .map(e => [e.dataset.metric, e.textContent]))}))""")
        shot = b.screenshot(_shot_path(tmp_path, "report-run.png"))
    assert [c["pair"] for c in cards] == list(res["pairs"])
    for c in cards:
        pr = res["pairs"][c["pair"]]
        t, m = pr["lmc"]["test"], c["metrics"]
        a = pr["alphas"]
        assert _shown_digits_ok(m["err_a"], t["error"][a.index(1.0)], percent=True), m
        assert _shown_digits_ok(m["err_b"], t["error"][a.index(0.0)], percent=True), m
        assert _shown_digits_ok(m["error_barrier"], t["barriers"]["error_barrier_frankle"], percent=True), m
        assert _shown_digits_ok(m["loss_barrier"], t["barriers"]["loss_barrier_entezari"]), m
        # the worst hidden layer, found here independently of llfc.criteria: largest d/baseline at .25/.5/.75
        ratios = [
            (ly["distance"]["mean"][a.index(x)] / ly["baseline"]["mean"], ly, x)
            for ly in pr["llfc"]
            if ly["kind"] != "logits"
            for x in (0.25, 0.5, 0.75)
        ]
        ratio, ly, x = max(ratios, key=lambda r: r[0])
        assert _shown_digits_ok(m["worst_ratio"], ratio), m
        assert _shown_digits_ok(m["worst_distance"], ly["distance"]["mean"][a.index(x)]), m
        assert _shown_digits_ok(m["worst_baseline"], ly["baseline"]["mean"]), m
        lmc = t["barriers"]["error_barrier_frankle"] <= criteria.LMC_MAX_ERROR_BARRIER
        assert c["verdicts"] == ["holds" if lmc else "fails", "holds" if criteria.llfc_holds(pr) else "fails"]
    from PIL import Image

    with Image.open(shot) as im:
        assert im.width >= 1000 and im.height > 3000  # the whole page, not just the viewport


def _force(pair: dict, lmc: bool, llfc: bool) -> dict:
    """A copy of ``pair`` whose verdicts are set by construction: the error barrier 0 or 50 pp; every LLFC
    distance 0 (LLFC holds) or equal to the baseline (ratio 1: fails)."""
    p = copy.deepcopy(pair)
    p["lmc"]["test"]["barriers"]["error_barrier_frankle"] = 0.0 if lmc else 0.5
    for ly in p["llfc"]:
        n = len(ly["distance"]["mean"])
        ly["distance"]["mean"] = [0.0 if llfc else ly["baseline"]["mean"]] * n
    return p


@needs_chromium
def test_sweep_report_in_chromium(run_dir, tmp_path):
    """A sweep folder: run folders below it; the co-occurrence table counts pairs by their verdicts."""
    res = json.loads((run_dir / "results.json").read_text())
    base = res["pairs"]["independent"]
    cells = [(True, True), (True, True), (False, False), (False, True), (True, False)]
    sweep = tmp_path / "sweep"
    for i, (lmc, llfc) in enumerate(cells):
        d = sweep / f"k{i}" / f"seed{i % 2}"
        d.mkdir(parents=True)
        r = {**res, "sweep": {"k": i, "seed": i % 2}, "pairs": {"independent": _force(base, lmc, llfc)}}
        (d / "results.json").write_text(json.dumps(r))
        for png in run_dir.glob("*.png"):  # (else each run's report redraws its figures: slower)
            shutil.copy(png, d / png.name)
    shutil.copy(run_dir / "lmc.png", sweep / "barrier_vs_k.png")
    (sweep / "sweep.json").write_text(
        json.dumps({"config": {"grid": {"k": [0, 1, 2, 3, 4]}}, "created": "2026-01-01T00:00:00+00:00"})
    )
    path = write_html_report(sweep)
    assert all((sweep / f"k{i}" / f"seed{i % 2}" / REPORT_NAME).is_file() for i in range(len(cells)))
    with Browser(CHROMIUM) as b:
        imgs = _check_page(b, path)
        assert [i["alt"] for i in imgs] == ["barrier_vs_k.png"]
        counts = b.eval(
            "Object.fromEntries([...document.querySelectorAll('[data-cell]')]"
            ".map(e => [e.dataset.cell, +e.textContent]))"
        )
        rows = b.eval("[...document.querySelectorAll('tr[data-pair] a')].map(a => a.getAttribute('href'))")
        b.screenshot(_shot_path(tmp_path, "report-sweep.png"))
        b.goto((sweep / rows[0]).resolve().as_uri())  # the row's link opens that run's report
        assert b.errors == [] and b.eval("document.querySelectorAll('.headline').length") == 1
    assert counts == {"lmc-llfc": 2, "lmc-only": 1, "llfc-only": 1, "neither": 1}
    assert rows == [f"k{i}/seed{i % 2}/{REPORT_NAME}" for i in range(len(cells))]

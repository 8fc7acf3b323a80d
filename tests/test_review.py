"""Regression tests for the outside review (issue 7): lost results, interfaces, thresholds."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from llfc import interpolate
from llfc.checkpoint import atomic_write_json, load_checkpoint, load_weights
from llfc.cli import main
from llfc.engine import measure_pair
from llfc.errors import ConfigError
from llfc.models import create_model

TINY = ["--epochs", "1", "--widths", "16", "--test-samples", "100", "--train-samples", "200",
        "--no-conditions", "--alphas", "5", "--no-progress", "--threads", "1"]
MEASURE = TINY[4:]  # the measurement flags, shared by run and analyze


def _strict(path):
    """json.load that rejects NaN / Infinity (RFC 8259)."""
    def bad(c):
        raise ValueError(f"non-JSON constant {c} in {path}")
    return json.loads(path.read_text(), parse_constant=bad)


@pytest.fixture(scope="module")
def run3(tmp_path_factory):
    """A tiny digits run with a non-zero master seed."""
    out = tmp_path_factory.mktemp("review") / "run"
    assert main(["run", "--out", str(out), "--seed", "3", *TINY]) == 0
    return out


# ---------------------------------------------------------------- 1. the Python API and BatchNorm
class _BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.bn = nn.BatchNorm1d(8)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        return self.out(torch.relu(self.bn(self.fc(x))))


def _bn_pair():
    sds = []
    for s in (0, 1):
        torch.manual_seed(s)
        m = _BNNet().train()
        m(torch.randn(64, 4) * 3 + s)  # non-trivial running statistics
        sds.append({k: v.clone() for k, v in m.eval().state_dict().items()})
    return _BNNet().eval(), sds[0], sds[1]


def test_measure_pair_warns_about_bn_and_can_reset(monkeypatch):
    monkeypatch.setattr(interpolate, "_warned_bn", False)
    model, sd_a, sd_b = _bn_pair()
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g))]
    with pytest.warns(UserWarning, match="BatchNorm"):
        interp = measure_pair(model, sd_a, sd_b, data, [0, .25, .5, .75, 1])
    bn_batches = [torch.randn(32, 4, generator=g) for _ in range(2)]
    reset = measure_pair(model, sd_a, sd_b, data, [0, .25, .5, .75, 1], bn_mode="reset",
                         bn_batches=bn_batches)
    # endpoints untouched, interior points differ (recomputed statistics)
    assert reset["lmc"]["loss"][0] == interp["lmc"]["loss"][0]
    assert reset["lmc"]["loss"][-1] == interp["lmc"]["loss"][-1]
    assert reset["lmc"]["loss"][2] != pytest.approx(interp["lmc"]["loss"][2], rel=1e-6)
    # the reset path equals measuring with states computed by path_states(..., "reset")
    states = interpolate.path_states(model, sd_a, sd_b, [0, .25, .5, .75, 1], "reset", bn_batches)
    explicit = measure_pair(model, sd_a, sd_b, data, [0, .25, .5, .75, 1], states=states)
    assert explicit["lmc"]["loss"] == reset["lmc"]["loss"]
    with pytest.raises(ConfigError, match="bn_batches"):
        measure_pair(model, sd_a, sd_b, data, [0, .25, .5, .75, 1], bn_mode="reset")
    # PairMeter's own default path sees the real model too
    from llfc.engine import PairMeter
    from llfc.probe import FeatureExtractor

    monkeypatch.setattr(interpolate, "_warned_bn", False)
    with pytest.warns(UserWarning, match="BatchNorm"):
        PairMeter(FeatureExtractor(model), sd_a, sd_b, [0, .25, .5, .75, 1])


# ---------------------------------------------------------------- 2, 3. analyze reproduces a run
def test_analyze_reproduces_a_seeded_run_and_json_is_strict(run3, tmp_path, monkeypatch):
    res = _strict(run3 / "results.json")
    _strict(run3 / "environment.json")
    _strict(run3 / "pairs" / "spawn" / "a" / "final.json")
    spawn = res["pairs"]["spawn"]
    assert spawn["lmc"]["train"]["subset"]["master_seed"] == 3
    meta = load_checkpoint(run3 / "pairs" / "spawn" / "a" / "final")[1]
    assert meta["run"]["seed"] == 3 and meta["run"]["data_root"]
    monkeypatch.delenv("LLFC_DATA_ROOT", raising=False)  # the recorded data root is used
    out = tmp_path / "analysis"
    assert main(["analyze", str(run3 / "pairs/spawn/a/final"), str(run3 / "pairs/spawn/b/final"),
                 "--out", str(out), *MEASURE]) == 0
    got = _strict(out / "results.json")["pairs"]["A vs B"]
    assert got["lmc"]["train"] == spawn["lmc"]["train"]
    assert got["lmc"]["test"] == spawn["lmc"]["test"]
    assert got["llfc"] == spawn["llfc"]


def test_json_writes_null_for_non_finite(tmp_path):
    p = atomic_write_json(tmp_path / "x.json", {"c": [1.0, float("inf")], "s": float("nan"), "n": 2})
    assert _strict(p) == {"c": [1.0, None], "s": None, "n": 2}


# ---------------------------------------------------------------- 4. restart / refused attempts
def test_overwrite_restarts_an_unfinished_run_and_refusals_write_nothing(run3, tmp_path, capsys):
    out = tmp_path / "r"
    shutil.copytree(run3, out)
    (out / "results.json").unlink()  # an interrupted run: checkpoints, no results
    cfg = (out / "config.yaml").read_text()
    assert main(["run", "--out", str(out), "--seed", "3", "--lr", "0.01", *TINY]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "overwrite=True" in err and "resume=True" not in err
    assert (out / "config.yaml").read_text() == cfg  # the refused attempt changed nothing
    # a truncated training state: the message says how to get out
    last = out / "pairs" / "spawn" / "a" / "last.safetensors"
    last.write_bytes(last.read_bytes()[:100])
    assert main(["run", "--out", str(out), "--seed", "3", *TINY]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["run", "--out", str(out), "--seed", "3", *TINY, "--overwrite"]) == 0
    assert _strict(out / "results.json")["pairs"]["spawn"]["lmc"] == \
        _strict(run3 / "results.json")["pairs"]["spawn"]["lmc"]


# ---------------------------------------------------------------- 5, 7. own weights
def _own_weights(tmp_path, widths=(16,), fmt="safetensors", prefix=""):
    paths = []
    for s in (0, 1):
        torch.manual_seed(s)
        sd = {prefix + k: v for k, v in create_model("mlp", input_shape=[1, 8, 8], num_classes=10,
                                                     widths=list(widths)).state_dict().items()}
        p = tmp_path / f"m{s}.{fmt}"
        save_file(sd, str(p)) if fmt == "safetensors" else torch.save(sd, p)
        paths.append(str(p))
    return paths


@pytest.mark.parametrize("extra, expect", [
    (["--model-args", '{"widths": [32]}'], "shape"),          # wrong widths
    (["--model-args", '{"widths": [16, 16]}'], "does not fit"),  # wrong depth
    (["--dataset", "mnist"], "does not fit"),                 # wrong dataset: input size
])
def test_analyze_own_weights_mismatch_is_one_clear_error(tmp_path, capsys, extra, expect):
    a, b = _own_weights(tmp_path)
    args = {"--model": "mlp", "--model-args": '{"widths": [16]}', "--dataset": "digits"}
    for k, v in zip(extra[::2], extra[1::2]):
        args[k] = v
    out = tmp_path / "out"
    flat = [x for kv in args.items() for x in kv]
    assert main(["analyze", a, b, "--out", str(out), *flat, *MEASURE]) == 2
    err = capsys.readouterr().err
    assert expect in err and "Traceback" not in err and "--model" in err
    assert not out.exists()  # nothing written


def test_torch_format_checkpoints_are_read(tmp_path):
    a, b = _own_weights(tmp_path, fmt="pt", prefix="module.")
    sd, meta = load_weights(a)
    assert meta == {} and all(not k.startswith("module.") for k in sd)
    ref = create_model("mlp", input_shape=[1, 8, 8], num_classes=10, widths=[16]).state_dict()
    assert sd.keys() == ref.keys()
    torch.save({"state_dict": torch.load(a, weights_only=True), "epoch": 3}, tmp_path / "nested.pth")
    assert load_weights(tmp_path / "nested.pth")[0].keys() == ref.keys()
    out = tmp_path / "an"
    assert main(["analyze", a, b, "--model", "mlp", "--model-args", '{"widths": [16]}', "--dataset",
                 "digits", "--out", str(out), *MEASURE]) == 0
    assert _strict(out / "results.json")["pairs"]["A vs B"]["n_samples"] == 100


# ---------------------------------------------------------------- 6. α grid
def test_alpha_grid_is_bounded():
    with pytest.raises(ConfigError, match="--alphas"):
        interpolate.default_alphas(1_000_000)
    with pytest.raises(ConfigError, match="--alphas"):
        interpolate.check_alphas([i / 5000 for i in range(5001)])
    sd = {"w": torch.zeros(1000)}  # 4000 bytes per interpolated state
    interpolate.check_path_memory(sd, 10, available=100_000)
    with pytest.raises(ConfigError, match="fewer α"):
        interpolate.check_path_memory(sd, 30, available=100_000)


# ---------------------------------------------------------------- 8. align
def test_align_plain_safetensors_into_a_folder(tmp_path, capsys):
    a, b = _own_weights(tmp_path)
    folder = tmp_path / "aligned"
    folder.mkdir()
    assert main(["align", a, b, "--model", "mlp", "--model-args", '{"widths": [16]}', "--dataset",
                 "digits", "--out", str(folder)]) == 0
    sd, meta = load_checkpoint(folder / "m1_aligned")
    assert meta["model"]["name"] == "mlp" and (folder / "m1_aligned.report.json").is_file()
    assert not (tmp_path / "aligned.safetensors").exists()
    # the aligned B computes the same function as B (a permutation)
    mb = create_model("mlp", input_shape=[1, 8, 8], num_classes=10, widths=[16]).eval()
    mb.load_state_dict(load_weights(b)[0])
    mc = create_model("mlp", input_shape=[1, 8, 8], num_classes=10, widths=[16]).eval()
    mc.load_state_dict(sd)
    x = torch.randn(5, 1, 8, 8)
    torch.testing.assert_close(mc(x), mb(x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- 10. threads
def test_threads_flag_and_default_are_recorded(run3, monkeypatch):
    from llfc.seeding import default_threads, environment, set_threads

    env = _strict(run3 / "environment.json")
    assert env["threads"] == 1 and env["threads_source"] == "--threads"
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert default_threads() == (1, "OMP_NUM_THREADS")
        monkeypatch.delenv("OMP_NUM_THREADS")
        n, why = default_threads()
        assert n >= 1 and why == "cores available to the process"
        assert set_threads(None) == n == environment()["threads"]
        with pytest.raises(ConfigError, match="--threads"):
            set_threads(0)
    finally:
        torch.set_num_threads(before)


def test_same_model_twice_warns(run3, tmp_path, capsys):
    a = str(run3 / "pairs/spawn/a/final")
    with warnings.catch_warnings():
        assert main(["analyze", a, a, "--out", str(tmp_path / "aa"), *MEASURE]) == 0
    assert "same weights" in capsys.readouterr().err


# ---------------------------------------------------------------- 11, 14. one criterion, in the summary
def _pair(barrier, dist, base):
    al = [0.0, 0.25, 0.5, 0.75, 1.0]
    return {"alphas": al, "lmc": {"test": {"error": [0.1] * 5, "barriers": {
        "error_barrier_frankle": barrier, "loss_barrier_entezari": 0.0}}},
        "llfc": [{"name": "h", "kind": "post", "baseline": {"mean": base},
                  "distance": {"mean": [0.0, dist, dist, dist, 0.0]}}]}


def test_summary_uses_the_one_criterion():
    from llfc import criteria, report
    from llfc.report.summary import summary_table

    assert report.worst_layer is criteria.worst_layer  # no second definition
    # the review's case: ratio ×0.099 passes the ratio, but the absolute distance does not
    indep = _pair(0.0189, 0.062, 0.63)
    assert criteria.lmc_holds(indep) is (0.0189 <= criteria.LMC_MAX_ERROR_BARRIER)
    assert criteria.llfc_holds(indep) is False
    good = _pair(0.001, 0.001, 0.5)
    assert criteria.lmc_holds(good) and criteria.llfc_holds(good)
    text = summary_table({"good": good, "bad": _pair(0.2, 0.3, 0.6)}, note="DRY RUN: x")
    lines = text.splitlines()
    assert lines[0] == "DRY RUN: x"
    good_line = next(ln for ln in lines if ln.startswith("good"))
    bad_line = next(ln for ln in lines if ln.startswith("bad"))
    assert " yes   yes " in good_line and " no    no " in bad_line
    assert criteria.describe() in text
    assert "*:" not in text  # the endpoint footnote only when a barrier peaks at an endpoint
    at_end = _pair(0.01, 0.001, 0.5)
    at_end["lmc"]["test"]["barriers"]["error_barrier_interior"] = 0.0
    text = summary_table({"e": at_end})
    assert "1.00* pp" in text and "*: the maximum is at an endpoint" in text
    # the verdict says how many hidden layers it covers (one hand-picked layer says little)
    assert text.splitlines()[-1] == "LLFC is judged over the 1 hidden layer(s) measured."
    two = _pair(0.001, 0.001, 0.5)
    two["llfc"] = two["llfc"] * 2 + [{**two["llfc"][0], "name": "out", "kind": "logits"}]
    text = summary_table({"e": at_end, "two": two})
    assert text.splitlines()[-1] == "LLFC is judged over the hidden layers measured: e 1, two 2."


# ---------------------------------------------------------------- 13. the README's Python API runs as written
def test_readme_api_snippet_runs(run3, tmp_path, monkeypatch, capsys):
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"### Python API\s+```python\n(.*?)```", readme, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "demo").symlink_to(run3)
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    res = ns["res"]
    assert set(res) >= {"alphas", "n_samples", "lmc", "llfc", "weak_additivity", "commutativity"}
    assert set(res["lmc"]) == {"loss", "error", "barriers"}
    assert res["n_samples"] == 450  # the whole digits test set
    from llfc import criteria

    out = capsys.readouterr().out.splitlines()
    assert out[-1] == f"{criteria.lmc_holds(res)} {criteria.llfc_holds(res)}"


# ---------------------------------------------------------------- 14. figures
def test_figures_scales_labels_and_legends(run3, monkeypatch, tmp_path):
    from llfc.report import plots

    figs = {}

    def keep(fig, path):
        figs[path.name] = fig
        return path

    monkeypatch.setattr(plots, "_save", keep)
    pairs = _strict(run3 / "results.json")["pairs"]
    for pr in pairs.values():
        pr["commutativity"] = [{"name": "layers.2", "module": "layers.2", "dist_com": 0.01, "dist_W": 1.0,
                                "dist_H": 0.5}]
    plots.plot_lmc(pairs, tmp_path / "lmc.png")
    plots.plot_stitching(pairs, tmp_path / "stitching.png")
    plots.plot_commutativity(pairs, tmp_path / "commutativity.png")
    lmc = figs["lmc.png"].axes  # rows: pairs; columns: loss, error
    assert lmc[1].get_ylim() == lmc[3].get_ylim() and lmc[0].get_ylim() == lmc[2].get_ylim()
    st = figs["stitching.png"].axes
    assert len(st) == len(pairs)  # one panel (own y-scale) per pair
    for ax in st:
        assert ax.get_xlabel() and ax.get_ylabel()
        assert {"A alone", "B alone"} <= {t.get_text().split(" (")[0] for t in ax.get_legend().get_texts()}
    com = figs["commutativity.png"]
    assert all(ax.get_legend() is None for ax in com.axes) and len(com.legends) == 1


def test_undefined_values_are_empty_csv_cells(tmp_path):
    from llfc.report.tables import _write

    _write(tmp_path / "t.csv", ["a", "b", "c"], [[1.5, float("nan"), None], ["x", float("inf"), 2]])
    assert (tmp_path / "t.csv").read_text() == "a,b,c\n1.5,,\nx,,2\n"

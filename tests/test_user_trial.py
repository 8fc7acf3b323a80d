"""Defects found by trying llfc as a new user (clean clone, README only): each test fails before its fix."""

from __future__ import annotations

import pytest

from llfc import criteria
from llfc.cli import main


def _pair(barrier: float) -> dict:
    return {"lmc": {"test": {"barriers": {"error_barrier_frankle": barrier}}}}


def test_lmc_verdict_is_not_flipped_by_float_rounding_at_the_threshold():
    # 9 more wrong answers out of 450 is exactly 2 pp; float64 gives 0.020000000000000018
    assert criteria.lmc_holds(_pair(0.020000000000000018))
    assert not criteria.lmc_holds(_pair(0.02 + 1 / 10_000))  # one sample in 10,000 over: fails


@pytest.mark.parametrize(
    "argv, words",
    [
        (["probes", "gpt"], "gpt reads windows of token ids"),
        (["probes", "vit", "--dataset", "tinyshakespeare"], "vit reads images"),
        (["probes", "mlp", "--dataset", "tinyshakespeare"], "mlp cannot take tinyshakespeare's inputs"),
    ],
)
def test_a_model_on_the_wrong_kind_of_data_is_one_clear_error(argv, words, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


def test_zero_width_is_refused_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--widths", "64,0", "--out", str(out)]) == 2
    assert "whole numbers ≥ 1" in capsys.readouterr().err
    assert not out.exists()


def test_negative_train_samples_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--train-samples", "-3", "--out", str(out)]) == 2
    assert "--train-samples must be ≥ 0" in capsys.readouterr().err
    assert not out.exists()


def test_analyze_model_args_without_model_is_refused(tmp_path, capsys):
    out = tmp_path / "an"
    assert main(["analyze", "a", "b", "--model-args", '{"widths": [8]}', "--out", str(out)]) == 2
    assert "--model-args needs --model" in capsys.readouterr().err
    assert not out.exists()


def test_run_takes_model_args(monkeypatch, tmp_path):
    import llfc.experiment

    seen = {}
    monkeypatch.setattr(llfc.experiment, "run_experiment", lambda cfg, out, **k: seen.setdefault("cfg", cfg))
    argv = ["run", "--model", "vit", "--model-args", '{"width": 16, "depth": 1}', "--out", str(tmp_path / "r")]
    assert main(argv) == 0
    cfg = seen["cfg"]
    assert cfg.model == "vit" and cfg.model_args == {"width": 16, "depth": 1}  # not the digits MLP's widths


# --------------------------------------------------------------------------- small user-facing fixes
TINY_SWEEP = {
    "name": "t",
    "base": {
        "name": "t",
        "dataset": "digits",
        "model": "mlp",
        "model_args": {"widths": [8]},
        "alphas": 5,
        "train": {"epochs": 1, "batch_size": 64, "lr": 0.05, "max_batches_per_epoch": 2},
        "measure": {"test_samples": 32, "train_samples": 0, "batch_size": 64, "stitching": False, "angles_k": 0},
    },
    "grid": {"pair": ["independent"], "seed": [0]},
    "point_figures": False,
}


def test_sweep_threads_per_job_follow_omp_num_threads(tmp_path, monkeypatch):
    """The banner's threads per job are the ones each job uses and records ($OMP_NUM_THREADS was ignored)."""
    import json
    import os

    import torch

    from llfc import sweep

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert sweep.job_threads(None, 2) == (1, "OMP_NUM_THREADS")  # each worker inherits it
    assert sweep.job_threads(3, 2) == (3, "--threads")
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert sweep.job_threads(None, 2) == (2, "cores available // --jobs")
    with pytest.raises(sweep.SweepError, match="--threads must be ≥ 1"):
        sweep.job_threads(0, 1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    lines: list[str] = []
    before = torch.get_num_threads()
    try:
        sweep.run_sweep(TINY_SWEEP, tmp_path / "s", progress=False, log=lines.append)
    finally:
        torch.set_num_threads(before)
    assert "1 thread(s) per job (OMP_NUM_THREADS)" in lines[0]
    (point,) = (tmp_path / "s" / "points").glob("*/results.json")
    env = json.loads(point.read_text())["environment"]
    assert (env["threads"], env["threads_source"]) == (1, "OMP_NUM_THREADS")


def test_run_records_the_alpha_grid_and_test_samples_it_used(tmp_path, capsys):
    """Duplicate α values and --test-samples beyond the test set: config.yaml and results.json record
    the sorted, de-duplicated grid and the clipped sample count that were measured."""
    import json

    import yaml

    out = tmp_path / "run"
    argv = ["run", "--pairs", "independent", "--epochs", "1", "--widths", "8", "--alphas", "0.6,0.1,0.6,0.1"]
    argv += ["--test-samples", "100000", "--train-samples", "0", "--no-conditions", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    cap = capsys.readouterr()
    assert "llfc: warning: --test-samples 100000 (test_samples in Python) is more than digits's 450 test" in cap.err
    # --no-conditions and --train-samples 0: the log does not claim they are measured
    assert "[independent] measuring LMC (test set), LLFC, stitching and principal angles\n" in cap.out
    res = json.loads((out / "results.json").read_text())
    grid = [0.0, 0.1, 0.25, 0.5, 0.6, 0.75, 1.0]
    assert res["pairs"]["independent"]["alphas"] == grid and res["dataset"]["n_test"] == 450
    for cfg in (res["config"], yaml.safe_load((out / "config.yaml").read_text())):
        assert cfg["alphas"] == grid and cfg["measure"]["test_samples"] == 450
    (out / "results.json").unlink()  # an unfinished run of the same command still resumes
    assert main(argv) == 0


def test_unwritable_cache_names_llfc_cache_and_the_fix(tmp_path, monkeypatch):
    import gzip

    from llfc import data
    from llfc.errors import ConfigError, DataNotFoundError

    gz = tmp_path / "t10k-labels-idx1-ubyte.gz"
    gz.write_bytes(gzip.compress(b"\x00" * 16))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("LLFC_CACHE", str(blocker / "cache"))  # a folder cannot be made inside a file
    with pytest.raises(ConfigError) as e:
        data._decompressed("mnist", gz)
    msg = str(e.value)
    assert "$LLFC_CACHE" in msg and str(blocker / "cache") in msg and "export LLFC_CACHE=" in msg
    monkeypatch.setenv("LLFC_CACHE", str(tmp_path / "cache"))  # a writable cache still works
    assert data._decompressed("mnist", gz).read_bytes() == b"\x00" * 16
    for bad in (b"not gzip at all", gzip.compress(bytes(range(256)) * 8)[:-20]):  # damaged files: named as such
        gz.write_bytes(bad)
        with pytest.raises(DataNotFoundError, match="not a valid gzip file"):
            data._decompressed("mnist", gz)


def _mlp_weights(tmp_path, name: str, prefix: str = "", extra: dict | None = None) -> str:
    import torch

    from llfc.models import create_model

    torch.manual_seed(len(name))
    sd = create_model("mlp", input_shape=[1, 8, 8], num_classes=10, widths=[8]).state_dict()
    path = tmp_path / f"{name}.pt"
    torch.save({**{prefix + k: v for k, v in sd.items()}, **(extra or {})}, path)
    return str(path)


MLP8 = ["--model", "mlp", "--model-args", '{"widths": [8]}', "--dataset", "digits"]


def test_lightning_style_model_prefix_is_stripped_or_suggested(tmp_path, capsys):
    import torch

    a, b = _mlp_weights(tmp_path, "a", "model."), _mlp_weights(tmp_path, "bb", "model.")
    out = tmp_path / "an"
    argv = ["analyze", a, b, *MLP8, "--alphas", "5", "--test-samples", "50", "--train-samples", "0"]
    assert main([*argv, "--no-conditions", "--no-progress", "--out", str(out)]) == 0
    assert "stripped the key prefix 'model.'" in capsys.readouterr().err
    assert (out / "results.json").is_file()
    # other keys beside the model's: nothing guessed, the prefix suggested
    c, d = (_mlp_weights(tmp_path, n, "model.", {"loss_fn.weight": torch.ones(10)}) for n in ("c", "dd"))
    assert main(["align", c, d, *MLP8, "--out", str(tmp_path / "al")]) == 2
    err = capsys.readouterr().err
    assert "under the prefix 'model.'" in err and "1 other key" in err and "Traceback" not in err


def test_corrupt_torch_file_is_named_and_no_unsafe_load_is_suggested(tmp_path):
    import os

    import torch

    from llfc.checkpoint import load_torch_state_dict
    from llfc.errors import CheckpointError

    good = _mlp_weights(tmp_path, "good")
    blob = open(good, "rb").read()
    cases = {"random.pt": os.urandom(500), "truncated.pt": blob[: len(blob) // 2], "empty.pth": b""}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError) as e:
            load_torch_state_dict(tmp_path / name)
        msg = str(e.value)
        assert str(tmp_path / name) in msg and "corrupt" in msg, msg
        assert "weights_only` set to `False" not in msg and "weights_only=False" not in msg, msg
    torch.save(torch.nn.Linear(2, 2), tmp_path / "whole.pt")  # sound, but a pickled module: named as such
    with pytest.raises(CheckpointError, match=r"whole.pt holds Python objects besides tensors \(it needs torch"):
        load_torch_state_dict(tmp_path / "whole.pt")


def test_ctl_summary_legend_states_only_the_criteria_of_its_columns():
    from llfc.report.ctl import summary_ctl

    pair = {
        "points": [[0.5, 0.5]],
        "pretrain_epochs": 2,
        "errors": {"A": {"t1": 0.1}, "B": {"t2": 0.2}, "points": [{"t1": 0.3, "t2": 0.4}]},
        "verdict": {"holds": True, "worst": {"layer": "layers.1", "distance": 0.01, "baseline": 0.1}},
    }
    text = summary_ctl({"tasks": [{"name": "t0"}, {"name": "t1"}, {"name": "t2"}], "pairs": {"p": pair}})
    assert "CTL holds" in text.splitlines()[0]  # the column
    legend = text.splitlines()[-1]
    assert "LMC" not in text and "barrier" not in legend  # no LMC column, so no LMC threshold
    assert f"≤ {criteria.LLFC_MAX_RATIO:g} × E[1−cos_AB]" in legend and f"≤ {criteria.LLFC_MAX_DISTANCE:g}" in legend


def _mlp_checkpoints(tmp_path, meta=None) -> list[str]:
    """Two digits-sized MLP checkpoints (widths [8], seeds 0 and 1) with the architecture recorded."""
    import torch

    from llfc.checkpoint import save_checkpoint
    from llfc.models import create_model

    kw = {"input_shape": [1, 8, 8], "num_classes": 10, "widths": [8]}
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        path = tmp_path / f"m{seed}"
        sd = create_model("mlp", **kw).state_dict()
        save_checkpoint(path, sd, {"model": {"name": "mlp", "kwargs": kw}, **(meta or {})})
        paths.append(str(path))
    return paths


@pytest.mark.parametrize("method", ["activation", "ste", "weight"])
def test_align_on_data_the_model_cannot_take_is_one_clear_error(tmp_path, capsys, method):
    paths = _mlp_checkpoints(tmp_path)
    out = tmp_path / "al"
    # an MNIST-sized dataset for a digits-sized model: refused before any data file is looked for
    argv = ["align", *paths, "--method", method, "--dataset", "fashion-mnist", "--data-root", str(tmp_path / "none")]
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "(1, 8, 8)" in err and "(1, 28, 28)" in err and "--dataset" in err
    assert len(err.strip().splitlines()) == 1 and not list(tmp_path.glob("al*"))


EXTRAPOLATED = [-0.2, 0.0, 0.25, 0.5, 0.75, 1.0, 1.2]
TINY_RUN = ["--pairs", "spawn", "--spawn-epoch", "0", "--epochs", "1", "--widths", "8", "--test-samples", "100"]
TINY_RUN += ["--train-samples", "0", "--no-conditions", "--no-progress"]


def _test_error(sd: dict) -> float:
    """Test error of the digits MLP-8 with weights ``sd`` on the whole digits test set."""
    import torch

    from llfc.data import get_dataset
    from llfc.models import create_model

    model = create_model("mlp", input_shape=[1, 8, 8], num_classes=10, widths=[8])
    model.load_state_dict(sd)
    x, y = map(torch.stack, zip(*[(x, torch.as_tensor(y)) for x, y in get_dataset("digits", "test")]))
    with torch.no_grad():
        return (model.eval()(x).argmax(1) != y).float().mean().item()


def test_allow_extrapolation_flag_reaches_the_measurement_of_analyze(tmp_path):
    """--allow-extrapolation was recorded, then the measurement refused α = -0.2 all the same."""
    import json

    import torch

    from llfc.interpolate import lerp_state_dict

    a, b = _mlp_weights(tmp_path, "a"), _mlp_weights(tmp_path, "bb")
    out = tmp_path / "an"
    argv = ["analyze", a, b, *MLP8, "--alphas=-0.2,0.5,1.2", "--allow-extrapolation", "--train-samples", "0"]
    assert main([*argv, "--no-conditions", "--no-progress", "--out", str(out)]) == 0
    pair = json.loads((out / "results.json").read_text())["pairs"]["A vs B"]
    assert pair["alphas"] == EXTRAPOLATED
    sd_a = torch.load(a, weights_only=True)
    sd_b = torch.load(b, weights_only=True)
    for i in (0, -1):  # θ_α = α·θ_A + (1−α)·θ_B beyond both ends
        assert pair["lmc"]["test"]["error"][i] == pytest.approx(
            _test_error(lerp_state_dict(sd_a, sd_b, EXTRAPOLATED[i])), abs=1e-6
        )


@pytest.mark.parametrize("how", ["flag", "yaml"])
def test_allow_extrapolation_of_run_from_the_flag_or_the_yaml_config(tmp_path, how):
    import json

    import yaml

    out = tmp_path / "run"
    argv = ["run", *TINY_RUN, "--out", str(out)]
    if how == "flag":
        argv += ["--alphas=-0.2,0.5,1.2", "--allow-extrapolation"]
    else:
        cfg = tmp_path / "x.yaml"
        cfg.write_text("allow_extrapolation: true\nalphas: [-0.2, 0.5, 1.2]\n")
        argv += ["--config", str(cfg)]
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["pairs"]["spawn"]["alphas"] == EXTRAPOLATED
    assert len(res["pairs"]["spawn"]["lmc"]["test"]["error"]) == len(EXTRAPOLATED)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["allow_extrapolation"] is True and saved["alphas"] == EXTRAPOLATED


@pytest.mark.parametrize(
    "alphas, words",
    [(["--alphas=-0.2,0.5"], "--allow-extrapolation"), (["--alphas", "3"], "list them, e.g. --alphas 0,0.5,1")],
)
def test_run_checks_the_alpha_grid_before_training_or_writing(tmp_path, capsys, monkeypatch, alphas, words):
    import llfc.experiment
    from llfc.config import ExperimentConfig
    from llfc.errors import ConfigError

    def no_training(*a, **k):
        raise AssertionError("trained before the α grid was checked")

    monkeypatch.setattr(llfc.experiment, "spawn_pair", no_training)
    out = tmp_path / "run"
    assert main(["run", *TINY_RUN, *alphas, "--out", str(out)]) == 2
    assert words in capsys.readouterr().err
    assert not out.exists()
    # with the other config checks; API users are shown the argument, not the flag
    with pytest.raises(ConfigError, match=r"at least 5 points.*pass a list, e\.g\. alphas=\[0, 0\.5, 1\]"):
        ExperimentConfig(alphas=3).resolved()


FIGURES = ["lmc.png", "llfc.png", "weak_additivity.png", "commutativity.png", "stitching.png"]


@pytest.fixture(scope="module")
def one_sample_run(tmp_path_factory):
    """``llfc analyze A B --test-samples 1 --train-samples 0`` of two MLP-8s on digits."""
    tmp = tmp_path_factory.mktemp("one")
    a, b = _mlp_weights(tmp, "a"), _mlp_weights(tmp, "bb")
    out = tmp / "an"
    argv = ["analyze", a, b, *MLP8, "--test-samples", "1", "--train-samples", "0", "--no-progress"]
    assert main([*argv, "--out", str(out)]) == 0
    return out


def _embedded_figures(run) -> int:
    return (run / "report.html").read_text().count('<img src="data:image/png;base64,')


def test_one_test_sample_draws_every_figure_without_undefined_error_bars(one_sample_run):
    """The std over one sample is undefined (NaN in memory, null in results.json): plot_llfc failed
    with 'Axis limits cannot be NaN or Inf'."""
    import json

    pair = json.loads((one_sample_run / "results.json").read_text())["pairs"]["A vs B"]
    assert pair["n_samples"] == 1 and pair["llfc"][0]["baseline"]["std"] is None
    assert all((one_sample_run / f).stat().st_size > 0 for f in FIGURES)
    assert _embedded_figures(one_sample_run) == len(FIGURES)
    for f in FIGURES:  # drawn again from results.json, where the std is null
        (one_sample_run / f).unlink()
    assert main(["report", str(one_sample_run)]) == 0
    assert all((one_sample_run / f).stat().st_size > 0 for f in FIGURES)


@pytest.mark.parametrize("figure", FIGURES)
def test_report_redraws_each_missing_figure(one_sample_run, tmp_path, figure):
    """`llfc report DIR` redrew the figures only when lmc.png was missing; report.html then embedded fewer."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(one_sample_run, run)
    kept = {f: (run / f).stat().st_mtime_ns for f in FIGURES if f != figure}
    (run / figure).unlink()
    assert main(["report", str(run)]) == 0
    assert (run / figure).stat().st_size > 0
    assert {f: (run / f).stat().st_mtime_ns for f in kept} == kept  # the others are left as they are
    assert _embedded_figures(run) == len(FIGURES)


def test_lmc_figure_joins_the_endpoints_not_the_ends_of_an_extrapolated_grid(tmp_path, monkeypatch):
    """The dotted reference line of lmc.png joined the first and last α of the grid: α = -0.2 and 1.2
    under extrapolation, not the two models."""
    from llfc.report import plots

    figs = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figs.append(fig))
    errors = [0.5, 0.1, 0.2, 0.3, 0.2, 0.05, 0.4]
    lmc = {
        "loss": [2 * e for e in errors],
        "error": errors,
        "barriers": dict.fromkeys(["error_barrier_frankle", "loss_barrier_entezari"], 0.0),
    }
    plots.plot_lmc({"p": {"alphas": EXTRAPOLATED, "lmc": {"test": lmc}}}, tmp_path / "lmc.png")
    (fig,) = figs
    dotted = [ln for ln in fig.axes[1].lines if ln.get_linestyle() == ":"]
    assert [list(ln.get_ydata()) for ln in dotted] == [pytest.approx([10.0, 5.0])]  # B (α = 0), A (α = 1), in %
    plots.plt.close(fig)


def _bn_pair():
    import torch
    import torch.nn as nn

    def net(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))

    return net(0), net(0).state_dict(), net(1).state_dict()


@pytest.mark.parametrize("form", ["tensors", "tensor", "xy tuples", "xy lists", "loader xy", "loader x-only"])
def test_bn_batches_take_the_forms_a_user_has(form):
    """bn_mode='reset' with a list of (x, y) tuples (what a DataLoader yields) raised a raw
    AttributeError: 'tuple' object has no attribute 'to'."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from llfc.engine import measure_pair
    from llfc.interpolate import lerp_state_dict, path_states

    model, sd_a, sd_b = _bn_pair()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 4, generator=g), torch.randint(0, 3, (64,), generator=g)
    xs = list(x.split(16))
    batches = {
        "tensors": xs,
        "tensor": x,
        "xy tuples": list(zip(xs, y.split(16))),
        "xy lists": [[xb, yb] for xb, yb in zip(xs, y.split(16))],
        "loader xy": DataLoader(TensorDataset(x, y), batch_size=16),
        "loader x-only": DataLoader(TensorDataset(x), batch_size=16),
    }[form]
    grid = [0.0, 0.25, 0.5, 0.75, 1.0]
    states = path_states(model, sd_a, sd_b, grid, "reset", batches)
    # the interior BN statistics: the average over the batches of the batch mean / unbiased variance of
    # the first Linear's output (REPAIR's cumulative average)
    mid = lerp_state_dict(sd_a, sd_b, 0.5)
    h = x @ mid["0.weight"].T + mid["0.bias"]
    chunks = [h] if form == "tensor" else list(h.split(16))
    assert torch.allclose(states[2]["1.running_mean"], h.mean(0), atol=1e-6)
    assert torch.allclose(states[2]["1.running_var"], torch.stack([c.var(0) for c in chunks]).mean(0), atol=1e-6)
    assert states[0] is sd_b and states[-1] is sd_a  # the endpoints keep their trained statistics
    res = measure_pair(model, sd_a, sd_b, [(x, y)], grid, bn_mode="reset", bn_batches=batches)
    ref = measure_pair(model, sd_a, sd_b, [(x, y)], grid, states=states)
    assert res["lmc"]["loss"] == ref["lmc"]["loss"]


@pytest.mark.parametrize("form", ["dict batches", "dataset", "number"])
def test_bn_batches_in_another_form_is_one_clear_error(form):
    import torch
    from torch.utils.data import TensorDataset

    from llfc.errors import ConfigError
    from llfc.interpolate import path_states

    model, sd_a, sd_b = _bn_pair()
    x = torch.randn(16, 4)
    batches = {"dict batches": [{"x": x}], "dataset": TensorDataset(x), "number": 20}[form]
    with pytest.raises(ConfigError, match=r"bn_batches .*\(x, y\) tuples"):
        path_states(model, sd_a, sd_b, [0.0, 0.5, 1.0], "reset", batches)


def test_align_out_is_required_in_help_and_behaviour(tmp_path, capsys):
    """`llfc align --help` promised a default --out that did not exist; --out is required, and says so."""
    with pytest.raises(SystemExit) as e:
        main(["align", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--out OUT required" in text and "default runs/" not in text
    a, b = _mlp_checkpoints(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["align", a, b])
    assert e.value.code == 2 and "the following arguments are required: --out" in capsys.readouterr().err


def test_align_ste_settings_from_the_cli(tmp_path, capsys, monkeypatch):
    """--ste-epochs / --ste-lr reach the straight-through estimator; with another method, or out of range, they are
    one clear error before anything is written."""
    import importlib
    import json
    import math

    from llfc.data import get_dataset

    al = importlib.import_module("llfc.permutation.align")  # the module (llfc.permutation.align is the function)

    a, b = _mlp_checkpoints(tmp_path, {"dataset": "digits"})
    out = tmp_path / "al"
    for bad, words in (
        ([], "use them with --method ste"),
        (["--method", "ste", "--ste-epochs", "0"], "at least 1"),
        (["--method", "ste", "--ste-lr", "-1"], "positive number"),
    ):
        assert main(["align", a, b, "--ste-epochs", "2", *bad, "--out", str(out)]) == 2
        assert words in capsys.readouterr().err and not list(tmp_path.glob("al*"))
    seen = {}

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return ste_matching(*args, **kwargs)

    ste_matching = al.ste_matching
    monkeypatch.setattr(al, "ste_matching", spy)
    assert main(["align", a, b, "--method", "ste", "--ste-epochs", "2", "--ste-lr", "0.05", "--out", str(out)]) == 0
    assert seen["epochs"] == 2 and seen["lr"] == 0.05
    report = json.loads((tmp_path / "al.report.json").read_text())
    batches = math.ceil(min(10000, len(get_dataset("digits", "train"))) / 500)  # activation_samples, batch_size
    assert report["method"] == "ste" and report["details"]["steps"] == 2 * batches
    assert report["objective"] == report["details"]["best_loss"] == min(report["details"]["losses"])


def test_gpt_context_is_settable_from_the_cli(tmp_path, capsys, monkeypatch):
    """The GPT context error told the user to set a "dataset option" the CLI had no flag for: `llfc run
    --dataset-args` sets it (merged over the config's dataset_args), and the error names that flag."""
    import llfc.experiment

    (tmp_path / "tinyshakespeare").mkdir()
    (tmp_path / "tinyshakespeare" / "input.txt").write_text("To be, or not to be: that is the question.\n" * 40)
    argv = ["run", "--dataset", "tinyshakespeare", "--model", "gpt", "--data-root", str(tmp_path)]
    out = tmp_path / "run"
    assert main([*argv, "--model-args", '{"block_size": 16}', "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--dataset-args '{\"context\": 16}'" in err and "--model-args '{\"block_size\": 128}'" in err
    assert not out.exists()
    assert main([*argv, "--dataset-args", "{context: 16}", "--out", str(out)]) == 2
    assert "--dataset-args must be JSON" in capsys.readouterr().err
    seen = []
    monkeypatch.setattr(llfc.experiment, "run_experiment", lambda cfg, out, **kw: seen.append(cfg))
    small = ["--model-args", '{"block_size": 16}', "--dataset-args", '{"context": 16}']
    assert main([*argv, *small, "--out", str(out)]) == 0
    assert seen[0].dataset_args == {"context": 16} and seen[0].model_args["block_size"] == 16


@pytest.mark.parametrize("bad", ["ste_lr: 0", "ste_epochs: 0", "restarts: 0", "activation_samples: -5"])
def test_bad_align_settings_are_refused_before_training(tmp_path, capsys, monkeypatch, bad):
    """align.* from a YAML config were only checked when the permutation pair was aligned, after training."""
    import llfc.experiment

    def no_training(*a, **k):
        raise AssertionError("trained before the align settings were checked")

    monkeypatch.setattr(llfc.experiment, "independent_pair", no_training)
    cfg = tmp_path / "x.yaml"
    cfg.write_text(f"pairs: [permutation-ste]\nalign:\n  {bad}\n")
    out = tmp_path / "run"
    assert main(["run", "--config", str(cfg), "--out", str(out), "--no-progress"]) == 2
    assert f"align.{bad.split(':')[0]}" in capsys.readouterr().err and not out.exists()

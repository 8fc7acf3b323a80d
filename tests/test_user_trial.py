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
    for bad, words in (([], "use them with --method ste"), (["--method", "ste", "--ste-epochs", "0"], "at least 1"),
                       (["--method", "ste", "--ste-lr", "-1"], "positive number")):
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

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

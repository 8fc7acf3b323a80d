"""The CLI as a user meets it: a tiny end-to-end run on digits, and every bad input."""

import json
import math

import pytest
import torch

from llfc.checkpoint import save_checkpoint
from llfc.cli import main
from llfc.models import create_model

TINY = ["--epochs", "2", "--widths", "32,32", "--train-samples", "100", "--no-progress"]


def _run(argv, capsys):
    code = main(argv)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r"
    assert main(["run", "--out", str(out), "--spawn-epoch", "1", *TINY]) == 0
    return out


def test_tiny_end_to_end_run_on_digits(tiny_run):
    res = json.loads((tiny_run / "results.json").read_text())
    assert res["schema_version"] == 1
    assert set(res["pairs"]) == {"spawn", "independent"}
    for name in ("lmc.png", "llfc.png", "weak_additivity.png", "commutativity.png", "llfc.csv",
                 "lmc.csv", "config.yaml", "environment.json", "summary.txt",
                 "pairs/spawn/a/final.safetensors", "pairs/independent/b/final.json"):
        assert (tiny_run / name).exists(), name
    sp = res["pairs"]["spawn"]
    assert sp["alphas"] == [0.0, 0.1, 0.2, 0.25, 0.4, 0.5, 0.6, 0.75, 0.8, 0.9, 1.0]
    assert sp["n_samples"] == 450  # digits test split
    # endpoints of the curve are the two trained models: their logged test error must agree
    log_a = sp["train_logs"]["a"][-1]
    assert sp["lmc"]["test"]["error"][-1] == pytest.approx(log_a["test_err"], abs=1e-9)
    # the first Linear layer is exactly linear in the weights (LLFC holds trivially there)
    assert max(sp["llfc"][0]["distance"]["mean"]) < 1e-9
    assert sp["lmc"]["train"]["error"][0] >= 0
    assert all(math.isfinite(c["dist_com"]) for c in sp["commutativity"])


def test_existing_results_are_refused_and_kept(tiny_run, capsys):
    before = (tiny_run / "results.json").read_bytes()
    code, out, err = _run(["run", "--out", str(tiny_run), *TINY], capsys)
    assert code == 2
    assert "already holds results" in err and "--overwrite" in err
    assert (tiny_run / "results.json").read_bytes() == before


def test_unknown_dataset_lists_valid_names(tmp_path, capsys):
    code, _, err = _run(["run", "--dataset", "imagenet-22k", "--out", str(tmp_path / "o")], capsys)
    assert code == 2
    assert "unknown dataset 'imagenet-22k'" in err and "digits" in err and "mnist" in err
    assert not (tmp_path / "o").exists()


def test_unknown_model_lists_valid_names(tmp_path, capsys):
    code, _, err = _run(["run", "--model", "transformer9000", "--out", str(tmp_path / "o"), *TINY], capsys)
    assert code == 2
    assert "unknown model 'transformer9000'" in err and "mlp" in err


def test_missing_data_names_the_folder_and_both_fixes(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = _run(["run", "--dataset", "mnist", "--data-root", str(empty),
                         "--out", str(tmp_path / "o")], capsys)
    assert code == 2
    assert str(empty.resolve()) in err and "--data-root" in err and "--download" in err
    assert not (tmp_path / "o").exists()


def test_alpha_outside_unit_interval_needs_explicit_flag(tmp_path, capsys):
    code, _, err = _run(["run", "--alphas", "0,0.5,1.5", "--out", str(tmp_path / "o"), *TINY], capsys)
    assert code == 2
    assert "--allow-extrapolation" in err


def _ckpt(path, widths, seed=0, nan=False):
    torch.manual_seed(seed)
    kwargs = {"input_shape": [1, 8, 8], "num_classes": 10, "widths": widths}
    sd = create_model("mlp", **kwargs).state_dict()
    if nan:
        sd["layers.2.weight"][0, 0] = float("nan")
    save_checkpoint(path, sd, {"model": {"name": "mlp", "kwargs": kwargs}, "dataset": "digits"})
    return str(path)


def test_analyze_two_checkpoints(tmp_path, capsys):
    a, b = _ckpt(tmp_path / "a", [16, 16]), _ckpt(tmp_path / "b", [16, 16], seed=1)
    code, out, _ = _run(["analyze", a, b, "--out", str(tmp_path / "o"), "--alphas", "5",
                         "--no-progress"], capsys)
    assert code == 0
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert res["pairs"]["A vs B"]["alphas"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert "err barrier" in out


def test_analyze_refuses_different_shapes_naming_the_parameter(tmp_path, capsys):
    a, b = _ckpt(tmp_path / "a", [16, 16]), _ckpt(tmp_path / "b", [16, 8])
    code, _, err = _run(["analyze", a, b, "--out", str(tmp_path / "o")], capsys)
    assert code == 2
    # safetensors stores keys sorted, so the first difference found is layers.2's bias
    assert "'layers.2.bias'" in err and "(16,)" in err and "(8,)" in err


def test_analyze_refuses_nan_weights(tmp_path, capsys):
    a, b = _ckpt(tmp_path / "a", [16, 16]), _ckpt(tmp_path / "b", [16, 16], nan=True)
    code, _, err = _run(["analyze", a, b, "--out", str(tmp_path / "o")], capsys)
    assert code == 2
    assert "layers.2.weight" in err and "NaN" in err


def test_analyze_refuses_corrupted_checkpoint(tmp_path, capsys):
    a, b = _ckpt(tmp_path / "a", [16, 16]), _ckpt(tmp_path / "b", [16, 16])
    data = (tmp_path / "b.safetensors").read_bytes()
    (tmp_path / "b.safetensors").write_bytes(data[: len(data) // 2])
    code, _, err = _run(["analyze", a, b, "--out", str(tmp_path / "o")], capsys)
    assert code == 2
    assert "b.safetensors" in err


def test_analyze_refuses_images_of_the_wrong_shape(tmp_path, capsys):
    a, b = _ckpt(tmp_path / "a", [16, 16]), _ckpt(tmp_path / "b", [16, 16], seed=1)
    code, _, err = _run(["analyze", a, b, "--dataset", "mnist", "--out", str(tmp_path / "o")], capsys)
    assert code == 2
    assert "(1, 8, 8)" in err and "(1, 28, 28)" in err and "--dataset" in err


def test_yaml_config_with_cli_override(tmp_path, capsys):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(
        "name: from-yaml\n"
        "pairs: [independent]\n"
        "model_args: {widths: [8]}\n"
        "alphas: [0.0, 0.5, 1.0]\n"
        "train: {epochs: 3, batch_size: 128}\n"
        "measure: {train_samples: 50, conditions: false}\n"
    )
    out = tmp_path / "o"
    code, _, err = _run(["run", "--config", str(cfg), "--epochs", "1", "--out", str(out),
                         "--no-progress"], capsys)
    assert code == 0, err
    import yaml

    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["name"] == "from-yaml" and saved["train"]["epochs"] == 1  # the flag wins
    assert saved["model_args"] == {"widths": [8]}
    res = json.loads((out / "results.json").read_text())
    assert len(res["pairs"]["independent"]["train_logs"]["a"]) == 1
    assert res["pairs"]["independent"]["alphas"] == [0.0, 0.25, 0.5, 0.75, 1.0]  # quarters added
    assert "commutativity" not in res["pairs"]["independent"]


def test_unknown_config_key_is_named(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("datset: mnist\n")
    code, _, err = _run(["run", "--config", str(cfg), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "datset" in err and "dataset" in err


def test_analyze_refuses_different_architectures(tmp_path, capsys):
    a = _ckpt(tmp_path / "a", [16, 16])
    torch.manual_seed(0)
    kwargs = {"input_shape": [1, 8, 8], "num_classes": 10}
    save_checkpoint(tmp_path / "b", create_model("lenet", **{**kwargs, "input_shape": [1, 28, 28]}).state_dict(),
                    {"model": {"name": "lenet", "kwargs": kwargs}, "dataset": "digits"})
    code, _, err = _run(["analyze", a, str(tmp_path / "b"), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "'mlp'" in err and "'lenet'" in err


def test_align_writes_a_function_preserving_checkpoint_closer_to_a(tmp_path, capsys):
    from llfc.checkpoint import load_checkpoint

    a, b = _ckpt(tmp_path / "a", [16, 16]), _ckpt(tmp_path / "b", [16, 16], seed=1)
    out = tmp_path / "b_aligned"
    code, stdout, err = _run(["align", a, b, "--method", "weight", "--out", str(out)], capsys)
    assert code == 0, err
    sd_a, _ = load_checkpoint(a)
    sd_b, meta_b = load_checkpoint(b)
    sd_c, meta_c = load_checkpoint(out)
    assert meta_c["model"] == meta_b["model"] and meta_c["alignment_method"] == "weight"
    x = torch.randn(5, 1, 8, 8)
    mb, mc = create_model("mlp", **meta_b["model"]["kwargs"]), create_model("mlp", **meta_b["model"]["kwargs"])
    mb.load_state_dict(sd_b)
    mc.load_state_dict(sd_c)
    assert torch.allclose(mb(x), mc(x), atol=1e-5)  # same function
    dist = lambda sd: sum(((sd_a[k] - sd[k]) ** 2).sum().item() for k in sd_a)
    assert dist(sd_c) < dist(sd_b)  # closer to A in weight space
    report = json.loads((tmp_path / "b_aligned.report.json").read_text())
    assert report["method"] == "weight"
    code, _, err = _run(["align", a, b, "--out", str(out)], capsys)
    assert code == 2 and "--overwrite" in err


def test_interrupted_run_resumes_and_matches_a_fresh_run(tmp_path, capsys, monkeypatch):
    import llfc.experiment as ex

    args = ["run", "--epochs", "2", "--widths", "16", "--train-samples", "50", "--no-progress",
            "--pairs", "spawn", "--spawn-epoch", "1"]
    real = ex.measure_pair

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ex, "measure_pair", interrupt)
    code, _, err = _run([*args, "--out", str(tmp_path / "r")], capsys)
    assert code == 130 and "resume" in err
    assert (tmp_path / "r" / "pairs" / "spawn" / "b" / "final.safetensors").exists()
    assert not (tmp_path / "r" / "results.json").exists()
    monkeypatch.setattr(ex, "measure_pair", real)
    code, out, _ = _run([*args, "--out", str(tmp_path / "r")], capsys)
    assert code == 0 and "(resume)" in out
    code, _, _ = _run([*args, "--out", str(tmp_path / "fresh")], capsys)
    resumed = json.loads((tmp_path / "r" / "results.json").read_text())["pairs"]["spawn"]
    fresh = json.loads((tmp_path / "fresh" / "results.json").read_text())["pairs"]["spawn"]
    assert resumed["lmc"] == fresh["lmc"] and resumed["llfc"] == fresh["llfc"]


def test_analyze_plain_safetensors_with_model_flag(tmp_path, capsys):
    from safetensors.torch import save_file

    for name, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        save_file(create_model("mlp", input_shape=[1, 8, 8], num_classes=10, widths=[16]).state_dict(),
                  str(tmp_path / f"{name}.safetensors"))
    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    code, _, err = _run(["analyze", a, b, "--out", str(tmp_path / "o1")], capsys)
    assert code == 2 and "--model" in err
    code, _, err = _run(["analyze", a, b, "--model", "mlp", "--model-args", '{"widths": [16]}',
                         "--dataset", "digits", "--out", str(tmp_path / "o2"), "--no-progress"], capsys)
    assert code == 0, err
    assert (tmp_path / "o2" / "config.yaml").exists() and (tmp_path / "o2" / "environment.json").exists()


def test_own_architecture_registered_then_cli_main(tmp_path, monkeypatch, capsys):
    """docs/models.md, "Your own architecture": a factory registered with register_model (here in this
    process, as `import mymodels` does) is usable by `llfc align` / `llfc analyze --model` through
    llfc.cli.main; unregistered, --model names it as unknown."""
    import torch.nn as nn
    from safetensors.torch import save_file

    from llfc.models import registry

    def my_mlp(input_shape=(1, 8, 8), num_classes=10, hidden=16):
        return nn.Sequential(
            nn.Flatten(), nn.Linear(math.prod(input_shape), hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    for seed, path in ((0, a), (1, b)):
        torch.manual_seed(seed)
        save_file(my_mlp().state_dict(), str(path))
    argv = ["analyze", str(a), str(b), "--model", "my_mlp", "--dataset", "digits", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "unknown")]) == 2
    assert "unknown model 'my_mlp'" in capsys.readouterr().err
    monkeypatch.setitem(registry._REGISTRY, "my_mlp", my_mlp)  # what @register_model("my_mlp") does
    out = tmp_path / "b_aligned"
    assert main(["align", str(a), str(b), "--model", "my_mlp", "--dataset", "digits", "--out", str(out)]) == 0
    assert json.loads(out.with_suffix(".json").read_text())["model"]["name"] == "my_mlp"
    assert main([*argv, "--alphas", "5", "--out", str(tmp_path / "run")]) == 0
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["model"]["name"] == "my_mlp" and len(res["pairs"]["A vs B"]["alphas"]) == 5

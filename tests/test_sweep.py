"""Sweeps (llfc.sweep): grid expansion, shared parents, resume with identical results, the aggregate
checked against each pair's results.json, bad input refused before anything is written, and the
submitit backend through submitit's LocalExecutor. Tiny MLPs on the bundled digits data."""

import csv
import importlib.util
import json
import shutil
import statistics
import sys

import pytest
import torch
import yaml
from scipy.stats import spearmanr

from llfc import criteria
from llfc.checkpoint import checkpoint_exists, load_checkpoint
from llfc.cli import main
from llfc.errors import ConfigError, OutputExistsError
from llfc.sweep import SweepConfig, SweepError, check_backend, expand, means_markdown, run_sweep, seed_means

SPE = 3  # steps per epoch of BASE (max_batches_per_epoch)
BASE = {"name": "t", "dataset": "digits", "model": "mlp", "model_args": {"widths": [8, 8]},
        "alphas": 5, "train": {"epochs": 2, "batch_size": 64, "lr": 0.05, "max_batches_per_epoch": SPE,
                               "eval_batch_size": 500},
        "measure": {"test_samples": 64, "train_samples": 0, "batch_size": 64, "stitching": False,
                    "angles_k": 0}}
GRID = {"spawn_iteration": [0, 2], "spawn_epoch": [1], "seed": [0, 1],
        "pair": ["spawn", "independent", "permutation-weight"]}


def sweep_cfg(**grid):
    return {"name": "t", "base": BASE, "grid": {**GRID, **grid}, "point_figures": False}


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "s"
    agg = run_sweep(sweep_cfg(), out, progress=False, threads=1, log=lambda s: None)
    return out, agg


def test_grid_expansion():
    pts = expand(SweepConfig.from_dict(sweep_cfg(spawn_iteration=[0, 2, 3])))
    spawn = [p for p in pts if p.pair == "spawn"]
    # k = 3 iterations and k = 1 epoch (= 3 iterations) are one point; 3 k × 2 seeds
    assert sorted({p.k_iteration for p in spawn}) == [0, 2, 3] and len(spawn) == 6
    assert {p.k_label for p in spawn if p.k_iteration == 3} == {"3 it"}
    assert len(pts) == 6 + 2 + 2 and len({p.id for p in pts}) == len(pts)
    assert [p.k_epoch for p in spawn if p.seed == 0] == [0.0, 2 / 3, 1.0]
    # a spawn at a whole epoch is `llfc run --spawn-epoch`'s pair; inside an epoch it keeps the default
    assert [p.config.spawn_epoch for p in spawn if p.k_iteration == 3] == [1, 1]
    # parents: one per seed for spawning (all k), one independent pair per seed shared by two kinds
    assert len({p.parent for p in spawn}) == 2
    by_seed = {}
    for p in pts:
        if p.pair != "spawn":
            by_seed.setdefault(p.seed, set()).add(p.parent)
    assert all(len(v) == 1 for v in by_seed.values()) and len(by_seed) == 2
    wide = expand(SweepConfig.from_dict({**sweep_cfg(), "grid": {"width": [4, 16], "pair": ["spawn"]}}))
    assert [p.config.model_args["widths"] for p in wide] == [[4, 4], [16, 16]]
    assert wide[0].parent != wide[1].parent and wide[0].id != wide[1].id


@pytest.mark.parametrize("grid,match", [
    ({}, "grid is empty"),
    ({"lr": [0.1]}, "unknown grid key.*lr"),
    ({"seed": []}, "non-empty list"),
    ({"spawn_iteration": [6]}, "beyond the end of training.*6 iterations"),
    ({"spawn_epoch": [2]}, "beyond the end of training"),
])
def test_bad_grid_refused_before_writing(tmp_path, grid, match):
    cfg = {"name": "t", "base": BASE, "grid": grid}
    with pytest.raises(SweepError, match=match):
        run_sweep(cfg, tmp_path / "s", progress=False, log=lambda s: None)
    assert not (tmp_path / "s").exists()
    with pytest.raises(ConfigError, match="α grid"):
        run_sweep({**cfg, "base": {**BASE, "alphas": 3}, "grid": {"seed": [0]}}, tmp_path / "s",
                  progress=False, log=lambda s: None)
    assert not (tmp_path / "s").exists()


def test_backend_missing_named(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # import fails as if not installed
    with pytest.raises(SweepError, match="pip install submitit"):
        check_backend("submitit")
    with pytest.raises(SweepError, match="pip install submitit"):
        run_sweep(sweep_cfg(seed=[0]), tmp_path / "s", backend="submitit", progress=False, log=lambda s: None)
    assert not (tmp_path / "s").exists()
    assert main(["sweep", str(tmp_path / "nope.yaml")]) == 2


def test_shared_parents_and_outputs(done):
    out, agg = done
    parents = sorted(p.name for p in (out / "parents").iterdir())
    assert len(parents) == 4 and sum(p.startswith("spawn-") for p in parents) == 2
    for p in parents:
        if p.startswith("spawn-"):  # trained once, to the largest k, its state saved at every k
            assert all(checkpoint_exists(out / "parents" / p / f"iter-{k}") for k in (0, 2, 3))
            assert json.loads((out / "parents" / p / "log.json").read_text())[-1]["epoch"] == 1
    assert agg["n_finished"] == agg["n_points"] == 10
    # the forked children start from the parent's state at k: their logs carry the parent's rows
    a = json.loads((out / "points" / "spawn-k000003it-seed0" / "pairs" / "spawn" / "a" / "log.json").read_text())
    assert [r["epoch"] for r in a] == [1, 2] and a[0]["data_seed"] != a[1]["data_seed"]
    # the permuted pair aligns the same independent pair the independent point measures
    ind = json.loads((out / "points" / "independent-seed0" / "results.json").read_text())["pairs"]["independent"]
    per = json.loads((out / "points" / "permutation-weight-seed0" / "results.json").read_text())
    per = per["pairs"]["permutation-weight"]
    assert per["lmc"]["test"]["error"][-1] == ind["lmc"]["test"]["error"][-1]  # α = 1: model A itself


def test_sweep_writes_its_report(done):
    """The sweep writes report.html as `llfc report` would: titled by the sweep's name (not its folder's), its
    configuration, environment and seeds filled from sweep.yaml and the points' results.json."""
    out, agg = done
    assert agg["name"] == "t" and agg["config"] == yaml.safe_load((out / "sweep.yaml").read_text())
    assert json.loads((out / "sweep.json").read_text())["environment"]["threads"] == 1
    html = (out / "report.html").read_text()
    assert "<title>llfc sweep: t</title>" in html and out.name == "s"
    env = html[html.index('<section id="environment">'):]
    assert "<h3>Configuration</h3>" in env and "spawn_iteration:" in env and "<h3>Environment</h3>" in env
    assert "<th>threads</th><td>1</td>" in env and "<th>master 0</th>" in env and "<th>master 1</th>" in env
    seeds = json.loads((out / "points" / "independent-seed1" / "results.json").read_text())["environment"]["seeds"]
    assert f"spawn: {', '.join(map(str, seeds['spawn']))}; independent:" in env
    # the table's grid columns come from each point's results.json "point" entry: k and seed
    head = html[html.index("<th>run</th>") :].split("</thead>")[0]
    assert '<th class="n">k</th>' in head and '<th class="n">seed</th>' in head
    k2 = json.loads((out / "points" / "spawn-k000002it-seed0" / "results.json").read_text())["point"]["k_label"]
    row = html[html.index('data-pair="points/spawn-k000002it-seed0/spawn"') :].split("</tr>")[0]
    assert f'<td class="n">{k2}</td><td class="n">0</td>' in row
    # every point's page, without drawing the figures the sweep skipped (point_figures: false)
    pages = list((out / "points").glob("*/report.html"))
    assert len(pages) == 10 and not list((out / "points").glob("*/*.png"))


def test_spawn_inside_epoch_matches_fork(done):
    """A child spawned at iteration 2 starts from exactly the parent's weights after 2 SGD steps."""
    out, _ = done
    parent = next(p for p in (out / "parents").iterdir() if p.name.startswith("spawn-seed0"))
    sd, meta = load_checkpoint(parent / "iter-2")
    assert meta["iteration"] == 2 and meta["batch_in_epoch"] == 2 and meta["epoch"] == 0
    sd0, _ = load_checkpoint(parent / "iter-0")
    assert not torch.equal(sd["layers.0.weight"], sd0["layers.0.weight"])
    child = json.loads((out / "points" / "spawn-k000002it-seed0" / "pairs" / "spawn" / "a" / "final.json").read_text())
    assert child["spawned_from"]["iteration"] == 2


def test_aggregate_matches_pair_results(done):
    out, agg = done
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert len(rows) == 10 == len(json.loads((out / "sweep.json").read_text())["rows"])
    for r in rows:
        pr = json.loads((out / "points" / r["id"] / "results.json").read_text())["pairs"][r["pair"]]
        b = pr["lmc"]["test"]["barriers"]["error_barrier_frankle"]
        assert float(r["error_barrier_frankle"]) == pytest.approx(b, rel=1e-12)
        assert float(r["err_a"]) == pr["lmc"]["test"]["error"][pr["alphas"].index(1.0)]
        w = criteria.worst_layer(pr)
        assert r["llfc_worst_layer"] == w["layer"] and float(r["llfc_worst_ratio"]) == pytest.approx(w["ratio"])
        hid = [ly for ly in pr["llfc"] if ly["kind"] in criteria.HIDDEN_KINDS]
        i = pr["alphas"].index(0.5)
        assert float(r["llfc_mean_distance"]) == pytest.approx(statistics.fmean(ly["distance"]["mean"][i] for ly in hid))
        assert r["lmc_holds"] == str(criteria.lmc_holds(pr)) and r["llfc_holds"] == str(criteria.llfc_holds(pr))
    # mean ± std over the two seeds
    for m in agg["means"]:
        rs = [r for r in agg["rows"] if r["pair"] == m["pair"] and r["k_iteration"] == m["k_iteration"]]
        assert m["n"] == 2 == len(rs)
        v = [r["error_barrier_frankle"] for r in rs]
        assert m["error_barrier_frankle_mean"] == pytest.approx(sum(v) / 2)
        assert m["error_barrier_frankle_std"] == pytest.approx(abs(v[0] - v[1]) / 2**0.5)  # ÷(N−1)
    co = agg["cooccurrence"]["counts"]
    assert sum(co.values()) == 10
    assert co["lmc_and_llfc"] == sum(r["lmc_holds"] == "True" and r["llfc_holds"] == "True" for r in rows)
    assert co["lmc_without_llfc"] == sum(r["lmc_holds"] == "True" and r["llfc_holds"] == "False" for r in rows)
    rho = spearmanr([float(r["error_barrier_frankle"]) for r in rows], [float(r["llfc_worst_distance"]) for r in rows])
    assert agg["spearman"]["rho"] == pytest.approx(rho.statistic)
    assert criteria.describe() in (out / "cooccurrence.md").read_text()


def _row(pair, k, seed, barrier):
    return {"id": f"{pair}-{k}-{seed}", "dataset": "digits", "model": "mlp", "model_args": "{}", "width": None,
            "pair": pair, "seed": seed, "k_iteration": k, "k_epoch": None if k is None else k / 22,
            "k_label": None if k is None else f"{k} it", "error_barrier_frankle": barrier,
            "lmc_holds": barrier < 0.02, "llfc_holds": True}


def test_seed_means_sample_std():
    """The std over seeds is the sample std ÷(N−1), as docs/results.md defines it; undefined for one seed."""
    rows = [_row("spawn", 0, 0, 0.0233), _row("spawn", 0, 1, 0.0122),  # the trial's barriers 2.33, 1.22 pp
            _row("spawn", 22, 0, 0.01), _row("spawn", 22, 1, 0.02), _row("spawn", 22, 2, 0.04),
            _row("independent", None, 0, 0.25)]
    m = {(r["pair"], r["k_iteration"]): r for r in seed_means(rows)}
    # (2.33, 1.22): mean 1.775, std |2.33 − 1.22| / √2 = 0.78489 (the population std would be 0.555)
    assert m["spawn", 0]["error_barrier_frankle_mean"] == pytest.approx(0.01775)
    assert m["spawn", 0]["error_barrier_frankle_std"] == pytest.approx(0.0078489, abs=1e-7)
    # (1, 2, 4): mean 7/3, Σ(x − mean)² = 42/9, ÷ 2 → variance 7/3, std 1.52753
    assert m["spawn", 22]["error_barrier_frankle_std"] == pytest.approx(0.0152753, abs=1e-7)
    assert m["independent", None]["n"] == 1 and m["independent", None]["error_barrier_frankle_std"] is None
    md = means_markdown([m["spawn", 0], m["independent", None]])
    assert "| 1.78 ± 0.78 |" in md and "| 25.00 ± – |" in md and "÷(N−1)" in md


def test_resume_after_kill_identical(done, tmp_path):
    out0, agg0 = done
    out = tmp_path / "s"
    shutil.copytree(out0, out)
    kept = out / "points" / "spawn-k000000it-seed1" / "results.json"
    stamp = kept.stat().st_mtime_ns
    # a "kill": one point without results.json and with a child half trained, one spawn state lost
    p = out / "points" / "spawn-k000002it-seed0"
    (p / "results.json").unlink()
    shutil.rmtree(p / "pairs" / "spawn" / "b")
    parent = next(q for q in (out / "parents").iterdir() if q.name.startswith("spawn-seed0"))
    for f in parent.glob("iter-2.*"):
        f.unlink()
    (out / "points" / "independent-seed1" / "results.json").unlink()
    with pytest.raises(OutputExistsError, match="different sweep config"):
        run_sweep(sweep_cfg(seed=[0]), out, progress=False, log=lambda s: None)
    agg = run_sweep(sweep_cfg(), out, progress=False, jobs=2, threads=1, log=lambda s: None)  # process pool
    assert agg["timing"]["pairs_run"] == 2 and agg["timing"]["parents_run"] == 1
    assert kept.stat().st_mtime_ns == stamp  # finished pairs are not redone
    num = [c for c in agg["rows"][0] if c not in ("id",)]
    assert [[r[c] for c in num] for r in agg["rows"]] == [[r[c] for c in num] for r in agg0["rows"]]


@pytest.mark.skipif(importlib.util.find_spec("submitit") is None, reason="submitit not installed (llfc[cluster])")
def test_submitit_local_executor(done, tmp_path):
    import submitit

    _, agg0 = done
    ex = submitit.LocalExecutor(folder=str(tmp_path / "logs"))
    ex.update_parameters(timeout_min=5)
    cfg = sweep_cfg(spawn_iteration=[2], spawn_epoch=[1], seed=[0], pair=["spawn"])
    cfg["grid"].pop("spawn_epoch")
    agg = run_sweep(cfg, tmp_path / "s", executor=ex, threads=1, progress=False, log=lambda s: None)
    (row,) = agg["rows"]
    ref = next(r for r in agg0["rows"] if r["id"] == row["id"])
    assert row == ref  # the same pair, run on submitit's executor, gives the same numbers
    assert yaml.safe_load((tmp_path / "s" / "sweep.yaml").read_text())["grid"]["seed"] == [0]


def test_catalogue_sweeps_expand():
    """Every shipped sweep config parses and expands (its k within the training length)."""
    from llfc.sweep import find_config, list_sweeps

    names = [f"{p.parent.name}/{p.stem}" for p in list_sweeps()]
    assert "sweep-cpu/mnist-mlp-coemergence" in names and "sweep-paper/cifar10-resnet20-coemergence" in names
    for n in names:
        sc = SweepConfig.from_yaml(find_config(n))
        pts = expand(sc, check_data=False)
        assert pts and all(p.k_iteration is None or p.k_iteration >= 0 for p in pts)
    mnist = expand(SweepConfig.from_yaml(find_config("sweep-cpu/mnist-mlp-coemergence")), check_data=False)
    assert sorted({p.k_iteration for p in mnist if p.pair == "spawn"}) == [0, 10, 50, 100, 469, 500]
    assert len(mnist) == 21 and len({p.parent for p in mnist}) == 6


def test_state_at_epoch_boundary_is_the_epoch_state(tmp_path):
    """The spawn state saved at k = 1 epoch of iterations equals `last` after one epoch (what `llfc run
    --spawn-epoch 1` forks), and a run stopped inside an epoch resumes that epoch where it stopped."""
    from llfc.data import get_dataset
    from llfc.seeding import seed_everything
    from llfc.train import ModelSpec, TrainConfig, train

    tr = get_dataset("digits", "train")
    cfg = TrainConfig(epochs=2, batch_size=64, lr=0.05, max_batches_per_epoch=SPE)
    spec = ModelSpec("mlp", {"input_shape": [1, 8, 8], "num_classes": 10, "widths": [8]})
    seed_everything(0)
    train(spec(), tr, None, cfg, data_seed=1, out_dir=tmp_path / "p", save_at_iterations=[2, SPE],
          stop_iteration=SPE, progress=False)
    seed_everything(0)
    train(spec(), tr, None, cfg, data_seed=1, out_dir=tmp_path / "q", stop_epoch=1, progress=False)
    a, ma = load_checkpoint(tmp_path / "p" / f"iter-{SPE}")
    b, mb = load_checkpoint(tmp_path / "q" / "last")
    assert ma["epoch"] == mb["epoch"] == 1 and all(torch.equal(a[k], b[k]) for k in b)
    # parent data seed, continued from iteration 2: equals the uninterrupted parent at iteration SPE
    seed_everything(0)
    r = train(spec(), tr, None, cfg, data_seed=1, start_state=tmp_path / "p" / "iter-2", stop_epoch=1,
              progress=False)
    assert all(torch.equal(r.model.state_dict()[k], b[k]) for k in b)


def _running(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie does not). Not ``Process.is_alive()``: the
    executor's manager thread may reap a worker first, and then Python 3.11's ``is_alive()`` keeps
    answering True (its waitpid gets ECHILD, taken as "not started yet")."""
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_ctrl_c_stops_local_workers(tmp_path):
    """Ctrl-C reaches every process of the terminal's group: a worker interrupted while holding the
    task queue's lock left `llfc sweep --jobs 2` waiting forever. Workers ignore SIGINT; the main
    process stops them (running jobs terminated, pending ones cancelled)."""
    import signal
    import time

    from llfc.sweep import _executor, _stop_workers

    ex = _executor("local", 2, (1, "test"), tmp_path, None)
    assert ex.submit(signal.getsignal, signal.SIGINT).result() == signal.SIG_IGN
    for _ in range(2):  # one long job per worker
        ex.submit(time.sleep, 600)
    pending = ex.submit(time.sleep, 600)
    procs = list(ex._processes.values())
    assert len(procs) == 2 and all(p.is_alive() for p in procs)
    _stop_workers(ex)
    assert not any(_running(p.pid) for p in procs)
    # the third job never runs: cancelled while still pending, or, when the executor had already
    # moved it to the workers' call queue (it queues one job ahead), failed with the pool's breakage
    assert pending.cancelled() or pending.exception(timeout=60) is not None

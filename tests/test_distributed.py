"""Data-parallel runs (gloo, 2 CPU processes) give the 1-process results: measurement up to float64
summation order, training up to float32 rounding; shards are disjoint and unpadded."""

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, Subset, TensorDataset

from llfc.distributed import check_same, shard_range
from llfc.errors import DistributedError

N, BS = 50, 8  # 7 batches: rank 0 gets 3 (24 samples), rank 1 gets 4 (26, the last one of 2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, tmp: str, job) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        job(Path(tmp))
    finally:
        dist.destroy_process_group()


def _all_jobs(tmp: Path) -> None:
    """Everything the 2-process tests check, in one spawn (starting processes is the slow part)."""
    out = {"measure": _measure(sharded=True), **_train_job(tmp)}
    torch.save(out, tmp / f"rank{dist.get_rank()}.pt")
    _dying_rank_job(tmp)  # last: it breaks the group


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[Path, list]:
    tmp = tmp_path_factory.mktemp("ddp2")
    mp.spawn(_worker, args=(2, _free_port(), str(tmp), _all_jobs), nprocs=2, join=True)
    return tmp, [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(2)]


# ---------------------------------------------------------------------------------------- shards


@pytest.mark.parametrize("n,bs,world", [(50, 8, 2), (50, 8, 3), (7, 1, 7), (1000, 128, 4), (9, 4, 3), (10, 8, 3)])
def test_shards_are_disjoint_unpadded_whole_batches(n, bs, world):
    parts = [shard_range(n, bs, world, r) for r in range(world)]
    assert [i for p in parts for i in p] == list(range(n))  # disjoint, complete, no padding
    assert all(p.start % bs == 0 for p in parts if len(p))  # whole batches of 1 process
    assert len(parts[0]) > 0 and sum(len(p) for p in parts) == n
    k = -(-n // bs)  # every rank has a batch when there are enough of them
    assert all(len(p) > 0 for p in parts) == (k >= world)


def test_more_ranks_than_samples_is_refused():
    with pytest.raises(DistributedError, match="3 processes but only 2 sample"):
        shard_range(2, 8, 3, 0)


def test_outside_a_process_group_everything_is_a_no_op(monkeypatch):
    from llfc.distributed import init_from_env

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_from_env() is False  # plain `llfc ...`: one process, no group
    check_same("anything", "the configuration")  # no group: nothing to compare, no error


def test_an_unavailable_backend_is_named_with_the_available_ones(monkeypatch):
    from llfc.distributed import init_from_env

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "is_nccl_available", lambda: False)
    with pytest.raises(DistributedError, match="backend 'nccl' is not available.*available: gloo"):
        init_from_env(backend="nccl")


# ---------------------------------------------------------------------------------- measurement


def _measure_setup():
    from llfc.models import create_model

    torch.manual_seed(0)
    x = torch.randn(N, 1, 8, 8)
    y = torch.randint(0, 10, (N,))
    model = create_model("mlp", input_shape=(1, 8, 8), num_classes=10, widths=[16, 12])
    sd_a = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(1)
    model_b = create_model("mlp", input_shape=(1, 8, 8), num_classes=10, widths=[16, 12])
    return model, model_b, sd_a, model_b.state_dict(), TensorDataset(x, y)


def _measure(sharded: bool) -> dict:
    import copy

    from llfc.distributed import shard_dataset
    from llfc.engine import measure_pair
    from llfc.permutation import derive_spec
    from llfc.permutation.activation_matching import activation_matching
    from llfc.stitching import stitching_errors

    model, model_b, sd_a, sd_b, data = _measure_setup()
    ds = shard_dataset(data, BS) if sharded else data
    loader = DataLoader(ds, batch_size=BS)
    res = measure_pair(model, sd_a, sd_b, loader, [0.0, 0.3, 0.5, 1.0], sharded=sharded)
    res["stitching"] = stitching_errors(model, sd_a, sd_b, loader, sharded=sharded)
    few = Subset(data, range(5))  # one batch: rank 1 has nothing to measure and only merges
    few = shard_dataset(few, BS) if sharded else few
    res["idle_rank"] = measure_pair(model, sd_a, sd_b, DataLoader(few, batch_size=BS), [0.0, 0.5, 1.0], sharded=sharded)
    ma = copy.deepcopy(model)
    ma.load_state_dict(sd_a)
    spec = derive_spec(ma, data[:2][0])
    perms, rep = activation_matching(ma, model_b, spec, ((xb,) for xb, _ in loader), correlation=True, sharded=sharded)
    res["perms"] = {g: p.tolist() for g, p in perms.items()}
    res["am_objective"], res["am_inputs"] = rep.objective, rep.n_inputs
    return res


def test_two_process_measurement_equals_one_process(two_ranks, assert_tree_close):
    ranks = [r["measure"] for r in two_ranks[1]]
    single = _measure(sharded=False)
    assert ranks[0]["n_samples"] == N == single["n_samples"]  # no sample padded or dropped
    assert ranks[0]["am_inputs"] == N and ranks[1]["idle_rank"]["n_samples"] == 5
    for r in ranks:
        assert_tree_close(single, r, rel=1e-12, abs=1e-15)  # float64 summation order
    assert single["perms"] == ranks[1]["perms"]


# ------------------------------------------------------------------------------------- training

TRAIN_N = 50  # batches of 11: 11 (5 + 6 over two ranks: unequal parts), ..., 6 (3 + 3)


def _train_setup():
    from llfc.train import ModelSpec, TrainConfig

    g = torch.Generator().manual_seed(5)
    x = torch.randn(TRAIN_N + 20, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (TRAIN_N + 20,), generator=g)
    spec = ModelSpec("mlp", {"input_shape": (1, 8, 8), "num_classes": 10, "widths": [16]})
    cfg = TrainConfig(epochs=2, batch_size=11, lr=0.05, eval_batch_size=8)
    return spec, cfg, TensorDataset(x[:TRAIN_N], y[:TRAIN_N]), TensorDataset(x[TRAIN_N:], y[TRAIN_N:])


def _train_runs(root: Path) -> dict:
    from llfc.train import spawn_pair, train

    spec, cfg, tr, te = _train_setup()
    a, b, logs = spawn_pair(spec, tr, te, cfg, 1, (0, 1, 2, 3), root / "spawn", progress=False)
    torch.manual_seed(7)
    full = train(spec(), tr, te, cfg, data_seed=4, out_dir=root / "full", progress=False)
    torch.manual_seed(7)
    train(spec(), tr, te, cfg, data_seed=4, out_dir=root / "r", stop_epoch=1, progress=False)
    torch.manual_seed(8)  # another init: the resumed run must take everything from the checkpoint
    resumed = train(spec(), tr, te, cfg, data_seed=4, out_dir=root / "r", resume=True, progress=False)

    def sd(m):
        return {k: v.detach().clone() for k, v in m.state_dict().items()}

    return {
        "a": sd(a),
        "b": sd(b),
        "logs": logs,
        "full": sd(full.model),
        "resumed": sd(resumed.model),
        "resumed_log": resumed.log,
    }


def _train_job(tmp: Path) -> dict:  # returns what the test compares
    from llfc.train import train

    out = _train_runs(tmp / "ddp")
    spec, cfg, tr, te = _train_setup()
    torch.manual_seed(3)  # BatchNorm: each rank normalises its part; rank 0's statistics are kept
    bn = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Linear(16, 10)
    )
    train(bn, tr, te, cfg, data_seed=9, progress=False)
    out["bn_buffers"] = {k: v.clone() for k, v in bn.state_dict().items() if "running" in k}
    cfg.lr = 0.05 if dist.get_rank() == 0 else 0.06  # ranks that disagree on the recipe
    try:
        train(spec(), tr, te, cfg, data_seed=0, progress=False)
        out["disagree"] = None
    except DistributedError as e:
        out["disagree"] = str(e)
    return out


def test_two_process_ddp_training_equals_one_process_and_resumes(two_ranks, tmp_path):
    ddp_root, ranks = two_ranks
    single = _train_runs(tmp_path / "single")
    r0, r1 = ranks
    for k in ("a", "b", "full"):
        for name, v in single[k].items():
            assert torch.equal(r0[k][name], r1[k][name]), (k, name)  # one model on every rank
            torch.testing.assert_close(r0[k][name], v, rtol=1e-5, atol=1e-6)  # float rounding
    assert any(not torch.equal(r0["a"][k], r0["b"][k]) for k in r0["a"])  # two children
    for name in single["full"]:  # resumed after epoch 1 = uninterrupted, bit for bit
        assert torch.equal(r0["resumed"][name], r0["full"][name]), name
    for row_1, row_2 in zip(single["logs"]["a"], r0["logs"]["a"]):  # all samples, all ranks
        assert row_2["train_loss"] == pytest.approx(row_1["train_loss"], rel=1e-5)
        assert row_2["test_err"] == pytest.approx(row_1["test_err"], abs=1e-12)
    written = sorted(p.relative_to(ddp_root / "ddp").as_posix() for p in (ddp_root / "ddp").rglob("*"))
    assert "spawn/parent/last.safetensors" in written and "r/final.safetensors" in written
    assert not [p for p in written if ".tmp" in p]  # atomic writes by rank 0 only
    import json

    meta = json.loads((ddp_root / "ddp" / "spawn" / "a" / "final.json").read_text())
    assert meta["data_parallel"] == {"world_size": 2}
    for r in ranks:
        assert "rank 1 disagrees with rank 0 on the training configuration" in r["disagree"]
    for k, v in r0["bn_buffers"].items():  # one BatchNorm state on every rank, and a trained one
        assert torch.equal(v, r1["bn_buffers"][k]), k
    assert r0["bn_buffers"]["2.running_mean"].abs().sum() > 0


# ------------------------------------------------------------------------------- a rank dies


def _dying_rank_job(tmp: Path):
    from llfc.distributed import shard_dataset
    from llfc.engine import measure_pair

    model, _, sd_a, sd_b, data = _measure_setup()
    if dist.get_rank() == 1:
        os._exit(0)  # dies mid-pass, before the all-reduce, without a word
    try:
        measure_pair(model, sd_a, sd_b, DataLoader(shard_dataset(data, BS), batch_size=BS), [0.0, 1.0], sharded=True)
        msg = None
    except DistributedError as e:
        msg = str(e)
    torch.save(msg, tmp / "dying.pt")


def test_a_rank_dying_mid_pass_is_a_clean_error_on_the_others(two_ranks):
    msg = torch.load(two_ranks[0] / "dying.pt", weights_only=False)
    assert msg is not None and "rank 0 of 2" in msg and "another rank stopped" in msg


# ------------------------------------------------------------------------- the CLI on torchrun


def test_torchrun_analyze_equals_one_process_and_only_rank_0_prints(tmp_path, assert_tree_close):
    import json
    import subprocess
    import sys

    from llfc.checkpoint import save_checkpoint
    from llfc.cli import main
    from llfc.models import create_model

    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        m = create_model("mlp", input_shape=(1, 8, 8), num_classes=10, widths=[16])
        paths.append(str(tmp_path / f"m{seed}"))
        save_checkpoint(
            paths[-1],
            m.state_dict(),
            {
                "dataset": "digits",
                "model": {"name": "mlp", "kwargs": {"input_shape": [1, 8, 8], "num_classes": 10, "widths": [16]}},
            },
        )
    args = ["analyze", *paths, "--alphas", "5", "--train-samples", "100", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        "-m",
        "llfc",
        *args,
        "--out",
        str(tmp_path / "two"),
    ]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("results, tables and figures in") == 1  # rank 0 alone prints
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["environment"]["world_size"] == 2
    p1, p2 = one["pairs"]["A vs B"], two["pairs"]["A vs B"]
    p1.pop("seconds"), p2.pop("seconds")
    assert p2["n_samples"] == 450  # digits test split: 256 on rank 0, 194 on rank 1, none twice
    assert_tree_close(p1, p2, rel=1e-12, abs=1e-15)

"""The paper's central claims on real MNIST (read from $LLFC_DATA_ROOT; skipped without it).

Small but real: the MLP 784-128-128-10, 2 epochs, measured on 2,000 test images. Spawned pairs
are linearly connected layer by layer (LLFC, paper §3 Fig. 2); independently trained pairs are not
(Fig. 4) until B is permuted onto A (Fig. 3, Git Re-Basin weight matching).
"""

import os
from pathlib import Path

import pytest

from llfc.config import ExperimentConfig
from llfc.experiment import run_experiment
from llfc.report import worst_layer

ROOT = os.environ.get("LLFC_DATA_ROOT")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not ROOT or not (Path(ROOT) / "MNIST" / "raw").is_dir(),
                       reason="set LLFC_DATA_ROOT to a folder holding MNIST/raw"),
]


@pytest.fixture(scope="module")
def mnist_results(tmp_path_factory):
    cfg = ExperimentConfig.from_dict({
        "dataset": "mnist", "data_root": ROOT, "model": "mlp", "model_args": {"widths": [128, 128]},
        "pairs": ["spawn", "independent", "permutation-weight"], "spawn_epoch": 1, "seed": 0,
        "alphas": 5,
        "train": {"epochs": 2, "batch_size": 128, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9,
                  "schedule": "cosine"},
        "measure": {"test_samples": 2000, "train_samples": 500, "stitching": False},
    })
    return run_experiment(cfg, tmp_path_factory.mktemp("mnist") / "run", progress=False,
                          log=lambda *_: None)["pairs"]


def test_spawned_pair_is_lmc_and_llfc(mnist_results):
    sp = mnist_results["spawn"]
    assert sp["lmc"]["test"]["barriers"]["error_barrier_frankle"] <= 0.01
    w = worst_layer(sp)
    assert w["ratio"] <= 0.2, w  # every hidden layer, α ∈ {.25, .5, .75}
    for c in sp["commutativity"]:  # Theorem 1's condition holds far better than its factors
        assert c["dist_com"] < 0.1 * min(c["dist_W"], c["dist_H"]), c


def test_independent_pair_is_neither_until_permuted(mnist_results):
    sp, ind, wm = (mnist_results[k] for k in ("spawn", "independent", "permutation-weight"))
    b = lambda p: p["lmc"]["test"]["barriers"]["error_barrier_frankle"]
    assert b(ind) > 3 * max(b(sp), 0.005)
    assert worst_layer(ind)["ratio"] > 3 * worst_layer(sp)["ratio"]
    # weight matching restores linear connectivity (Git Re-Basin; LLFC paper Fig. 3)
    assert b(wm) < 0.5 * b(ind)
    assert worst_layer(wm)["ratio"] < worst_layer(ind)["ratio"]
    # the endpoints are the same models: permuting B does not change its error
    assert wm["lmc"]["test"]["error"][0] == pytest.approx(ind["lmc"]["test"]["error"][0], abs=1e-12)

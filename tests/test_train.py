"""Seeded training, resume, spawning, schedules (MLP width 32 on scikit-learn digits)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llfc.checkpoint import build_model, load_checkpoint, load_training_state
from llfc.data import get_dataset
from llfc.errors import ConfigError, NonFiniteWeightsError, OutputExistsError
from llfc.seeding import seed_everything
from llfc.train import (
    LRFactor,
    ModelSpec,
    TrainConfig,
    build_optimizer,
    build_scheduler,
    evaluate,
    independent_pair,
    spawn_pair,
    train,
)

torch.set_num_threads(1)

SPEC = ModelSpec("mlp", {"input_shape": (1, 8, 8), "num_classes": 10, "widths": [32]})
CFG = TrainConfig(epochs=3, batch_size=64, lr=0.05, momentum=0.9, weight_decay=1e-4,
                max_batches_per_epoch=8)


@pytest.fixture(scope="module")
def data():
    return get_dataset("digits", "train"), get_dataset("digits", "test")


def _fresh(seed=0):
    seed_everything(seed)
    return SPEC()


def _equal(m1, m2):
    s1, s2 = m1.state_dict(), m2.state_dict()
    return s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)


def _strip_time(log):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in log]


# ------------------------------------------------------------------ config


def test_config_round_trip_and_errors():
    cfg = TrainConfig(schedule="multistep", milestones=[2, 4], betas=[0.8, 0.9])
    d = cfg.to_dict()
    assert d["milestones"] == [2, 4] and TrainConfig.from_dict(d) == cfg
    with pytest.raises(ConfigError) as ei:
        TrainConfig.from_dict({"epochs": 2, "learning_rate": 0.1})
    msg = str(ei.value)
    assert "'learning_rate'" in msg and "lr" in msg and "batch_size" in msg
    with pytest.raises(ConfigError, match="optimizer must be one of"):
        TrainConfig(optimizer="SGD")
    with pytest.raises(ConfigError, match="needs milestones"):
        TrainConfig(schedule="multistep")


def test_lr_factor_hand_values():
    # multistep per epoch: lr × 0.1 at 2 and again at 4
    f = LRFactor(TrainConfig(epochs=6, schedule="multistep", milestones=[2, 4], gamma=0.1), 1)
    assert [f(t) for t in range(6)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    # multistep per iteration, 4 steps per epoch: the drop happens at step 2·4 = 8
    f = LRFactor(TrainConfig(epochs=6, schedule="multistep", milestones=[2], gamma=0.5,
                             schedule_step="iteration"), 4)
    assert (f(7), f(8)) == (1.0, 0.5)
    # cosine, 1 warmup epoch from 0.1 over 4 iterations, 5 epochs in all
    f = LRFactor(TrainConfig(epochs=5, schedule="cosine", warmup_epochs=1, warmup_start_factor=0.1,
                             min_lr_factor=0.0, schedule_step="iteration"), 4)
    assert f(0) == pytest.approx(0.1) and f(2) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(4) == pytest.approx(1.0)
    assert f(12) == pytest.approx(0.5)  # t = 3: halfway through the 4 cosine epochs
    assert f(20) == pytest.approx(0.0, abs=1e-12)


def test_evaluate_matches_direct_formula(data):
    _, test = data
    model = _fresh(3).eval()
    loss, err = evaluate(model, test, batch_size=37)
    x = torch.stack([test[i][0] for i in range(len(test))])
    y = torch.stack([test[i][1] for i in range(len(test))])
    with torch.no_grad():
        out = model(x)
    assert loss == pytest.approx(F.cross_entropy(out, y).item(), rel=1e-5)
    assert err == int((out.argmax(1) != y).sum()) / len(y)
    assert 0.5 < err <= 1.0  # an untrained 10-class net is near chance


# ------------------------------------------------------------------ reproducibility, resume


def test_seeded_training_is_bit_reproducible(data):
    tr, te = data
    r1 = train(_fresh(0), tr, te, CFG, data_seed=5, progress=False)
    r2 = train(_fresh(0), tr, te, CFG, data_seed=5, progress=False)
    r3 = train(_fresh(0), tr, te, CFG, data_seed=6, progress=False)
    assert _equal(r1.model, r2.model)
    assert _strip_time(r1.log) == _strip_time(r2.log)
    assert not _equal(r1.model, r3.model)  # the data seed matters
    assert [r["epoch"] for r in r1.log] == [1, 2, 3] and r1.epoch == 3


class _Wrapped(torch.utils.data.Dataset):
    """A dataset llfc does not know: training reads it through a DataLoader."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return self.ds[i]


@pytest.mark.parametrize("augment", [False, True])
def test_in_memory_batches_equal_dataloader_batches(data, augment):
    # an ArrayDataset is batched directly (no DataLoader); the weights must be those of the
    # DataLoader path bit for bit, augmentation (random crops and flips) included
    tr = data[0].with_augment(augment)
    cfg = TrainConfig(**{**CFG.to_dict(), "augment": None})  # the dataset's own augmentation
    direct = train(_fresh(0), tr, None, cfg, data_seed=5, progress=False)
    loader = train(_fresh(0), _Wrapped(tr), None, cfg, data_seed=5, progress=False)
    assert _equal(direct.model, loader.model)
    assert _strip_time(direct.log) == _strip_time(loader.log)


class _Interrupting(torch.utils.data.Dataset):
    """Wraps a dataset and raises after ``n`` batch fetches (a simulated crash)."""

    def __init__(self, ds, n):
        self.ds, self.n = ds, n

    def __len__(self):
        return len(self.ds)

    def __getitems__(self, idx):
        self.n -= 1
        if self.n < 0:
            raise KeyboardInterrupt("simulated crash")
        return self.ds.__getitems__(idx)


def test_resume_after_interruption_is_identical(data, tmp_path):
    tr, te = data
    # a schedule that moves every iteration, so a scheduler not restored would show
    cfg = TrainConfig.from_dict({**CFG.to_dict(), "schedule": "cosine", "warmup_epochs": 1,
                                 "schedule_step": "iteration"})
    full = train(_fresh(0), tr, te, cfg, data_seed=5, progress=False)
    # crash in the middle of epoch 3 (8 batches per epoch)
    with pytest.raises(KeyboardInterrupt):
        train(_fresh(0), _Interrupting(tr, 2 * 8 + 3), te, cfg, data_seed=5, out_dir=tmp_path,
              progress=False)
    _, meta = load_checkpoint(tmp_path / "last")
    assert meta["epoch"] == 2 and not (tmp_path / "final.safetensors").exists()
    with pytest.raises(OutputExistsError):
        train(_fresh(0), tr, te, cfg, data_seed=5, out_dir=tmp_path, progress=False)
    with pytest.raises(ConfigError, match="data_seed"):
        train(_fresh(0), tr, te, cfg, data_seed=6, out_dir=tmp_path, resume=True, progress=False)
    other = TrainConfig.from_dict({**cfg.to_dict(), "lr": 0.01})
    with pytest.raises(ConfigError, match="lr"):
        train(_fresh(0), tr, te, other, data_seed=5, out_dir=tmp_path, resume=True, progress=False)
    # resume with a differently initialised model: the state replaces everything
    res = train(_fresh(123), tr, te, cfg, data_seed=5, out_dir=tmp_path, resume=True,
                progress=False, meta={"model": SPEC.to_meta()})
    assert _equal(res.model, full.model)
    assert _strip_time(res.log) == _strip_time(full.log)
    model, meta = build_model(tmp_path / "final")
    assert _equal(model, full.model) and meta["epoch"] == 3 and meta["seeds"]["data"] == 5
    assert (tmp_path / "log.csv").read_text().count("\n") == 4  # header + 3 epochs


def test_training_state_holds_momentum_buffers(data, tmp_path):
    tr, te = data
    cfg = TrainConfig.from_dict({**CFG.to_dict(), "epochs": 1})
    res = train(_fresh(0), tr, None, cfg, data_seed=1, out_dir=tmp_path, progress=False)
    m = SPEC()
    opt = build_optimizer(m, cfg)
    sch = build_scheduler(opt, cfg, 8)
    epoch, rng, meta = load_training_state(tmp_path / "last", m, opt, sch)
    assert epoch == 1 and rng is not None and meta["train_config"] == cfg.to_dict()
    s_ref, s_new = res.optimizer.state_dict()["state"], opt.state_dict()["state"]
    assert len(s_ref) == 4
    for pid in s_ref:
        buf = s_ref[pid]["momentum_buffer"]
        assert buf.abs().sum() > 0 and torch.equal(s_new[pid]["momentum_buffer"], buf)


# ------------------------------------------------------------------ pairs


def test_independent_pair_differs_and_records_seeds(data, tmp_path):
    tr, te = data
    a, b, logs = independent_pair(SPEC, tr, te, CFG, seeds=(0, 1, 2, 3), out_dir=tmp_path,
                                  progress=False)
    assert not _equal(a, b) and set(logs) == {"a", "b"}
    ref = train(_fresh(2), tr, te, CFG, data_seed=3, progress=False)
    assert _equal(b, ref.model)
    _, meta = load_checkpoint(tmp_path / "b" / "final")
    assert meta["seeds"] == {"init": 2, "data": 3} and meta["model"]["name"] == "mlp"
    assert meta["pair"] == "independent"


def test_spawn_children_share_parent_then_differ(data, tmp_path):
    tr, te = data
    cfg = TrainConfig.from_dict({**CFG.to_dict(), "epochs": 3, "schedule": "multistep",
                                 "milestones": [1], "gamma": 0.1})
    a, b, logs = spawn_pair(SPEC, tr, te, cfg, spawn_epoch=2, seeds=(0, 1, 2, 3),
                            out_dir=tmp_path, progress=False)
    parent_w, pmeta = load_checkpoint(tmp_path / "parent" / "last")
    assert pmeta["epoch"] == 2
    # both children started from the parent's weights: the parent at k equals a run stopped at k
    stopped = train(_fresh(0), tr, te, cfg, data_seed=1, stop_epoch=2, progress=False)
    assert all(torch.equal(parent_w[k], v) for k, v in stopped.model.state_dict().items())
    assert not _equal(a, b)
    # a child's log = the parent's 2 rows + its own 3rd epoch
    assert _strip_time(logs["a"][:2]) == _strip_time(logs["parent"]) == _strip_time(logs["b"][:2])
    assert [r["data_seed"] for r in logs["a"]] == [1, 1, 2]
    # LR not restarted at the fork: epoch 3 runs at 0.1·lr (milestone 1), as in an unforked run
    assert logs["a"][2]["lr"] == pytest.approx(cfg.lr * 0.1)
    m = SPEC()
    opt = build_optimizer(m, cfg)
    sch = build_scheduler(opt, cfg, 8)
    load_training_state(tmp_path / "parent" / "last", m, opt, sch)
    assert sch.get_last_lr() == pytest.approx([cfg.lr * 0.1]) and sch.last_epoch == 2
    # a child whose data seed equals the parent's is exactly the unforked run of that seed
    c, _, _ = spawn_pair(SPEC, tr, te, cfg, spawn_epoch=2, seeds=(0, 1, 1, 3), progress=False)
    unforked = train(_fresh(0), tr, te, cfg, data_seed=1, progress=False)
    assert _equal(c, unforked.model)
    # child checkpoints record the spawn
    _, cmeta = load_checkpoint(tmp_path / "a" / "final")
    assert cmeta["seeds"] == {"init": 0, "data_parent": 1, "data": 2}
    assert cmeta["spawn_epoch"] == 2 and cmeta["spawned_from"]["epoch"] == 2


def test_spawn_at_end_equals_parent_and_at_zero_shares_init(data):
    tr, te = data
    a, b, logs = spawn_pair(SPEC, tr, te, CFG, spawn_epoch=CFG.epochs, seeds=(0, 1, 2, 3),
                            progress=False)
    parent = train(_fresh(0), tr, te, CFG, data_seed=1, progress=False)
    assert _equal(a, parent.model) and _equal(b, parent.model)
    # k = 0: only the initialisation is shared; child a = a fresh run with (init 0, data 2)
    a0, b0, _ = spawn_pair(SPEC, tr, te, CFG, spawn_epoch=0, seeds=(0, 1, 2, 3), progress=False)
    ref = train(_fresh(0), tr, te, CFG, data_seed=2, progress=False)
    assert _equal(a0, ref.model) and not _equal(a0, b0)
    with pytest.raises(ConfigError, match="spawn_epoch"):
        spawn_pair(SPEC, tr, te, CFG, spawn_epoch=CFG.epochs + 1, progress=False)


# ------------------------------------------------------------------ real value


def test_digits_reaches_low_test_error(data):
    tr, te = data
    cfg = TrainConfig(epochs=10, batch_size=32, lr=0.05, momentum=0.9, weight_decay=1e-4,
                      schedule="cosine", eval_every=5)
    res = train(_fresh(0), tr, te, cfg, data_seed=0, progress=False)
    assert res.log[4]["test_err"] is not None and res.log[3]["test_err"] is None
    loss, err = evaluate(res.model, te)
    assert err == res.final["test_err"] and err < 0.10
    assert math.isfinite(loss) and loss < res.log[0]["train_loss"]


def test_divergence_is_reported(data, tmp_path):
    tr, _ = data
    cfg = TrainConfig(epochs=3, batch_size=64, lr=1e4, max_batches_per_epoch=8)
    with pytest.raises(NonFiniteWeightsError, match="diverged"):
        train(_fresh(0), tr, None, cfg, data_seed=0, out_dir=tmp_path, progress=False)
    assert not (tmp_path / "final.safetensors").exists()

"""Checkpoints (safetensors + JSON sidecar), atomic writes, training state, seeding."""

from __future__ import annotations

import collections
import hashlib
import json
import math
import os
import random

import numpy as np
import pytest
import torch

from llfc import checkpoint as ck
from llfc.checkpoint import (
    atomic_write_json,
    atomic_write_text,
    build_model,
    check_finite,
    checkpoint_paths,
    load_checkpoint,
    load_extra_tensors,
    load_training_state,
    save_checkpoint,
    save_training_state,
)
from llfc.errors import CheckpointError, IncompatibleModelsError, NonFiniteWeightsError
from llfc.models import create_model
from llfc.seeding import derive_seed, environment, rng_state, seed_everything, set_rng_state

torch.set_num_threads(1)

MLP_KW = {"input_shape": [1, 8, 8], "num_classes": 10, "widths": [16, 8]}


def _mlp(widths=(16, 8)):
    return create_model("mlp", input_shape=(1, 8, 8), num_classes=10, widths=list(widths))


def _meta(widths=(16, 8)):
    return {"model": {"name": "mlp", "kwargs": {**MLP_KW, "widths": list(widths)}},
            "dataset": "digits", "seeds": {"init": 3}, "epoch": 7}


# ------------------------------------------------------------------ round trips


def test_round_trip_exact_dtypes_and_meta(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {
        "w": torch.randn(5, 3, generator=g),
        "h": torch.randn(4, generator=g).half(),
        "bf": torch.randn(4, generator=g).bfloat16(),
        "d": torch.randn(2, 2, generator=g).double(),
        "bn.num_batches_tracked": torch.tensor(17, dtype=torch.int64),
        "view": torch.arange(12.0).view(3, 4)[:, 1],  # non-contiguous view of shared storage
    }
    p = save_checkpoint(tmp_path / "run" / "ck", sd, _meta(), extra_tensors={"perm": torch.tensor([2, 0, 1])})
    assert p == tmp_path / "run" / "ck.safetensors"
    sd2, meta = load_checkpoint(tmp_path / "run" / "ck")
    assert set(sd2) == set(sd)
    for k in sd:
        assert sd2[k].dtype == sd[k].dtype and torch.equal(sd2[k], sd[k]), k
    assert torch.equal(sd2["view"], torch.tensor([1.0, 5.0, 9.0]))
    assert meta["model"] == _meta()["model"] and meta["epoch"] == 7 and meta["seeds"] == {"init": 3}
    assert meta["format"] == "llfc-checkpoint" and meta["environment"]["torch"] == torch.__version__
    assert meta["extra_tensors"] == ["perm"]
    assert torch.equal(load_extra_tensors(tmp_path / "run" / "ck")["perm"], torch.tensor([2, 0, 1]))
    # the same checkpoint through the other accepted path spellings
    for spelled in ("ck.safetensors", "ck.json"):
        sd3, _ = load_checkpoint(tmp_path / "run" / spelled)
        assert torch.equal(sd3["w"], sd["w"])


def test_paths_keep_dotted_names():
    w, j = checkpoint_paths("out/model.v2")
    assert (str(w), str(j)) == ("out/model.v2.safetensors", "out/model.v2.json")


def test_module_prefix_is_stripped(tmp_path):
    m = _mlp()
    wrapped = {"module." + k: v for k, v in m.state_dict().items()}
    save_checkpoint(tmp_path / "a", wrapped, _meta())
    sd, _ = load_checkpoint(tmp_path / "a")
    assert set(sd) == set(m.state_dict())
    # a file written by another tool (no llfc sidecar id) with the prefix is also accepted
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in wrapped.items()}, str(tmp_path / "b.safetensors"))
    (tmp_path / "b.json").write_text(json.dumps(_meta()))
    model, _ = build_model(tmp_path / "b")
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(model(x), m.eval()(x))


def test_build_model_rebuilds_function(tmp_path):
    torch.manual_seed(1)
    m = _mlp().eval()
    save_checkpoint(tmp_path / "m", m.state_dict(), _meta())
    m2, meta = build_model(tmp_path / "m")
    x = torch.randn(6, 1, 8, 8)
    assert not m2.training and meta["dataset"] == "digits"
    assert torch.equal(m2(x), m(x))


# ------------------------------------------------------------------ errors


def test_truncated_safetensors_names_file(tmp_path):
    save_checkpoint(tmp_path / "m", _mlp().state_dict(), _meta())
    w = tmp_path / "m.safetensors"
    data = w.read_bytes()
    for n in (0, 6, 100, len(data) - 7):
        w.write_bytes(data[:n])
        with pytest.raises(CheckpointError) as ei:
            load_checkpoint(tmp_path / "m")
        msg = str(ei.value)
        assert str(w) in msg and "corrupted or truncated" in msg and "Re-create" in msg


def test_missing_json_and_missing_both(tmp_path):
    save_checkpoint(tmp_path / "m", _mlp().state_dict(), _meta())
    (tmp_path / "m.json").unlink()
    with pytest.raises(CheckpointError, match=r"m\.json is missing"):
        load_checkpoint(tmp_path / "m")
    with pytest.raises(CheckpointError, match="neither"):
        load_checkpoint(tmp_path / "nothing")


def test_bad_json(tmp_path):
    save_checkpoint(tmp_path / "m", _mlp().state_dict(), _meta())
    (tmp_path / "m.json").write_text('{"model": ')
    with pytest.raises(CheckpointError, match="not valid JSON") as ei:
        load_checkpoint(tmp_path / "m")
    assert str(tmp_path / "m.json") in str(ei.value)


def test_torn_pair_detected(tmp_path):
    save_checkpoint(tmp_path / "m", _mlp().state_dict(), _meta())
    old_json = (tmp_path / "m.json").read_text()
    save_checkpoint(tmp_path / "m", _mlp().state_dict(), _meta())
    (tmp_path / "m.json").write_text(old_json)  # new weights, old sidecar
    with pytest.raises(CheckpointError, match="different saves"):
        load_checkpoint(tmp_path / "m")


def test_mismatched_architecture_names_key(tmp_path):
    save_checkpoint(tmp_path / "m", _mlp((16, 8)).state_dict(), _meta((12, 8)))
    with pytest.raises(IncompatibleModelsError) as ei:
        build_model(tmp_path / "m")
    msg = str(ei.value)
    assert "'layers.0.weight'" in msg and "(16, 64)" in msg and "(12, 64)" in msg
    # missing key: one hidden layer fewer in the file
    save_checkpoint(tmp_path / "s", _mlp((16,)).state_dict(), _meta((16, 8)))
    with pytest.raises(IncompatibleModelsError, match="layers.2.weight"):
        build_model(tmp_path / "s")
    # unexpected key
    sd = dict(_mlp().state_dict())
    sd["layers.9.weight"] = torch.zeros(2, 2)
    save_checkpoint(tmp_path / "u", sd, _meta())
    with pytest.raises(IncompatibleModelsError, match="layers.9.weight"):
        build_model(tmp_path / "u")


def test_build_model_without_model_meta(tmp_path):
    save_checkpoint(tmp_path / "m", _mlp().state_dict(), {"dataset": "digits"})
    with pytest.raises(CheckpointError, match="records no architecture"):
        build_model(tmp_path / "m")


def test_check_finite_names_key_and_count():
    sd = {"a": torch.ones(3), "b": torch.tensor([1.0, float("nan"), float("inf"), -float("inf"), 2.0]),
          "c": torch.tensor([float("nan")]), "n": torch.tensor(3)}
    with pytest.raises(NonFiniteWeightsError) as ei:
        check_finite(sd, "model A")
    msg = str(ei.value)
    assert msg.startswith("model A") and "'b'" in msg and "3 NaN/Inf" in msg and "of 5" in msg
    check_finite({"a": torch.ones(2), "n": torch.tensor(1)}, "ok")  # no error


def test_reserved_prefix_and_non_tensor_rejected(tmp_path):
    with pytest.raises(CheckpointError, match="reserved"):
        save_checkpoint(tmp_path / "r", {"optimizer/x": torch.ones(1)}, {})
    with pytest.raises(CheckpointError, match="not a tensor"):
        save_checkpoint(tmp_path / "r", {"x": [1, 2]}, {})
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------ atomic writes


def test_atomic_write_keeps_old_file_when_replace_fails(tmp_path, monkeypatch):
    f = tmp_path / "r.txt"
    atomic_write_text(f, "old")

    def boom(src, dst):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="simulated"):
        atomic_write_text(f, "new")
    monkeypatch.undo()
    assert f.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.txt"]  # no temp file left


def test_atomic_write_json_unserialisable_keeps_old(tmp_path):
    f = tmp_path / "r.json"
    atomic_write_json(f, {"a": 1})
    with pytest.raises(TypeError):
        atomic_write_json(f, {"a": object()})
    assert json.loads(f.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_save_checkpoint_bad_meta_keeps_old_checkpoint(tmp_path):
    m = _mlp()
    save_checkpoint(tmp_path / "m", m.state_dict(), _meta())
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(CheckpointError, match="not JSON-serialisable"):
        save_checkpoint(tmp_path / "m", _mlp((4, 4)).state_dict(), {"bad": object()})
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_save_checkpoint_replace_failure_keeps_old(tmp_path, monkeypatch):
    sd = _mlp().state_dict()
    save_checkpoint(tmp_path / "m", sd, _meta())
    monkeypatch.setattr(os, "replace", lambda s, d: (_ for _ in ()).throw(OSError("simulated")))
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "m", {k: v + 1 for k, v in sd.items()}, _meta())
    monkeypatch.undo()
    sd2, _ = load_checkpoint(tmp_path / "m")
    assert all(torch.equal(sd2[k], sd[k]) for k in sd)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.safetensors"]


# ------------------------------------------------------------------ tagged JSON, training state


def test_tagged_json_round_trip():
    obj = {"t": (1, 2.5, (3,)), "c": collections.Counter({80: 1, 120: 2}), "i": {0: "a", 5: None},
           "f": [float("nan"), float("inf"), -float("inf"), 0.1], "__x__": 1, "s": {"n": [True]},
           "tens": torch.tensor([[1.5, -2.0]], dtype=torch.float32)}
    back = ck._dec(json.loads(json.dumps(ck._enc(obj, "obj"), allow_nan=False)))
    assert back["t"] == (1, 2.5, (3,)) and isinstance(back["t"], tuple)
    assert isinstance(back["c"], collections.Counter) and back["c"] == obj["c"]
    assert back["i"] == {0: "a", 5: None} and back["__x__"] == 1 and back["s"] == {"n": [True]}
    assert math.isnan(back["f"][0]) and back["f"][1:] == [math.inf, -math.inf, 0.1]
    assert back["tens"].dtype == torch.float32 and torch.equal(back["tens"], obj["tens"])
    with pytest.raises(CheckpointError, match="not supported"):
        ck._enc({"fn": lambda: 0}, "obj")


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_training_state_round_trip(tmp_path, opt_name):
    torch.manual_seed(0)
    m = _mlp()
    mk = (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-4)) if opt_name == "sgd" \
        else (lambda p: torch.optim.Adam(p, lr=1e-3, betas=(0.8, 0.99)))
    opt = mk(m.parameters())
    sch = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2, 4], gamma=0.1)
    x, y = torch.randn(20, 1, 8, 8), torch.randint(0, 10, (20,))
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
        sch.step()
    seed_everything(5)
    rng = rng_state()
    save_training_state(tmp_path / "st", m, opt, sch, 3, rng, {"note": "x"})

    m2 = _mlp()
    opt2 = mk(m2.parameters())
    sch2 = torch.optim.lr_scheduler.MultiStepLR(opt2, milestones=[2, 4], gamma=0.1)
    epoch, rng2, meta = load_training_state(tmp_path / "st", m2, opt2, sch2)
    assert epoch == 3 and meta["note"] == "x"
    for k, v in m.state_dict().items():
        assert torch.equal(m2.state_dict()[k], v)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    assert s1["state"].keys() == s2["state"].keys() and len(s1["state"]) == 6
    for pid in s1["state"]:
        assert s1["state"][pid].keys() == s2["state"][pid].keys()
        for name, v in s1["state"][pid].items():
            assert torch.equal(s2["state"][pid][name], v), (pid, name)
    if opt_name == "sgd":
        assert s2["state"][0]["momentum_buffer"].abs().sum() > 0
    assert sch2.state_dict() == sch.state_dict() and sch2.get_last_lr() == pytest.approx([0.1 * s1["param_groups"][0]["initial_lr"]])
    # one more identical step from both gives identical weights
    for mm, oo in ((m, opt), (m2, opt2)):
        oo.zero_grad()
        torch.nn.functional.cross_entropy(mm(x), y).backward()
        oo.step()
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), m2.parameters()))
    # RNG states restore the same random stream
    seed_everything(99)
    set_rng_state(rng2)
    seq = (random.random(), float(np.random.rand()), torch.rand(3))
    set_rng_state(rng)
    assert seq[:2] == (random.random(), float(np.random.rand())) and torch.equal(seq[2], torch.rand(3))
    # a plain weights checkpoint is not a training state
    save_checkpoint(tmp_path / "w", m.state_dict(), {})
    with pytest.raises(CheckpointError, match="not a training state"):
        load_training_state(tmp_path / "w", m2, opt2, sch2)


def test_training_state_wrong_optimizer_class(tmp_path):
    m = _mlp()
    save_training_state(tmp_path / "st", m, torch.optim.SGD(m.parameters(), lr=0.1), None, 0, None)
    with pytest.raises(CheckpointError, match="SGD"):
        load_training_state(tmp_path / "st", m, torch.optim.Adam(m.parameters()))


# ------------------------------------------------------------------ seeding


def test_derive_seed_is_stable_and_independent():
    expected = int.from_bytes(hashlib.sha256(b'[7,"epoch","3"]').digest()[:8], "big") & (2**63 - 1)
    assert derive_seed(7, "epoch", 3) == expected
    assert derive_seed(7, "epoch", 3) != derive_seed(7, "epoch", 4) != derive_seed(8, "epoch", 3)
    assert 0 <= derive_seed(2**70, "x") < 2**63
    with pytest.raises(TypeError):
        derive_seed(1.5, "x")


def test_seed_everything_and_environment():
    seed_everything(11)
    a = (random.random(), float(np.random.rand()), torch.rand(2))
    seed_everything(11)
    b = (random.random(), float(np.random.rand()), torch.rand(2))
    assert a[:2] == b[:2] and torch.equal(a[2], b[2])
    env = environment("cpu")
    assert env["torch"] == torch.__version__ and env["device"] == "cpu" and env["threads"] >= 1
    json.dumps(env)

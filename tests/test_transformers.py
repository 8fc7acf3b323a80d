"""Transformers (issue 8): the vit and gpt models, the tinyshakespeare text dataset, per-token LM
loss / error, GELU weak additivity, commutativity on attention layers, per-token cosine."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from llfc.data import CharVocab, TextDataset, get_dataset
from llfc.engine import measure_pair
from llfc.errors import ConfigError, DataNotFoundError
from llfc.models import create_model
from llfc.probe import list_probes


def _gpt(**kw):
    return create_model("gpt", **{"input_shape": (8,), "num_classes": 11, "width": 16, "depth": 2,
                                  "heads": 2, **kw})


def _vit(**kw):
    return create_model("vit", **{"input_shape": (1, 28, 28), "num_classes": 10, "width": 16,
                                  "depth": 2, "heads": 4, **kw})


# ------------------------------------------------------------------------------------------ models

def test_forward_shapes_and_names():
    torch.manual_seed(0)
    v = _vit()
    assert v(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert v.pos_embed.shape == (1, 16 + 1, 16)          # 4×4 patches of 7 pixels + class token
    assert _vit(pool="mean").pos_embed.shape == (1, 16, 16)
    c = _vit(input_shape=(3, 32, 32))                      # CIFAR: patch 4 → 64 patches
    assert c(torch.randn(2, 3, 32, 32)).shape == (2, 10) and c.pos_embed.shape == (1, 65, 16)
    g = _gpt()
    assert g(torch.randint(0, 11, (3, 8))).shape == (3, 8, 11)
    assert g(torch.randint(0, 11, (3, 5))).shape == (3, 5, 11)   # shorter contexts are fine
    keys = set(g.state_dict())
    for k in ("tok_emb.weight", "pos_emb.weight", "blocks.1.attn.q.weight", "blocks.1.attn.o.bias",
              "blocks.0.ln1.weight", "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight",
              "ln_f.bias", "head.weight"):
        assert k in keys, k
    assert "head.bias" not in keys
    t = _gpt(tie_weights=True)
    assert t.head.weight is t.tok_emb.weight


def test_param_counts_by_hand():
    """Per block: 2 LayerNorms (4d), q/k/v/o (4(d² + d)), fc1 (d·rd + rd), fc2 (rd·d + d)."""
    def block(d, r):
        return 4 * d + 4 * (d * d + d) + (d * r * d + r * d) + (r * d * d + d)

    d = 64   # MNIST ViT: conv 1·d·7² + d, class token d, 17 positions, 4 blocks, ln_f, head d·10 + 10
    want = (49 * d + d) + d + 17 * d + 4 * block(d, 4) + 2 * d + (d * 10 + 10)
    assert sum(p.numel() for p in create_model("vit").parameters()) == want == 205_066
    d = 128  # char GPT, V = 65, T = 64: embeddings, 2 blocks, ln_f, unembedding d·V (no bias)
    want = 65 * d + 64 * d + 2 * block(d, 4) + 2 * d + d * 65
    g = create_model("gpt", input_shape=(64,), num_classes=65)
    assert sum(p.numel() for p in g.parameters()) == want == 421_632
    tied = create_model("gpt", input_shape=(64,), num_classes=65, tie_weights=True)
    assert sum(p.numel() for p in tied.parameters()) == want - d * 65


def test_causal_mask():
    """A change of token t changes no logit before t, and does change the logits from t on."""
    torch.manual_seed(0)
    g = _gpt().eval()
    x = torch.randint(0, 11, (2, 8))
    x2 = x.clone()
    x2[:, 5] = (x[:, 5] + 1) % 11
    with torch.no_grad():
        a, b = g(x), g(x2)
    assert torch.equal(a[:, :5], b[:, :5])
    assert (a[:, 5:] - b[:, 5:]).abs().amax() > 1e-4
    v = _vit().eval()   # the ViT is not causal: a change in the last patch reaches the class token
    im = torch.randn(1, 1, 28, 28)
    im2 = im.clone()
    im2[..., -7:, -7:] += 1
    with torch.no_grad():
        assert (v(im) - v(im2)).abs().amax() > 1e-5


def test_probes_of_a_transformer():
    probes = {p.name: p for p in list_probes(_gpt(depth=1))}
    kinds = {n: p.kind for n, p in probes.items()}
    assert kinds["blocks.0.ln1"] == kinds["ln_f"] == "norm"
    assert kinds["blocks.0.attn.o"] == kinds["blocks.0.mlp.fc1"] == "pre"
    assert kinds["blocks.0.mlp.act"] == "post" and probes["blocks.0.mlp.act"].op == "GELU"
    assert kinds["blocks.0.add"] == kinds["blocks.0.add_1"] == "residual"   # after attn / block out
    assert probes["blocks.0.mlp.act"].input_node == probes["blocks.0.mlp.fc1"].node
    assert list(probes)[-1] == "logits"


def test_context_longer_than_position_table():
    with pytest.raises(ConfigError, match="block_size=32"):
        create_model("gpt", input_shape=(64,), num_classes=65, block_size=32)
    with pytest.raises(ConfigError, match="not a multiple of patch"):
        _vit(patch=5)
    with pytest.raises(ConfigError, match="divisible"):
        _vit(width=18)


# ------------------------------------------------------------------------------------------ data

def _text_root(tmp_path, text):
    (tmp_path / "tinyshakespeare").mkdir()
    (tmp_path / "tinyshakespeare" / "input.txt").write_text(text, encoding="utf-8")
    return tmp_path


def test_tinyshakespeare_split_and_windows(tmp_path):
    text = "abcabcabca" * 9 + "bcabcabcXz"      # 100 characters; X and z only in the last 10%
    root = _text_root(tmp_path, text)
    tr = get_dataset("tinyshakespeare", "train", root, options={"context": 4})
    te = get_dataset("tinyshakespeare", "test", root, options={"context": 4})
    assert tr.vocab.chars == sorted(set(text)) == te.vocab.chars   # vocabulary of the whole text
    assert tr.info.num_classes == 5 and tr.info.input_shape == (4,)
    assert tr.vocab.decode(tr.ids) == text[:90] and te.vocab.decode(te.ids) == text[90:]
    assert len(tr) == (90 - 1 - 4) // 4 + 1 == 22 and len(te) == (10 - 1 - 4) // 4 + 1 == 2
    x, y = tr[3]
    assert tr.vocab.decode(x) == text[12:16] and tr.vocab.decode(y) == text[13:17]
    x, y = te[1]
    assert te.vocab.decode(x) == "cabc" and te.vocab.decode(y) == "abcX"
    assert x.dtype == torch.long and y.dtype == torch.long
    with pytest.raises(IndexError):
        te[2]
    overl = get_dataset("tinyshakespeare", "test", root, options={"context": 4, "stride": 1})
    assert len(overl) == 6
    x, y = overl[5]
    assert overl.vocab.decode(x) == "abcX" and overl.vocab.decode(y) == "bcXz"
    with pytest.raises(ConfigError, match="context"):
        get_dataset("tinyshakespeare", "test", root, options={"context": 10})   # 10 < 11 chars
    with pytest.raises(ConfigError, match="no options"):
        get_dataset("digits", "test", options={"context": 4})
    with pytest.raises(DataNotFoundError, match="input.txt"):
        get_dataset("tinyshakespeare", "test", tmp_path / "nowhere")


def test_unknown_character():
    v = CharVocab("hello")
    assert v.decode(v.encode("hole")) == "hole"
    with pytest.raises(ConfigError, match="'z'.*position 2"):
        v.encode("hoz")
    with pytest.raises(ConfigError, match="shorter than one window"):
        TextDataset(v.encode("hel"), 3, v)


# ------------------------------------------------------------------------------------------ measure

def test_gpt_measurement_end_to_end():
    """Per-token LM loss/error at the endpoints, GELU weak additivity, commutativity on every
    Linear after the embedding (q, k, v, o, fc1, fc2, head), LLFC exactly 0 at the endpoints."""
    torch.manual_seed(0)
    m = _gpt(depth=1)
    sd_a = {k: v.clone() for k, v in m.state_dict().items()}
    sd_b = {k: v.clone() for k, v in _gpt(depth=1).state_dict().items()}
    x = torch.randint(0, 11, (6, 8))
    y = torch.randint(0, 11, (6, 8))
    res = measure_pair(m, sd_a, sd_b, [(x[:4], y[:4]), (x[4:], y[4:])], [0, 0.5, 1])
    assert res["n_samples"] == 6
    for a, sd in ((1.0, sd_a), (0.0, sd_b)):
        m.load_state_dict(sd)
        with torch.no_grad():
            lg = m.eval()(x)
        k = res["alphas"].index(a)
        ce = F.cross_entropy(lg.reshape(-1, 11).double(), y.reshape(-1)).item()
        err = (lg.argmax(-1) != y).double().mean().item()
        assert res["lmc"]["loss"][k] == pytest.approx(ce, rel=1e-9)
        assert res["lmc"]["error"][k] == pytest.approx(err, abs=1e-12)
    wa = {w["name"]: w for w in res["weak_additivity"]}
    assert list(wa) == ["blocks.0.mlp.act"] and wa["blocks.0.mlp.act"]["activation"] == "GELU"
    # independent formula at α = 0.5 (per sample, T·D flattened, mean over the 6 samples)
    from llfc.probe import FeatureExtractor
    fx = FeatureExtractor(m)
    fa, fb = fx(sd_a, x), fx(sd_b, x)
    ga, gb = fa["blocks_0_mlp_fc1"], fb["blocks_0_mlp_fc1"]
    u = F.gelu(0.5 * ga + 0.5 * gb).flatten(1).double()
    v = (0.5 * F.gelu(ga) + 0.5 * F.gelu(gb)).flatten(1).double()
    want = (1 - F.cosine_similarity(u, v, dim=1)).mean().item()
    k = res["alphas"].index(0.5)
    assert wa["blocks.0.mlp.act"]["distance"]["mean"][k] == pytest.approx(want, rel=1e-6, abs=1e-12)
    assert want > 1e-6   # GELU is not additive: the distance is not trivially 0
    com = {c["name"] for c in res["commutativity"]}
    assert com == {"blocks.0.attn.q", "blocks.0.attn.k", "blocks.0.attn.v", "blocks.0.attn.o",
                   "blocks.0.mlp.fc1", "blocks.0.mlp.fc2", "logits"}
    for ly in res["llfc"]:
        for a in (0.0, 1.0):
            assert ly["distance"]["mean"][res["alphas"].index(a)] == pytest.approx(0, abs=1e-12)


def test_vit_measurement_end_to_end():
    torch.manual_seed(1)
    m = _vit(depth=1)
    sd_a = {k: v.clone() for k, v in m.state_dict().items()}
    sd_b = {k: v.clone() for k, v in _vit(depth=1).state_dict().items()}
    x, y = torch.randn(5, 1, 28, 28), torch.randint(0, 10, (5,))
    res = measure_pair(m, sd_a, sd_b, [(x, y)], [0, 0.5, 1])
    com = {c["name"] for c in res["commutativity"]}
    assert "patch_embed" not in com and {"blocks.0.attn.q", "logits"} <= com   # input layer excluded
    m.load_state_dict(sd_a)
    with torch.no_grad():
        ce = F.cross_entropy(m.eval()(x).double(), y).item()
    assert res["lmc"]["loss"][res["alphas"].index(1.0)] == pytest.approx(ce, rel=1e-9)
    names = [ly["name"] for ly in res["llfc"]]
    assert {"blocks.0.add_1", "blocks.0.attn.o", "blocks.0.mlp.act", "ln_f", "logits"} <= set(names)


class _Scale(nn.Module):
    """relu(w ⊙ x): token features (B, T, 2) whose interpolation is hand-computable."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(2))

    def forward(self, x):
        return F.relu(x * self.w)


def test_per_token_vs_flattened_cosine():
    """Two tokens x₁ = (1, 1), x₂ = (1, 2); w_A = (1, 1), w_B = (−1, 3). At α = ½: w = (0, 2),
    f_α = [(0, 2), (0, 4)]; f_int = ½ f_A + ½ f_B = [(½, 2), (½, 4)]. Per token: 1 − 2/√4.25 and
    1 − 4/√16.25, averaged; flattened (the paper's per-sample vector): 1 − 20/√(20·20.5)."""
    m = _Scale()
    sd_a, sd_b = {"w": torch.tensor([1.0, 1.0])}, {"w": torch.tensor([-1.0, 3.0])}
    x = torch.tensor([[[1.0, 1.0], [1.0, 2.0]]])
    y = torch.tensor([[1, 1]])
    flat = measure_pair(m, sd_a, sd_b, [(x, y)], [0, 0.5, 1], conditions=False)
    tok = measure_pair(m, sd_a, sd_b, [(x, y)], [0, 0.5, 1], conditions=False, per_token=True)
    k = flat["alphas"].index(0.5)
    d_flat = flat["llfc"][-1]["distance"]["mean"][k]
    d_tok = tok["llfc"][-1]["distance"]["mean"][k]
    assert d_flat == pytest.approx(1 - 20 / math.sqrt(20 * 20.5), rel=1e-6)
    assert d_tok == pytest.approx(((1 - 2 / math.sqrt(4.25)) + (1 - 4 / math.sqrt(16.25))) / 2, rel=1e-6)
    # the whole-tensor distance does not depend on the convention; the LM loss neither
    assert tok["llfc"][-1]["distance"]["whole"][k] == pytest.approx(flat["llfc"][-1]["distance"]["whole"][k])
    assert tok["lmc"]["loss"] == pytest.approx(flat["lmc"]["loss"])


def test_text_run_analyze_and_cli(tmp_path, capsys):
    """`llfc run` on a text dataset (context from dataset_args), `llfc analyze` of its checkpoints
    (the context comes from the model's input shape) with the per-token cosine, `llfc probes`."""
    from llfc.cli import main
    from llfc.config import ExperimentConfig
    from llfc.experiment import run_experiment

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    text = "".join("abcdefgh \n"[int(i)] for i in torch.randint(0, 10, (3000,), generator=g))
    root = _text_root(tmp_path, text)
    cfg = ExperimentConfig.from_dict({
        "dataset": "tinyshakespeare", "data_root": str(root), "dataset_args": {"context": 12},
        "model": "gpt", "model_args": {"width": 8, "depth": 1, "heads": 2}, "pairs": ["independent"],
        "alphas": [0, 0.5, 1], "train": {"epochs": 1, "batch_size": 8, "max_batches_per_epoch": 2,
                                         "optimizer": "adamw", "lr": 1e-3},
        "measure": {"test_samples": 16, "train_samples": 8, "stitching": False, "angles_k": 0}})
    res = run_experiment(cfg, tmp_path / "run", progress=False, log=lambda s: None)
    pr = res["pairs"]["independent"]
    assert res["model"]["kwargs"]["input_shape"] == [12] and res["model"]["kwargs"]["num_classes"] == 10
    assert pr["n_samples"] == 16 and {w["activation"] for w in pr["weak_additivity"]} == {"GELU"}
    a = tmp_path / "run" / "pairs" / "independent" / "a" / "final.safetensors"
    b = tmp_path / "run" / "pairs" / "independent" / "b" / "final.safetensors"
    assert main(["analyze", str(a), str(b), "--out", str(tmp_path / "an"), "--data-root", str(root),
                 "--per-token", "--no-conditions", "--test-samples", "16", "--train-samples", "0",
                 "--alphas", "0,0.5,1", "--no-progress"]) == 0
    import json
    an = json.loads((tmp_path / "an" / "results.json").read_text())["pairs"]["A vs B"]
    # the same test loss as the run (the per-token cosine does not change LMC)
    assert an["lmc"]["test"]["loss"] == pytest.approx(pr["lmc"]["test"]["loss"], rel=1e-9)
    ly = {x["name"]: x for x in an["llfc"]}
    assert ly["blocks.0.mlp.act"]["dim"] == 32   # per token: one row of r·d = 32 per token
    capsys.readouterr()
    assert main(["probes", "gpt", "--dataset", "tinyshakespeare", "--model-args",
                 '{"width": 8, "depth": 1, "heads": 2}']) == 0
    out = capsys.readouterr().out
    assert "blocks.0.mlp.act" in out and "weak additivity" in out and "(128, 32)" in out

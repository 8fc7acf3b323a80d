"""Permutation symmetries of transformers: derivation, self-test, refusals, weight/activation matching.

Properties asserted: a random permutation of every derived group leaves the output unchanged (vit, gpt
with tied unembedding, nn.MultiheadAttention / nn.TransformerEncoderLayer / nn.TransformerEncoder);
the groups are exactly heads-as-blocks, per-head QK and OV, the MLP hidden units and one residual
stream; planted permutations are recovered exactly by weight and activation matching; weight matching
lowers the midpoint loss of two independently trained tiny ViTs; what is not a permutation symmetry is
refused naming the module.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from llfc.errors import UnsupportedOperationError
from llfc.models import create_model
from llfc.permutation import (
    activation_matching,
    apply_permutation,
    check_spec,
    compose,
    derive_spec,
    invert,
    random_permutation,
    weight_matching,
)
from llfc.permutation.spec import relative_output_change

VIT = {"input_shape": (1, 8, 8), "num_classes": 5, "width": 16, "depth": 2, "heads": 4, "mlp_ratio": 2, "patch": 4}
GPT = {"input_shape": (6,), "num_classes": 11, "width": 16, "depth": 2, "heads": 4, "mlp_ratio": 2, "tie_weights": True}


def _perturbed(name, kw, seed=0):
    """A model whose LayerNorms, biases and class token are not at their init values (so a spec
    that forgets them fails the self-test)."""
    torch.manual_seed(seed)
    m = create_model(name, **kw).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return m


def _vit_x(n=4):
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def _gpt_x(n=4):
    return torch.randint(0, 11, (n, 6), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def vit_spec():
    m = _perturbed("vit", VIT)
    return m, derive_spec(m, _vit_x())


@pytest.fixture(scope="module")
def gpt_spec():
    m = _perturbed("gpt", GPT)
    return m, derive_spec(m, _gpt_x())


def test_vit_groups_are_heads_within_heads_mlp_and_one_residual_stream(vit_spec):
    _m, spec = vit_spec
    H, dh, d = 4, 4, 16
    assert set(spec.heads) == {"blocks.0.attn.heads", "blocks.1.attn.heads"}
    assert spec.heads["blocks.0.attn.heads"] == {"qk": [f"blocks.0.attn.qk.h{i}" for i in range(H)],
                                                 "ov": [f"blocks.0.attn.ov.h{i}" for i in range(H)]}
    # 1 residual + per block (heads + 2·H within + MLP hidden) groups
    assert len(spec.groups) == 1 + 2 * (1 + 2 * H + 1)
    assert spec.sizes["blocks.0.attn.heads"] == H and spec.sizes["blocks.0.attn.qk.h3"] == dh
    assert spec.sizes["blocks.1.mlp.fc1"] == 2 * d
    heads = {(r.key, r.axis, r.block) for r in spec.groups["blocks.1.attn.heads"]}
    assert heads == {(f"blocks.1.attn.{p}.{w}", 0, dh) for p in "qkv" for w in ("weight", "bias")} | {
        ("blocks.1.attn.o.weight", 1, dh)}
    qk2 = {(r.key, r.axis, r.offset) for r in spec.groups["blocks.0.attn.qk.h2"]}
    assert qk2 == {(f"blocks.0.attn.{p}.{w}", 0, 2 * dh) for p in "qk" for w in ("weight", "bias")}
    ov1 = {(r.key, r.axis, r.offset) for r in spec.groups["blocks.0.attn.ov.h1"]}
    assert ov1 == {("blocks.0.attn.v.weight", 0, dh), ("blocks.0.attn.v.bias", 0, dh), ("blocks.0.attn.o.weight", 1, dh)}
    residual = [g for g in spec.groups if any(r.key == "pos_embed" for r in spec.groups[g])]
    assert len(residual) == 1
    res = {(r.key, r.axis) for r in spec.groups[residual[0]]}
    expect = {("cls_token", 2), ("pos_embed", 2), ("patch_embed.weight", 0), ("patch_embed.bias", 0),
              ("ln_f.weight", 0), ("ln_f.bias", 0), ("head.weight", 1)}
    for b in range(2):
        p = f"blocks.{b}."
        expect |= {(p + "ln1.weight", 0), (p + "ln1.bias", 0), (p + "ln2.weight", 0), (p + "ln2.bias", 0),
                   (p + "attn.q.weight", 1), (p + "attn.k.weight", 1), (p + "attn.v.weight", 1),
                   (p + "attn.o.weight", 0), (p + "attn.o.bias", 0), (p + "mlp.fc1.weight", 1),
                   (p + "mlp.fc2.weight", 0), (p + "mlp.fc2.bias", 0)}
    assert res == expect


def test_gpt_residual_includes_tied_unembedding_and_self_test_passes(gpt_spec):
    m, spec = gpt_spec
    res = next(g for g in spec.groups if any(r.key == "tok_emb.weight" for r in spec.groups[g]))
    keys = {(r.key, r.axis) for r in spec.groups[res]}
    assert {("tok_emb.weight", 1), ("pos_emb.weight", 1), ("head.weight", 1), ("ln_f.weight", 0)} <= keys
    sd = m.state_dict()
    p = random_permutation(spec, torch.Generator().manual_seed(4), derange=True)
    out = apply_permutation(spec, p, sd)
    assert out["head.weight"] is out["tok_emb.weight"]  # the tie survives the permutation
    assert relative_output_change(m, sd, out, _gpt_x()) < 1e-5
    assert relative_output_change(m, sd, {**sd, "blocks.0.attn.q.weight": out["blocks.0.attn.q.weight"]},
                                  _gpt_x()) > 1e-3  # and the self-test is sensitive


@pytest.mark.parametrize("which", ["heads", "qk", "ov"])
def test_each_attention_group_alone_is_a_symmetry_and_mismatched_moves_are_not(vit_spec, which):
    m, spec = vit_spec
    sd = m.state_dict()
    g = {"heads": "blocks.1.attn.heads", "qk": "blocks.1.attn.qk.h2", "ov": "blocks.1.attn.ov.h0"}[which]
    p = torch.roll(torch.arange(spec.sizes[g]), 1)
    moved = apply_permutation(spec, {g: p}, sd)
    assert relative_output_change(m, sd, moved, _vit_x()) < 1e-5
    # moving only the q (or v) rows of the group, not the k rows (o columns) with them, changes the function
    key = "blocks.1.attn.v.weight" if which == "ov" else "blocks.1.attn.q.weight"
    half = {**sd, key: moved[key]}
    assert relative_output_change(m, sd, half, _vit_x()) > 1e-3


class _TorchAttn(nn.Module):
    def __init__(self, kind: str, batch_first: bool):
        super().__init__()
        self.kind, self.bf = kind, batch_first
        self.inp = nn.Linear(6, 16)
        if kind == "mha":
            self.att = nn.MultiheadAttention(16, 4, batch_first=batch_first)
        elif kind == "mha_kdim":
            self.att = nn.MultiheadAttention(16, 4, batch_first=batch_first, kdim=12, vdim=10, add_bias_kv=True)
            self.kp, self.vp = nn.Linear(6, 12), nn.Linear(6, 10)
        elif kind == "layer":
            self.att = nn.TransformerEncoderLayer(16, 4, 24, batch_first=batch_first, activation="gelu")
        elif kind == "layer_prenorm":
            self.att = nn.TransformerEncoderLayer(16, 4, 24, batch_first=batch_first, norm_first=True)
        else:
            self.att = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 24, batch_first=batch_first), 2,
                                             norm=nn.LayerNorm(16), enable_nested_tensor=False)
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        h = self.inp(x)
        xs = x
        if not self.bf:
            h, xs = h.transpose(0, 1), x.transpose(0, 1)
        if self.kind == "mha":
            h = h + self.att(h, h, h)[0]
        elif self.kind == "mha_kdim":
            h = h + self.att(h, self.kp(xs), self.vp(xs), need_weights=False)[0]
        else:
            h = self.att(h)
        if not self.bf:
            h = h.transpose(0, 1)
        return self.out(h.mean(1))


@pytest.mark.parametrize("kind", ["mha", "mha_kdim", "layer", "layer_prenorm", "encoder"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_torch_attention_modules_pass_the_self_test(kind, batch_first):
    torch.manual_seed(0)
    m = _TorchAttn(kind, batch_first).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn_like(p))
    x = torch.randn(3, 5, 6)
    spec = derive_spec(m, x)  # runs check_spec
    assert spec.heads, "heads must be found"
    hg = next(iter(spec.heads))
    assert spec.sizes[hg] == 4 and len(spec.heads[hg]["qk"]) == 4
    packed = [r for r in spec.groups[hg] if r.key.endswith("in_proj_bias")]
    assert sorted(r.offset for r in packed) == [0, 16, 32]  # q, k, v segments of the packed bias
    assert check_spec(m, spec, x, seed=3) < 1e-5


class _CustomAttn(nn.Module):
    """q/k/v/o attention with optional rotary embedding, grouped-query or matmul attention."""

    def __init__(self, mode: str, kv_heads: int = 4):
        super().__init__()
        self.mode, self.h, self.hkv, self.dh = mode, 4, kv_heads, 4
        self.q, self.o = nn.Linear(16, 16), nn.Linear(16, 16)
        self.k, self.v = nn.Linear(16, 4 * kv_heads), nn.Linear(16, 4 * kv_heads)
        self.register_buffer("cos", torch.randn(5, 4))

    def forward(self, h):
        B, T, D = h.shape
        q = self.q(h).view(B, T, self.h, self.dh).transpose(1, 2)
        k = self.k(h).view(B, T, self.hkv, self.dh).transpose(1, 2)
        v = self.v(h).view(B, T, self.hkv, self.dh).transpose(1, 2)
        if self.mode == "rotary":
            q = q * self.cos + torch.cat([-q[..., 2:], q[..., :2]], -1)
        if self.mode == "gqa_repeat":
            k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        if self.mode == "matmul":
            y = torch.softmax(q @ k.transpose(-2, -1), -1) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, enable_gqa=self.mode == "gqa")
        return self.o(y.transpose(1, 2).reshape(B, T, D))


class _Custom(nn.Module):
    def __init__(self, mode: str, kv_heads: int = 4):
        super().__init__()
        self.inp, self.attn, self.out = nn.Linear(6, 16), _CustomAttn(mode, kv_heads), nn.Linear(16, 3)

    def forward(self, x):
        h = self.inp(x)
        return self.out((h + self.attn(h)).mean(1))


@pytest.mark.parametrize("mode,kv,fragment", [
    ("rotary", 4, "rotary"), ("gqa", 2, "grouped-query"), ("gqa_repeat", 2, "grouped-query"),
    ("matmul", 4, "scaled_dot_product_attention"),
])
def test_non_symmetries_are_refused_naming_module_and_reason(mode, kv, fragment):
    with pytest.raises(UnsupportedOperationError) as e:
        derive_spec(_Custom(mode, kv).eval(), torch.randn(2, 5, 6))
    assert "at module path 'attn'" in str(e.value)
    assert fragment in str(e.value)


def test_custom_attention_without_extras_is_accepted():
    spec = derive_spec(_Custom("plain").eval(), torch.randn(2, 5, 6))
    assert list(spec.heads) == ["attn.heads"]


def test_invert_and_compose_with_nested_head_groups(vit_spec):
    m, spec = vit_spec
    sd = m.state_dict()
    p = random_permutation(spec, torch.Generator().manual_seed(5), derange=True)
    q = random_permutation(spec, torch.Generator().manual_seed(6), derange=True)
    out = apply_permutation(spec, p, sd)
    back = apply_permutation(spec, invert(p, spec), out)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    two = apply_permutation(spec, q, out)
    one = apply_permutation(spec, compose(p, q, spec), sd)
    assert all(torch.equal(one[k], two[k]) for k in sd)


@pytest.mark.parametrize("name", ["vit", "gpt"])
def test_weight_matching_recovers_planted_heads_within_heads_and_residual_exactly(name, vit_spec, gpt_spec):
    m, spec = vit_spec if name == "vit" else gpt_spec
    sd = m.state_dict()
    p = random_permutation(spec, torch.Generator().manual_seed(7), derange=True)
    assert all(not torch.equal(p[g], torch.arange(len(p[g]))) for g in spec.groups)
    sd_b = apply_permutation(spec, p, sd)
    perms, rep = weight_matching(spec, sd, sd_b)
    inv = invert(p, spec)
    for g in spec.groups:  # B = π(A), so the matching must return π⁻¹ for every group
        assert torch.equal(perms[g], inv[g]), g
    rec = apply_permutation(spec, perms, sd_b)
    assert all(torch.equal(rec[k], sd[k]) for k in sd)
    assert rep.distance_after and max(rep.distance_after.values()) == 0.0


@pytest.mark.parametrize("name", ["vit", "gpt"])
def test_activation_matching_recovers_planted_permutation(name, vit_spec, gpt_spec):
    m, spec = vit_spec if name == "vit" else gpt_spec
    kw, mk = (VIT, _vit_x) if name == "vit" else (GPT, _gpt_x)
    sd = m.state_dict()
    p = random_permutation(spec, torch.Generator().manual_seed(8), derange=True)
    b = create_model(name, **kw).eval()
    b.load_state_dict(apply_permutation(spec, p, sd))
    perms, rep = activation_matching(m, b, spec, [mk(16) for _ in range(3)])
    inv = invert(p, spec)
    for g in spec.groups:
        assert torch.equal(perms[g], inv[g]), g
    assert rep.n_samples["blocks.0.attn.heads/qk"] == 2 * 3 * 16 * (5 if name == "vit" else 6)


def test_weight_matching_lowers_the_midpoint_loss_of_two_trained_vits():
    """Two tiny ViTs trained from different seeds on a synthetic 4-class task: weight matching over
    heads, within-head dims, MLP and residual lowers the loss at the midpoint (Git Re-Basin's claim;
    GLMC Table 1's ordering plain > weight matching)."""
    g = torch.Generator().manual_seed(0)
    proto = torch.randn(4, 1, 8, 8, generator=g)
    y = torch.randint(0, 4, (256,), generator=g)
    x = proto[y] + 0.8 * torch.randn(256, 1, 8, 8, generator=g)
    kw = dict(VIT, num_classes=4, width=32)

    def train(seed):
        torch.manual_seed(seed)
        m = create_model("vit", **kw)
        opt = torch.optim.Adam(m.parameters(), 3e-3)
        for step in range(60):
            i = torch.randint(0, 256, (64,), generator=torch.Generator().manual_seed(seed * 1000 + step))
            opt.zero_grad()
            F.cross_entropy(m(x[i]), y[i]).backward()
            opt.step()
        return m.eval()

    a, b = train(1), train(2)
    spec = derive_spec(a, x[:4])
    perms, _ = weight_matching(spec, a.state_dict(), b.state_dict())
    sb = apply_permutation(spec, perms, b.state_dict())
    sa = a.state_dict()

    def mid_loss(sd_b):
        mid = {k: (sa[k] + sd_b[k]) / 2 if sa[k].is_floating_point() else sa[k] for k in sa}
        with torch.no_grad():
            return float(F.cross_entropy(torch.func.functional_call(a, mid, (x,)), y))

    with torch.no_grad():
        end = (float(F.cross_entropy(a(x), y)) + float(F.cross_entropy(b(x), y))) / 2
    plain, matched = mid_loss(b.state_dict()) - end, mid_loss(sb) - end
    assert matched < plain
    assert relative_output_change(b, b.state_dict(), sb, x[:16]) < 1e-5


def test_run_with_a_model_llfc_cannot_permute_is_refused_before_anything_is_written(tmp_path, capsys):
    """`llfc run` with a permutation pair derives the spec before training: an unpermutable model
    (here ResNet-20's zero-padding shortcut) exits with llfc's error and leaves no output folder."""
    from llfc.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text("dataset: digits\nmodel: resnet20\nmodel_args: {width: 0.25, shortcut: A}\n"
                   "pairs: [permutation-weight]\n")
    out = tmp_path / "r"
    code = main(["run", "--config", str(cfg), "--out", str(out), "--epochs", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert code != 0 and "pad" in err.lower() and "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())


def test_ste_runs_on_a_tied_language_model(gpt_spec):
    """Git Re-Basin's STE on (B, T, V) logits with a tied unembedding: per-token cross-entropy, one free
    tensor for the tied pair; the result is a permutation that keeps B's function."""
    from llfc.permutation import ste_matching

    m, spec = gpt_spec
    b = _perturbed("gpt", GPT, seed=1)
    g = torch.Generator().manual_seed(2)
    loader = [(torch.randint(0, 11, (8, 6), generator=g), torch.randint(0, 11, (8, 6), generator=g)) for _ in range(2)]
    perms, rep = ste_matching(m, spec, m.state_dict(), b.state_dict(), loader)
    assert rep.steps == 2 and all(torch.isfinite(torch.tensor(rep.losses)))
    out = apply_permutation(spec, perms, b.state_dict())
    assert out["head.weight"] is out["tok_emb.weight"]
    assert relative_output_change(b, b.state_dict(), out, _gpt_x()) < 1e-5

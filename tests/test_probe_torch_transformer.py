"""Probes inside torch's own transformer modules (nn.TransformerEncoder / nn.TransformerEncoderLayer are
traced through, nn.MultiheadAttention and the decoder modules are probed at their output), the warning
when no hidden probe can show LLFC, and the probe lists of llfc's registered models, unchanged."""

import dataclasses
import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from llfc.criteria import llfc_holds
from llfc.engine import measure_pair
from llfc.models import list_models
from llfc.probe import FeatureExtractor
from test_probe import _small


class EncoderModel(nn.Module):
    """The new-user trial's model: Linear(6→32) → nn.TransformerEncoder (2 pre-LN GELU layers) → mean → head."""

    def __init__(self, **layer_kw):
        super().__init__()
        kw = {"batch_first": True, "norm_first": True, "activation": "gelu", **layer_kw}
        self.inp = nn.Linear(6, 32)
        with warnings.catch_warnings():  # torch: nested tensors are off for norm_first layers
            warnings.simplefilter("ignore")
            self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, **kw), 2)
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        return self.head(self.enc(self.inp(x)).mean(1))


def _data(n=64):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 5, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_encoder_layers_are_probed_and_llfc_fails_for_independent_inits():
    torch.manual_seed(0)
    a, b = EncoderModel(), EncoderModel()
    probes = {p.name: p for p in FeatureExtractor(a).probes}
    for i in (0, 1):
        ly = f"enc.layers.{i}"
        # the residual stream after each block: the addition that ends the pre-LN layer
        assert probes[f"{ly}.add_1"].kind == "residual"
        assert probes[f"{ly}.add"].kind == "residual"  # after the attention block
        assert probes[f"{ly}.self_attn"].kind == "pre" and probes[f"{ly}.self_attn"].op == "MultiheadAttention"
        assert [probes[f"{ly}.{m}"].kind for m in ("norm1", "norm2", "linear1", "gelu", "linear2")] == [
            "norm",
            "norm",
            "pre",
            "post",
            "pre",
        ]
    x, y = _data()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # hidden layers are measured: no warning
        res = measure_pair(a, a.state_dict(), b.state_dict(), [(x, y)], alphas=[0, 0.5, 1])
    measured = [ly["name"] for ly in res["llfc"]]
    assert "enc.layers.0.add_1" in measured and "enc.layers.1.add_1" in measured
    assert llfc_holds(res) is False
    worst = max(ly["distance"]["mean"][res["alphas"].index(0.5)] for ly in res["llfc"] if ly["kind"] == "residual")
    assert worst > 0.05


@pytest.mark.parametrize("norm_first", [True, False])
def test_traced_encoder_computes_what_torch_computes(norm_first):
    torch.manual_seed(0)
    m = EncoderModel(norm_first=norm_first, activation="relu").eval()
    m.enc.norm = nn.LayerNorm(32)  # a final norm, applied after the layers
    fe = FeatureExtractor(m)
    x, _ = _data(8)
    with torch.no_grad():  # torch's fast path (eval, no grad) against the traced slow path
        out = fe(m.state_dict(), x)
        ref = m(x)
    torch.testing.assert_close(out[fe.probes[-1].node], ref, atol=1e-5, rtol=1e-5)
    kinds = {p.name: p.kind for p in fe.probes}
    assert kinds["enc.norm"] == "norm"
    if not norm_first:  # post-LN: each layer ends with norm2, after the residual addition
        assert kinds["enc.layers.1.norm2"] == "norm" and kinds["enc.layers.1.add_1"] == "residual"


class LeafModules(nn.Module):
    """torch modules that stay fx leaves: attention and a decoder layer."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.dec = nn.TransformerDecoderLayer(8, 2, 16, batch_first=True, norm_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h, _ = self.attn(x, x, x)
        return self.head(self.dec(h, x).mean(1))


def test_leaf_torch_modules_are_probed_at_their_output():
    m = LeafModules().eval()
    fe = FeatureExtractor(m)
    assert [(p.name, p.kind, p.op) for p in fe.probes] == [
        ("attn", "pre", "MultiheadAttention"),
        ("dec", "residual", "TransformerDecoderLayer"),
        ("logits", "logits", "Linear"),
    ]
    x = torch.randn(4, 5, 8)
    with torch.no_grad():
        out = fe(m.state_dict(), x)
        h = m.attn(x, x, x)[0]
    torch.testing.assert_close(out[fe.probes[0].node], h)
    assert fe.probes[0].input_node is None  # not a Linear: no commutativity, no weak additivity


class OnlyFirstLinear(nn.Module):
    """Its only probe-able hidden layer is the first Linear (sin is not a recognised activation)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(torch.sin(self.fc(x)))


def test_warning_when_the_only_hidden_probe_takes_the_input():
    torch.manual_seed(0)
    a, b = OnlyFirstLinear(), OnlyFirstLinear()
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    with pytest.warns(UserWarning, match=r"LLFC is measured at fc, logits only: its only hidden probes \(fc\)") as w:
        res = measure_pair(a, a.state_dict(), b.state_dict(), [(x, y)], alphas=[0, 0.5, 1])
    msg = str(w[0].message)
    assert "kinds=/names=" in msg and "--kinds/--probes" in msg and "llfc probes" in msg
    assert llfc_holds(res) is True  # the verdict the warning is about: fc is linear in the weights


def test_no_warning_when_a_hidden_layer_is_measured():
    torch.manual_seed(0)
    a, b = _small("mlp"), _small("mlp")
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 7, (8,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        measure_pair(a, a.state_dict(), b.state_dict(), [(x, y)], alphas=[0, 1])
    with pytest.warns(UserWarning, match="no hidden layer is probed"):
        measure_pair(a, a.state_dict(), b.state_dict(), [(x, y)], alphas=[0, 1], kinds=["logits"])


@pytest.mark.parametrize("name", list_models())
def test_registered_models_keep_their_probes(name):
    """Every probe (name, kind, node, op, input node, module, ReLU, from input) as recorded before torch's
    transformer modules were traced through (tests/probes_registered.json, from the models of test_probe)."""
    expected = json.loads((Path(__file__).parent / "probes_registered.json").read_text())
    torch.manual_seed(0)
    got = [list(dataclasses.astuple(p)) for p in FeatureExtractor(_small(name)).all_probes]
    assert got == expected[name]

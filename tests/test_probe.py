"""Probes on every registered architecture, and the BatchNorm reset along the path."""

import pytest
import torch
import torch.nn as nn

from llfc.interpolate import lerp_state_dict, path_states, reset_bn_stats
from llfc.models import create_model, list_models
from llfc.probe import FeatureExtractor, select_probes

SMALL = {
    "mlp": {"input_shape": [1, 8, 8], "widths": [16, 16]},
    "lenet": {"input_shape": [1, 28, 28]},
    "resnet50": {"input_shape": [3, 32, 32], "width": 0.25},
    "vit": {"input_shape": [1, 28, 28], "width": 16, "depth": 1, "heads": 2},
    "gpt": {"input_shape": [8], "width": 16, "depth": 1, "heads": 2},  # token ids in, (N, T, 7) out
}


def _small(name):
    if name in SMALL:
        return create_model(name, num_classes=7, **SMALL[name])
    kw = {"input_shape": [3, 32, 32], "num_classes": 7, "width": 0.25}
    if name.startswith("vgg"):
        kw["classifier"] = "linear"
    return create_model(name, **kw)


@pytest.mark.parametrize("name", list_models())
def test_every_model_has_probes_and_its_logits(name):
    torch.manual_seed(0)
    m = _small(name).eval()
    shape = (SMALL.get(name) or {}).get("input_shape", [3, 32, 32])
    x = torch.randint(0, 7, (2, *shape)) if name == "gpt" else torch.randn(2, *shape)
    fe = FeatureExtractor(m)
    kinds = {p.kind for p in fe.probes}
    assert fe.probes[-1].kind == "logits"
    assert {"pre", "post"} <= kinds
    if name.startswith("resnet"):
        assert "residual" in kinds  # block additions are probed even though ReLUs are functional
    if "_bn" in name or (name.startswith("resnet") and "_ln" not in name):
        assert "norm" in kinds
    out = fe(m.state_dict(), x)
    assert torch.allclose(out[fe.probes[-1].node], m(x), atol=1e-5)
    names = [p.name for p in fe.all_probes]
    assert len(names) == len(set(names))


def test_vgg_inplace_relu_does_not_overwrite_the_conv_output():
    torch.manual_seed(0)
    m = _small("vgg11").eval()
    x = torch.randn(2, 3, 32, 32)
    fe = FeatureExtractor(m)
    first = fe.probes[0]
    assert first.kind == "pre" and first.module == "features.0"
    f = fe(m.state_dict(), x)[first.node]
    assert torch.allclose(f, m.features[0](x))
    assert (f < 0).any()  # an in-place ReLU would have clamped it
    assert m.features[1].inplace  # the user's model is left as it was


def test_select_probes_by_kind_and_name():
    m = _small("mlp")
    probes = FeatureExtractor(m).all_probes
    post = select_probes(probes, kinds=["post"])
    assert [p.kind for p in post] == ["post", "post", "logits"]
    assert [p.name for p in select_probes(probes, names=["layers.2"])] == ["layers.2", "logits"]
    with pytest.raises(KeyError, match="layers.99"):
        select_probes(probes, names=["layers.99"])


def test_bn_reset_equals_manual_recomputation():
    torch.manual_seed(0)
    m = _small("vgg11_bn").eval()
    sd_a = {k: v.clone() for k, v in m.state_dict().items()}
    torch.manual_seed(1)
    sd_b = _small("vgg11_bn").state_dict()
    sd_half = lerp_state_dict(sd_a, sd_b, 0.5)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(16, 3, 32, 32, generator=g) for _ in range(3)]
    new = reset_bn_stats(m, sd_half, batches)
    # manual: the first BN sees conv1's output; running stats = average over the batches of the
    # batch mean and of the unbiased batch variance (cumulative moving average, momentum=None)
    conv = nn.Conv2d(3, m.features[0].out_channels, 3, padding=1)
    conv.load_state_dict({"weight": sd_half["features.0.weight"], "bias": sd_half["features.0.bias"]})
    with torch.no_grad():
        outs = [conv(x) for x in batches]
    mean = torch.stack([o.mean((0, 2, 3)) for o in outs]).mean(0)
    var = torch.stack([o.var((0, 2, 3), unbiased=True) for o in outs]).mean(0)
    assert torch.allclose(new["features.1.running_mean"], mean, atol=1e-5)
    assert torch.allclose(new["features.1.running_var"], var, rtol=1e-4)
    assert not torch.allclose(new["features.1.running_mean"], sd_half["features.1.running_mean"])
    # weights are untouched; path_states resets interior points only
    assert torch.equal(new["features.0.weight"], sd_half["features.0.weight"])
    states = path_states(m, sd_a, sd_b, [0.0, 0.5, 1.0], "reset", batches)
    assert states[0] is sd_b and states[2] is sd_a
    assert torch.allclose(states[1]["features.1.running_mean"], mean, atol=1e-5)

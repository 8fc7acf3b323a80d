"""Permutation specs derive and pass the self-test for every architecture llfc ships (and two
torchvision models); option-A (zero-padding) shortcuts are refused with a clear error."""

import pytest
import torch
import torchvision

from llfc.errors import UnsupportedOperationError
from llfc.models import create_model
from llfc.permutation import apply_permutation, check_spec, derive_spec, random_permutation

CASES = {
    "mlp": dict(input_shape=[1, 28, 28], widths=[32, 32, 32]),
    "lenet": dict(input_shape=[1, 28, 28]),
    "vgg11": dict(width=0.125, classifier="linear"),
    "vgg11_bn": dict(width=0.125, classifier="linear"),
    "vgg16": dict(width=0.125, classifier="linear"),
    "vgg16_bn": dict(width=0.125, classifier="paper", hidden=64),
    "resnet20 (shortcut B)": dict(width=0.5, shortcut="B"),
    "resnet20_ln (GroupNorm)": dict(width=0.5, norm="groupnorm"),
    "resnet20_ln (LayerNorm)": dict(width=0.5, norm="layernorm"),
}


def _build(case):
    name = case.split(" ")[0]
    kw = {"num_classes": 10, "input_shape": [3, 32, 32], **CASES[case]}
    return create_model(name, **kw).eval(), kw["input_shape"]


@pytest.mark.parametrize("case", list(CASES))
def test_spec_self_test_passes(case):
    torch.manual_seed(0)
    model, shape = _build(case)
    x = torch.randn(4, *shape)
    spec = derive_spec(model, x)  # runs the mandatory self-test
    assert spec.groups, "a hidden layer must be permutable"
    # independently: a random permutation of every group leaves the function unchanged
    sd = model.state_dict()
    perms = random_permutation(spec, torch.Generator().manual_seed(1))
    model2 = _build(case)[0]
    model2.load_state_dict(apply_permutation(spec, perms, sd))
    with torch.no_grad():
        assert torch.allclose(model2(x), model(x), rtol=1e-4, atol=1e-5)
    assert check_spec(model, spec, x) < 1e-4


@pytest.mark.parametrize("name", ["resnet18", "vgg11_bn"])
def test_torchvision_models(name):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    spec = derive_spec(model, x)
    assert len(spec.groups) >= 5


def test_option_a_shortcut_is_refused_naming_the_padding():
    model, shape = create_model("resnet20", width=0.5, shortcut="A").eval(), [3, 32, 32]
    with pytest.raises(UnsupportedOperationError, match="(?i)pad"):
        derive_spec(model, torch.randn(2, *shape))

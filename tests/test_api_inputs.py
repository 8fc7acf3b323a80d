"""Inputs of the Python API (measure_pair, PairMeter, derive_spec) that a new user got wrong: the
dtype of the model, state dicts, inputs and labels, and the structure of the loader's batches.
Each failed with a raw torch error before its fix."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn as nn

from llfc.engine import measure_pair
from llfc.errors import ConfigError, IncompatibleModelsError


def _mlp(bn: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), *([nn.BatchNorm1d(8)] if bn else []), nn.ReLU(), nn.Linear(8, 3))


def _pair(bn: bool = False):
    torch.manual_seed(1)
    sd_a = _mlp(bn).state_dict()
    torch.manual_seed(2)
    sd_b = {k: v + 0.3 * torch.randn_like(v) if v.is_floating_point() else v for k, v in sd_a.items()}
    return sd_a, sd_b


def _data():
    g = torch.Generator().manual_seed(3)
    return torch.randn(12, 4, generator=g), torch.randint(0, 3, (12,), generator=g)


def _cast(sd, dtype):
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}


def _measure(model, sd_a, sd_b, x, y, **kw):
    res = measure_pair(model, sd_a, sd_b, [(x, y)], [0, 0.5, 1], **kw)
    return json.dumps(res, sort_keys=True)  # every number, NaN included, compared exactly


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_the_state_dicts_dtype_is_the_measurement_dtype_whatever_the_models(dtype):
    sd_a, sd_b = _cast(_pair()[0], dtype), _cast(_pair()[1], dtype)
    x, y = _data()
    # a model already in the state dicts' dtype, fed inputs of that dtype, worked before
    expected = _measure(_mlp().to(dtype), sd_a, sd_b, x.to(dtype), y)
    assert _measure(_mlp(), sd_a, sd_b, x, y) == expected  # float32 model, float32 inputs


def test_a_float64_model_with_float32_state_dicts_measures_in_float32():
    sd_a, sd_b = _pair()
    x, y = _data()
    assert _measure(_mlp().double(), sd_a, sd_b, x, y) == _measure(_mlp(), sd_a, sd_b, x, y)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_floating_inputs_are_cast_to_the_pairs_dtype(dtype):
    sd_a, sd_b = _pair()
    x, y = _data()
    x = x.to(dtype)
    assert _measure(_mlp(), sd_a, sd_b, x, y) == _measure(_mlp(), sd_a, sd_b, x.float(), y)


def test_int32_labels_are_cast_to_int64():
    sd_a, sd_b = _pair()
    x, y = _data()
    assert _measure(_mlp(), sd_a, sd_b, x, y.int()) == _measure(_mlp(), sd_a, sd_b, x, y)


def test_floating_labels_are_refused_with_the_fix():
    sd_a, sd_b = _pair()
    x, y = _data()
    with pytest.raises(ConfigError, match=r"labels y are torch.float32.*y.long\(\)"):
        measure_pair(_mlp(), sd_a, sd_b, [(x, y.float())], [0, 1])


def test_bn_reset_runs_in_the_state_dicts_dtype():
    sd_a, sd_b = _cast(_pair(bn=True)[0], torch.float64), _cast(_pair(bn=True)[1], torch.float64)
    x, y = _data()
    kw = {"bn_mode": "reset", "bn_batches": [x]}
    # the float32 model's copy used to take the float64 statistics in float32
    assert _measure(_mlp(bn=True), sd_a, sd_b, x, y, **kw) == _measure(
        _mlp(bn=True).double(), sd_a, sd_b, x.double(), y, **kw
    )


def test_endpoints_of_different_dtypes_are_incompatible():
    sd_a, sd_b = _pair()
    x, y = _data()
    with pytest.raises(IncompatibleModelsError, match="differ in dtype.*Convert both to one dtype"):
        measure_pair(_mlp(), sd_a, _cast(sd_b, torch.float64), [(x, y)], [0, 1])


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda x, y: {"x": x, "y": y}, r"a dict with keys \['x', 'y'\].*\(b\[\"x\"\], b\[\"y\"\]\) for b in loader"),
        (lambda x, y: (x,), r"a tuple of 1 \(Tensor\).*need labels.*TensorDataset\(x, y\)"),
        (lambda x, y: x, r"a bare tensor of shape \(12, 4\).*need labels"),
        (lambda x, y: (x, y, y), r"a tuple of 3 .*\(b\[0\], b\[1\]\) for b in loader"),
    ],
    ids=["dict", "x-only", "bare-tensor", "extra-item"],
)
def test_batches_that_are_not_x_y_pairs_are_one_clear_error(make, words):
    sd_a, sd_b = _pair()
    x, y = _data()
    with pytest.raises(ConfigError, match=r"batches must yield \(inputs, labels\) pairs.*" + words):
        measure_pair(_mlp(), sd_a, sd_b, [make(x, y)], [0, 1])


def test_pair_meter_update_takes_two_tensors():
    from llfc.engine import PairMeter
    from llfc.probe import FeatureExtractor

    sd_a, sd_b = _pair()
    x, y = _data()
    meter = PairMeter(FeatureExtractor(_mlp()), sd_a, sd_b, [0, 1])
    with pytest.raises(ConfigError, match=r"update\(x, y\) takes two tensors.*got dict and Tensor"):
        meter.update({"x": x}, y)


@pytest.mark.parametrize("call", ["derive_spec", "align"])
def test_a_wrong_dtype_example_input_is_one_clear_error_without_a_printed_traceback(call, capfd):
    from llfc.permutation import align, derive_spec

    x = torch.zeros(2, 4, dtype=torch.float64)  # the model is float32
    with pytest.raises(ConfigError, match=r"cannot run on the example input.*got Double and Float"):
        derive_spec(_mlp(), x) if call == "derive_spec" else align(_mlp(), _pair()[1], x)
    assert capfd.readouterr().err == ""  # torch.fx's ShapeProp printed ~20 lines here


def test_derive_spec_passes_on_what_a_successful_pass_prints(monkeypatch, capfd):
    import llfc.permutation.graph as graph

    class Loud(graph.ShapeProp):  # e.g. a warning of a torch op during the forward pass
        def propagate(self, *args):
            print("a warning", file=sys.stderr)
            return super().propagate(*args)

    monkeypatch.setattr(graph, "ShapeProp", Loud)
    graph.derive_spec(_mlp(), _data()[0])
    assert capfd.readouterr().err == "a warning\n"

"""The engine's memory budget (micro-batches) and malloc tuning change no result."""

import pytest
import torch

from llfc import _malloc
from llfc.engine import PairMeter, measure_pair
from llfc.errors import ConfigError
from llfc.models import create_model
from llfc.probe import FeatureExtractor

ALPHAS = [0.0, 0.3, 0.5, 1.0]


def _resnet_pair():
    # float64 so that batched and micro-batched forward passes agree to rounding: any difference
    # would come from the chunking itself (BN in eval mode: per-sample computation)
    kw = {"input_shape": (3, 8, 8), "num_classes": 4, "width": 0.25}
    torch.manual_seed(0)
    m = create_model("resnet20", **kw).double().eval()
    sd_a = {k: v.clone() for k, v in m.state_dict().items()}
    torch.manual_seed(1)
    sd_b = create_model("resnet20", **kw).double().state_dict()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(23, 3, 8, 8, generator=g, dtype=torch.float64)
    return m, sd_a, sd_b, x, torch.randint(0, 4, (23,), generator=g)


def test_micro_batches_give_the_unchunked_results(assert_tree_close):
    m, sd_a, sd_b, x, y = _resnet_pair()
    per_sample = sum(t.numel() * t.element_size() for t in FeatureExtractor(m)(sd_a, x[:1]).values())
    budget = 4 * per_sample * 5.5  # room for 5 samples: 23 = 5 chunks of at most 5
    meter = PairMeter(FeatureExtractor(m), sd_a, sd_b, ALPHAS, memory_budget=budget)
    assert meter.micro_batch(x) == 5
    assert meter.micro_batch(x[:4]) == 4
    assert PairMeter(FeatureExtractor(m), sd_a, sd_b, ALPHAS, memory_budget=1).micro_batch(x) == 1
    whole = measure_pair(m, sd_a, sd_b, [(x, y)], ALPHAS, memory_budget=None)
    chunked = measure_pair(m, sd_a, sd_b, [(x[:20], y[:20]), (x[20:], y[20:])], ALPHAS, memory_budget=budget)
    assert chunked["n_samples"] == whole["n_samples"] == 23
    assert whole["llfc"] and whole["weak_additivity"] and whole["commutativity"]
    assert_tree_close(chunked, whole, rel=1e-9, abs=1e-12)
    with pytest.raises(ConfigError, match="memory_budget"):
        PairMeter(FeatureExtractor(m), sd_a, sd_b, ALPHAS, memory_budget=0)


def test_malloc_tuning_is_scoped_and_can_be_switched_off(monkeypatch):
    calls = []

    class FakeLibc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

        def malloc_trim(self, pad):
            calls.append(("trim", pad))
            return 1

    monkeypatch.setattr(_malloc, "_glibc", lambda: FakeLibc())
    monkeypatch.setattr(_malloc, "_libc", FakeLibc())
    for var in _malloc._USER_VARS + ("LLFC_MALLOC_TUNING",):
        monkeypatch.delenv(var, raising=False)
    with _malloc.retain_freed_memory():
        with _malloc.retain_freed_memory():  # nested: set once, restored once
            pass
        assert calls == [(-3, 32 * 2**20), (-1, 2**31 - 1)]
    assert calls[2:] == [(-1, 64 * 2**20), ("trim", 0)]
    for var, value in (("LLFC_MALLOC_TUNING", "0"), ("MALLOC_TRIM_THRESHOLD_", "1000000")):
        calls.clear()
        monkeypatch.setenv(var, value)
        assert not _malloc.malloc_tuning_available()
        with _malloc.retain_freed_memory():
            pass
        assert calls == []
        monkeypatch.delenv(var)

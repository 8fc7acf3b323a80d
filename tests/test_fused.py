"""The fused (numba) per-sample norms against hand-computed values, float64 formulas and the torch
path they replace; the engine gives the same results with and without them."""

import math
import os
import subprocess
import sys

import pytest
import torch

from llfc.engine import measure_pair
from llfc.metrics import fused
from llfc.models import create_model


@pytest.fixture(params=["fused", "torch"])
def path(request, monkeypatch):
    monkeypatch.setenv("LLFC_FUSED", "1" if request.param == "fused" else "0")
    return request.param


def test_kernels_are_available():
    # numba is a dependency: without it the engine silently falls back to the slower torch path
    assert fused.available()


def test_hand_computed_values(path):
    # the fused kernels are exact here (float64 sums of small integers); the torch path squares a
    # float32 norm, off by float32 rounding
    def same(got, want):
        assert got.dtype == torch.float64
        assert got.tolist() == pytest.approx(want, rel=0 if path == "fused" else 1e-6)

    X = torch.tensor([[3.0, 4.0]])
    A = torch.tensor([[2.0, 0.0]])
    B = torch.tensor([[0.0, 2.0]])
    # f_int = 0.5 A + 0.5 B = (1, 1): ‖X‖² = 25, ‖X − f_int‖² = 2² + 3² = 13
    same(fused.interp_sq(X, A, B, 0.5)[0], [25.0, 13.0])
    # α = 0.25: f_int = (0.5, 1.5), X − f_int = (2.5, 2.5)
    same(fused.interp_sq(X, A, B, 0.25)[0], [25.0, 12.5])
    same(fused.pair_sq(A, B)[0], [4.0, 4.0, 8.0])
    gA = torch.tensor([[1.0, -1.0, 0.0, 2.0]])
    gB = torch.tensor([[1.0, 1.0, -3.0, -2.0]])
    # products 1, −1, 0, −4: two of four are ≥ 0
    same(fused.sign_agreement_rows(gA, gB), [0.5])
    # weak additivity at α = 0.5: u = relu((1, 0, −1.5, 0)) = (1, 0, 0, 0);
    # v = (relu(gA) + relu(gB)) / 2 = (1, 0.5, 0, 1); ‖u‖² = 1, ‖v − u‖² = 0.25 + 1
    same(fused.relu_interp_sq(gA, gB, gA.relu(), gB.relu(), 0.5)[0], [1.0, 1.25])


def _reference(X, A, B, gA, gB, a):
    """The same quantities from float64 copies, written out."""
    X, A, B, gA, gB = (t.double() for t in (X, A, B, gA, gB))
    f_int = a * A + (1 - a) * B
    u = (a * gA + (1 - a) * gB).relu()
    v = a * gA.relu() + (1 - a) * gB.relu()
    return {
        "interp": torch.stack([(X * X).sum(1), ((X - f_int) ** 2).sum(1)], 1),
        "pair": torch.stack([(A * A).sum(1), (B * B).sum(1), ((A - B) ** 2).sum(1)], 1),
        "relu": torch.stack([(u * u).sum(1), ((v - u) ** 2).sum(1)], 1),
        "sign": (gA * gB >= 0).double().mean(1),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_random_rows_match_float64_formulas(path, dtype):
    g = torch.Generator().manual_seed(0)
    n, d, a = 7, 3001, 0.3
    A, B = torch.randn(n, d, generator=g, dtype=dtype), torch.randn(n, d, generator=g, dtype=dtype)
    X = (a * A + (1 - a) * B + 0.01 * torch.randn(n, d, generator=g, dtype=dtype)).to(dtype)
    gA, gB = torch.randn(n, d, generator=g, dtype=dtype), torch.randn(n, d, generator=g, dtype=dtype)
    ref = _reference(X, A, B, gA, gB, a)
    got = {
        "interp": fused.interp_sq(X, A, B, a),
        "pair": fused.pair_sq(A, B),
        "relu": fused.relu_interp_sq(gA, gB, gA.relu(), gB.relu(), a),
        "sign": fused.sign_agreement_rows(gA, gB),
    }
    # the fused kernels sum in float64 (exact to float64 rounding); the torch path sums in the
    # tensors' dtype
    rel = 1e-12 if path == "fused" or dtype == torch.float64 else 1e-5
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=rel, atol=0)


def test_strided_inputs_take_the_torch_path_and_agree():
    g = torch.Generator().manual_seed(1)
    A, B, X = (torch.randn(40, 6, generator=g).t() for _ in range(3))  # (6, 40), not contiguous
    assert not X.is_contiguous()
    got = fused.interp_sq(X, A, B, 0.7)
    ref = _reference(X, A, B, A, B, 0.7)["interp"]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=0)


def test_nan_propagates(path):
    X = torch.tensor([[math.nan, 1.0]])
    A = torch.ones(1, 2)
    assert torch.isnan(fused.interp_sq(X, A, A, 0.5)).all()
    assert torch.isnan(fused.relu_interp_sq(X, A, A, A, 0.5)[0, 0])


def test_engine_results_equal_with_and_without_kernels(monkeypatch):
    torch.manual_seed(0)
    m = create_model("resnet20", input_shape=(3, 8, 8), num_classes=4, width=0.25).eval()
    sd_a = {k: v.clone() for k, v in m.state_dict().items()}
    torch.manual_seed(1)
    sd_b = create_model("resnet20", input_shape=(3, 8, 8), num_classes=4, width=0.25).state_dict()
    g = torch.Generator().manual_seed(2)
    data = [(torch.randn(9, 3, 8, 8, generator=g), torch.randint(0, 4, (9,), generator=g)) for _ in range(2)]
    out = {}
    for mode in ("1", "0"):
        monkeypatch.setenv("LLFC_FUSED", mode)
        out[mode] = measure_pair(m, sd_a, sd_b, data, [0.0, 0.4, 1.0], bn_mode="interpolate")

    def numbers(tree):
        if isinstance(tree, dict):
            return [x for k in sorted(tree) for x in numbers(tree[k])]
        if isinstance(tree, (list, tuple)):
            return [x for v in tree for x in numbers(v)]
        return [tree] if isinstance(tree, float) else []

    f, t = numbers(out["1"]), numbers(out["0"])
    assert len(f) == len(t) > 500
    assert out["1"]["weak_additivity"] and out["1"]["commutativity"]  # the conditions were measured
    torch.testing.assert_close(torch.tensor(f), torch.tensor(t), rtol=2e-5, atol=1e-7)


def test_relu_of_minus_inf_is_zero(path):
    # a diverged pre-activation: ReLU(−inf) = 0 as in torch, not 0·(−inf) = NaN. At α = 0.3,
    # u = relu((0.7 + 0.3·(−inf), 1)) = (0, 1), v = 0.3·(0, 1) + 0.7·(1, 1) = (0.7, 1):
    # ‖u‖² = 1, ‖v − u‖² = 0.49
    gA, gB = torch.tensor([[-math.inf, 1.0]]), torch.tensor([[1.0, 1.0]])
    got = fused.relu_interp_sq(gA, gB, gA.relu(), gB.relu(), 0.3)[0]
    assert got.tolist() == pytest.approx([1.0, 0.49], rel=1e-6)


def test_sign_agreement_of_zero_width_rows_is_nan(path):
    # the mean over no units is undefined (torch's mean of an empty row), not a ZeroDivisionError
    assert torch.isnan(fused.sign_agreement_rows(torch.zeros(2, 0), torch.zeros(2, 0))).all()


def test_mismatched_shapes_are_not_read_out_of_bounds(path):
    # shapes that do not broadcast raise (torch's error), shapes that do are broadcast; the kernels
    # never see them (they would read past the end of the smaller tensor)
    with pytest.raises(RuntimeError):
        fused.pair_sq(torch.ones(2, 3), torch.ones(2, 2))
    g = torch.Generator().manual_seed(3)
    X, A, B = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g), torch.randn(1, 5, generator=g)
    ref = _reference(X, A, B.expand(3, 5), A, B.expand(3, 5), 0.4)["interp"]
    torch.testing.assert_close(fused.interp_sq(X, A, B, 0.4), ref, rtol=1e-5, atol=0)


@pytest.mark.parametrize("shape", [(4,), (2, 2, 2)])
def test_rows_must_be_two_dimensional(path, shape):
    with pytest.raises(ValueError, match="2-D"):
        fused.pair_sq(torch.ones(shape), torch.ones(shape))


def test_kernels_compile_without_a_writable_cache_directory():
    # a read-only install with an unwritable home: numba finds nowhere to cache and refuses
    # cache=True at import; the kernels must still be used (compiled in memory), not silently lost
    code = (
        "import numba.core.caching as c\n"
        "(getattr(c, 'CacheImpl', None) or c._CacheImpl)._locator_classes = []\n"
        "import torch\n"
        "from llfc.metrics import fused\n"
        "assert fused.available()\n"
        "print(fused.pair_sq(torch.tensor([[3.0, 4.0]]), torch.tensor([[0.0, 1.0]])).tolist())\n"
    )
    env = {**os.environ, "LLFC_FUSED": "1"}
    env.pop("NUMBA_CACHE_LOCATOR_CLASSES", None)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["[[25.0,", "1.0,", "18.0]]"]
    assert "Warning" not in r.stderr


def test_numba_disable_jit_takes_the_torch_path():
    # NUMBA_DISABLE_JIT=1 (a debugging switch) turns the kernels into Python loops, about a
    # thousand times slower than torch: the torch path must be used instead
    code = "from llfc.metrics import fused\nprint(fused.available())\n"
    env = {**os.environ, "LLFC_FUSED": "1", "NUMBA_DISABLE_JIT": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False"]


_CACHE_FAULT = """
import numba.core.caching as c
import torch

def fail(*args, **kwargs):
    raise {error}

c.Cache.{method} = fail
from llfc.metrics import fused
A, B = torch.tensor([[3.0, 4.0]]), torch.tensor([[0.0, 4.0]])  # squared norms exact in float32 too
print(fused.pair_sq(A, B).tolist(), fused.pair_sq(A, B).tolist(), fused.available())
"""


@pytest.mark.parametrize(
    "method, error, available",
    [
        # numba registers the compiled kernel before writing its cache: a failed write (disk
        # full, quota) leaves a working kernel
        ("save_overload", "OSError(28, 'No space left on device')", "True"),
        # an unreadable cache file: this process uses the torch path
        ("load_overload", "PermissionError(13, 'Permission denied')", "False"),
    ],
)
def test_a_failing_numba_cache_is_not_fatal(tmp_path, method, error, available):
    code = _CACHE_FAULT.format(method=method, error=error)
    env = {**os.environ, "LLFC_FUSED": "1", "NUMBA_CACHE_DIR": str(tmp_path)}  # empty: compiles
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["[[25.0,", "16.0,", "9.0]]"] * 2 + [available]


def test_missing_numba_warns_once_and_falls_back(monkeypatch):
    import sys

    monkeypatch.setattr(fused, "_KERNELS", None)
    monkeypatch.setattr(fused, "_FAILED", False)
    import llfc.metrics

    monkeypatch.delitem(sys.modules, "llfc.metrics._kernels", raising=False)
    monkeypatch.delattr(llfc.metrics, "_kernels", raising=False)
    monkeypatch.setitem(sys.modules, "numba", None)  # import numba now raises ImportError
    A, B = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    with pytest.warns(UserWarning, match="pip install numba"):
        got = fused.pair_sq(A, B)
    assert got.tolist()[0] == pytest.approx([4.0, 4.0, 8.0], rel=1e-6)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process: no second warning
        fused.pair_sq(A, B)

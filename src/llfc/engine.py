"""One streaming pass over the data for every α and every probed layer (DESIGN.md §3).

Per batch, the features of θ_A and θ_B are computed once and reused for every α; θ_α costs one
forward pass per interior α (the endpoints reuse A's and B's features), so the time is about
(K + 2) forward passes for K interior α values. Everything is folded into float64 running sums
(:mod:`llfc.metrics.streaming`) and discarded: memory is O(batch × largest layer) and does not
grow with the number of samples.

What is measured (α weights A: θ_α = α·θ_A + (1−α)·θ_B):

* LMC: mean cross-entropy loss and error of θ_α (DESIGN.md §1, Def. 1).
* LLFC per probe and α (paper §3, Def. 2, Figs. 2–4): per-sample d_α = 1 − cos(f_α, f_int) with
  f_int = α f_A + (1−α) f_B (mean, std over samples, and the whole-tensor version); the baseline
  d_AB = 1 − cos(f_A, f_B); the least-squares scale s = ⟨f_α, f_int⟩/‖f_int‖² (per sample and
  whole tensor; official code's ``coef``) and c = 1/s (Def. 2, App. B.2).
* Weak additivity per ReLU probe and α (Def. 3): 1 − cos(σ(α g_A + (1−α) g_B), α σ(g_A) +
  (1−α) σ(g_B)) with g each network's own pre-activation; sign agreement P[g_A·g_B ≥ 0].
* Commutativity per Linear/Conv layer whose input is not the model input (Def. 4, Fig. 7):
  Dist_com = dist(W_A H_A + W_B H_B, W_A H_B + W_B H_A), Dist_W = dist(W_A, W_B),
  Dist_H = dist(H_A, H_B), dist(X, Y) = ‖X−Y‖²_F/(‖X‖_F‖Y‖_F), H the layer's input, weights
  without bias; whole tensors over all samples.

The cosine products are expanded so that f_int is never materialised:
⟨f_α, f_int⟩ = α⟨f_α, f_A⟩ + (1−α)⟨f_α, f_B⟩ and
‖f_int‖² = α²‖f_A‖² + (1−α)²‖f_B‖² + 2α(1−α)⟨f_A, f_B⟩.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from llfc.metrics.cosine import coef_from_inner, cos_from_inner, dist_from_sums
from llfc.metrics.lmc import barriers
from llfc.metrics.streaming import RunningMoments, RunningSum
from llfc.probe import FeatureExtractor, Probe

StateDict = dict[str, torch.Tensor]


def _flat64(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).to(torch.float64)


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row inner products of two (B, D) tensors, shape (B,) (one fused kernel, no (B, D)
    temporary)."""
    return torch.linalg.vecdot(a, b)


def _cos(inner, sq_a, sq_b, absolute: bool) -> torch.Tensor:
    c = cos_from_inner(inner, sq_a, sq_b)
    return c.abs() if absolute else c


class _LLFCAcc:
    """Streaming LLFC statistics of one probe over K α values."""

    def __init__(self) -> None:
        self.dist = RunningMoments()   # (B, K) per-sample 1 − cos(f_α, f_int)
        self.coef = RunningMoments()   # (B, K) per-sample s
        self.base = RunningMoments()   # (B,)  per-sample 1 − cos(f_A, f_B)
        self.sums = RunningSum()       # (B, K, 3): ⟨f_α,f_int⟩, ‖f_int‖², ‖f_α‖²
        self.base_sums = RunningSum()  # (B, 3): ⟨f_A,f_B⟩, ‖f_A‖², ‖f_B‖²
        self.dim = 0


class _WAAcc:
    """Streaming weak-additivity statistics of one ReLU probe over K α values."""

    def __init__(self) -> None:
        self.dist = RunningMoments()   # (B, K)
        self.sums = RunningSum()       # (B, K, 3): ⟨u,v⟩, ‖u‖², ‖v‖²
        self.sign = RunningMoments()   # (B,)


class PairMeter:
    """Streaming LMC / LLFC / conditions meter for one pair (torchmetrics-style update/compute).

    Args:
        extractor: a :class:`~llfc.probe.FeatureExtractor` for the architecture.
        sd_a, sd_b: the endpoints θ_A, θ_B (same keys/shapes; see
            :func:`llfc.interpolate.check_compatible`).
        alphas: the α grid (α weights A); must contain 0 and 1.
        states: θ_α for every α (default: plain interpolation); at α = 1 / 0 pass ``sd_a`` /
            ``sd_b`` themselves to reuse the endpoints' features.
        llfc: measure LLFC distances (else LMC only, e.g. on the train subset).
        conditions: measure weak additivity and commutativity.
        absolute: use the official code's 1 − |cos| instead of the signed 1 − cos.

    ``update(x, y)`` takes a batch (x: (B, ...) float32 inputs, y: (B,) int64 labels);
    ``compute()`` returns the results dict documented in docs/results.md (the ``measure`` part).
    """

    def __init__(self, extractor: FeatureExtractor, sd_a: StateDict, sd_b: StateDict,
                 alphas: Sequence[float], states: Sequence[StateDict] | None = None, *,
                 llfc: bool = True, conditions: bool = True, absolute: bool = False):
        from llfc.interpolate import path_states

        self.fx = extractor
        self.alphas = [float(a) for a in alphas]
        if 0.0 not in self.alphas or 1.0 not in self.alphas:
            raise ValueError("the α grid must contain 0 and 1")
        self.sd_a, self.sd_b = sd_a, sd_b
        self.states = list(states) if states is not None else path_states(
            nn.Module(), sd_a, sd_b, self.alphas)
        self.llfc, self.conditions, self.absolute = llfc, conditions, absolute
        self.logits = next(p for p in extractor.probes if p.kind == "logits")
        self.llfc_probes = [p for p in extractor.probes] if llfc else []
        self.wa_probes = [p for p in extractor.probes if p.is_relu and p.input_node] if conditions else []
        self.com_probes = [p for p in extractor.probes if self._commutable(p)] if conditions else []
        K = len(self.alphas)
        self._alpha_t = torch.tensor(self.alphas, dtype=torch.float64)
        self.n = 0
        self.loss = torch.zeros(K, dtype=torch.float64)
        self.wrong = torch.zeros(K, dtype=torch.float64)
        self.acc = {p.name: _LLFCAcc() for p in self.llfc_probes}
        self.wa = {p.name: _WAAcc() for p in self.wa_probes}
        self.com = {p.name: torch.zeros(6, dtype=torch.float64) for p in self.com_probes}
        self._fa = self._fb = self._cache = None  # per-batch state of update()

    def _commutable(self, p: Probe) -> bool:
        if p.kind not in ("pre", "logits") or p.module is None or p.input_node is None or p.from_input:
            return False
        return isinstance(self.fx.module(p.module), (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))

    # ---------------------------------------------------------------- per batch
    @torch.no_grad()
    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Fold in one batch: x (B, ...) inputs, y (B,) integer labels."""
        fa = self.fx(self.sd_a, x)
        fb = self.fx(self.sd_b, x)
        feats = []
        for s in self.states:
            feats.append(fa if s is self.sd_a else fb if s is self.sd_b else self.fx(s, x))
        self.n += x.shape[0]
        for k, f in enumerate(feats):
            logits = f[self.logits.node].to(torch.float64)
            self.loss[k] += F.cross_entropy(logits, y, reduction="sum")
            self.wrong[k] += (logits.argmax(1) != y).sum()
        self._fa, self._fb, self._cache = fa, fb, {}
        try:
            for p in self.llfc_probes:
                self._update_llfc(p, feats)
            for p in self.wa_probes:
                self._update_wa(p)
            for p in self.com_probes:
                self._update_com(p)
        finally:
            self._fa = self._fb = self._cache = None

    def _a64(self, node: str) -> torch.Tensor:
        """A's feature map at ``node`` as (B, D) float64, converted once per batch."""
        key = ("A", node)
        if key not in self._cache:
            self._cache[key] = _flat64(self._fa[node])
        return self._cache[key]

    def _b64(self, node: str) -> torch.Tensor:
        key = ("B", node)
        if key not in self._cache:
            self._cache[key] = _flat64(self._fb[node])
        return self._cache[key]

    def _endpoint_stats(self, node: str):
        """(‖f_A‖², ‖f_B‖², ⟨f_A, f_B⟩) per sample at ``node``, computed once per batch."""
        key = ("stats", node)
        if key not in self._cache:
            A, Bm = self._a64(node), self._b64(node)
            self._cache[key] = (_rowdot(A, A), _rowdot(Bm, Bm), _rowdot(A, Bm))
        return self._cache[key]

    def _update_llfc(self, p: Probe, feats) -> None:
        acc = self.acc[p.name]
        A, Bm = self._a64(p.node), self._b64(p.node)
        sqa, sqb, ab = self._endpoint_stats(p.node)
        acc.dim = A.shape[1]
        al = self._alpha_t
        rows = []
        for f in feats:
            if f is self._fa:
                ia, ib, sq = sqa, ab, sqa
            elif f is self._fb:
                ia, ib, sq = ab, sqb, sqb
            else:
                X = _flat64(f[p.node])
                ia, ib, sq = _rowdot(X, A), _rowdot(X, Bm), _rowdot(X, X)
            rows.append(torch.stack([ia, ib, sq], 1))
        R = torch.stack(rows, 1)                          # (B, K, 3)
        inner = al * R[..., 0] + (1 - al) * R[..., 1]
        sq_int = al**2 * sqa[:, None] + (1 - al) ** 2 * sqb[:, None] + 2 * al * (1 - al) * ab[:, None]
        sq_al = R[..., 2]
        acc.dist.update(1.0 - _cos(inner, sq_al, sq_int, self.absolute))
        acc.coef.update(coef_from_inner(inner, sq_int, sq_al))
        acc.sums.update(torch.stack([inner, sq_int, sq_al], 2))
        acc.base.update(1.0 - _cos(ab, sqa, sqb, self.absolute))
        acc.base_sums.update(torch.stack([ab, sqa, sqb], 1))

    def _update_wa(self, p: Probe) -> None:
        acc = self.wa[p.name]
        gA, gB = self._a64(p.input_node), self._b64(p.input_node)
        rA, rB = self._a64(p.node), self._b64(p.node)
        sqa, sqb, ab = self._endpoint_stats(p.node)
        al = self._alpha_t
        rows = []
        for a in self.alphas:
            if a == 1.0:    # u = σ(g_A) = v exactly
                rows.append(torch.stack([sqa, sqa], 1))
            elif a == 0.0:
                rows.append(torch.stack([sqb, sqb], 1))
            else:
                u = torch.relu(torch.lerp(gB, gA, a))
                rows.append(torch.stack([a * _rowdot(u, rA) + (1 - a) * _rowdot(u, rB), _rowdot(u, u)], 1))
        R = torch.stack(rows, 1)                          # (B, K, 2): ⟨u, v⟩, ‖u‖²
        sq_v = al**2 * sqa[:, None] + (1 - al) ** 2 * sqb[:, None] + 2 * al * (1 - al) * ab[:, None]
        acc.dist.update(1.0 - _cos(R[..., 0], R[..., 1], sq_v, self.absolute))
        acc.sums.update(torch.stack([R[..., 0], R[..., 1], sq_v], 2))
        acc.sign.update(((gA * gB) >= 0).to(torch.float64).mean(1))

    def _update_com(self, p: Probe) -> None:
        mod = self.fx.module(p.module)
        fa, fb = self._fa, self._fb
        wa, wb = self.sd_a[p.module + ".weight"], self.sd_b[p.module + ".weight"]
        HA, HB = fa[p.input_node], fb[p.input_node]

        def no_bias(out, sd):
            b = sd.get(p.module + ".bias")
            if b is None:
                return out
            return out - (b if isinstance(mod, nn.Linear) else b.view(1, -1, *([1] * (out.ndim - 2))))

        def apply(w, h):  # the layer with weight w and no bias, on input h
            params = {"weight": w}
            if getattr(mod, "bias", None) is not None:
                params["bias"] = torch.zeros_like(mod.bias)
            return functional_call(mod, params, (h,))

        left = (no_bias(fa[p.node], self.sd_a) + no_bias(fb[p.node], self.sd_b)).reshape(-1).double()
        right = (apply(wa, HB) + apply(wb, HA)).reshape(-1).double()
        d = left - right
        ha, hb = self._a64(p.input_node).reshape(-1), self._b64(p.input_node).reshape(-1)
        dh = ha - hb
        self.com[p.name] += torch.stack([
            torch.dot(d, d), torch.dot(left, left), torch.dot(right, right),
            torch.dot(dh, dh), torch.dot(ha, ha), torch.dot(hb, hb),
        ])

    # ---------------------------------------------------------------- results
    def compute(self) -> dict:
        """The measurements as plain Python floats/lists (JSON-ready); see docs/results.md."""
        if self.n == 0:
            raise RuntimeError("PairMeter.compute() before any update()")
        K = len(self.alphas)
        loss = (self.loss / self.n).tolist()
        err = (self.wrong / self.n).tolist()
        out: dict = {
            "alphas": self.alphas,
            "n_samples": self.n,
            "lmc": {"loss": loss, "error": err, "barriers": barriers(self.alphas, loss, err)},
        }
        if self.llfc:
            layers = []
            for p in self.llfc_probes:
                acc = self.acc[p.name]
                dm, ds = acc.dist.compute()
                cm, cs = acc.coef.compute()
                bm, bs = acc.base.compute()
                S = acc.sums.compute()                   # (K, 3)
                bS = acc.base_sums.compute()
                whole = 1.0 - _cos(S[:, 0], S[:, 2], S[:, 1], self.absolute)
                coef_whole = coef_from_inner(S[:, 0], S[:, 1], S[:, 2])
                layers.append({
                    "name": p.name, "kind": p.kind, "op": p.op, "dim": acc.dim,
                    "baseline": {"mean": float(bm), "std": float(bs),
                                 "whole": float(1.0 - _cos(bS[0], bS[1], bS[2], self.absolute))},
                    "distance": {"mean": dm.tolist(), "std": ds.tolist(), "whole": whole.tolist()},
                    "coef": {"mean": cm.tolist(), "std": cs.tolist(), "whole": coef_whole.tolist()},
                    "c_whole": [1.0 / v if v != 0 else float("inf") for v in coef_whole.tolist()],
                })
            out["llfc"] = layers
        if self.conditions:
            wa = []
            for p in self.wa_probes:
                acc = self.wa[p.name]
                dm, ds = acc.dist.compute()
                S = acc.sums.compute()
                sm, ss = acc.sign.compute()
                wa.append({
                    "name": p.name, "pre_activation": p.input_node,
                    "sign_agreement": {"mean": float(sm), "std": float(ss)},
                    "distance": {"mean": dm.tolist(), "std": ds.tolist(),
                                 "whole": (1.0 - _cos(S[:, 0], S[:, 1], S[:, 2], self.absolute)).tolist()},
                })
            out["weak_additivity"] = wa
            com = []
            for p in self.com_probes:
                s = self.com[p.name]
                wa_, wb_ = self.sd_a[p.module + ".weight"], self.sd_b[p.module + ".weight"]
                com.append({
                    "name": p.name, "module": p.module,
                    "dist_com": float(dist_from_sums(s[0], s[1], s[2])),
                    "dist_W": float(dist_from_sums(((wa_.double() - wb_.double()) ** 2).sum(),
                                                   (wa_.double() ** 2).sum(), (wb_.double() ** 2).sum())),
                    "dist_H": float(dist_from_sums(s[3], s[4], s[5])),
                })
            out["commutativity"] = com
        assert len(out["lmc"]["loss"]) == K
        return out


def measure_pair(model: nn.Module, sd_a: StateDict, sd_b: StateDict,
                 batches: Iterable[tuple[torch.Tensor, torch.Tensor]], alphas: Sequence[float], *,
                 states: Sequence[StateDict] | None = None, kinds: Sequence[str] | None = None,
                 names: Sequence[str] | None = None, llfc: bool = True, conditions: bool = True,
                 absolute: bool = False, device: str | torch.device = "cpu",
                 progress: bool = False, desc: str = "measure") -> dict:
    """Measure LMC, LLFC and the LLFC conditions of (θ_A, θ_B) in one streaming pass.

    Args:
        model: the architecture (any fx-traceable module; weights are taken from the state dicts).
        sd_a, sd_b: endpoint state dicts (α = 1 is A, α = 0 is B).
        batches: iterable of (x, y) batches, e.g. a DataLoader over the test set.
        alphas: α grid containing 0 and 1.
        states: optional θ_α state dicts (e.g. after a BatchNorm reset), one per α.
        kinds, names: probe selection (see :mod:`llfc.probe`).
        llfc, conditions, absolute: see :class:`PairMeter`.
        device: where to compute.
        progress: show a tqdm progress bar.

    Returns:
        the dict of :meth:`PairMeter.compute`.
    """
    from tqdm.auto import tqdm

    extractor = FeatureExtractor(model, kinds=kinds, names=names)
    dev = torch.device(device)
    move = (lambda sd: {k: v.to(dev) for k, v in sd.items()}) if dev.type != "cpu" else (lambda sd: sd)
    sa, sb = move(sd_a), move(sd_b)
    if states is not None:
        states = [sa if s is sd_a else sb if s is sd_b else move(s) for s in states]
    meter = PairMeter(extractor, sa, sb, alphas, states, llfc=llfc, conditions=conditions,
                      absolute=absolute)
    for x, y in tqdm(batches, desc=desc, disable=not progress, leave=False):
        meter.update(x.to(dev), y.to(dev))
    return meter.compute()

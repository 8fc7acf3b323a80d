"""One streaming pass over the data for every α and every probed layer (docs/architecture.md).

Per batch, the features of θ_A and θ_B are computed once and reused for every α; θ_α costs one
forward pass per interior α (the endpoints reuse A's and B's features), so the time is about
(K + 2) forward passes for K interior α values. Everything is folded into float64 running sums
(:mod:`llfc.metrics.streaming`) and discarded: memory holds the probed feature maps of three
networks (θ_A, θ_B, one θ_α) for one batch, and does not grow with the number of samples or α.

What is measured (α weights A: θ_α = α·θ_A + (1−α)·θ_B):

* LMC: mean cross-entropy loss and error of θ_α (LLFC paper Def. 1; barriers: docs/results.md).
* LLFC per probe and α (paper §3, Def. 2, Figs. 2–4): per-sample d_α = 1 − cos(f_α, f_int) with
  f_int = α f_A + (1−α) f_B (mean, std over samples, and the whole-tensor version); the baseline
  d_AB = 1 − cos(f_A, f_B); the least-squares scale s = ⟨f_α, f_int⟩/‖f_int‖² (per sample and
  whole tensor; official code's ``coef``) and c = 1/s (Def. 2, App. B.2).
* Weak additivity per activation probe and α (Def. 3): 1 − cos(σ(α g_A + (1−α) g_B), α σ(g_A) +
  (1−α) σ(g_B)) with g each network's own pre-activation; sign agreement P[g_A·g_B ≥ 0]. Def. 3
  and Theorem 1 are stated for σ = ReLU; for other elementwise σ (GELU in transformers) the same
  distance is measured, without the theorem's guarantee.
* Commutativity per Linear/Conv layer whose input is not the model input (Def. 4, Fig. 7):
  Dist_com = dist(W_A H_A + W_B H_B, W_A H_B + W_B H_A), Dist_W = dist(W_A, W_B),
  Dist_H = dist(H_A, H_B), dist(X, Y) = ‖X−Y‖²_F/(‖X‖_F‖Y‖_F), H the layer's input, weights
  without bias; whole tensors over all samples.

The cosine products are expanded so that f_int is never materialised:
⟨f_α, f_int⟩ = α⟨f_α, f_A⟩ + (1−α)⟨f_α, f_B⟩ and
‖f_int‖² = α²‖f_A‖² + (1−α)²‖f_B‖² + 2α(1−α)⟨f_A, f_B⟩.
The per-sample norms themselves (‖f_α‖², ‖f_α − f_int‖², the weak-additivity pair, the endpoint
norms) come from :mod:`llfc.metrics.fused`: one read of each feature map per α, float64 sums.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence, cast

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from llfc._malloc import malloc_tuning_available, retain_freed_memory
from llfc.metrics.cosine import coef_from_sq, cosine_distance_from_sq, dist_from_sums
from llfc.metrics.fused import interp_sq, pair_sq, relu_interp_sq, sign_agreement_rows
from llfc.metrics.lmc import as_classification, barriers
from llfc.metrics.streaming import RunningMoments, RunningSum
from llfc.probe import FeatureExtractor, Probe, warn_if_no_hidden_evidence

StateDict = dict[str, torch.Tensor]

#: default working-set budget of one :meth:`PairMeter.update`, bytes (2 GB)
DEFAULT_MEMORY_BUDGET = 2e9
_MMAP_LIMIT = 32 * 2**20  # llfc._malloc's mmap threshold


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


class _Scratch:
    """Reusable work buffers, one per (slot, per-sample shape, dtype, device): the per-α
    differences are written in place instead of allocating (and page-faulting) a fresh tensor
    every time. A smaller batch (the last one, or a micro-batch) gets the leading rows of the
    buffer, which are contiguous."""

    def __init__(self) -> None:
        self._bufs: dict[tuple, torch.Tensor] = {}

    def __call__(self, like: torch.Tensor, slot: int = 0) -> torch.Tensor:
        key = (slot, tuple(like.shape[1:]), like.dtype, like.device)
        buf = self._bufs.get(key)
        if buf is None or buf.shape[0] < like.shape[0]:
            buf = self._bufs[key] = torch.empty_like(like, memory_format=torch.contiguous_format)
        return buf[: like.shape[0]]


def _sq_int(al, sqa, sqb, dab):
    """‖α a + (1−α) b‖² for every α: α²‖a‖² + (1−α)²‖b‖² + α(1−α)(‖a‖² + ‖b‖² − ‖a−b‖²); (B, K)."""
    ab = (sqa + sqb - dab) / 2
    return al**2 * sqa[:, None] + (1 - al) ** 2 * sqb[:, None] + 2 * al * (1 - al) * ab[:, None]


class _LLFCAcc:
    """Streaming LLFC statistics of one probe over K α values."""

    def __init__(self) -> None:
        self.dist = RunningMoments()  # (B, K) per-sample 1 − cos(f_α, f_int)
        self.coef = RunningMoments()  # (B, K) per-sample s
        self.base = RunningMoments()  # (B,)  per-sample 1 − cos(f_A, f_B)
        self.sums = RunningSum()  # (B, K, 3): ‖f_α‖², ‖f_int‖², ‖f_α − f_int‖²
        self.base_sums = RunningSum()  # (B, 3): ‖f_A‖², ‖f_B‖², ‖f_A − f_B‖²
        self.dim = 0


class _WAAcc:
    """Streaming weak-additivity statistics of one ReLU probe over K α values."""

    def __init__(self) -> None:
        self.dist = RunningMoments()  # (B, K)
        self.sums = RunningSum()  # (B, K, 3): ‖u‖², ‖v‖², ‖u − v‖²
        self.sign = RunningMoments()  # (B,)


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
        memory_budget: bytes that the per-batch working set (the probed feature maps of θ_A, θ_B
            and one θ_α, the θ_α forward's temporaries and the work buffers) may use; default
            2 GB. A larger batch is split into equal micro-batches that fit (chosen from the
            feature-map sizes of one sample, see :meth:`micro_batch`); the results are those of
            the whole batch up to float rounding (every statistic is a per-sample value or a
            float64 sum over samples). ``None``: never split. Raises ConfigError (a ValueError)
            when not positive.

    ``update(x, y)`` takes a batch (x: (B, ...) inputs, y: (B,) integer labels, or (B, T) next-token
    targets of a language model whose logits are (B, T, V): loss and error are then per token).
    The networks run in the dtype of the state dicts' floating tensors (a float64 pair is measured
    in float64): floating inputs of another dtype are cast to it, and integer labels of another
    integer dtype (int32, uint8) to int64 (:meth:`update`);
    ``compute()`` returns the results dict documented in docs/results.md (the ``measure`` part).
    ``all_reduce()`` combines the sums of every rank of a torch.distributed group
    (:mod:`llfc.distributed`); every accumulator has a ``merge`` method, the plain sums are named
    in ``sum_fields``.
    """

    #: attributes holding plain per-sample sums (ints, float64 tensors, dicts of them)
    sum_fields = ("n", "n_targets", "loss", "wrong", "com")

    def __init__(
        self,
        extractor: FeatureExtractor,
        sd_a: StateDict,
        sd_b: StateDict,
        alphas: Sequence[float],
        states: Sequence[StateDict] | None = None,
        *,
        llfc: bool = True,
        conditions: bool = True,
        absolute: bool = False,
        memory_budget: float | None = DEFAULT_MEMORY_BUDGET,
    ):
        from llfc.interpolate import floating_dtype, path_states

        self.fx = extractor
        self.alphas = [float(a) for a in alphas]
        if 0.0 not in self.alphas or 1.0 not in self.alphas:
            raise ValueError("the α grid must contain 0 and 1")
        self.sd_a, self.sd_b = sd_a, sd_b
        self.dtype = floating_dtype(sd_a)  # the networks' dtype, that of the floating inputs
        self.states = (
            list(states) if states is not None else path_states(extractor.gm, sd_a, sd_b, self.alphas)
        )  # the real model: its BatchNorm is seen
        self.llfc, self.conditions, self.absolute = llfc, conditions, absolute
        self.logits = next(p for p in extractor.probes if p.kind == "logits")
        self.llfc_probes = [p for p in extractor.probes] if llfc else []
        self.wa_probes = [p for p in extractor.probes if p.kind == "post" and p.input_node] if conditions else []
        self.com_probes = [p for p in extractor.probes if self._commutable(p)] if conditions else []
        K = len(self.alphas)
        self._alpha_t = torch.tensor(self.alphas, dtype=torch.float64)
        self.n = self.n_targets = 0
        dev = next(iter(sd_a.values())).device  # sums stay on the device: no per-batch host sync
        self.loss = torch.zeros(K, dtype=torch.float64, device=dev)
        self.wrong = torch.zeros(K, dtype=torch.float64, device=dev)
        self.acc = {p.name: _LLFCAcc() for p in self.llfc_probes}
        self.wa = {p.name: _WAAcc() for p in self.wa_probes}
        self.com = {p.name: torch.zeros(6, dtype=torch.float64, device=dev) for p in self.com_probes}
        self._fa: dict[str, torch.Tensor] | None = None  # per-batch state of update()
        self._fb: dict[str, torch.Tensor] | None = None
        self._scratch = _Scratch()
        if memory_budget is not None and not memory_budget > 0:
            from llfc.errors import ConfigError

            raise ConfigError(
                f"memory_budget must be a positive number of bytes (e.g. 2e9) or None "
                f"(never split batches), got {memory_budget!r}."
            )
        self.memory_budget = memory_budget
        self._per_sample: dict[tuple, tuple[int, int]] = {}  # input shape -> (bytes, largest map)

    def _commutable(self, p: Probe) -> bool:
        """Linear/Conv module probes whose input is not the model input (Def. 4 needs ℓ ≥ 2)."""
        if p.kind not in ("pre", "logits") or p.module is None or p.input_node is None or p.from_input:
            return False
        return isinstance(self.fx.module(p.module), (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))

    # ---------------------------------------------------------------- per batch
    def micro_batch(self, x: torch.Tensor) -> int:
        """The micro-batch size that :meth:`update` uses for a batch shaped like ``x``.

        From the probed feature maps of one sample (measured once per input shape): per sample
        the working set is taken as 4× their bytes (θ_A, θ_B, one θ_α, and as much again for the
        θ_α forward's temporaries and the work buffers), and the micro-batch is the largest that
        fits ``memory_budget``. Where llfc tunes malloc (:mod:`llfc._malloc`), it is also capped
        so that the largest single map stays below malloc's 32 MiB mmap threshold (larger blocks
        would be returned to the kernel on every free). Never below 1: if one sample does not
        fit the budget, it runs one sample at a time (over budget).
        """
        B = x.shape[0]
        if self.memory_budget is None or B <= 1:
            return max(B, 1)
        key = (tuple(x.shape[1:]), x.dtype, x.device)
        if key not in self._per_sample:
            with torch.no_grad():
                f = self.fx(self.sd_a, x[:1])
            sizes = [t.numel() * t.element_size() for t in f.values()]
            self._per_sample[key] = (sum(sizes), max(sizes))
            del f
        per, largest = self._per_sample[key]
        m = int(self.memory_budget // max(4 * per, 1))
        if malloc_tuning_available() and x.device.type == "cpu":
            m = min(m, (_MMAP_LIMIT - 4096) // max(largest, 1))
        m = max(1, min(B, m))
        n = -(-B // m)  # chunks
        return -(-B // n)  # equal sizes

    @torch.no_grad()
    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Fold in one batch: x (B, ...) inputs, y (B,) integer labels (or (B, T) token targets).

        Floating ``x`` is cast to the state dicts' floating dtype (:attr:`dtype`; e.g. float64
        images for a float32 pair), integer ``y`` to int64. An empty batch (B = 0) adds nothing.

        Raises:
            ConfigError: ``x`` or ``y`` is not a tensor, or ``y`` is not integer (class indices).

        Memory: the feature maps of θ_A, θ_B and *one* θ_α at a time, plus one work buffer per
        feature-map shape; the per-α results are (B,)-vectors. Small per-batch sums (loss, errors,
        commutativity) and everything else are accumulated on the features' device. A batch
        whose working set exceeds ``memory_budget`` is folded in micro-batches
        (:meth:`micro_batch`).
        """
        from llfc.errors import ConfigError
        from llfc.interpolate import as_input

        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise ConfigError(
                f"update(x, y) takes two tensors, inputs x (B, ...) and labels y (B,); got "
                f"{type(x).__name__} and {type(y).__name__}."
            )
        if y.is_floating_point() or y.is_complex():
            raise ConfigError(
                f"the labels y are {y.dtype}; llfc measures the cross-entropy and error against "
                "integer class indices (B,) (or token ids (B, T)): pass y.long() if they are whole "
                "numbers, or the class indices (y.argmax(1)) if they are one-hot / probabilities."
            )
        if x.ndim > 0 and x.shape[0] == 0:  # no samples: nothing to add (and (0, ...) feature maps do not flatten)
            return
        x, y = as_input(x, self.dtype), y.long()
        m = self.micro_batch(x)
        if m >= x.shape[0]:
            self._update(x, y)
        else:
            for i in range(0, x.shape[0], m):
                self._update(x[i : i + m], y[i : i + m])

    def _update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        fa = self.fx(self.sd_a, x)
        fb = self.fx(self.sd_b, x)
        self.n += x.shape[0]
        self.n_targets += y.numel()  # N samples, or N·T tokens of a language model
        self._fa, self._fb = fa, fb
        try:
            stats = {p.node: self._endpoint_stats(p.node) for p in self.llfc_probes}
            rows: dict[str, list[torch.Tensor]] = {p.name: [] for p in self.llfc_probes}
            for k, s in enumerate(self.states):
                f = fa if s is self.sd_a else fb if s is self.sd_b else self.fx(s, x)
                logits, t = as_classification(f[self.logits.node].to(torch.float64), y)
                self.loss[k] += F.cross_entropy(logits, t, reduction="sum")
                self.wrong[k] += (logits.argmax(1) != t).sum()
                for p in self.llfc_probes:
                    rows[p.name].append(self._llfc_row(p, f, stats[p.node], self.alphas[k]))
                del f
            for p in self.llfc_probes:
                self._fold_llfc(p, torch.stack(rows.pop(p.name), 1), stats[p.node])
            for p in self.wa_probes:
                self._update_wa(p, stats.get(p.node))
            for p in self.com_probes:
                self._update_com(p)
        finally:
            self._fa = self._fb = None

    def _endpoint_stats(self, node: str):
        """(‖f_A‖², ‖f_B‖², ‖f_A − f_B‖²) per sample at ``node``, float64 (B,) each."""
        assert self._fa is not None and self._fb is not None  # inside _update()
        A, Bm = _flat(self._fa[node]), _flat(self._fb[node])
        return pair_sq(A, Bm, work=self._scratch(A)).unbind(1)

    def _llfc_row(self, p: Probe, f, stats, a: float) -> torch.Tensor:
        """(B, 2): ‖f_α‖², ‖f_α − f_int‖² for one α (f_int = α f_A + (1−α) f_B)."""
        sqa, sqb, _ = stats
        if f is self._fa:
            return torch.stack([sqa, torch.zeros_like(sqa)], 1)
        if f is self._fb:
            return torch.stack([sqb, torch.zeros_like(sqb)], 1)
        assert self._fa is not None and self._fb is not None  # inside _update()
        X = _flat(f[p.node])
        return interp_sq(X, _flat(self._fa[p.node]), _flat(self._fb[p.node]), a, work=self._scratch(X))

    def _fold_llfc(self, p: Probe, R: torch.Tensor, stats) -> None:
        """Fold the (B, K, 2) rows of one probe into its accumulators."""
        acc = self.acc[p.name]
        sqa, sqb, dab = stats
        assert self._fa is not None and self._fb is not None  # inside _update()
        acc.dim = self._fa[p.node][0].numel()
        sq_x, sq_d = R[..., 0], R[..., 1]
        sq_f = _sq_int(self._alpha_t.to(R.device), sqa, sqb, dab)
        acc.dist.update(cosine_distance_from_sq(sq_x, sq_f, sq_d, absolute=self.absolute))
        acc.coef.update(coef_from_sq(sq_x, sq_f, sq_d))
        acc.sums.update(torch.stack([sq_x, sq_f, sq_d], 2))
        acc.base.update(cosine_distance_from_sq(sqa, sqb, dab, absolute=self.absolute))
        acc.base_sums.update(torch.stack([sqa, sqb, dab], 1))

    def _update_wa(self, p: Probe, stats=None) -> None:
        acc = self.wa[p.name]
        assert self._fa is not None and self._fb is not None  # inside _update()
        assert p.input_node is not None  # wa probes have an input node
        gA, gB = _flat(self._fa[p.input_node]), _flat(self._fb[p.input_node])
        rA, rB = _flat(self._fa[p.node]), _flat(self._fb[p.node])
        sqa, sqb, dab = stats if stats is not None else self._endpoint_stats(p.node)
        act = None if p.is_relu else self._activation(p)
        work = (self._scratch(gA, 0), self._scratch(rA, 1))  # the torch path's buffers
        rows = []
        for a in self.alphas:
            if a == 1.0:  # u = σ(g_A) = v exactly
                rows.append(torch.stack([sqa, torch.zeros_like(sqa)], 1))
            elif a == 0.0:
                rows.append(torch.stack([sqb, torch.zeros_like(sqb)], 1))
            else:
                rows.append(relu_interp_sq(gA, gB, rA, rB, a, activation=act, work=work))
        R = torch.stack(rows, 1)  # (B, K, 2): ‖u‖², ‖u − v‖²
        sq_v = _sq_int(self._alpha_t.to(R.device), sqa, sqb, dab)
        acc.dist.update(cosine_distance_from_sq(R[..., 0], sq_v, R[..., 1], absolute=self.absolute))
        acc.sums.update(torch.stack([R[..., 0], sq_v, R[..., 1]], 2))
        acc.sign.update(sign_agreement_rows(gA, gB, work=self._scratch(gA, 0)))  # P[g_A·g_B ≥ 0]

    def _activation(self, p: Probe):
        """σ of a non-ReLU ``post`` probe as a function (the traced module, or the traced call with
        its constant arguments), applied to the interpolated pre-activation in weak additivity."""
        if p.module is not None:
            return self.fx.module(p.module)
        node = next(n for n in self.fx.gm.graph.nodes if n.name == p.node)
        if node.op == "call_method":
            return lambda t: getattr(t, node.target)(*node.args[1:], **node.kwargs)
        return lambda t: node.target(t, *node.args[1:], **node.kwargs)

    def _update_com(self, p: Probe) -> None:
        assert p.module is not None  # com probes are _commutable()
        mod = self.fx.module(p.module)
        assert self._fa is not None and self._fb is not None  # inside _update()
        fa, fb = self._fa, self._fb
        wa, wb = self.sd_a[p.module + ".weight"], self.sd_b[p.module + ".weight"]
        assert p.input_node is not None  # com probes are _commutable()
        HA, HB = fa[p.input_node], fb[p.input_node]

        def no_bias(out, sd):
            b = sd.get(p.module + ".bias")
            if b is None:
                return out
            return out - (b if isinstance(mod, nn.Linear) else b.view(1, -1, *([1] * (out.ndim - 2))))

        def apply(w, h):  # the layer with weight w and no bias, on input h
            params = {"weight": w}
            if getattr(mod, "bias", None) is not None:
                params["bias"] = w.new_zeros(w.shape[0])  # the state dict's dtype and device
            return functional_call(mod, params, (h,))

        left = _flat(no_bias(fa[p.node], self.sd_a) + no_bias(fb[p.node], self.sd_b))  # new tensor
        right = _flat(apply(wa, HB) + apply(wb, HA))
        sq_left, sq_right, sq_com = pair_sq(left, right).sum(0)
        ha, hb = _flat(HA), _flat(HB)
        sq_ha, sq_hb, sq_h = pair_sq(ha, hb, work=self._scratch(ha)).sum(0)
        self.com[p.name] += torch.stack([sq_com, sq_left, sq_right, sq_h, sq_ha, sq_hb])

    def all_reduce(self) -> None:
        """Combine the accumulators of all ranks (:func:`llfc.distributed.reduce_accumulators`):
        afterwards every rank holds the sums over the union of the ranks' batches."""
        from llfc.distributed import Max, reduce_accumulators

        reduce_accumulators(self, self.sum_fields)
        dims = [Max(acc.dim) for acc in self.acc.values()]  # a rank without batches saw no shape
        reduce_accumulators(dims, modules=())
        for acc, d in zip(self.acc.values(), dims):
            acc.dim = d.total

    # ---------------------------------------------------------------- results
    def compute(self) -> dict:
        """The measurements as plain Python floats/lists (JSON-ready); see docs/results.md."""
        if self.n == 0:
            raise RuntimeError("PairMeter.compute() before any update()")
        K = len(self.alphas)
        loss = (self.loss / self.n_targets).tolist()
        err = (self.wrong / self.n_targets).tolist()
        out: dict = {
            "alphas": self.alphas,
            "n_samples": self.n,
            "lmc": {"loss": loss, "error": err, "barriers": barriers(self.alphas, loss, err)},
        }
        acc: _LLFCAcc | _WAAcc  # one name for both accumulator kinds below
        if self.llfc:
            layers = []
            for p in self.llfc_probes:
                acc = self.acc[p.name]
                dm, ds = acc.dist.compute()
                cm, cs = acc.coef.compute()
                bm, bs = acc.base.compute()
                S = acc.sums.compute()  # (K, 3)
                bS = acc.base_sums.compute()
                whole = cosine_distance_from_sq(S[:, 0], S[:, 1], S[:, 2], absolute=self.absolute)
                coef_whole = coef_from_sq(S[:, 0], S[:, 1], S[:, 2])
                layers.append(
                    {
                        "name": p.name,
                        "kind": p.kind,
                        "op": p.op,
                        "dim": acc.dim,
                        "baseline": {
                            "mean": float(bm),
                            "std": float(bs),
                            "whole": float(cosine_distance_from_sq(bS[0], bS[1], bS[2], absolute=self.absolute)),
                        },
                        "distance": {"mean": dm.tolist(), "std": ds.tolist(), "whole": whole.tolist()},
                        "coef": {"mean": cm.tolist(), "std": cs.tolist(), "whole": coef_whole.tolist()},
                        "c_whole": [1.0 / v if v != 0 else None for v in coef_whole.tolist()],  # None: s = 0
                    }
                )
            out["llfc"] = layers
        if self.conditions:
            wa = []
            probe_name = {q.node: q.name for q in self.fx.all_probes}  # fx node → name (layers_0 → layers.0)
            for p in self.wa_probes:
                assert p.input_node is not None  # wa probes have an input node
                acc = self.wa[p.name]
                dm, ds = acc.dist.compute()
                S = acc.sums.compute()
                sm, ss = acc.sign.compute()
                wa.append(
                    {
                        "name": p.name,
                        "pre_activation": probe_name.get(p.input_node, p.input_node),
                        "activation": p.op,
                        "sign_agreement": {"mean": float(sm), "std": float(ss)},
                        "distance": {
                            "mean": dm.tolist(),
                            "std": ds.tolist(),
                            "whole": cosine_distance_from_sq(
                                S[:, 0], S[:, 1], S[:, 2], absolute=self.absolute
                            ).tolist(),
                        },
                    }
                )
            out["weak_additivity"] = wa
            com = []
            for p in self.com_probes:
                s = self.com[p.name]
                assert p.module is not None  # com probes are _commutable()
                wa_, wb_ = self.sd_a[p.module + ".weight"], self.sd_b[p.module + ".weight"]
                sq_wa, sq_wb, sq_dw = pair_sq(wa_.reshape(1, -1), wb_.reshape(1, -1))[0]
                com.append(
                    {
                        "name": p.name,
                        "module": p.module,
                        "dist_com": float(dist_from_sums(s[0], s[1], s[2])),
                        "dist_W": float(dist_from_sums(sq_dw, sq_wa, sq_wb)),
                        "dist_H": float(dist_from_sums(s[3], s[4], s[5])),
                    }
                )
            out["commutativity"] = com
        assert len(out["lmc"]["loss"]) == K
        return out


class TokenRows:
    """A feature extractor whose (B, T, D) outputs are returned as (B·T, D) token rows.

    With it, every per-sample statistic of :class:`PairMeter` becomes a per-token one: the
    per-token cosine distance averaged over all B·T tokens (``measure.per_token``), instead of the
    paper's per-sample cosine of the flattened T·D vector (§3). Whole-tensor distances and
    commutativity are the same either way; features of any other rank pass unchanged.
    """

    def __init__(self, extractor: FeatureExtractor):
        self._fx = extractor

    def __getattr__(self, name):
        return getattr(self._fx, name)

    def __call__(self, state_dict: StateDict, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self._fx(state_dict, x)
        return {k: v.reshape(-1, v.shape[-1]) if v.ndim == 3 else v for k, v in out.items()}


def _labelled(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The (x, y) of one batch of :func:`measure_pair`'s ``batches``.

    Raises:
        ConfigError: the batch is not a pair of tensors (a dict, a bare tensor, (x,), (x, y, extra));
            the message names what it is and how to adapt the loader.
    """
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and all(isinstance(t, torch.Tensor) for t in batch):
        return batch[0], batch[1]
    from llfc.errors import ConfigError

    no_labels = "the loss and error need labels: give the loader a dataset of (x, y), e.g. TensorDataset(x, y)"
    if isinstance(batch, dict):
        what = f"a dict with keys {sorted(map(str, batch))}"
        fix = 'for dict batches, batches=((b["x"], b["y"]) for b in loader) with your keys'
    elif isinstance(batch, (tuple, list)):
        what = f"a {type(batch).__name__} of {len(batch)} ({', '.join(type(t).__name__ for t in batch)})"
        fix = "for extra items, batches=((b[0], b[1]) for b in loader)" if len(batch) > 2 else no_labels
    elif isinstance(batch, torch.Tensor):
        what, fix = f"a bare tensor of shape {tuple(batch.shape)}", no_labels
    else:
        what, fix = f"a {type(batch).__name__}", no_labels
    raise ConfigError(
        f"measure_pair: batches must yield (inputs, labels) pairs of tensors, x (B, ...) and y (B,) "
        f"integer labels, but it yielded {what}. Adapt the loader: {fix}."
    )


def measure_pair(
    model: nn.Module,
    sd_a: StateDict,
    sd_b: StateDict,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    alphas: Sequence[float],
    *,
    states: Sequence[StateDict] | None = None,
    kinds: Sequence[str] | None = None,
    names: Sequence[str] | None = None,
    llfc: bool = True,
    conditions: bool = True,
    absolute: bool = False,
    per_token: bool = False,
    allow_extrapolation: bool = False,
    device: str | torch.device = "cpu",
    progress: bool = False,
    desc: str = "measure",
    bn_mode: str = "interpolate",
    bn_batches: torch.Tensor | Iterable[Any] | None = None,
    sharded: bool = False,
    memory_budget: float | None = DEFAULT_MEMORY_BUDGET,
) -> dict:
    """Measure LMC, LLFC and the LLFC conditions of (θ_A, θ_B) in one streaming pass.

    Args:
        model: the architecture (any fx-traceable module; weights, and so the dtype, are taken
            from the state dicts).
        sd_a, sd_b: endpoint state dicts (α = 1 is A, α = 0 is B).
        batches: iterable of (x, y) batches (tuples or lists of two tensors: x (B, ...) inputs,
            y (B,) integer labels or (B, T) token targets), e.g. a DataLoader over the test set.
            The pair runs in the dtype of the state dicts (a float64 pair is measured in float64),
            whatever ``model``'s own dtype: floating x of another dtype is cast to it, integer y to
            int64 (:class:`PairMeter`).
        alphas: α grid (α weights A); 0, 0.25, 0.5, 0.75 and 1 are added when missing; values
            outside [0, 1] need ``allow_extrapolation=True``.
        states: optional θ_α state dicts (e.g. after a BatchNorm reset), one per α; when given,
            ``bn_mode`` / ``bn_batches`` are not used.
        kinds, names: probe selection (see :mod:`llfc.probe`).
        llfc, conditions, absolute: see :class:`PairMeter`.
        per_token: for (B, T, D) features (transformers), per-token cosine distances averaged
            over tokens (:class:`TokenRows`) instead of the per-sample cosine of the flattened
            T·D vector (the paper's convention, default).
        device: where to compute.
        progress: show a tqdm progress bar.
        bn_mode: BatchNorm running statistics along the path, as ``llfc run --bn-mode``:
            ``"interpolate"`` (the official LLFC code; warns once when the model has BatchNorm) or
            ``"reset"`` (recomputed on ``bn_batches`` for every interior α, REPAIR-style; the
            endpoints α = 0, 1 are the trained networks and keep their trained statistics, so the
            barriers compare reset interior networks against the trained endpoints; see
            :func:`llfc.interpolate.path_states`).
        bn_batches: training data for ``bn_mode="reset"``: one input tensor (N, ...), or a list or
            DataLoader of input tensors (N_i, ...) or of (x, y) / (x,) tuples or lists (the x is
            used; :func:`llfc.interpolate.bn_inputs`).
        sharded: ``batches`` is this rank's shard of the data (:func:`llfc.distributed.shard_dataset`);
            the sums of all ranks are combined once, after the pass (:meth:`PairMeter.all_reduce`),
            so every rank returns the result of the whole data set.
        memory_budget: bytes for one batch's working set (default 2 GB); larger batches are
            measured in micro-batches, with the same results (see :class:`PairMeter`).

    Returns:
        the dict of :meth:`PairMeter.compute`: ``alphas``, ``n_samples``, ``lmc`` (loss, error,
        barriers), ``llfc`` (per probe), ``weak_additivity`` and ``commutativity`` (docs/results.md).

    Warns:
        UserWarning: with ``llfc``, when no measured hidden probe can show whether LLFC holds (none, or only
            layers applied to the model input; :func:`llfc.probe.warn_if_no_hidden_evidence`).

    Raises:
        IncompatibleModelsError: the state dicts differ in keys, shapes or dtypes.
        NonFiniteWeightsError: NaN/Inf in either state dict.
        ConfigError: an α outside [0, 1] without ``allow_extrapolation``; no batch in ``batches``;
            an unknown ``bn_mode``, or ``"reset"`` without ``bn_batches`` or with ``bn_batches`` in
            none of the accepted forms; a batch of ``batches`` that is not an (x, y) pair of tensors,
            or floating labels y (checked before it is measured).
    """
    from tqdm.auto import tqdm

    from llfc.checkpoint import check_finite
    from llfc.errors import ConfigError
    from llfc.interpolate import check_alphas, check_compatible, path_states

    check_compatible(sd_a, sd_b)
    check_finite(sd_a, "model A")
    check_finite(sd_b, "model B")
    if states is None:
        alphas = check_alphas(alphas, allow_extrapolation)
    elif any(not 0 <= a <= 1 for a in alphas) and not allow_extrapolation:
        check_alphas(alphas, allow_extrapolation)  # raises the standard message
    if states is None:  # the real model, so that BatchNorm is seen (warning or reset)
        states = path_states(model, sd_a, sd_b, alphas, bn_mode, bn_batches, device)

    if not llfc and not conditions:  # LMC only: evaluate the logits and nothing else
        kinds, names = ["logits"], None
    extractor = FeatureExtractor(model, kinds=kinds, names=names)
    if llfc:
        warn_if_no_hidden_evidence(extractor.probes)
    if per_token:
        extractor = cast(FeatureExtractor, TokenRows(extractor))  # duck-typed via __getattr__
    dev = torch.device(device)
    move = (lambda sd: {k: v.to(dev) for k, v in sd.items()}) if dev.type != "cpu" else (lambda sd: sd)
    sa, sb = move(sd_a), move(sd_b)
    if states is not None:
        states = [sa if s is sd_a else sb if s is sd_b else move(s) for s in states]
    meter = PairMeter(
        extractor,
        sa,
        sb,
        alphas,
        states,
        llfc=llfc,
        conditions=conditions,
        absolute=absolute,
        memory_budget=memory_budget,
    )
    with retain_freed_memory():  # no fresh kernel pages per batch (llfc._malloc)
        for batch in tqdm(batches, desc=desc, disable=None if progress else True, leave=False):
            x, y = _labelled(batch)
            meter.update(x.to(dev), y.to(dev))
    if sharded:
        meter.all_reduce()
    if meter.n == 0:
        raise ConfigError("measure_pair: the data yielded no batch; pass a non-empty loader.")
    return meter.compute()

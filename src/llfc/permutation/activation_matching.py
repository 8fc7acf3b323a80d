"""Activation matching (Git Re-Basin, Ainsworth et al. 2023, §3.1; LLFC paper §5.2, second factor of Eq. 9).

For every permutation group g, with a_x ∈ R^n and b_x ∈ R^n the features of A and B at the group's
node (the post-activation output; for convolutional maps every spatial position is one sample),

    C_g[i, j] = E_x[ a_x[i] · b_x[j] ]              (default, Git Re-Basin's choice)
    C_g[i, j] = corr(a[i], b[j])                     (``correlation=True``: Pearson)

and perms[g] = argmax_P Σ_i C_g[i, P(i)], one ``scipy.optimize.linear_sum_assignment(maximize=True)``
per group. Groups are matched independently (the permutations of earlier groups do not enter).

Attention heads (``spec.heads``) are matched as units, as in weight matching: with C the
cross-moment of all H·d_h units of a role (QK: the query and key projections' outputs; OV: the value
projection's output and the attention output before W_o, pooled as samples), the gain of sending
head j of B to head i of A is Σ_role max_π Σ_a C[(i, a), (j, π(a))], one d_h×d_h assignment per pair
and role; one assignment over heads follows, then the within-head permutations of the chosen pairs
(Theus et al., "Generalized LMC for Transformers", NeurIPS 2025, §3).

The moments are accumulated in one streaming pass in float64 with Chan et al.'s pairwise update of
means and centred co-moments, so memory is O(n²) per group, independent of the number of samples.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np
import torch
import torch.nn as nn
from scipy.optimize import linear_sum_assignment

from llfc.errors import ConfigError
from llfc.permutation.spec import NodeRef, PermutationSpec, trace
from llfc.permutation.weight_matching import moved_fraction

__all__ = ["CrossMoments", "NodeOutputs", "ActivationMatchingReport", "activation_matching"]


class CrossMoments:
    """Streaming first and second moments of paired feature vectors (float64).

    ``update(a, b)`` with ``a``: (m, n_a), ``b``: (m, n_b) rows = samples. Keeps the count N, the
    means μ_a, μ_b, the centred co-moment M_ab = Σ (a − μ_a)(b − μ_b)ᵀ and the centred second
    moments M_aa = Σ (a − μ_a)², M_bb, merged batch by batch with the pairwise formulas of Chan,
    Golub & LeVeque (1979): for a batch with count m, means ν and co-moment K,
    δ = ν − μ, M ← M + K + δ_a δ_bᵀ · N m / (N + m), μ ← μ + δ · m / (N + m).
    """

    def __init__(self, n_a: int, n_b: int, device: str | torch.device = "cpu") -> None:
        self.count = 0
        self.mean_a = torch.zeros(n_a, dtype=torch.float64, device=device)
        self.mean_b = torch.zeros(n_b, dtype=torch.float64, device=device)
        self.m_ab = torch.zeros(n_a, n_b, dtype=torch.float64, device=device)
        self.m_aa = torch.zeros(n_a, dtype=torch.float64, device=device)
        self.m_bb = torch.zeros(n_b, dtype=torch.float64, device=device)

    def update(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Fold in paired samples a (m, n_a) and b (m, n_b) (rows = samples), Chan et al.'s merge."""
        a = a.detach().to(self.m_ab.device, torch.float64)
        b = b.detach().to(self.m_ab.device, torch.float64)
        m = a.shape[0]
        if m == 0:
            return
        if b.shape[0] != m:
            raise ValueError(f"A and B give different sample counts ({m} vs {b.shape[0]})")
        nu_a, nu_b = a.mean(0), b.mean(0)
        ca, cb = a - nu_a, b - nu_b
        k_ab = ca.T @ cb
        k_aa, k_bb = (ca * ca).sum(0), (cb * cb).sum(0)
        n = self.count
        tot = n + m
        da, db = nu_a - self.mean_a, nu_b - self.mean_b
        w = n * m / tot
        self.m_ab += k_ab + torch.outer(da, db) * w
        self.m_aa += k_aa + da * da * w
        self.m_bb += k_bb + db * db * w
        self.mean_a += da * (m / tot)
        self.mean_b += db * (m / tot)
        self.count = tot

    def merge(self, other: CrossMoments) -> None:
        """Fold in another accumulator's samples (e.g. another rank's), with the same pairwise
        formulas as :meth:`update` (count m = other.count, means ν = other's, K = other's M)."""
        m = other.count
        if m == 0:
            return
        dev = self.m_ab.device
        tot = self.count + m
        da = other.mean_a.to(dev) - self.mean_a
        db = other.mean_b.to(dev) - self.mean_b
        w = self.count * m / tot
        self.m_ab += other.m_ab.to(dev) + torch.outer(da, db) * w
        self.m_aa += other.m_aa.to(dev) + da * da * w
        self.m_bb += other.m_bb.to(dev) + db * db * w
        self.mean_a += da * (m / tot)
        self.mean_b += db * (m / tot)
        self.count = tot

    def cross(self) -> torch.Tensor:
        """E[a bᵀ] = M_ab / N + μ_a μ_bᵀ, shape (n_a, n_b), float64."""
        return self.m_ab / self.count + torch.outer(self.mean_a, self.mean_b)

    def covariance(self) -> torch.Tensor:
        """Population cross-covariance M_ab / N."""
        return self.m_ab / self.count

    def correlation(self, eps: float = 1e-12) -> torch.Tensor:
        """Pearson correlation cov(a_i, b_j) / (σ_a,i σ_b,j). A unit with zero variance (a dead unit)
        gets correlation 0 with every unit (σ is clamped at ``sqrt(eps)``)."""
        sa = (self.m_aa / self.count).clamp_min(eps).sqrt()
        sb = (self.m_bb / self.count).clamp_min(eps).sqrt()
        return self.covariance() / torch.outer(sa, sb)


class NodeOutputs(nn.Module):
    """Wraps a model's fx graph so that ``forward(x)`` returns the outputs of the named nodes.

    Each requested output is cloned right after its node runs, so later in-place operations
    (``ReLU(inplace=True)``, ``+=``) cannot change it.
    """

    def __init__(self, model: nn.Module, node_names: Iterable[str]):
        super().__init__()
        gm = trace(model)
        names = list(dict.fromkeys(node_names))
        by_name = {n.name: n for n in gm.graph.nodes}
        missing = [n for n in names if n not in by_name]
        if missing:
            raise ConfigError(
                f"node {missing[0]!r} of the permutation spec is not in this model's fx graph (nodes: "
                f"{', '.join(list(by_name)[:8])}, ...). Derive the spec from the same architecture."
            )
        outs = []
        for name in names:
            node = by_name[name]
            with gm.graph.inserting_after(node):
                c = gm.graph.call_function(torch.clone, (node,))
            outs.append(c)
        out_node = next(n for n in gm.graph.nodes if n.op == "output")
        out_node.args = (tuple(outs),)
        gm.graph.lint()
        gm.recompile()
        self.gm = gm
        self.names = names

    def forward(self, *args) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.gm(*args)))


def _as_samples(t: torch.Tensor, ref: NodeRef, n: int) -> torch.Tensor:
    """(samples, n) matrix: the unit dimension moved last, every other position a sample."""
    t = t.narrow(ref.dim, ref.offset, n).movedim(ref.dim, -1)
    return t.reshape(-1, n)


@dataclass
class ActivationMatchingReport:
    """Diagnostics of :func:`activation_matching`.

    Attributes:
        statistic: ``"cross_moment"`` (E[a bᵀ]) or ``"correlation"`` (Pearson).
        n_samples: group -> number of feature vectors accumulated (images × spatial positions).
        n_inputs: number of input examples seen.
        objective: group -> mean over units of C_g[i, perm[i]] (matched similarity).
        objective_identity: group -> mean of diag(C_g) (before alignment).
        nodes: group -> fx node names used.
        moved_fraction: group -> fraction of units moved.
        time_s: wall time, seconds.
    """

    statistic: str
    n_samples: dict[str, int]
    n_inputs: int
    objective: dict[str, float]
    objective_identity: dict[str, float]
    nodes: dict[str, list[str]]
    moved_fraction: dict[str, float] = field(default_factory=dict)
    time_s: float = 0.0

    def to_dict(self) -> dict:
        """JSON-serialisable dict."""
        return asdict(self)


def _batch_inputs(batch: Any) -> tuple:
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, Mapping):
        for k in ("input", "inputs", "x", "image", "images"):
            if k in batch:
                return (batch[k],)
        raise ConfigError("activation matching got dict batches without an 'input'/'x'/'image' key.")
    if isinstance(batch, (list, tuple)):
        return (batch[0],)
    raise ConfigError(
        f"activation matching cannot read inputs from a batch of type {type(batch).__name__}; "
        "give a loader yielding tensors or (inputs, labels) pairs."
    )


def _group_samples(feats: dict[str, torch.Tensor], refs, n: int) -> torch.Tensor:
    """(samples, n) features of one group: every node of the group, stacked as extra samples."""
    parts = [_as_samples(feats[r.node], r, n) for r in refs]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def accumulate_moments(
    model_a: nn.Module,
    model_b: nn.Module,
    spec: PermutationSpec,
    loader: Iterable,
    *,
    max_batches: int | None = None,
    device: str | torch.device = "cpu",
    nodes: str = "post_activation",
    sharded: bool = False,
) -> tuple[dict[str | tuple[str, str], CrossMoments], int]:
    """One streaming pass: per group, :class:`CrossMoments` of A's and B's features (both models see
    the same batches, in eval mode, without gradients). Returns (moments per group, inputs seen).

    A heads group ``g`` gets one entry per role, keyed ``(g, role)``, over all H·d_h units; its
    within-head groups get none (see :func:`activation_matching`).
    ``sharded``: ``loader`` is this rank's shard (:func:`llfc.distributed.shard_dataset`); the
    moments of all ranks are merged once, after the pass, so every rank returns the totals."""
    groups: dict[str | tuple[str, str], list[NodeRef]] = {}
    sizes: dict[str | tuple[str, str], int] = {}
    within = spec.within_head_groups()
    g: str | tuple[str, str]
    for g in spec.groups:
        if g in within:
            continue
        if g in spec.heads:
            for role, kids in spec.heads[g].items():
                refs = [r for r in spec.nodes.get(g, []) if r.kind == role]
                if not refs:
                    raise ConfigError(
                        f"the attention heads {g!r} have no feature node for their {role.upper()} units (e.g. "
                        "nn.MultiheadAttention computes them inside one module), so activation matching cannot read "
                        "them; use weight matching (--method weight / method='weight') for this model."
                    )
                groups[(g, role)] = refs
                sizes[(g, role)] = spec.sizes[g] * spec.sizes[kids[0]]
            continue
        refs = spec.feature_nodes(g, nodes)
        if not refs:
            raise ConfigError(
                f"permutation group {g!r} has no feature node, so activation matching cannot read its features. "
                "Derive the spec with derive_spec(...) or give nodes= to PermutationSpec.from_groups."
            )
        groups[g] = refs
        sizes[g] = spec.sizes[g]
    names = sorted({r.node for refs in groups.values() for r in refs})
    ext_a = NodeOutputs(model_a, names).to(device).eval()
    ext_b = NodeOutputs(model_b, names).to(device).eval()
    stats = {g: CrossMoments(sizes[g], sizes[g], device) for g in groups}
    seen = 0
    with torch.no_grad():
        for bi, batch in enumerate(loader):
            if max_batches is not None and bi >= max_batches:
                break
            inputs = tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in _batch_inputs(batch))
            fa, fb = ext_a(*inputs), ext_b(*inputs)
            for g, refs in groups.items():
                stats[g].update(_group_samples(fa, refs, sizes[g]), _group_samples(fb, refs, sizes[g]))
            seen += int(inputs[0].shape[0])
            del fa, fb
    if sharded:
        from llfc.distributed import Sum, reduce_accumulators

        total = Sum(seen)
        reduce_accumulators([*stats.values(), total], modules=())
        seen = total.total
    if seen == 0:
        raise ConfigError("activation matching got an empty loader (or max_batches=0); give it training batches.")
    return stats, seen


def activation_matching(
    model_a: nn.Module,
    model_b: nn.Module,
    spec: PermutationSpec,
    loader: Iterable,
    *,
    max_batches: int | None = None,
    device: str | torch.device = "cpu",
    correlation: bool = False,
    nodes: str = "post_activation",
    sharded: bool = False,
) -> tuple[dict[str, torch.Tensor], ActivationMatchingReport]:
    """Git Re-Basin activation matching: per group, the assignment maximising feature similarity.

    Args:
        model_a, model_b: two models of the spec's architecture (not modified; run in eval mode).
        spec: permutation spec with feature nodes (from :func:`~llfc.permutation.derive_spec`).
        loader: iterable of batches: tensors, ``(inputs, labels)`` pairs, or dicts with ``"input"``;
            training data in the paper's protocol (Git Re-Basin uses the whole training set).
        max_batches: stop after this many batches (None: the whole loader).
        device: where the models run and the moments are accumulated.
        correlation: use Pearson correlation instead of the raw cross-moment E[a bᵀ].
        nodes: ``"post_activation"`` (the group's last activation output) or ``"all_activations"``
            (every activation output of the group, e.g. each block of a residual stream, pooled
            into one set of samples).
        sharded: ``loader`` is this rank's shard; the statistics of all ranks are merged
            (:func:`accumulate_moments`), so every rank computes the same permutation.

    Returns:
        ``(perms, report)`` with ``perms[g][i]`` the index of B's unit matched to A's unit i, and an
        :class:`ActivationMatchingReport`.

    Raises:
        ConfigError: empty loader, unreadable batches, or a spec without feature nodes.
    """
    t0 = time.perf_counter()
    spec.resolve_sizes(model_a.state_dict())
    stats, seen = accumulate_moments(
        model_a, model_b, spec, loader, max_batches=max_batches, device=device, nodes=nodes, sharded=sharded
    )
    perms, obj, obj_id, counts = {}, {}, {}, {}
    head_blocks: dict[str, dict[str, np.ndarray]] = {}
    for g, st in stats.items():
        C = (st.correlation() if correlation else st.cross()).cpu().numpy()
        if isinstance(g, tuple):  # (heads group, role): all H·d_h units of one role
            head_blocks.setdefault(g[0], {})[g[1]] = C
            counts[f"{g[0]}/{g[1]}"] = st.count
            continue
        _, ci = linear_sum_assignment(C, maximize=True)
        perms[g] = torch.as_tensor(ci, dtype=torch.long)
        n = C.shape[0]
        obj[g] = float(C[np.arange(n), ci].mean())
        obj_id[g] = float(np.trace(C) / n)
        counts[g] = st.count
    for g, blocks in head_blocks.items():
        perms.update(_match_heads(spec, g, blocks, obj, obj_id))
    report = ActivationMatchingReport(
        statistic="correlation" if correlation else "cross_moment",
        n_samples=counts,
        n_inputs=seen,
        objective=obj,
        objective_identity=obj_id,
        nodes={
            g: [r.node for r in (spec.nodes.get(g, []) if g in spec.heads else spec.feature_nodes(g, nodes))]
            for g in spec.groups
            if g not in spec.within_head_groups()
        },
        moved_fraction=moved_fraction(perms),
    )
    report.time_s = time.perf_counter() - t0
    return perms, report


def _match_heads(
    spec: PermutationSpec, g: str, blocks: Mapping[str, np.ndarray], obj: dict, obj_id: dict
) -> dict[str, torch.Tensor]:
    """Heads as units from the per-role similarity matrices ``blocks[role]`` ((H·d_h)², A rows, B
    columns): per pair (i, j) and role the best within-head assignment, then one over heads."""
    n_heads = spec.sizes[g]
    total = np.zeros((n_heads, n_heads))
    cols = {}
    for role, C in blocks.items():
        dh = C.shape[0] // n_heads
        S = C.reshape(n_heads, dh, n_heads, dh).transpose(0, 2, 1, 3)
        cols[role] = np.zeros((n_heads, n_heads, dh), dtype=np.int64)
        for i in range(n_heads):
            for j in range(n_heads):
                _, ci = linear_sum_assignment(S[i, j], maximize=True)
                cols[role][i, j] = ci
                total[i, j] += S[i, j][np.arange(dh), ci].mean()
        obj_id[g + "/" + role] = float(np.trace(C) / C.shape[0])
    _, sigma = linear_sum_assignment(total, maximize=True)
    out = {g: torch.as_tensor(sigma, dtype=torch.long)}
    for role, kids in spec.heads[g].items():
        for i, kid in enumerate(kids):
            out[kid] = torch.as_tensor(cols[role][i, sigma[i]], dtype=torch.long)
    obj[g] = float(total[np.arange(n_heads), sigma].mean() / max(1, len(blocks)))
    return out

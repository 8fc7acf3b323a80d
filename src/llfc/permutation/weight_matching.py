"""Weight matching (Git Re-Basin, Ainsworth et al. 2023, Algorithm 1 "permutation coordinate descent").

Find permutations π of model B's hidden units maximising

    J(π) = Σ_(keys k in the spec) ⟨θ_A[k], π(θ_B)[k]⟩_F ,

equivalently minimising Σ_ℓ ‖W_A^(ℓ) − P^(ℓ) W_B^(ℓ) P^(ℓ−1)ᵀ‖_F² (LLFC paper §5.2, first factor of
Eq. 9). Coordinate descent: visit the groups in a random order; for group g, with every other
permutation fixed, J is linear in P_g with similarity matrix

    S_g[i, j] = Σ_{(k, axis) ∈ g} ⟨ A_k restricted to unit i of axis , π_{−g}(B_k) restricted to unit j ⟩

(all axes of B_k other than ``axis`` permuted by the current permutations), and the best P_g is one
linear assignment (``scipy.optimize.linear_sum_assignment(S_g, maximize=True)``). A new permutation
is accepted only if it raises ⟨S_g, P_g⟩ by more than ``tol`` (relative); sweeps stop when no group
improves. Several restarts (the first from ``init``, the others from random permutations) keep the
best J.

Each term of S_g (one weight permuted on other axes too) is a product A_k · π_{−g}(B_k)ᵀ of an
(n, R) by an (R, n) matrix, cached with the index vectors of B_k's other axes it was computed with.
When only m units of those axes moved since (late sweeps: a few tens of units of a 4096-wide
classifier layer), the product changes only in the m slices of the moved units, and the cache is
updated by that low-rank difference,

    term_new − term_old = Σ_(axes a, in order) A_k[.., D_a, ..] · (B_k[.., new_a[D_a], ..] − B_k[.., old_a[D_a], ..])ᵀ

(D_a the moved positions of axis a; axes before a at their new index, after a at their old
one), at a cost m·n²·(R / length of a) instead of n²·R. The difference and its product are formed in
float64, so the update adds no float32 rounding: a cached term differs from the exact product by
the rounding of its last full product (in ``dtype``) plus float64 rounding of the updates
(≈ 1e-16 relative each), with no growth that a periodic full recomputation would have to undo. A
term is recomputed in full when the moved slices exceed ``low_rank_max_share`` of it.

Attention heads (``spec.heads``) are matched as units (Theus et al., "Generalized LMC for
Transformers", NeurIPS 2025, §3; Verma & Elbayad 2024): with the residual stream fixed, the gain of
sending head j of B to head i of A is

    c[i, j] = max_π Σ_(q,k refs) ⟨A_i, π B_j⟩ + max_ρ Σ_(v,o refs) ⟨A_i, ρ B_j⟩ ,

each max one d_h×d_h linear assignment over the dimensions within the head (the QK and OV
permutations); one assignment over c gives the heads, and the within-head permutations of the
chosen pairs come after. This step maximises J exactly over heads and within-head permutations
jointly, so it replaces the coordinate step of the heads group and of its within-head groups.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Mapping

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from llfc.errors import ConfigError, NonFiniteWeightsError
from llfc.permutation.apply import (
    apply_permutation,
    axis_index,
    check_compatible,
    identity_permutation,
    random_permutation,
    strip_module_prefix,
)
from llfc.permutation.spec import AxisRef, PermutationSpec

__all__ = ["WeightMatchingReport", "weight_matching", "weight_distances", "moved_fraction"]


@dataclass
class WeightMatchingReport:
    """Diagnostics of :func:`weight_matching`.

    Attributes:
        objective: best J(π) = Σ ⟨θ_A, π(θ_B)⟩ over the spec's weights (float64; its buffers, e.g.
            BatchNorm running statistics, are permuted but not part of J).
        objective_identity: J at the identity (no alignment).
        objective_per_sweep: J after each sweep of the best restart.
        restart_objectives: final J of each restart (restart 0 starts from ``init``).
        best_restart: index of the kept restart.
        n_sweeps: sweeps of the best restart (a sweep visits every group once).
        converged: whether the best restart stopped because no group improved (not ``max_iter``).
        time_s: wall time of the whole call, seconds.
        products_full / products_low_rank: similarity terms (one weight's product, see the module
            docstring) computed in full / updated by the low-rank difference, over all restarts.
        cpu_products_s / cpu_assignments_s / cpu_objective_s: process CPU time (``time.process_time``,
            all threads) spent forming similarities, in ``linear_sum_assignment`` (the heads step's
            assignments included) and evaluating J after each sweep, seconds.
        moved_fraction: group -> fraction of units i with perm[i] ≠ i.
        distance_before / distance_after: state-dict key -> ‖θ_A[k] − θ_B[k]‖_F before and
            ‖θ_A[k] − π(θ_B)[k]‖_F after alignment (first factor of LLFC Eq. 9, per layer).
    """

    objective: float
    objective_identity: float
    objective_per_sweep: list[float]
    restart_objectives: list[float]
    best_restart: int
    n_sweeps: int
    converged: bool
    time_s: float
    products_full: int = 0
    products_low_rank: int = 0
    cpu_products_s: float = 0.0
    cpu_assignments_s: float = 0.0
    cpu_objective_s: float = 0.0
    moved_fraction: dict[str, float] = field(default_factory=dict)
    distance_before: dict[str, float] = field(default_factory=dict)
    distance_after: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-serialisable dict."""
        return asdict(self)


def moved_fraction(perms: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Fraction of units that a permutation moves (perm[i] ≠ i), per group."""
    return {
        g: float((torch.as_tensor(p) != torch.arange(len(p))).double().mean()) if len(p) else 0.0
        for g, p in perms.items()
    }


def weight_distances(sd_a: Mapping[str, torch.Tensor], sd_b: Mapping[str, torch.Tensor], keys) -> dict[str, float]:
    """‖θ_A[k] − θ_B[k]‖_F (float64) for each key."""
    return {k: float((sd_a[k].double() - sd_b[k].double()).norm()) for k in keys}


def _objective(sd_a, sd_b_perm, keys) -> float:
    """Σ_k ⟨θ_A[k], θ_B[k]⟩ in float64 (inputs may already be float64)."""
    return float(sum(float(torch.dot(sd_a[k].double().reshape(-1), sd_b_perm[k].double().reshape(-1))) for k in keys))


def _segment(t: torch.Tensor, ref: AxisRef, n: int) -> torch.Tensor:
    """(n, block·rest) matrix of the group's units along ``ref.axis`` (rows = units)."""
    seg = t.narrow(ref.axis, ref.offset, n * ref.block).movedim(ref.axis, 0)
    return seg.reshape(n, -1)


def weight_matching(
    spec: PermutationSpec,
    sd_a: Mapping[str, torch.Tensor],
    sd_b: Mapping[str, torch.Tensor],
    *,
    max_iter: int = 100,
    restarts: int = 1,
    seed: int = 0,
    init: str = "identity",
    tol: float = 1e-12,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    low_rank_max_share: float = 0.35,
) -> tuple[dict[str, torch.Tensor], WeightMatchingReport]:
    """Git Re-Basin weight matching: permutations of B that maximise Σ ⟨θ_A, π(θ_B)⟩ over the weights
    (Ainsworth et al. 2023, §3.2; the spec's ``buffers`` are permuted but not matched).

    Args:
        spec: the permutation spec (e.g. from :func:`~llfc.permutation.derive_spec`).
        sd_a, sd_b: state dicts of A and B (a ``module.`` prefix is removed). Not modified.
        max_iter: maximum number of sweeps per restart.
        restarts: number of coordinate-descent runs (≥ 1; default 1 as in Git Re-Basin, each one
            costs a full run); the first starts from ``init``, the
            others from uniformly random permutations; the best objective is kept.
        seed: seeds the group orders and random starts.
        init: ``"identity"`` or ``"random"`` start for the first restart.
        tol: a group's new permutation is accepted if it raises ⟨S_g, P_g⟩ by more than
            ``tol·max(1, |old|)``.
        dtype: dtype of the similarity matmuls (float32 default for speed; the assignment problem,
            the gains and the objective are evaluated in float64). ``torch.float64`` for exactness.
        device: where the matmuls run.
        low_rank_max_share: a cached similarity term whose other axes moved is updated by the
            low-rank difference of the moved slices (module docstring) when those slices are at
            most this share of the term (Σ over moved axes of moved units / axis length), and
            recomputed in full otherwise; ``0`` always recomputes in full. The results are the same
            up to float rounding (float64 updates; see the module docstring).

    Returns:
        ``(perms, report)``: ``perms[g]`` LongTensor (``perms[g][i]`` = index in B of the unit that
        goes to position i; apply with :func:`~llfc.permutation.apply_permutation`), and a
        :class:`WeightMatchingReport`.

    Raises:
        IncompatibleModelsError: A and B differ in keys or shapes.
        NonFiniteWeightsError: a spec entry holds NaN/Inf.
        ConfigError: bad ``restarts`` / ``init`` / ``max_iter`` / ``low_rank_max_share``.
    """
    t0 = time.perf_counter()
    if restarts < 1 or max_iter < 1:
        raise ConfigError(f"weight_matching needs restarts >= 1 and max_iter >= 1 (got {restarts}, {max_iter}).")
    if not 0.0 <= low_rank_max_share <= 1.0:
        raise ConfigError(f"low_rank_max_share must lie in [0, 1], got {low_rank_max_share!r}.")
    if init not in ("identity", "random"):
        raise ConfigError(f"init must be 'identity' or 'random', got {init!r}.")
    sd_a = strip_module_prefix(sd_a)
    sd_b = strip_module_prefix(sd_b)
    check_compatible(sd_a, sd_b)
    spec.resolve_sizes(sd_a)
    keys = spec.keys()
    for name, sd in (("A", sd_a), ("B", sd_b)):
        for k in keys:
            if not torch.isfinite(sd[k]).all():
                raise NonFiniteWeightsError(
                    f"model {name}'s {k!r} holds NaN or Inf values; weight matching needs "
                    "finite weights (check the checkpoint / training run)."
                )

    weights = [k for k in keys if k not in spec.buffers]  # J is over weights (spec.buffers: permuted only)
    A = {k: sd_a[k].detach().to(device=device, dtype=dtype) for k in weights}
    B = {k: sd_b[k].detach().to(device=device, dtype=dtype) for k in weights}
    axes_of_key: dict[str, set[int]] = {}
    for refs in spec.groups.values():
        for r in refs:
            axes_of_key.setdefault(r.key, set()).add(r.axis)

    # Per group: a constant similarity part (keys permuted along this axis only; float64) and
    # dynamic terms. Dynamic terms keep A's and B's group segments with the group axis moved to the
    # front (contiguous, shape (n, rest...)), so permuting B's other axes is one index_select per
    # axis and the (n, R) matrices are free reshapes.
    within = spec.within_head_groups()
    static: dict[str, torch.Tensor] = {}
    # (ref, A segment, B segment, [(axis of the key, its position in the segments), ...])
    dynamic: dict[str, list[tuple[AxisRef, torch.Tensor, torch.Tensor, list[tuple[int, int]]]]] = {}
    for g, refs in spec.groups.items():
        n = spec.sizes[g]
        if g in spec.heads or g in within:
            static[g], dynamic[g] = torch.zeros(0), []  # matched by heads_step
            continue
        S0 = torch.zeros(n, n, dtype=dtype, device=device)
        dyn = []
        for r in refs:
            if r.key in spec.buffers:
                continue
            if axes_of_key[r.key] == {r.axis}:
                S0 += _segment(A[r.key], r, n) @ _segment(B[r.key], r, n).T
            else:
                a_mov, b_mov = (
                    t.narrow(r.axis, r.offset, n * r.block).movedim(r.axis, 0).contiguous()
                    for t in (A[r.key], B[r.key])
                )
                others = [(ax, ax + 1 if ax < r.axis else ax) for ax in sorted(axes_of_key[r.key]) if ax != r.axis]
                dyn.append((r, a_mov, b_mov, others))
        static[g], dynamic[g] = S0.double(), dyn

    # Groups a dynamic term depends on (those permuting the entry's other axes). A term's product is
    # cached (float64) with the index vectors it was computed with, and recomputed or updated only
    # when one of those permutations changed since (late sweeps are cheap).
    deps = {
        g: [
            sorted({h for h, refs in spec.groups.items() for q in refs if q.key == r.key and q.axis != r.axis})
            for r, _, _, _ in dynamic[g]
        ]
        for g in spec.groups
    }
    version = {g: 0 for g in spec.groups}
    cache: dict[tuple[str, int], tuple[tuple, torch.Tensor, list[torch.Tensor]]] = {}
    # S_g depends only on the permutations in deps[g]: when none of them changed since g's last
    # assignment, S_g and hence the assignment are the same, and it cannot improve (skipped; exact)
    all_deps = {g: sorted({h for d in deps[g] for h in d}) for g in spec.groups}
    solved_at: dict[str, tuple] = {}
    counts = {"full": 0, "low_rank": 0}
    cpu = {"products": 0.0, "assignments": 0.0, "objective": 0.0}

    def low_rank_update(
        prod: torch.Tensor,
        a_mov: torch.Tensor,
        b_mov: torch.Tensor,
        pos: list[int],
        old: list[torch.Tensor],
        new: list[torch.Tensor],
    ) -> bool:
        """Add term_new − term_old to ``prod`` (float64, in place) when the moved slices are at most
        ``low_rank_max_share`` of the term; returns whether it did (module docstring's telescoping
        sum: axis a's difference has the axes before it at their new index, those after at the old)."""
        moved = [(new_a != old_a).nonzero().flatten() for old_a, new_a in zip(old, new)]
        share = sum(d.numel() / b_mov.shape[p] for d, p in zip(moved, pos))
        if share > low_rank_max_share:
            return False
        n = b_mov.shape[0]
        for a, d in enumerate(moved):
            if d.numel() == 0:
                continue
            diff = b_mov.index_select(pos[a], new[a][d]).double() - b_mov.index_select(pos[a], old[a][d]).double()
            for o in range(len(pos)):
                if o != a:
                    diff = diff.index_select(pos[o], new[o] if o < a else old[o])
            prod.addmm_(a_mov.index_select(pos[a], d).double().reshape(n, -1), diff.reshape(n, -1).T)
        return True

    def similarity(g: str, perms: dict[str, torch.Tensor]) -> torch.Tensor:
        """S_g, (n, n) float64 on ``device``."""
        n = spec.sizes[g]
        terms = []
        for ti, (r, a_mov, b_mov, others) in enumerate(dynamic[g]):
            stamp = tuple(version[h] for h in deps[g][ti])
            hit = cache.get((g, ti))
            if hit is not None and hit[0] == stamp:
                terms.append(hit[1])
                continue
            shape = B[r.key].shape
            idx = []
            for ax, _ in others:
                i = axis_index(spec, perms, r.key, ax, shape[ax])
                assert i is not None  # axes_of_key lists only the axes some group permutes
                idx.append(i.to(device))
            pos = [p for _, p in others]
            if hit is not None and low_rank_update(hit[1], a_mov, b_mov, pos, hit[2], idx):
                prod = hit[1]
                counts["low_rank"] += 1
            else:
                t = b_mov
                for p, i in zip(pos, idx):
                    t = t.index_select(p, i)
                prod = (a_mov.reshape(n, -1) @ t.reshape(n, -1).T).double()
                counts["full"] += 1
            cache[(g, ti)] = (stamp, prod, idx)
            terms.append(prod)
        if not terms:
            return static[g].clone()
        S = static[g] + terms[0]
        for term in terms[1:]:
            S += term
        return S

    def assignment(S: np.ndarray) -> np.ndarray:
        """Columns of the maximising linear assignment of the square float64 matrix S.

        Solved as the minimisation of the column-reduced cost max_i S[i, j] − S[i, j] (≥ 0, a zero
        in every column): a constant per column adds the same to every assignment, so the optimum
        is the same, and scipy's shortest-augmenting-path solver, which starts from zero duals,
        then finds short paths sooner (the 99 assignments of 4096² of the paper's VGG-16-BN in
        benchmarks/notes.md: 36 CPU s against 51 s with ``maximize=True`` on S)."""
        c = time.process_time()
        _, ci = linear_sum_assignment(S.max(axis=0, keepdims=True) - S)
        cpu["assignments"] += time.process_time() - c
        return ci

    def other_axes_permuted(key: str, axis: int, perms: dict[str, torch.Tensor]) -> torch.Tensor:
        t = B[key]
        for ax in axes_of_key[key]:
            if ax != axis:
                idx = axis_index(spec, perms, key, ax, t.shape[ax])
                assert idx is not None  # perms holds every group of spec
                t = t.index_select(ax, idx.to(t.device))
        return t

    def heads_step(g: str, perms: dict[str, torch.Tensor]) -> bool:
        """Heads group g and its within-head groups, jointly (see the module docstring)."""
        n_heads = spec.sizes[g]
        total = np.zeros((n_heads, n_heads))
        old = 0.0
        choice: dict[str, np.ndarray] = {}
        for role, kids in spec.heads[g].items():
            dh = spec.sizes[kids[0]]
            S = torch.zeros(n_heads, n_heads, dh, dh, dtype=dtype, device=device)
            for r in spec.groups[kids[0]]:  # head i's segment starts i·d_h·block after head 0's
                if r.key in spec.buffers:
                    continue
                a_seg = A[r.key].narrow(r.axis, r.offset, n_heads * dh * r.block).movedim(r.axis, 0)
                b_seg = (
                    other_axes_permuted(r.key, r.axis, perms)
                    .narrow(r.axis, r.offset, n_heads * dh * r.block)
                    .movedim(r.axis, 0)
                )
                prod = a_seg.reshape(n_heads * dh, -1) @ b_seg.reshape(n_heads * dh, -1).T  # ((i,a), (j,b))
                S += prod.reshape(n_heads, dh, n_heads, dh).transpose(1, 2)
            S64 = S.double().cpu().numpy()
            cols = np.zeros((n_heads, n_heads, dh), dtype=np.int64)
            for i in range(n_heads):
                for j in range(n_heads):
                    ci = assignment(S64[i, j])
                    cols[i, j] = ci
                    total[i, j] += S64[i, j][np.arange(dh), ci].sum()
            cur = perms[g].numpy()
            old += sum(S64[i, cur[i]][np.arange(dh), perms[kids[i]].numpy()].sum() for i in range(n_heads))
            choice[role] = cols
        sigma = assignment(total)
        new = total[np.arange(n_heads), sigma].sum()
        if not new > old + tol * max(1.0, abs(old)):
            return False
        perms[g] = torch.as_tensor(sigma, dtype=torch.long)
        version[g] += 1
        for role, kids in spec.heads[g].items():
            for i, kid in enumerate(kids):
                perms[kid] = torch.as_tensor(choice[role][i, sigma[i]], dtype=torch.long)
                version[kid] += 1
        return True

    A64 = {k: sd_a[k].detach().double() for k in keys}
    B64 = {k: sd_b[k].detach().double() for k in keys}
    # J after a sweep, per weight: ⟨A_k, π(B_k)⟩ is cached with the versions of the groups that
    # permute k and recomputed only when one of them moved (the same float64 terms, summed in the
    # same order as _objective over apply_permutation: the same value).
    groups_of_key = {k: sorted({h for h, refs in spec.groups.items() for q in refs if q.key == k}) for k in weights}
    term_cache: dict[str, tuple[tuple, float]] = {}

    def objective(perms: dict[str, torch.Tensor]) -> float:
        terms = []
        for k in weights:
            stamp = tuple(version[h] for h in groups_of_key[k])
            hit = term_cache.get(k)
            if hit is None or hit[0] != stamp:
                t = B64[k]
                axes = sorted(axes_of_key.get(k, ()))
                idx = []
                for ax in axes:
                    i = axis_index(spec, perms, k, ax, t.shape[ax])
                    assert i is not None  # axes_of_key lists only the axes some group permutes
                    idx.append(i)
                if t.dim() == 2 and len(idx) == 2 and t.device.type == "cpu":
                    # a hidden-to-hidden Linear (4096² in VGG-16's classifier, after every sweep of
                    # the tail): one numpy gather is about 2× faster than two index_selects
                    t = torch.from_numpy(t.numpy()[np.ix_(*(i.numpy() for i in idx))])
                else:
                    for ax, i in zip(axes, idx):
                        t = t.index_select(ax, i.to(t.device))
                hit = term_cache[k] = (stamp, float(torch.dot(A64[k].reshape(-1), t.reshape(-1))))
            terms.append(hit[1])
        return float(sum(terms))

    groups = [g for g in spec.groups if g not in within]
    gen = torch.Generator().manual_seed(seed)
    best = None
    restart_objs: list[float] = []
    for rs in range(restarts):
        if rs == 0 and init == "identity":
            perms = identity_permutation(spec)
        else:
            perms = random_permutation(spec, gen)
        for g in version:  # a new start invalidates every cached product
            version[g] += 1
        history: list[float] = []
        converged = False
        sweeps = 0
        best_local = (float("-inf"), dict(perms))
        for _ in range(max_iter):
            sweeps += 1
            progress = False
            for gi in torch.randperm(len(groups), generator=gen).tolist():
                g = groups[gi]
                if g in spec.heads:
                    progress = heads_step(g, perms) or progress
                    continue
                n = spec.sizes[g]
                stamp = tuple(version[h] for h in all_deps[g])
                if solved_at.get(g) == stamp:
                    continue
                solved_at[g] = stamp
                c = time.process_time()
                S = similarity(g, perms).cpu().numpy()
                cpu["products"] += time.process_time() - c
                ci = assignment(S)
                rows = np.arange(n)
                old = S[rows, perms[g].numpy()].sum()
                new = S[rows, ci].sum()
                if new > old + tol * max(1.0, abs(old)):
                    perms[g] = torch.as_tensor(ci, dtype=torch.long)
                    version[g] += 1
                    progress = True
            if progress or not history:
                c = time.process_time()
                history.append(objective(perms))
                cpu["objective"] += time.process_time() - c
            else:
                history.append(history[-1])
            if not progress:
                converged = True
                break
            # A group whose weight is permuted on two axes by itself (W[P, P], e.g. a layer inside
            # a residual stream) makes its step a linearisation: it can lower the true objective
            # and the descent can cycle. Keep the best state seen and stop when a sweep does not
            # improve the true objective.
            if len(history) >= 2 and history[-1] <= best_local[0] + tol * max(1.0, abs(best_local[0])):
                perms = dict(best_local[1])
                history.append(best_local[0])
                break
            best_local = (history[-1], dict(perms))
        restart_objs.append(history[-1])
        if best is None or history[-1] > best[1][-1]:
            best = (dict(perms), history, sweeps, converged, rs)

    assert best is not None  # restarts ≥ 1
    perms, history, sweeps, converged, best_rs = best
    aligned = apply_permutation(spec, perms, B64)  # float64 copies: no second conversion below
    report = WeightMatchingReport(
        objective=history[-1],
        objective_identity=_objective(A64, B64, weights),
        objective_per_sweep=history,
        restart_objectives=restart_objs,
        best_restart=best_rs,
        n_sweeps=sweeps,
        converged=converged,
        time_s=0.0,
        products_full=counts["full"],
        products_low_rank=counts["low_rank"],
        cpu_products_s=cpu["products"],
        cpu_assignments_s=cpu["assignments"],
        cpu_objective_s=cpu["objective"],
        moved_fraction=moved_fraction(perms),
        distance_before=weight_distances(A64, B64, keys),
        distance_after=weight_distances(A64, aligned, keys),
    )
    report.time_s = time.perf_counter() - t0
    return perms, report

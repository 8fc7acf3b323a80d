"""Applying, drawing and inverting permutations; state-dict helpers.

Convention (Git Re-Basin, Ainsworth et al. 2023): ``perms[g]`` is a LongTensor of length
``spec.sizes[g]`` and ``perms[g][i]`` is the index in B of the unit that goes to position ``i``.
On an axis where each unit occupies ``block`` positions starting at ``offset``, position
``offset + i·block + k`` of the result takes position ``offset + perms[g][i]·block + k`` of the input
(so a Linear's weight becomes ``W[perm]`` on its output axis and ``W[:, perm]`` on its input axis:
W' = P W P'ᵀ, LLFC paper §5.2).
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn

from llfc.checkpoint import strip_prefix as strip_module_prefix  # noqa: F401 (re-exported)
from llfc.interpolate import check_compatible  # noqa: F401 (re-exported)
from llfc.permutation.spec import PermutationSpec, SpecCheckError

__all__ = [
    "apply_permutation",
    "random_permutation",
    "identity_permutation",
    "invert",
    "compose",
    "axis_index",
    "strip_module_prefix",
    "check_compatible",
]


def _check_perm(g: str, p: torch.Tensor, n: int) -> torch.Tensor:
    p = torch.as_tensor(p, dtype=torch.long)
    if p.shape != (n,) or not torch.equal(torch.sort(p).values, torch.arange(n)):
        raise SpecCheckError(f"perms[{g!r}] is not a permutation of range({n}) (shape {tuple(p.shape)}).")
    return p


def axis_index(
    spec: PermutationSpec, perms: Mapping[str, torch.Tensor], key: str, axis: int, length: int
) -> torch.Tensor | None:
    """Index vector ``idx`` such that the permuted entry is ``t.index_select(axis, idx)``.

    Composes every group segment on (key, axis); positions outside all segments stay in place.
    Segments nest only for attention heads (a heads group of block d_h and the groups within each
    head, block 1): coarser segments act first, so position (i, a) takes (perm_heads[i],
    perm_within_i[a]) (``idx = idx_heads[idx_within]``). Disjoint segments (concatenated features)
    compose in any order. Returns ``None`` if no group in ``perms`` touches that axis.
    """
    segs = [
        (r, perms[g]) for g, refs in spec.groups.items() if g in perms for r in refs if r.key == key and r.axis == axis
    ]
    if not segs:
        return None
    idx = torch.arange(length)
    for r, p in sorted(segs, key=lambda rp: -rp[0].block):
        n = p.numel()
        seg = (p[:, None] * r.block + torch.arange(r.block)[None, :]).reshape(-1) + r.offset
        step = torch.arange(length)
        step[r.offset : r.offset + n * r.block] = seg
        idx = idx[step]
    return idx


def apply_permutation(
    spec: PermutationSpec,
    perms: Mapping[str, torch.Tensor],
    state_dict: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Permute a state dict: returns π(θ) as a new dict; the input is not modified.

    Args:
        spec: the permutation spec.
        perms: group -> LongTensor permutation (groups missing from ``perms`` stay as they are).
        state_dict: the weights (e.g. model B's). Entries not named by the spec (including integer
            buffers such as ``num_batches_tracked``) are returned as the same tensor objects;
            BatchNorm running statistics named by the spec are permuted like the weights.

    Raises:
        SpecCheckError: a permutation of the wrong length / not a permutation, or a spec that does not
            fit the state dict.
    """
    spec.resolve_sizes(state_dict)
    unknown = [g for g in perms if g not in spec.groups]
    if unknown:
        raise SpecCheckError(
            f"perms names group {unknown[0]!r}, which the spec does not have (groups: {', '.join(spec.groups)})."
        )
    ps = {g: _check_perm(g, p, spec.sizes[g]) for g, p in perms.items()}
    out = dict(state_dict)
    axes: dict[str, set[int]] = {}
    for g, refs in spec.groups.items():
        if g in ps:
            for r in refs:
                axes.setdefault(r.key, set()).add(r.axis)
    done: dict[tuple | None, list[torch.Tensor]] = {}
    for key, ax_set in axes.items():
        t = src = state_dict[key]
        for ax in sorted(ax_set):
            idx = axis_index(spec, ps, key, ax, t.shape[ax])
            assert idx is not None  # a group in ps touches this axis
            t = t.index_select(ax, idx.to(t.device))
        # tied entries (one storage under two keys, e.g. GPT's unembedding and token embedding)
        # permuted alike stay one tensor
        alias = (src.device, src.data_ptr(), tuple(src.shape), src.stride()) if src.numel() else None
        for prev in done.get(alias, []):
            if torch.equal(prev, t):
                t = prev
                break
        else:
            done.setdefault(alias, []).append(t)
        out[key] = t
    return out


def random_permutation(
    spec: PermutationSpec, generator: torch.Generator | None = None, *, derange: bool = False
) -> dict[str, torch.Tensor]:
    """One uniformly random permutation per group (``torch.randperm`` with ``generator``).

    With ``derange=True`` an identity draw (possible for small groups) is replaced by a cyclic shift,
    so every group of ≥ 2 units really moves. Sizes must be known (see ``spec.resolve_sizes``).
    """
    out = {}
    for g in spec.groups:
        n = spec.sizes[g]
        p = torch.randperm(n, generator=generator)
        if derange and n > 1 and torch.equal(p, torch.arange(n)):
            p = torch.roll(p, 1)
        out[g] = p
    return out


def identity_permutation(spec: PermutationSpec) -> dict[str, torch.Tensor]:
    """The identity permutation of every group."""
    return {g: torch.arange(spec.sizes[g]) for g in spec.groups}


def invert(perms: Mapping[str, torch.Tensor], spec: PermutationSpec | None = None) -> dict[str, torch.Tensor]:
    """Inverse permutations: ``apply(invert(p, spec), apply(p, sd)) == sd``.

    ``spec`` is needed only for attention heads (``spec.heads``): there the within-head permutation
    at position i acts after the heads, so the inverse within head j is the inverse of the one at
    position perm_heads⁻¹[j].
    """
    out = {g: torch.argsort(torch.as_tensor(p)) for g, p in perms.items()}
    for hg, roles in spec.heads.items() if spec is not None else ():
        if hg not in perms:
            continue
        back = out[hg]
        for kids in roles.values():
            if all(k in perms for k in kids):
                for j, kid in enumerate(kids):
                    out[kid] = torch.argsort(torch.as_tensor(perms[kids[int(back[j])]]))
    return out


def compose(
    first: Mapping[str, torch.Tensor], second: Mapping[str, torch.Tensor], spec: PermutationSpec | None = None
) -> dict[str, torch.Tensor]:
    """Permutations equal to applying ``first`` and then ``second``: ``result[g] = first[g][second[g]]``.

    With attention heads (``spec.heads``, needed then) the within-head permutation at position i is
    ``first[within at second_heads[i]][second[within at i]]``.
    """
    out = {g: torch.as_tensor(first[g])[torch.as_tensor(second[g])] for g in first}
    for hg, roles in spec.heads.items() if spec is not None else ():
        if hg not in first:
            continue
        s2 = torch.as_tensor(second[hg])
        for kids in roles.values():
            for i, kid in enumerate(kids):
                out[kid] = torch.as_tensor(first[kids[int(s2[i])]])[torch.as_tensor(second[kid])]
    return out


def unwrap_model(model: nn.Module) -> nn.Module:
    """The wrapped module of ``nn.DataParallel`` / ``DistributedDataParallel`` (else the model itself)."""
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return model.module
    return getattr(model, "_orig_mod", model)

"""Permutation specs: which state-dict axes share one permutation.

A *permutation group* is a set of hidden units (channels / features) that may be reordered without
changing the function the network computes, together with every (state-dict key, axis) whose
entries must be reordered with them (Git Re-Basin, Ainsworth et al. 2023, §2; LLFC paper §5.2,
Eq. 9: W' = P W P'ᵀ, b' = P b).

The package is split in three (PLeaS' ``PermutationProp`` layout):

- this module: the spec type (:class:`PermutationSpec`, :class:`AxisRef`, :class:`NodeRef`) and the
  self-test :func:`check_spec`, which permutes every group at random and verifies that the output
  does not change;
- :mod:`llfc.permutation.graph`: :func:`derive_spec`, which traces the model with
  ``torch.fx.symbolic_trace``, propagates the example input's shapes and joins axes with a
  union-find (:class:`TraceContext`);
- :mod:`llfc.permutation.handlers`: the per-operation handler registry (:func:`register_handler`)
  and the built-in handlers.

Every tensor in the traced graph carries at most one *feature axis* (``FeatAxis``): the tensor
dimension ``dim`` holding the permutable units, made of one or more *parts* ``(element, block)``:
each unit of the union-find element occupies ``block`` consecutive positions (``block > 1`` after a
flatten of C×H×W feature maps: a channel becomes a block of H·W inputs of the next Linear), and
several parts follow one another after ``torch.cat`` along the feature axis.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import torch
import torch.nn as nn

from llfc.errors import LLFCError

__all__ = [
    "AxisRef",
    "NodeRef",
    "FeatAxis",
    "HeadAxes",
    "PermutationSpec",
    "SpecCheckError",
    "TraceContext",
    "derive_spec",
    "check_spec",
    "register_handler",
    "DEFAULT_RTOL",
]

#: Relative tolerance ‖f(π(θ)) − f(θ)‖ / ‖f(θ)‖ used by :func:`check_spec` and ``align``.
DEFAULT_RTOL = 1e-4


class SpecCheckError(LLFCError):
    """A permutation spec does not leave the model's function unchanged (or does not fit its state dict)."""


# ---------------------------------------------------------------------------------------------
# Public data structures
# ---------------------------------------------------------------------------------------------


class AxisRef(NamedTuple):
    """One state-dict axis (or a segment of it) that a permutation group reorders.

    Attributes:
        key: state-dict key, e.g. ``"layer1.0.conv1.weight"``.
        axis: tensor axis of that entry (0 = output channels of a Linear/Conv weight, 1 = inputs).
        block: each unit occupies ``block`` consecutive positions on the axis (H·W for the first
            Linear after flattening a C×H×W feature map; 1 otherwise).
        offset: first position of the group's segment on the axis (non-zero only after
            ``torch.cat`` along channels).
    """

    key: str
    axis: int
    block: int = 1
    offset: int = 0


class NodeRef(NamedTuple):
    """An fx node whose output carries a group's units (used by activation matching).

    Attributes:
        node: fx node name (in ``torch.fx.symbolic_trace(model).graph``).
        dim: tensor dimension holding the units (1 for (N, C) and (N, C, H, W) features).
        offset: first position of the group's units on that dimension.
        kind: ``"activation"`` (elementwise nonlinearity output), ``"layer"`` (a Linear/Conv
            output), ``"norm"`` or ``"other"``.
    """

    node: str
    dim: int
    offset: int
    kind: str


class FeatAxis(NamedTuple):
    """The feature axis of a traced tensor: dimension ``dim``, parts ``((element, block), ...)``."""

    dim: int
    parts: tuple[tuple[int, int], ...]


class HeadAxes(NamedTuple):
    """The attention-head axes of a traced tensor whose units were split by a view into heads.

    Attributes:
        head_dim: tensor dimension of the heads (e.g. 1 of (B, H, T, d_h)).
        inner_dim: tensor dimension of the units within a head (e.g. 3), ``None`` when the
            within-head units were contracted (attention scores (B, H, T, T)).
        elem: the union-find element of the units (its size is H·d_h, split by
            ``TraceContext.split_heads``).
    """

    head_dim: int
    inner_dim: int | None
    elem: int


@dataclass
class PermutationSpec:
    """Which state-dict axes share a permutation.

    Attributes:
        groups: group name -> list of :class:`AxisRef` (``(key, axis, block, offset)``; the first
            two fields are the state-dict key and axis).
        sizes: group name -> number of units ``n`` (the permutation has length ``n``).
        nodes: group name -> fx nodes whose output carries the group's units (block 1), in graph
            order. Empty for hand-written specs unless given.
        heads: attention heads as units: heads-group name -> ``{"qk": [...], "ov": [...]}``, the
            groups of the dimensions within each head, in head order (``"qk"``: one permutation per
            head shared by the query and key rows; ``"ov"``: shared by the value rows and the
            output projection's columns). A heads group moves blocks of d_h positions; the groups
            of head i act at offset i·d_h, *after* the heads (position (i, a) of the permuted tensor
            takes position (perm_heads[i], perm_within_i[a]) of the input).
        buffers: state-dict keys of buffers (BatchNorm's ``running_mean`` / ``running_var``): they are
            permuted with their group, but weight matching leaves them out of its objective, which
            is over weights (Ainsworth et al. 2023, §3.2: J = Σ_ℓ ⟨W_ℓ^A, P_ℓ W_ℓ^B P_{ℓ−1}^T⟩;
            running statistics are no weights, and their magnitude can dominate the sum).
            :func:`derive_spec` fills it from the model's buffers; by hand: ``from_groups(buffers=...)``.

    Build one with :func:`derive_spec` or by hand with :meth:`from_groups`. ``str(spec)`` prints a
    table. Convention for permutations (``perms[g]``, LongTensor of length ``sizes[g]``):
    ``perms[g][i]`` is the index in B of the unit that goes to position ``i`` (so a Linear's
    permuted weight is ``W_B[perm]`` on the output axis; Git Re-Basin convention).
    """

    groups: dict[str, list[AxisRef]]
    sizes: dict[str, int] = field(default_factory=dict)
    nodes: dict[str, list[NodeRef]] = field(default_factory=dict)
    heads: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    buffers: frozenset[str] = frozenset()

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_groups(
        cls,
        groups: Mapping[str, Iterable[Sequence[Any]]],
        state_dict: Mapping[str, torch.Tensor] | None = None,
        sizes: Mapping[str, int] | None = None,
        nodes: Mapping[str, Iterable[Sequence[Any]]] | None = None,
        heads: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
        buffers: Iterable[str] = (),
    ) -> PermutationSpec:
        """A hand-written spec.

        Args:
            groups: name -> iterable of ``(key, axis)`` or ``(key, axis, block)`` or
                ``(key, axis, block, offset)``.
            state_dict: optional; group sizes are inferred from its shapes
                (``shape[axis] // block`` of the first entry, when the group has offset 0).
            sizes: optional explicit sizes (override inference).
            nodes: optional name -> iterable of ``(node_name, dim[, offset[, kind]])`` for
                activation matching.
            heads: optional heads-group name -> ``{"qk": [group per head], "ov": [...]}`` (see the
                class docstring).
            buffers: keys that are buffers, not weights (e.g. ``"bn1.running_mean"``): permuted,
                but left out of weight matching's objective (class docstring).

        Sizes that are neither given nor inferable are inferred later from the state dict passed
        to :func:`~llfc.permutation.apply_permutation` or the matching functions.
        """
        g2 = {str(g): [AxisRef(*ref) for ref in refs] for g, refs in groups.items()}
        spec = cls(
            groups=g2,
            sizes=dict(sizes or {}),
            heads={g: {k: list(v) for k, v in h.items()} for g, h in (heads or {}).items()},
            buffers=frozenset(buffers),
        )
        if nodes:
            for g, refs in nodes.items():
                lst = []
                for r in refs:
                    r = tuple(r)
                    lst.append(
                        NodeRef(
                            r[0],
                            r[1] if len(r) > 1 else 1,
                            r[2] if len(r) > 2 else 0,
                            r[3] if len(r) > 3 else "activation",
                        )
                    )
                spec.nodes[g] = lst
        if state_dict is not None:
            spec.resolve_sizes(state_dict)
        return spec

    # -- queries ---------------------------------------------------------------------------
    def keys(self) -> list[str]:
        """Sorted state-dict keys touched by any group."""
        return sorted({r.key for refs in self.groups.values() for r in refs})

    def axes_of(self, key: str) -> list[tuple[str, AxisRef]]:
        """All ``(group, AxisRef)`` memberships of one state-dict key."""
        return [(g, r) for g, refs in self.groups.items() for r in refs if r.key == key]

    def feature_nodes(self, group: str, which: str = "post_activation") -> list[NodeRef]:
        """Nodes used by activation matching for ``group``.

        ``which="post_activation"`` (default): the last elementwise-activation output in the group,
        falling back to the first producing layer's (Linear/Conv) output, then to any node.
        ``which="all_activations"``: every activation output of the group (e.g. each residual
        block's output in a residual stream), falling back as above.
        """
        cands = self.nodes.get(group, [])
        acts = [n for n in cands if n.kind == "activation"]
        if acts:
            return acts if which == "all_activations" else [acts[-1]]
        layers = [n for n in cands if n.kind == "layer"]
        if layers:
            return [layers[0]]
        return cands[:1]

    def resolve_sizes(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, int]:
        """Check the spec against ``state_dict`` and fill in missing group sizes.

        Raises:
            SpecCheckError: a key missing from the state dict, an axis out of range, a
                non-floating-point entry (integer buffers such as ``num_batches_tracked`` are never
                permuted), or a segment that does not fit the group size.
        """
        for g, refs in self.groups.items():
            if not refs:
                raise SpecCheckError(f"permutation group {g!r} has no state-dict axes; remove it from the spec.")
            for r in refs:
                if r.key not in state_dict:
                    raise SpecCheckError(
                        f"permutation group {g!r} names state-dict key {r.key!r}, which the model does not have. "
                        "Check the spec against model.state_dict().keys() (a 'module.' prefix can be removed "
                        "with llfc.permutation.strip_module_prefix)."
                    )
                t = state_dict[r.key]
                if not torch.is_floating_point(t):
                    raise SpecCheckError(
                        f"permutation group {g!r} names {r.key!r}, a {t.dtype} tensor; integer buffers "
                        "(e.g. BatchNorm's num_batches_tracked) are never permuted: remove it from the spec."
                    )
                if not 0 <= r.axis < t.dim():
                    raise SpecCheckError(
                        f"permutation group {g!r}: axis {r.axis} of {r.key!r} is out of range for shape "
                        f"{tuple(t.shape)}."
                    )
                if g not in self.sizes and r.offset == 0:
                    if t.shape[r.axis] % r.block:
                        raise SpecCheckError(
                            f"permutation group {g!r}: axis {r.axis} of {r.key!r} has length {t.shape[r.axis]}, "
                            f"not a multiple of block {r.block}."
                        )
                    self.sizes[g] = t.shape[r.axis] // r.block
            if g not in self.sizes:
                raise SpecCheckError(f"cannot infer the size of permutation group {g!r}; pass sizes={{...}}.")
            n = self.sizes[g]
            for r in refs:
                length = state_dict[r.key].shape[r.axis]
                if r.offset + n * r.block > length:
                    raise SpecCheckError(
                        f"permutation group {g!r} (size {n}) does not fit axis {r.axis} of {r.key!r} "
                        f"(length {length}, block {r.block}, offset {r.offset})."
                    )
        return self.sizes

    # -- printing --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """JSON-serialisable form."""
        return {
            "groups": {g: [list(r) for r in refs] for g, refs in self.groups.items()},
            "sizes": dict(self.sizes),
            "nodes": {g: [list(n) for n in ns] for g, ns in self.nodes.items()},
            "heads": {g: {k: list(v) for k, v in h.items()} for g, h in self.heads.items()},
        }

    def within_head_groups(self) -> set[str]:
        """Names of the groups of dimensions within a head (children of a heads group)."""
        return {c for h in self.heads.values() for kids in h.values() for c in kids}

    def __str__(self) -> str:
        lines = [
            f"PermutationSpec: {len(self.groups)} groups, "
            f"{sum(self.sizes.get(g, 0) for g in self.groups)} permutable units"
        ]
        w = max([5] + [len(g) for g in self.groups])
        lines.append(f"  {'group':<{w}}  {'size':>5}  feature node        axes (key:axis[xblock][@offset])")
        for g, refs in self.groups.items():
            fn = self.feature_nodes(g)
            node = fn[0].node if fn else "-"
            axes = []
            for r in refs:
                s = f"{r.key}:{r.axis}"
                if r.block != 1:
                    s += f"x{r.block}"
                if r.offset:
                    s += f"@{r.offset}"
                axes.append(s)
            size = self.sizes.get(g, "?")
            lines.append(f"  {g:<{w}}  {size!s:>5}  {node:<18}  {', '.join(axes)}")
        return "\n".join(lines)

    __repr__ = __str__


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------


def _as_tuple(example_input: Any) -> tuple:
    return tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)


def _clone_inputs(inputs: tuple) -> tuple:
    return tuple(x.clone() if isinstance(x, torch.Tensor) else x for x in inputs)


# ---------------------------------------------------------------------------------------------
# check_spec
# ---------------------------------------------------------------------------------------------


def _outputs_flat(out: Any) -> torch.Tensor:
    leaves = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    return torch.cat([t.detach().double().reshape(-1) for t in leaves])


def untie_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` without the second and later names of tied parameters (one ``nn.Parameter`` under
    several names, e.g. GPT's ``head.weight`` = ``tok_emb.weight``), for ``torch.func.functional_call``.

    Raises:
        SpecCheckError: two names of one tied parameter hold different values (a permutation spec
            moved them differently).
    """
    out = dict(state)
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if name not in out:
            continue
        if id(p) in first:
            keep = first[id(p)]
            if not torch.equal(out[keep], out[name]):
                raise SpecCheckError(
                    f"{name!r} and {keep!r} are one tied parameter but hold different values "
                    "(the permutation spec moves them differently; give both names' axes the same groups)."
                )
            del out[name]
        else:
            first[id(p)] = name
    return out


def _run(model: nn.Module, state: Mapping[str, torch.Tensor], inputs: tuple) -> torch.Tensor:
    with torch.no_grad():
        out = torch.func.functional_call(model, untie_state(model, state), _clone_inputs(inputs), strict=False)
    return _outputs_flat(out)


def relative_output_change(
    model: nn.Module,
    state_a: Mapping[str, torch.Tensor],
    state_b: Mapping[str, torch.Tensor],
    example_input: Any,
) -> float:
    """‖f(θ_b; x) − f(θ_a; x)‖ / ‖f(θ_a; x)‖ in eval mode (all outputs flattened, float64)."""
    inputs = _as_tuple(example_input)
    was_training = model.training
    model.eval()
    try:
        ref = _run(model, state_a, inputs)
        out = _run(model, state_b, inputs)
    finally:
        model.train(was_training)
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def _warn_if_insensitive(model: nn.Module, sd, example_input: Any, rtol: float) -> None:
    """Warn when the outputs of the batch's samples barely differ: the self-test is then weak."""
    inputs = _as_tuple(example_input)
    if not isinstance(inputs[0], torch.Tensor) or inputs[0].shape[0] < 2:
        return
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = torch.func.functional_call(model, untie_state(model, sd), _clone_inputs(inputs), strict=False)
    finally:
        model.train(was_training)
    leaves = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    if not leaves or leaves[0].dim() == 0 or leaves[0].shape[0] != inputs[0].shape[0]:
        return
    o = leaves[0].detach().double().reshape(leaves[0].shape[0], -1)
    spread = float((o - o.mean(0)).norm() / o.norm().clamp_min(1e-30))
    if spread < 100 * rtol:
        warnings.warn(
            f"check_spec: the model's output barely depends on its input (relative spread {spread:.2g} across the "
            "example batch), e.g. dead ReLUs of a deep untrained network; a wrong spec may then pass the self-test. "
            "Check the spec on trained weights or a better-conditioned initialisation.",
            stacklevel=3,
        )


def check_spec(
    model: nn.Module,
    spec: PermutationSpec,
    example_input: torch.Tensor | Sequence[torch.Tensor],
    rtol: float = DEFAULT_RTOL,
    seed: int = 0,
) -> float:
    """Self-test: a random permutation of every group must leave the model's output unchanged.

    Runs ``model`` in eval mode (BatchNorm uses its running statistics, dropout is off) on
    ``example_input`` with its own weights and with every group permuted at random (a non-identity
    permutation for groups of ≥ 2 units), and compares ‖Δout‖ / ‖out‖ (float64 over all outputs)
    with ``rtol`` (default 1e-4; float32 reordering noise is ~1e-7). Source of the property: a
    permutation of hidden units is a symmetry of the network (Git Re-Basin §2; LLFC paper §5.2).

    Returns:
        The relative output change (float).

    Raises:
        SpecCheckError: the output changes; each group is then tested alone and the message names the
            offending group(s), their keys and relative changes. Also raised when the spec does not fit
            the state dict (see :meth:`PermutationSpec.resolve_sizes`).
    """
    from llfc.permutation.apply import apply_permutation, random_permutation  # local: avoid import cycle

    sd = model.state_dict()
    spec.resolve_sizes(sd)
    _warn_if_insensitive(model, sd, example_input, rtol)
    gen = torch.Generator().manual_seed(seed)
    perms = random_permutation(spec, gen, derange=True)
    rel = relative_output_change(model, sd, apply_permutation(spec, perms, sd), example_input)
    if rel <= rtol:
        return rel
    bad = []
    for g in spec.groups:
        r = relative_output_change(model, sd, apply_permutation(spec, {g: perms[g]}, sd), example_input)
        if r > rtol:
            bad.append((g, r))
    if bad:
        detail = "; ".join(
            f"group {g!r} (relative change {r:.3g}; axes {', '.join(f'{a.key}:{a.axis}' for a in spec.groups[g])})"
            for g, r in bad
        )
        raise SpecCheckError(
            f"the permutation spec does not preserve the model's function: permuting {detail} changes the output "
            f"by more than rtol={rtol:g}. The group is missing an axis that must move with it, or holds one that "
            "must not (e.g. it reaches the model's input/output). Fix the spec (or the handler that built it)."
        )
    raise SpecCheckError(
        f"the permutation spec does not preserve the model's function (relative change {rel:.3g} > rtol={rtol:g}) "
        "when all groups are permuted together, although every group passes alone: two groups share an axis "
        "they should not. Fix the spec."
    )


# Backwards-compatible names: the graph derivation and the handler registry used to live here.
from llfc.permutation.graph import TraceContext, derive_spec, trace  # noqa: E402, F401
from llfc.permutation.handlers import (  # noqa: E402, F401
    _FUNCTION_HANDLERS,
    _METHOD_HANDLERS,
    _MODULE_HANDLERS,
    Handler,
    passthrough,
    register_handler,
)

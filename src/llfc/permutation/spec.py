"""Permutation specs: which state-dict axes share one permutation, derived from the model graph.

A *permutation group* is a set of hidden units (channels / features) that may be reordered without
changing the function the network computes, together with every (state-dict key, axis) whose
entries must be reordered with them (Git Re-Basin, Ainsworth et al. 2023, §2; LLFC paper §5.2,
Eq. 9: W' = P W P'ᵀ, b' = P b).

:func:`derive_spec` traces the model with ``torch.fx.symbolic_trace``, propagates the example
input's shapes (``torch.fx.passes.shape_prop.ShapeProp``) and joins axes with a union-find through
one *handler* per operation (in the style of PLeaS' ``PermutationProp``). Groups that reach the
model's input or output are not permuted. The result is checked by :func:`check_spec`, which
permutes every group at random and verifies that the output does not change.

Every tensor in the traced graph carries at most one *feature axis* (``FeatAxis``): the tensor
dimension ``dim`` holding the permutable units, made of one or more *parts* ``(element, block)``:
each unit of the union-find element occupies ``block`` consecutive positions (``block > 1`` after a
flatten of C×H×W feature maps: a channel becomes a block of H·W inputs of the next Linear), and
several parts follow one another after ``torch.cat`` along the feature axis.
"""

from __future__ import annotations

import math
import warnings
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from llfc.errors import LLFCError, UnsupportedOperationError

__all__ = [
    "AxisRef",
    "NodeRef",
    "FeatAxis",
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


@dataclass
class PermutationSpec:
    """Which state-dict axes share a permutation.

    Attributes:
        groups: group name -> list of :class:`AxisRef` (``(key, axis, block, offset)``; the first
            two fields are the state-dict key and axis).
        sizes: group name -> number of units ``n`` (the permutation has length ``n``).
        nodes: group name -> fx nodes whose output carries the group's units (block 1), in graph
            order. Empty for hand-written specs unless given.

    Build one with :func:`derive_spec` or by hand with :meth:`from_groups`. ``str(spec)`` prints a
    table. Convention for permutations (``perms[g]``, LongTensor of length ``sizes[g]``):
    ``perms[g][i]`` is the index in B of the unit that goes to position ``i`` (so a Linear's
    permuted weight is ``W_B[perm]`` on the output axis; Git Re-Basin convention).
    """

    groups: dict[str, list[AxisRef]]
    sizes: dict[str, int] = field(default_factory=dict)
    nodes: dict[str, list[NodeRef]] = field(default_factory=dict)

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_groups(
        cls,
        groups: Mapping[str, Iterable[Sequence[Any]]],
        state_dict: Mapping[str, torch.Tensor] | None = None,
        sizes: Mapping[str, int] | None = None,
        nodes: Mapping[str, Iterable[Sequence[Any]]] | None = None,
    ) -> "PermutationSpec":
        """A hand-written spec.

        Args:
            groups: name -> iterable of ``(key, axis)`` or ``(key, axis, block)`` or
                ``(key, axis, block, offset)``.
            state_dict: optional; group sizes are inferred from its shapes
                (``shape[axis] // block`` of the first entry, when the group has offset 0).
            sizes: optional explicit sizes (override inference).
            nodes: optional name -> iterable of ``(node_name, dim[, offset[, kind]])`` for
                activation matching.

        Sizes that are neither given nor inferable are inferred later from the state dict passed
        to :func:`~llfc.permutation.apply_permutation` or the matching functions.
        """
        g2 = {str(g): [AxisRef(*ref) for ref in refs] for g, refs in groups.items()}
        spec = cls(groups=g2, sizes=dict(sizes or {}))
        if nodes:
            for g, refs in nodes.items():
                lst = []
                for r in refs:
                    r = tuple(r)
                    lst.append(NodeRef(r[0], r[1] if len(r) > 1 else 1, r[2] if len(r) > 2 else 0,
                                       r[3] if len(r) > 3 else "activation"))
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
        }

    def __str__(self) -> str:
        lines = [f"PermutationSpec: {len(self.groups)} groups, "
                 f"{sum(self.sizes.get(g, 0) for g in self.groups)} permutable units"]
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
# Union-find and the tracing context handed to handlers
# ---------------------------------------------------------------------------------------------


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.fixed: list[bool] = []
        self.origin: list[str | None] = []

    def new(self, size: int, origin: str | None) -> int:
        self.parent.append(len(self.parent))
        self.size.append(int(size))
        self.fixed.append(False)
        self.origin.append(origin)
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> bool:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return True
        if self.size[ra] != self.size[rb]:
            return False
        lo, hi = min(ra, rb), max(ra, rb)  # the earlier-created root survives (stable names)
        self.parent[hi] = lo
        self.fixed[lo] = self.fixed[lo] or self.fixed[hi]
        return True


def _node_path(node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        last = list(stack.keys())[-1]
        return str(last) if last else "<top level>"
    return "<top level>"


def _target_name(node: fx.Node) -> str:
    t = node.target
    if node.op == "call_method":
        return f"Tensor.{t}"
    if node.op == "call_function":
        mod = getattr(t, "__module__", None) or ""
        name = getattr(t, "__name__", str(t))
        if mod.startswith("torch.nn.functional"):
            return f"torch.nn.functional.{name}"
        if mod in ("_operator", "operator"):
            return f"operator.{name}"
        if "torch" in mod or mod == "":
            return f"torch.{name}"
        return f"{mod}.{name}"
    return str(t)


class TraceContext:
    """State handed to permutation handlers while :func:`derive_spec` walks the fx graph.

    A handler is ``handler(ctx: TraceContext, node: torch.fx.Node) -> FeatAxis | None``: it reads
    the feature axes of its inputs (:meth:`axis`), joins axes that must share a permutation
    (:meth:`join`), declares which parameter axes follow which feature axis (:meth:`bind`), and
    returns the feature axis of its output (``None`` when the output carries no permutable units,
    e.g. a shape or a channel reduction). :meth:`new_axis` starts a fresh group (a Linear/Conv
    output); :meth:`fail` raises :class:`~llfc.errors.UnsupportedOperationError`.
    """

    def __init__(self, model: nn.Module, gm: fx.GraphModule) -> None:
        self.model = model
        self.gm = gm
        self.uf = _UnionFind()
        self.axes: dict[fx.Node, FeatAxis | None] = {}
        self.params: dict[tuple[str, int], tuple[FeatAxis, int]] = {}
        self.node: fx.Node | None = None
        self._modules = dict(model.named_modules())

    # -- reading ---------------------------------------------------------------------------
    def arg(self, i: int, name: str, default: Any = None) -> Any:
        """Positional argument ``i`` or keyword ``name`` of the current node."""
        node = self.node
        if len(node.args) > i:
            return node.args[i]
        return node.kwargs.get(name, default)

    def axis(self, value: Any) -> FeatAxis | None:
        """Feature axis of an fx node argument (``None`` for constants and unpermuted tensors)."""
        if isinstance(value, fx.Node):
            return self.axes.get(value)
        return None

    def shape(self, value: Any) -> tuple[int, ...] | None:
        """Shape of a node's tensor output from the shape propagation (``None`` if not a tensor)."""
        if isinstance(value, fx.Node):
            tm = value.meta.get("tensor_meta")
            if isinstance(tm, TensorMetadata):
                return tuple(tm.shape)
        return None

    def module(self, node: fx.Node | None = None) -> nn.Module:
        """The ``nn.Module`` called by a ``call_module`` node."""
        node = node or self.node
        return self._modules[str(node.target)]

    def size(self, ax: FeatAxis) -> int:
        """Length of a feature axis: Σ part size × block."""
        return sum(self.uf.size[e] * b for e, b in ax.parts)

    # -- writing ---------------------------------------------------------------------------
    def new_axis(self, size: int, dim: int, origin: str | None = None) -> FeatAxis:
        """A fresh group of ``size`` units on dimension ``dim`` (e.g. a Linear's outputs)."""
        e = self.uf.new(size, origin if origin is not None else _node_path(self.node))
        return FeatAxis(dim, ((e, 1),))

    def join(self, a: FeatAxis | None, b: FeatAxis | None) -> None:
        """Require ``a`` and ``b`` to share one permutation (e.g. both sides of a residual add)."""
        if a is None or b is None:
            return
        if len(a.parts) != len(b.parts) or any(pa[1] != pb[1] for pa, pb in zip(a.parts, b.parts)):
            self.fail("it combines two feature axes with different structure (concatenated/flattened differently)")
        for (ea, _), (eb, _) in zip(a.parts, b.parts):
            if not self.uf.union(ea, eb):
                self.fail(f"it combines feature axes of different sizes ({self.uf.size[ea]} vs {self.uf.size[eb]})")

    def fix(self, a: FeatAxis | None) -> None:
        """Mark the groups of ``a`` as not permutable (they reach the model's input or output)."""
        if a is None:
            return
        for e, _ in a.parts:
            self.uf.fixed[self.uf.find(e)] = True

    def bind(self, key: str, axis: int, ax: FeatAxis, *, segment_offset: int = 0) -> None:
        """Declare that state-dict entry ``key`` is reordered along ``axis`` with feature axis ``ax``."""
        prev = self.params.get((key, axis))
        if prev is not None:
            pax, poff = prev
            if poff != segment_offset:
                self.fail(f"parameter {key!r} axis {axis} is bound twice at different offsets")
            self.join(pax, ax)
            return
        self.params[(key, axis)] = (ax, segment_offset)

    def fail(self, reason: str) -> None:
        """Raise :class:`~llfc.errors.UnsupportedOperationError` for the current node."""
        raise _unsupported(self.node, reason)

    def param_key(self, name: str, node: fx.Node | None = None) -> str:
        """State-dict key of parameter/buffer ``name`` of the module called by ``node``."""
        node = node or self.node
        return f"{node.target}.{name}" if node.target else name


def _unsupported(node: fx.Node, reason: str | None = None) -> UnsupportedOperationError:
    op = _target_name(node) if node.op != "call_module" else type(
        node.graph.owning_module.get_submodule(str(node.target))).__qualname__
    why = f" because {reason}" if reason else " (no permutation handler is registered for it)"
    return UnsupportedOperationError(
        f"cannot derive a permutation spec: operation {op} at module path {_node_path(node)!r} "
        f"(fx node {node.name!r}) is not supported{why}. Register a handler with "
        f"llfc.permutation.register_handler({op.split('.')[-1] if node.op == 'call_method' else op}, handler) "
        "(see docs/permutation.md, 'Handlers'), or write the spec by hand with "
        "PermutationSpec.from_groups({...}) and pass it as spec=."
    )


# ---------------------------------------------------------------------------------------------
# Handler registry
# ---------------------------------------------------------------------------------------------

Handler = Callable[[TraceContext, fx.Node], "FeatAxis | None"]
_MODULE_HANDLERS: dict[type, tuple[Handler, str]] = {}
_FUNCTION_HANDLERS: dict[Any, tuple[Handler, str]] = {}
_METHOD_HANDLERS: dict[str, tuple[Handler, str]] = {}
_KINDS = ("activation", "layer", "norm", "other")


def register_handler(target: Any, handler: Handler, *, kind: str = "other") -> None:
    """Register how an operation moves permutable axes.

    Args:
        target: an ``nn.Module`` subclass (matched with ``isinstance``; fx traces into custom
            modules unless they are leaves, so only leaf modules need handlers), a function
            called in ``forward`` (e.g. ``torch.nn.functional.relu``), or a Tensor method name
            (e.g. ``"relu"``).
        handler: ``handler(ctx, node) -> FeatAxis | None``; see :class:`TraceContext`.
            Ready-made ones: ``llfc.permutation.spec.passthrough`` (elementwise / per-channel ops
            without parameters).
        kind: ``"activation"`` (elementwise nonlinearity; its output is preferred for activation
            matching), ``"layer"`` (creates new units), ``"norm"`` or ``"other"``.

    A later registration for the same target replaces the earlier one.
    """
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    if isinstance(target, type) and issubclass(target, nn.Module):
        _MODULE_HANDLERS[target] = (handler, kind)
    elif isinstance(target, str):
        _METHOD_HANDLERS[target] = (handler, kind)
    elif callable(target):
        _FUNCTION_HANDLERS[target] = (handler, kind)
    else:
        raise TypeError(f"cannot register a handler for {target!r}: give an nn.Module class, a function or a method name")


def _lookup(node: fx.Node, gm: fx.GraphModule) -> tuple[Handler, str] | None:
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        for cls in type(mod).__mro__:
            if cls in _MODULE_HANDLERS:
                return _MODULE_HANDLERS[cls]
        return None
    if node.op == "call_function":
        try:
            return _FUNCTION_HANDLERS.get(node.target)
        except TypeError:  # unhashable target
            return None
    if node.op == "call_method":
        return _METHOD_HANDLERS.get(str(node.target))
    return None


# ---------------------------------------------------------------------------------------------
# Built-in handlers
# ---------------------------------------------------------------------------------------------


def _first_axis(ctx: TraceContext) -> FeatAxis | None:
    return ctx.axis(ctx.arg(0, "input"))


def passthrough(ctx: TraceContext, node: fx.Node) -> FeatAxis | None:
    """Output has the feature axis of the first argument (elementwise, per-channel, equivariant ops)."""
    ax = ctx.axis(node.args[0]) if node.args else None
    if ax is None and "input" in node.kwargs:
        ax = ctx.axis(node.kwargs["input"])
    return ax


def _channel_passthrough(ctx: TraceContext, node: fx.Node) -> FeatAxis | None:
    """Pooling/padding-free spatial ops: the units must sit on dimension 1 with block 1."""
    ax = passthrough(ctx, node)
    if ax is None:
        return None
    shape = ctx.shape(node.args[0]) if node.args else None
    if ax.dim != 1 or any(b != 1 for _, b in ax.parts):
        if shape is not None and len(shape) >= 3:
            ctx.fail(f"the permuted units are on dimension {ax.dim} (block {ax.parts[0][1]}), not on the channel dimension 1")
    return ax


def _linear(ctx: TraceContext, node: fx.Node) -> FeatAxis | None:
    mod = ctx.module()
    inp = _first_axis(ctx)
    shape = ctx.shape(node.args[0])
    rank = len(shape)
    if inp is not None and inp.dim != rank - 1:
        return inp  # Linear acts on another dimension: the units pass through untouched
    if inp is not None:
        ctx.bind(ctx.param_key("weight"), 1, inp)
    out = ctx.new_axis(mod.out_features, rank - 1)
    ctx.bind(ctx.param_key("weight"), 0, out)
    if mod.bias is not None:
        ctx.bind(ctx.param_key("bias"), 0, out)
    return out


def _conv(ctx: TraceContext, node: fx.Node) -> FeatAxis | None:
    mod = ctx.module()
    inp = _first_axis(ctx)
    if inp is not None and (inp.dim != 1 or any(b != 1 for _, b in inp.parts)):
        ctx.fail("its input's permuted units are not on the channel dimension")
    transposed = isinstance(mod, nn.modules.conv._ConvTransposeNd)
    w = ctx.param_key("weight")
    if mod.groups == 1:
        if inp is not None:
            ctx.bind(w, 0 if transposed else 1, inp)
        out = ctx.new_axis(mod.out_channels, 1)
        ctx.bind(w, 1 if transposed else 0, out)
    elif mod.groups == mod.in_channels == mod.out_channels and not transposed:
        out = inp if inp is not None else ctx.new_axis(mod.out_channels, 1)
        ctx.bind(w, 0, out)
    else:
        ctx.fail(f"grouped convolutions (groups={mod.groups}) are supported only with groups=1 or depthwise "
                 "(groups = in_channels = out_channels)")
    if mod.bias is not None:
        ctx.bind(ctx.param_key("bias"), 0, out)
    return out


def _batchnorm(ctx: TraceContext, node: fx.Node) -> FeatAxis | None:
    mod = ctx.module()
    ax = _first_axis(ctx)
    if ax is None:
        return None
    if ax.dim != 1:
        ctx.fail("the permuted units are not on the channel dimension 1")
    for name in ("weight", "bias", "running_mean", "running_var"):
        if getattr(mod, name, None) is not None:
            ctx.bind(ctx.param_key(name), 0, ax)
    return ax


def _groupnorm(ctx: TraceContext, node: fx.Node) -> FeatAxis | None:
    mod = ctx.module()
    ax = _first_axis(ctx)
    if ax is None:
        return None
    if ax.dim != 1 or any(b != 1 for _, b in ax.parts):
        ctx.fail("the permuted units are not on the channel dimension 1")
    if mod.num_groups not in (1, mod.num_channels):
        ctx.fail(f"GroupNorm with {mod.num_groups} groups of channels only allows permutations inside each group; "
                 "only num_groups=1 (LayerNorm over channels) and num_groups=num_channels are supported")
    if mod.affine:
        ctx.bind(ctx.param_key("weight"), 0, ax)
        ctx.bind(ctx.param_key("bias"), 0, ax)
    return ax


def _layernorm(ctx: TraceContext, node: fx.Node) -> FeatAxis | None:
    mod = ctx.module()
    ax = _first_axis(ctx)
    if ax is None:
        return None
    rank = len(ctx.shape(node.args[0]))
    first = rank - len(mod.normalized_shape)
    if ax.dim >= first and getattr(mod, "weight", None) is not None:
        ctx.bind(ctx.param_key("weight"), ax.dim - first, ax)
        if getattr(mod, "bias", None) is not None:
            ctx.bind(ctx.param_key("bias"), ax.dim - first, ax)
    return ax


def _prelu(ctx: TraceContext, node: fx.Node) -> FeatAxis | None:
    mod = ctx.module()
    ax = _first_axis(ctx)
    if ax is not None and mod.num_parameters > 1:
        if ax.dim != 1:
            ctx.fail("PReLU's per-channel slopes act on dimension 1 but the permuted units are elsewhere")
        ctx.bind(ctx.param_key("weight"), 0, ax)
    return ax


def _reshape_axis(ctx: TraceContext, ax: FeatAxis, in_shape: Sequence[int], out_shape: Sequence[int]) -> FeatAxis:
    """Map a feature axis through a reshape/view/flatten (row-major), or fail."""
    in_shape, out_shape = tuple(in_shape), tuple(out_shape)
    if in_shape == out_shape:
        return ax
    d = ax.dim
    lead = math.prod(in_shape[:d])
    inner_in = math.prod(in_shape[d + 1:])
    total = in_shape[d] * inner_in
    for d2 in range(len(out_shape)):
        if math.prod(out_shape[:d2]) != lead:
            continue
        inner_out = math.prod(out_shape[d2 + 1:])
        if out_shape[d2] * inner_out != total:
            continue
        # block multiplies by inner_in / inner_out (must stay integral for every part)
        parts = []
        ok = True
        for e, b in ax.parts:
            num = b * inner_in
            if num % inner_out:
                ok = False
                break
            parts.append((e, num // inner_out))
        if ok and sum(ctx.uf.size[e] * b for e, b in parts) == out_shape[d2]:
            return FeatAxis(d2, tuple(parts))
    ctx.fail(f"it reshapes {in_shape} to {out_shape} in a way that splits or interleaves the permuted units "
             f"on dimension {d}")
    raise AssertionError  # unreachable


def _flatten(ctx: TraceContext, node: fx.Node) -> FeatAxis | None:
    ax = _first_axis(ctx)
    if ax is None:
        return None
    return _reshape_axis(ctx, ax, ctx.shape(node.args[0]), ctx.shape(node))


def _reshape(ctx: TraceContext, node: fx.Node) -> FeatAxis | None:
    return _flatten(ctx, node)


def _flatten_module(ctx: TraceContext, node: fx.Node) -> FeatAxis | None:
    return _flatten(ctx, node)


def _broadcast_dim(ax: FeatAxis, in_rank: int, out_rank: int) -> FeatAxis:
    return FeatAxis(out_rank - (in_rank - ax.dim), ax.parts)


def _elementwise(ctx: TraceContext, node: fx.Node) -> FeatAxis | None:
    """Binary/n-ary elementwise ops with broadcasting (add, mul, sub, div, ...)."""
    out_shape = ctx.shape(node)
    if out_shape is None:
        return None
    out_rank = len(out_shape)
    result: FeatAxis | None = None
    plain: list[fx.Node] = []
    for a in list(node.args) + list(node.kwargs.values()):
        if not isinstance(a, fx.Node):
            continue
        s = ctx.shape(a)
        if s is None:
            continue
        ax = ctx.axis(a)
        if ax is None:
            plain.append(a)
            continue
        bax = _broadcast_dim(ax, len(s), out_rank)
        if s[ax.dim] == 1 and ctx.size(ax) != 1:
            continue
        if result is None:
            result = bax
        else:
            if result.dim != bax.dim:
                ctx.fail("its operands carry permuted units on different dimensions")
            ctx.join(result, bax)
    if result is not None:
        for a in plain:
            s = ctx.shape(a)
            k = len(s) - (out_rank - result.dim)
            if 0 <= k < len(s) and s[k] != 1:
                ctx.fail(f"it combines the permuted units with an unpermuted tensor {a.name!r} of shape {tuple(s)} "
                         "(e.g. a parameter read with get_attr) along the same dimension")
    return result


def _reduce(ctx: TraceContext, node: fx.Node) -> FeatAxis | None:
    ax = _first_axis(ctx)
    if ax is None:
        return None
    rank = len(ctx.shape(node.args[0]))
    dims = ctx.arg(1, "dim", None)
    keepdim = bool(ctx.arg(2, "keepdim", False))
    if dims is None:
        return None
    if isinstance(dims, int):
        dims = (dims,)
    dims = [d % rank for d in dims]
    if ax.dim in dims:
        return None  # a reduction over the units is invariant to their order
    if keepdim:
        return ax
    return FeatAxis(ax.dim - sum(1 for d in dims if d < ax.dim), ax.parts)


def _cat(ctx: TraceContext, node: fx.Node) -> FeatAxis | None:
    tensors = ctx.arg(0, "tensors")
    dim = ctx.arg(1, "dim", 0)
    out_shape = ctx.shape(node)
    rank = len(out_shape)
    dim = dim % rank
    axes = [ctx.axis(t) for t in tensors]
    if all(a is None for a in axes):
        return None
    if any(a is None for a in axes):
        ctx.fail("it concatenates permuted features with unpermuted tensors")
    if any(a.dim != axes[0].dim for a in axes):
        ctx.fail("its inputs carry permuted units on different dimensions")
    if dim != axes[0].dim:
        for a in axes[1:]:
            ctx.join(axes[0], a)
        return axes[0]
    parts: list[tuple[int, int]] = []
    for a in axes:
        parts.extend(a.parts)
    return FeatAxis(dim, tuple(parts))


def _permute(ctx: TraceContext, node: fx.Node) -> FeatAxis | None:
    ax = _first_axis(ctx)
    if ax is None:
        return None
    rank = len(ctx.shape(node.args[0]))
    dims = node.args[1:] if node.op == "call_method" else (ctx.arg(1, "dims"),)
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = dims[0]
    dims = [d % rank for d in dims]
    return FeatAxis(dims.index(ax.dim), ax.parts)


def _transpose(ctx: TraceContext, node: fx.Node) -> FeatAxis | None:
    ax = _first_axis(ctx)
    if ax is None:
        return None
    rank = len(ctx.shape(node.args[0]))
    d0, d1 = ctx.arg(1, "dim0") % rank, ctx.arg(2, "dim1") % rank
    dim = d1 if ax.dim == d0 else d0 if ax.dim == d1 else ax.dim
    return FeatAxis(dim, ax.parts)


def _getitem(ctx: TraceContext, node: fx.Node) -> FeatAxis | None:
    src = node.args[0]
    ax = ctx.axis(src)
    if ax is None:
        return None
    idx = node.args[1]
    if not isinstance(idx, tuple):
        idx = (idx,)
    d = ax.dim
    pos = 0
    removed_before = 0
    for i, item in enumerate(idx):
        if item is Ellipsis or item is None or isinstance(item, fx.Node):
            ctx.fail("tensor indexing with Ellipsis, None or tensors is not supported")
        if pos == d:
            if not (isinstance(item, slice) and item == slice(None)):
                ctx.fail(f"it indexes/slices the permuted units on dimension {d} ({item!r})")
        elif isinstance(item, int):
            removed_before += 1 if pos < d else 0
        pos += 1
    return FeatAxis(d - removed_before, ax.parts)


def _pad(ctx: TraceContext, node: fx.Node) -> FeatAxis | None:
    ax = _first_axis(ctx)
    if ax is None:
        return None
    pad = ctx.arg(1, "pad")
    rank = len(ctx.shape(node.args[0]))
    k = len(pad) // 2  # pads the last k dimensions, last first
    padded = {rank - 1 - i for i in range(k) if pad[2 * i] or pad[2 * i + 1]}
    if ax.dim in padded:
        ctx.fail("torch.nn.functional.pad pads the channel dimension (a zero-padding 'option-A' shortcut): the "
                 "padded channels are not permutable units. Use a 1x1-convolution projection shortcut, or write "
                 "the spec by hand")
    return ax


def _no_axis(ctx: TraceContext, node: fx.Node) -> FeatAxis | None:
    return None


def _register_builtins() -> None:
    acts_mod = [nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.ELU, nn.SELU,
                nn.CELU, nn.Softplus, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.LogSigmoid,
                nn.Tanhshrink, nn.Softsign]
    for m in acts_mod:
        register_handler(m, passthrough, kind="activation")
    register_handler(nn.PReLU, _prelu, kind="activation")
    for m in [nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
              nn.Softmax, nn.LogSoftmax]:
        register_handler(m, passthrough)
    for m in [nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
              nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
              nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample]:
        register_handler(m, _channel_passthrough)
    register_handler(nn.Linear, _linear, kind="layer")
    for m in [nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d]:
        register_handler(m, _conv, kind="layer")
    for m in [nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d,
              nn.InstanceNorm3d]:
        register_handler(m, _batchnorm, kind="norm")
    register_handler(nn.GroupNorm, _groupnorm, kind="norm")
    register_handler(nn.LayerNorm, _layernorm, kind="norm")
    register_handler(nn.Flatten, _flatten_module)

    act_fns = [torch.relu, torch.relu_, F.relu, F.relu_, F.relu6, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh,
               F.gelu, F.silu, F.leaky_relu, F.elu, F.selu, F.celu, F.softplus, F.mish, F.hardswish,
               F.hardsigmoid, F.hardtanh, F.logsigmoid, F.softsign]
    for f in act_fns:
        register_handler(f, passthrough, kind="activation")
    for name in ["relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_"]:
        register_handler(name, passthrough, kind="activation")
    for f in [F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.softmax, F.log_softmax, torch.softmax,
              torch.log_softmax, operator.neg, torch.neg, operator.pos, torch.clone, torch.abs]:
        register_handler(f, passthrough)
    for f in [F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
              F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
              F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate]:
        register_handler(f, _channel_passthrough)
    for name in ["contiguous", "clone", "detach", "float", "double", "to", "type_as", "neg", "abs", "softmax",
                 "log_softmax"]:
        register_handler(name, passthrough)
    for f in [operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub,
              operator.imul, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div, torch.maximum,
              torch.minimum]:
        register_handler(f, _elementwise)
    for name in ["add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "maximum", "minimum"]:
        register_handler(name, _elementwise)
    register_handler(torch.flatten, _flatten)
    for name in ["flatten", "view", "reshape", "squeeze", "unsqueeze"]:
        register_handler(name, _reshape)
    for f in [torch.reshape, torch.squeeze, torch.unsqueeze]:
        register_handler(f, _reshape)
    for f in [torch.mean, torch.sum, torch.amax, torch.amin]:
        register_handler(f, _reduce)
    for name in ["mean", "sum", "amax", "amin"]:
        register_handler(name, _reduce)
    register_handler(torch.cat, _cat)
    register_handler(torch.concat, _cat)
    register_handler(torch.permute, _permute)
    register_handler("permute", _permute)
    register_handler(torch.transpose, _transpose)
    register_handler("transpose", _transpose)
    register_handler(operator.getitem, _getitem)
    register_handler(F.pad, _pad)
    register_handler(getattr, _no_axis)
    for name in ["size", "dim", "numel"]:
        register_handler(name, _no_axis)


_register_builtins()


# ---------------------------------------------------------------------------------------------
# derive_spec
# ---------------------------------------------------------------------------------------------


def _as_tuple(example_input: Any) -> tuple:
    return tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)


def _clone_inputs(inputs: tuple) -> tuple:
    return tuple(x.clone() if isinstance(x, torch.Tensor) else x for x in inputs)


def trace(model: nn.Module) -> fx.GraphModule:
    """``torch.fx.symbolic_trace(model)`` with an explanatory error.

    Raises:
        UnsupportedOperationError: fx cannot trace the model (data-dependent control flow, ...).
    """
    try:
        return fx.symbolic_trace(model)
    except Exception as exc:  # fx raises TraceError, TypeError, ... depending on the construct
        raise UnsupportedOperationError(
            f"torch.fx cannot trace {type(model).__name__} ({type(exc).__name__}: {exc}). Permutation specs are "
            "derived from the fx graph, so either make the forward's control flow static (no Python branches "
            "or loops that depend on tensor values; see torch.fx's 'Limitations of Symbolic Tracing'), or write "
            "the spec by hand with llfc.permutation.PermutationSpec.from_groups({...}) and pass spec=."
        ) from exc


def derive_spec(
    model: nn.Module,
    example_input: torch.Tensor | Sequence[torch.Tensor],
    *,
    check: bool = True,
    rtol: float = DEFAULT_RTOL,
    seed: int = 0,
) -> PermutationSpec:
    """Derive the permutation spec of ``model`` from its torch.fx graph.

    Args:
        model: any ``nn.Module`` that ``torch.fx.symbolic_trace`` can trace.
        example_input: a batch (or tuple of positional inputs) of the right shape, e.g. (2, C, H, W)
            float32; only shapes matter. It is not modified.
        check: run :func:`check_spec` (random permutation of every group leaves the output
            unchanged, relative tolerance ``rtol``) before returning.
        rtol: tolerance of the check, ‖Δout‖ / ‖out‖ (default 1e-4).
        seed: seed of the check's random permutations.

    Returns:
        The :class:`PermutationSpec` (groups named after the module that creates their units).

    Raises:
        UnsupportedOperationError: fx cannot trace the model, or an operation has no handler
            (the message names the operation and module path, and how to register a handler).
        SpecCheckError: the derived spec fails the self-test (a bug in a handler; the message
            names the group).
    """
    gm = trace(model)
    inputs = _as_tuple(example_input)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*_clone_inputs(inputs))
    finally:
        model.train(was_training)

    ctx = TraceContext(model, gm)
    order: list[tuple[fx.Node, str]] = []
    for node in gm.graph.nodes:
        ctx.node = node
        if node.op == "placeholder":
            s = ctx.shape(node)
            if s is not None and len(s) >= 2:
                ax = ctx.new_axis(s[1], 1, origin="<input>")
                ctx.fix(ax)
                ctx.axes[node] = ax
            else:
                ctx.axes[node] = None
            continue
        if node.op == "output":
            for leaf in _node_leaves(node.args):
                ctx.fix(ctx.axes.get(leaf))
            continue
        if node.op == "get_attr":
            ctx.axes[node] = None
            continue
        found = _lookup(node, gm)
        if found is None:
            tm = node.meta.get("tensor_meta")
            has_tensor = tm is not None and any(isinstance(t, TensorMetadata) for t in _meta_leaves(tm))
            carries = any(ctx.axes.get(a) is not None for a in _node_leaves((node.args, node.kwargs)))
            if not has_tensor and not carries:
                ctx.axes[node] = None
                continue
            raise _unsupported(node)
        handler, kind = found
        ax = handler(ctx, node)
        ctx.axes[node] = ax
        if ax is not None:
            order.append((node, kind))

    spec = _build_spec(ctx, order)
    if check:
        check_spec(model, spec, example_input, rtol=rtol, seed=seed)
    return spec


def _node_leaves(obj: Any) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg(obj, lambda n: out.append(n) or n)
    return out


def _meta_leaves(obj: Any) -> list[Any]:
    if isinstance(obj, (list, tuple)) and not isinstance(obj, TensorMetadata):
        return [x for o in obj for x in _meta_leaves(o)]
    if isinstance(obj, dict):
        return [x for o in obj.values() for x in _meta_leaves(o)]
    return [obj]


def _build_spec(ctx: TraceContext, order: list[tuple[fx.Node, str]]) -> PermutationSpec:
    uf = ctx.uf
    refs: dict[int, list[AxisRef]] = {}
    for (key, axis), (ax, base) in ctx.params.items():
        off = base
        for e, b in ax.parts:
            r = uf.find(e)
            if not uf.fixed[r]:
                refs.setdefault(r, []).append(AxisRef(key, axis, b, off))
            off += uf.size[e] * b
    sd_order = {k: i for i, k in enumerate(ctx.model.state_dict().keys())}
    names: dict[int, str] = {}
    used: set[str] = set()
    for root in sorted(refs):
        base = uf.origin[root] or f"group{root}"
        name, k = base, 1
        while name in used:
            k += 1
            name = f"{base}#{k}"
        used.add(name)
        names[root] = name
    spec = PermutationSpec(groups={}, sizes={}, nodes={})
    for root in sorted(refs):
        g = names[root]
        spec.groups[g] = sorted(refs[root], key=lambda r: (sd_order.get(r.key, 1 << 30), r.axis, r.offset))
        spec.sizes[g] = uf.size[root]
        spec.nodes[g] = []
    for node, kind in order:
        ax = ctx.axes[node]
        off = 0
        for e, b in ax.parts:
            r = uf.find(e)
            if r in names and b == 1:
                spec.nodes[names[r]].append(NodeRef(node.name, ax.dim, off, kind))
            off += uf.size[e] * b
    return spec


# ---------------------------------------------------------------------------------------------
# check_spec
# ---------------------------------------------------------------------------------------------


def _outputs_flat(out: Any) -> torch.Tensor:
    leaves = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    return torch.cat([t.detach().double().reshape(-1) for t in leaves])


def _run(model: nn.Module, state: Mapping[str, torch.Tensor], inputs: tuple) -> torch.Tensor:
    with torch.no_grad():
        out = torch.func.functional_call(model, dict(state), _clone_inputs(inputs), strict=False)
    return _outputs_flat(out)


def relative_output_change(
    model: nn.Module, state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor],
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
            out = torch.func.functional_call(model, dict(sd), _clone_inputs(inputs), strict=False)
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

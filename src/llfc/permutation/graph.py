"""Derivation of a :class:`~llfc.permutation.spec.PermutationSpec` from a model's torch.fx graph.

:func:`derive_spec` traces the model with ``torch.fx.symbolic_trace``, propagates the example
input's shapes (``torch.fx.passes.shape_prop.ShapeProp``) and walks the graph once, calling one
*handler* per operation (:mod:`llfc.permutation.handlers`, in the style of PLeaS'
``PermutationProp``). Handlers join feature axes with a union-find through :class:`TraceContext`.
Groups that reach the model's input or output are not permuted. The result is checked by
:func:`~llfc.permutation.spec.check_spec`.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from llfc.errors import UnsupportedOperationError
from llfc.permutation.spec import (
    DEFAULT_RTOL,
    AxisRef,
    FeatAxis,
    NodeRef,
    PermutationSpec,
    _as_tuple,
    _clone_inputs,
    check_spec,
)

__all__ = ["TraceContext", "derive_spec", "trace"]


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
# derive_spec
# ---------------------------------------------------------------------------------------------


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



from llfc.permutation.handlers import _lookup  # (the registry imports TraceContext from here)

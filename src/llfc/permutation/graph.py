"""Derivation of a :class:`~llfc.permutation.spec.PermutationSpec` from a model's torch.fx graph.

:func:`derive_spec` traces the model with ``torch.fx.symbolic_trace``, propagates the example
input's shapes (``torch.fx.passes.shape_prop.ShapeProp``) and walks the graph once, calling one
*handler* per operation (:mod:`llfc.permutation.handlers`, in the style of PLeaS'
``PermutationProp``). Handlers join feature axes with a union-find through :class:`TraceContext`.
Groups that reach the model's input or output are not permuted. The result is checked by
:func:`~llfc.permutation.spec.check_spec`.
"""

from __future__ import annotations

import contextlib
import io
import sys
from typing import Any, NoReturn, Sequence, cast

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from llfc.errors import ConfigError, UnsupportedOperationError
from llfc.permutation.spec import (
    DEFAULT_RTOL,
    AxisRef,
    FeatAxis,
    HeadAxes,
    NodeRef,
    PermutationSpec,
    _as_tuple,
    _clone_inputs,
    check_spec,
)

__all__ = ["TraceContext", "derive_spec", "trace"]

#: Why a tensor whose feature dimension is split into attention heads cannot go through an operation.
HEADS_REASON = (
    "it acts on attention heads split into (heads, head_dim) dimensions in a way that is not permutation-"
    "equivariant: only reshapes/views that split or merge the two, transpose/permute, unary elementwise ops, "
    "dropout, multiplication by a scalar and scaled_dot_product_attention keep the symmetry of heads and of "
    "the dimensions within a head (rotary position embeddings, grouped-query attention and slicing of head "
    "dimensions are not permutation symmetries), so llfc refuses rather than permute half of the model"
)


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


def _head_root_path(node: fx.Node) -> str:
    path = _node_path(node)
    return path if path != "<top level>" else ""


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
        self.axes: dict[fx.Node, FeatAxis | HeadAxes | None] = {}
        self.params: dict[tuple[str, int], tuple[FeatAxis, int]] = {}
        self.node: fx.Node | None = None
        self._modules = dict(model.named_modules())
        # attention heads: element -> (H, d_h) for units split into heads; head links (q/k element,
        # v element, attention module path) whose heads share one permutation
        self.splits: dict[int, tuple[int, int]] = {}
        self.head_links: list[tuple[int, int, str]] = []
        # get_attr nodes (and expand/slices of them) reading a parameter: node -> (key, dim shift,
        # dims sliced); bound by the op that combines them with features (class token, position table)
        self.param_src: dict[fx.Node, tuple[str, int, frozenset]] = {}
        # ops returning tuples (nn.MultiheadAttention): node -> per-element feature axes
        self.tuple_axes: dict[fx.Node, tuple[Any, ...]] = {}

    # -- reading ---------------------------------------------------------------------------
    def arg(self, i: int, name: str, default: Any = None) -> Any:
        """Positional argument ``i`` or keyword ``name`` of the current node."""
        node = self.node
        assert node is not None  # set while derive_spec walks the graph
        if len(node.args) > i:
            return node.args[i]
        return node.kwargs.get(name, default)

    def axis(self, value: Any) -> FeatAxis | None:
        """Feature axis of an fx node argument (``None`` for constants and unpermuted tensors).

        Raises:
            UnsupportedOperationError: the argument carries attention heads split into two
                dimensions (:class:`HeadAxes`); handlers that understand heads read
                :meth:`raw_axis` instead.
        """
        ax = self.raw_axis(value)
        if isinstance(ax, HeadAxes):
            self.fail(HEADS_REASON)
        return ax

    def raw_axis(self, value: Any) -> FeatAxis | HeadAxes | None:
        """Like :meth:`axis`, but returns a :class:`HeadAxes` as it is."""
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
        assert node is not None  # set while derive_spec walks the graph
        return self._modules[str(node.target)]

    def size(self, ax: FeatAxis) -> int:
        """Length of a feature axis: Σ part size × block."""
        return sum(self.uf.size[e] * b for e, b in ax.parts)

    # -- writing ---------------------------------------------------------------------------
    def new_axis(self, size: int, dim: int, origin: str | None = None) -> FeatAxis:
        """A fresh group of ``size`` units on dimension ``dim`` (e.g. a Linear's outputs)."""
        e = self.uf.new(size, origin if origin is not None else _node_path(cast(fx.Node, self.node)))
        return FeatAxis(dim, ((e, 1),))

    def join(self, a: FeatAxis | None, b: FeatAxis | None) -> None:
        """Require ``a`` and ``b`` to share one permutation (e.g. both sides of a residual add)."""
        if a is None or b is None:
            return
        if len(a.parts) != len(b.parts) or any(pa[1] != pb[1] for pa, pb in zip(a.parts, b.parts)):
            self.fail("it combines two feature axes with different structure (concatenated/flattened differently)")
        for (ea, _), (eb, _) in zip(a.parts, b.parts):
            self.join_elements(ea, eb)

    def fix(self, a: FeatAxis | HeadAxes | None) -> None:
        """Mark the groups of ``a`` as not permutable (they reach the model's input or output)."""
        if a is None:
            return
        for e in [a.elem] if isinstance(a, HeadAxes) else [e for e, _ in a.parts]:
            self.uf.fixed[self.uf.find(e)] = True

    def split_heads(self, elem: int, n_heads: int, head_dim: int) -> None:
        """Declare that the units of ``elem`` are ``n_heads`` contiguous heads of ``head_dim`` units."""
        r = self.uf.find(elem)
        prev = self.splits.get(r)
        if prev is not None and prev != (n_heads, head_dim):
            self.fail(
                f"its units are split into {n_heads} heads of {head_dim} here and {prev[0]} heads of "
                f"{prev[1]} elsewhere"
            )
        self.splits[r] = (n_heads, head_dim)

    def join_elements(self, ea: int, eb: int) -> None:
        """Require two union-find elements to share one permutation (keeps their head split)."""
        ra, rb = self.uf.find(ea), self.uf.find(eb)
        sa, sb = self.splits.get(ra), self.splits.get(rb)
        if sa is not None and sb is not None and sa != sb:
            self.fail(
                f"it combines units split into {sa[0]} heads of {sa[1]} with units split into {sb[0]} heads of {sb[1]}"
            )
        if not self.uf.union(ea, eb):
            self.fail(f"it combines feature axes of different sizes ({self.uf.size[ra]} vs {self.uf.size[rb]})")
        split = sa or sb
        if split is not None:
            self.splits[self.uf.find(ea)] = split

    def link_heads(self, qk_elem: int, v_elem: int, path: str | None = None) -> None:
        """Queries/keys ``qk_elem`` and values ``v_elem`` of one attention (module ``path``, default
        the current node's): one permutation of heads."""
        self.head_links.append((qk_elem, v_elem, _head_root_path(cast(fx.Node, self.node)) if path is None else path))

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

    def fail(self, reason: str) -> NoReturn:
        """Raise :class:`~llfc.errors.UnsupportedOperationError` for the current node."""
        raise _unsupported(cast(fx.Node, self.node), reason)

    def param_key(self, name: str, node: fx.Node | None = None) -> str:
        """State-dict key of parameter/buffer ``name`` of the module called by ``node``."""
        node = node or self.node
        assert node is not None  # set while derive_spec walks the graph
        return f"{node.target}.{name}" if node.target else name


def _unsupported(node: fx.Node, reason: str | None = None) -> UnsupportedOperationError:
    op = (
        _target_name(node)
        if node.op != "call_module"
        else type(cast(fx.GraphModule, node.graph.owning_module).get_submodule(str(node.target))).__qualname__
    )
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


def _buffer_keys(model: nn.Module) -> set[str]:
    """State-dict keys of ``model``'s buffers (a ``module.`` wrapper prefix removed)."""
    return {k[len("module.") :] if k.startswith("module.") else k for k, _ in model.named_buffers()}


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
    printed = io.StringIO()  # ShapeProp prints the traceback of a failing node before re-raising
    try:
        with torch.no_grad(), contextlib.redirect_stderr(printed):
            ShapeProp(gm).propagate(*_clone_inputs(inputs))
    except Exception as exc:  # the model's own error (shape mismatch, a torch._assert, ...)
        cause = exc.__cause__ or exc
        raise ConfigError(
            f"{type(model).__name__} cannot run on the example input of shape "
            f"{[tuple(x.shape) for x in inputs if isinstance(x, torch.Tensor)]} "
            f"({type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}); the permutation spec is "
            "derived from one forward pass, so give an example batch the model accepts (example_input= / --dataset)."
        ) from exc
    finally:
        model.train(was_training)
    sys.stderr.write(printed.getvalue())  # what the model printed (warnings) on a successful pass

    ctx = TraceContext(model, gm)
    order: list[tuple[fx.Node, str]] = []
    ax: FeatAxis | HeadAxes | None
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
            t = _get_attr_tensor(gm, node)
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() >= 1:
                ctx.param_src[node] = (str(node.target), 0, frozenset())
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

    _join_tied(ctx)
    spec = _build_spec(ctx, order)
    spec.buffers = frozenset(k for k in spec.keys() if k in _buffer_keys(model))
    if check:
        check_spec(model, spec, example_input, rtol=rtol, seed=seed)
    return spec


_TIED_FIX = "Untie them, or write the spec by hand with PermutationSpec.from_groups({...}) and pass spec=."


def _join_tied(ctx: TraceContext) -> None:
    """Make tied parameters (one ``nn.Parameter`` under several names, e.g. ``fc2.weight = fc1.weight``)
    move alike: on every axis, the groups bound to the names are joined, and an axis bound under one
    name only is fixed (the other name does not move along it).

    Raises:
        UnsupportedOperationError: an axis is bound under the names at different offsets, or to feature
            axes of different structure, sizes or head splits, which one permutation cannot serve.
    """
    first: dict[int, str] = {}
    for name, p in ctx.model.named_parameters(remove_duplicate=False):
        keep = first.setdefault(id(p), name)
        if keep == name:
            continue
        for axis in range(p.dim()):
            a, b = ctx.params.get((keep, axis)), ctx.params.get((name, axis))
            if a is None or b is None:  # moved under one name only: it must not move at all
                ctx.fix(a[0] if a is not None else b[0] if b is not None else None)
                continue
            why = f"{name!r} and {keep!r} are one tied parameter, its axis {axis} used differently under each name"
            if a[1] != b[1] or [s for _, s in a[0].parts] != [s for _, s in b[0].parts]:
                raise UnsupportedOperationError(f"cannot derive a permutation spec: {why}. {_TIED_FIX}")
            for (ea, _), (eb, _) in zip(a[0].parts, b[0].parts):
                try:
                    ctx.join_elements(ea, eb)
                except UnsupportedOperationError as exc:  # sizes or head splits differ
                    raise UnsupportedOperationError(
                        f"cannot derive a permutation spec: {why} ({exc}). {_TIED_FIX}"
                    ) from exc


def _get_attr_tensor(gm: fx.GraphModule, node: fx.Node) -> Any:
    obj: Any = gm
    for part in str(node.target).split("."):
        obj = getattr(obj, part, None)
    return obj


def _node_leaves(obj: Any) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg(obj, lambda n: out.append(n) or n)  # type: ignore[func-returns-value]  # append, then keep n
    return out


def _meta_leaves(obj: Any) -> list[Any]:
    if isinstance(obj, (list, tuple)) and not isinstance(obj, TensorMetadata):
        return [x for o in obj for x in _meta_leaves(o)]
    if isinstance(obj, dict):
        return [x for o in obj.values() for x in _meta_leaves(o)]
    return [obj]


def _head_sets(ctx: TraceContext) -> tuple[dict[int, int], dict[int, str], dict[int, str]]:
    """Union of the roots whose heads share one permutation: root -> head-set id (its smallest root),
    head-set id -> attention path, root -> role (``"qk"`` or ``"ov"``)."""
    uf = ctx.uf
    parent: dict[int, int] = {}

    def find(r: int) -> int:
        while parent.setdefault(r, r) != r:
            r = parent[r]
        return r

    role: dict[int, str] = {}
    paths: dict[int, str] = {}
    for qk, v, path in ctx.head_links:
        rq, rv = uf.find(qk), uf.find(v)
        role.setdefault(rq, "qk")
        role.setdefault(rv, "ov")
        a, b = find(rq), find(rv)
        lo, hi = min(a, b), max(a, b)
        parent[hi] = lo
        paths.setdefault(rq, path)
    for r in ctx.splits:
        find(uf.find(r))
    sets = {r: find(r) for r in list(parent)}
    set_path: dict[int, str] = {}
    for r, s in sorted(sets.items()):
        set_path.setdefault(s, paths.get(r, uf.origin[r] or f"group{r}"))
    return sets, set_path, role


def _build_spec(ctx: TraceContext, order: list[tuple[fx.Node, str]]) -> PermutationSpec:
    """Turn the union-find into named groups.

    A root split into heads (:meth:`TraceContext.split_heads`) gives one group of heads per head set
    (block d_h on each axis, shared by the linked q/k and v/o roots) and one group per head and root
    (``<attention>.qk.h{i}`` / ``<attention>.ov.h{i}``, d_h units at offset i·d_h); the heads group
    lists them in ``spec.heads``. A head set with a fixed member is not permuted at all.
    """
    uf = ctx.uf
    sets, set_path, role = _head_sets(ctx)
    fixed_set = {s for r, s in sets.items() if uf.fixed[r]}
    split = {r: hw for r, hw in ctx.splits.items() if r == uf.find(r)}
    # a "unit" is a plain root (int), a head set ("heads", set id) or a head of a root ("head", root, i)
    refs: dict[Any, list[AxisRef]] = {}
    ax: FeatAxis | HeadAxes | None
    base: int | str  # a segment offset below, then a group name

    def add(unit_key: Any, ref: AxisRef) -> None:
        refs.setdefault(unit_key, []).append(ref)

    for (key, axis), (ax, base) in ctx.params.items():
        off = base
        for e, b in ax.parts:
            r = uf.find(e)
            if r in split:
                if sets[r] not in fixed_set:
                    n_heads, dh = split[r]
                    add(("heads", sets[r]), AxisRef(key, axis, b * dh, off))
                    for i in range(n_heads):
                        add(("head", r, i), AxisRef(key, axis, b, off + i * dh * b))
            elif not uf.fixed[r]:
                add(r, AxisRef(key, axis, b, off))
            off += uf.size[e] * b

    def sort_key(u: Any) -> tuple:
        if isinstance(u, int):
            return (u, 0, 0, 0)
        if u[0] == "heads":
            return (u[1], 1, 0, 0)
        return (sets[u[1]], 2, u[1], u[2])

    sd_order = {k: i for i, k in enumerate(ctx.model.state_dict().keys())}
    names: dict[Any, str] = {}
    used: set[str] = set()
    for u in sorted(refs, key=sort_key):
        if isinstance(u, int):
            base = uf.origin[u] or f"group{u}"
        elif u[0] == "heads":
            base = f"{set_path[u[1]]}.heads".lstrip(".")
        else:
            base = f"{set_path[sets[u[1]]]}.{role.get(u[1], 'units')}.h{u[2]}".lstrip(".")
        name, k = base, 1
        while name in used:
            k += 1
            name = f"{base}#{k}"
        used.add(name)
        names[u] = name
    spec = PermutationSpec(groups={}, sizes={}, nodes={})
    for u in sorted(refs, key=sort_key):
        g = names[u]
        spec.groups[g] = sorted(refs[u], key=lambda r: (sd_order.get(r.key, 1 << 30), r.axis, r.offset))
        if isinstance(u, int):
            spec.sizes[g] = uf.size[u]
        elif u[0] == "heads":
            spec.sizes[g] = next(split[r][0] for r, s in sets.items() if s == u[1] and r in split)
            spec.heads[g] = {}
        else:
            spec.sizes[g] = split[u[1]][1]
            hg = names[("heads", sets[u[1]])]
            spec.heads[hg].setdefault(role.get(u[1], "units"), []).append(g)
        spec.nodes[g] = []
    for node, kind in order:
        ax = ctx.axes[node]
        if not isinstance(ax, FeatAxis):
            continue
        off = 0
        for e, b in ax.parts:
            r = uf.find(e)
            if r in names and b == 1:
                spec.nodes[names[r]].append(NodeRef(node.name, ax.dim, off, kind))
            elif r in split and b == 1 and ("heads", sets[r]) in names:
                n_heads, dh = split[r]
                spec.nodes[names[("heads", sets[r])]].append(NodeRef(node.name, ax.dim, off, role.get(r, "units")))
                for i in range(n_heads):
                    spec.nodes[names[("head", r, i)]].append(NodeRef(node.name, ax.dim, off + i * dh, kind))
            off += uf.size[e] * b
    return spec


from llfc.permutation.handlers import _lookup  # noqa: E402  (the registry imports TraceContext from here)

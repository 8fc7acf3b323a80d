"""The per-operation handler registry of the spec derivation (PLeaS' ``PermutationProp`` style).

A handler is ``handler(ctx: TraceContext, node: torch.fx.Node) -> FeatAxis | None``: it tells how one
operation moves permutable units (see :class:`~llfc.permutation.graph.TraceContext`).
:func:`register_handler` adds or replaces one for an ``nn.Module`` class, a function or a Tensor
method name; the built-in handlers below cover elementwise activations, Linear/Conv, the
normalisations, pooling, reshapes, concatenation, indexing and padding.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Callable, Sequence, cast

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from llfc.permutation.graph import HEADS_REASON, TraceContext
from llfc.permutation.spec import FeatAxis, HeadAxes

__all__ = ["Handler", "passthrough", "register_handler"]

Handler = Callable[[TraceContext, fx.Node], "FeatAxis | HeadAxes | None"]
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
        raise TypeError(
            f"cannot register a handler for {target!r}: give an nn.Module class, a function or a method name"
        )


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


def passthrough(ctx: TraceContext, node: fx.Node) -> FeatAxis | HeadAxes | None:
    """Output has the feature axis of the first argument (elementwise, per-channel, equivariant ops).

    Attention heads (:class:`HeadAxes`) pass through too: a unary elementwise op, dropout or a
    softmax over any dimension commutes with every permutation of heads and within-head units.
    """
    ax = ctx.raw_axis(node.args[0]) if node.args else None
    if ax is None and "input" in node.kwargs:
        ax = ctx.raw_axis(node.kwargs["input"])
    return ax


def _channel_passthrough(ctx: TraceContext, node: fx.Node) -> FeatAxis | None:
    """Pooling/padding-free spatial ops: the units must sit on dimension 1 with block 1."""
    ax = _first_axis(ctx)
    if ax is None:
        return None
    shape = ctx.shape(node.args[0]) if node.args else None
    if ax.dim != 1 or any(b != 1 for _, b in ax.parts):
        if shape is not None and len(shape) >= 3:
            ctx.fail(
                f"the permuted units are on dimension {ax.dim} (block {ax.parts[0][1]}), not on the channel dimension 1"
            )
    return ax


def _linear(ctx: TraceContext, node: fx.Node) -> FeatAxis | None:
    mod = cast(nn.Linear, ctx.module())
    inp = _first_axis(ctx)
    shape = ctx.shape(node.args[0])
    assert shape is not None  # a Linear's input is a tensor
    rank = len(shape)
    if inp is not None and inp.dim != rank - 1:
        if not all(ctx.uf.fixed[ctx.uf.find(e)] for e, _ in inp.parts):
            return inp  # Linear acts on another dimension: the units pass through untouched
        inp = None  # a fixed axis elsewhere (the token dimension of a (B, T, F) model input): new units
    if inp is not None:
        ctx.bind(ctx.param_key("weight"), 1, inp)
    out = ctx.new_axis(mod.out_features, rank - 1)
    ctx.bind(ctx.param_key("weight"), 0, out)
    if mod.bias is not None:
        ctx.bind(ctx.param_key("bias"), 0, out)
    return out


def _conv(ctx: TraceContext, node: fx.Node) -> FeatAxis | None:
    mod = cast(nn.modules.conv._ConvNd, ctx.module())
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
        ctx.fail(
            f"grouped convolutions (groups={mod.groups}) are supported only with groups=1 or depthwise "
            "(groups = in_channels = out_channels)"
        )
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
        ctx.fail(
            f"GroupNorm with {mod.num_groups} groups of channels only allows permutations inside each group; "
            "only num_groups=1 (LayerNorm over channels) and num_groups=num_channels are supported"
        )
    if mod.affine:
        ctx.bind(ctx.param_key("weight"), 0, ax)
        ctx.bind(ctx.param_key("bias"), 0, ax)
    return ax


def _layernorm(ctx: TraceContext, node: fx.Node) -> FeatAxis | None:
    mod = cast(nn.LayerNorm, ctx.module())
    ax = _first_axis(ctx)
    if ax is None:
        return None
    rank = len(cast("tuple[int, ...]", ctx.shape(node.args[0])))
    first = rank - len(mod.normalized_shape)
    if ax.dim >= first and getattr(mod, "weight", None) is not None:
        ctx.bind(ctx.param_key("weight"), ax.dim - first, ax)
        if getattr(mod, "bias", None) is not None:
            ctx.bind(ctx.param_key("bias"), ax.dim - first, ax)
    return ax


def _prelu(ctx: TraceContext, node: fx.Node) -> FeatAxis | None:
    mod = cast(nn.PReLU, ctx.module())
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
    inner_in = math.prod(in_shape[d + 1 :])
    total = in_shape[d] * inner_in
    for d2 in range(len(out_shape)):
        if math.prod(out_shape[:d2]) != lead:
            continue
        inner_out = math.prod(out_shape[d2 + 1 :])
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
    ctx.fail(
        f"it reshapes {in_shape} to {out_shape} in a way that splits or interleaves the permuted units on dimension {d}"
    )
    raise AssertionError  # unreachable


def _split_heads(ctx: TraceContext, ax: FeatAxis, in_shape: Sequence[int], out_shape: Sequence[int]) -> HeadAxes | None:
    """A view that splits the feature dimension d of D units into (H, d_h) at dimensions (d, d+1),
    leaving the other dimensions alone: the units become H attention heads of d_h (``None`` if the
    reshape is not such a split)."""
    d = ax.dim
    in_shape, out_shape = tuple(in_shape), tuple(out_shape)
    if len(ax.parts) != 1 or ax.parts[0][1] != 1 or len(out_shape) != len(in_shape) + 1:
        return None
    if out_shape[:d] != in_shape[:d] or out_shape[d + 2 :] != in_shape[d + 1 :]:
        return None
    n_heads, dh = out_shape[d], out_shape[d + 1]
    if n_heads * dh != in_shape[d] or n_heads < 2 or dh < 2:  # unsqueeze is not a split into heads
        return None
    e = ax.parts[0][0]
    ctx.split_heads(e, n_heads, dh)
    return HeadAxes(d, d + 1, e)


def _merge_heads(ctx: TraceContext, ax: HeadAxes, in_shape: Sequence[int], out_shape: Sequence[int]) -> FeatAxis:
    """A reshape merging adjacent (heads, head_dim) dimensions back into one feature dimension."""
    in_shape, out_shape = tuple(in_shape), tuple(out_shape)
    h = ax.head_dim
    if (
        ax.inner_dim == h + 1
        and len(out_shape) == len(in_shape) - 1
        and out_shape[:h] == in_shape[:h]
        and out_shape[h + 1 :] == in_shape[h + 2 :]
        and out_shape[h] == in_shape[h] * in_shape[h + 1]
    ):
        return FeatAxis(h, ((ax.elem, 1),))
    ctx.fail(
        f"it reshapes {in_shape} to {out_shape}, which does not merge the (heads, head_dim) dimensions "
        f"{h}, {ax.inner_dim} back into one (e.g. it folds heads into the batch); " + HEADS_REASON
    )
    raise AssertionError  # unreachable


def _flatten(ctx: TraceContext, node: fx.Node) -> FeatAxis | HeadAxes | None:
    ax = ctx.raw_axis(node.args[0]) if node.args else None
    if ax is None:
        return None
    in_shape, out_shape = ctx.shape(node.args[0]), ctx.shape(node)
    assert in_shape is not None and out_shape is not None  # a feature axis is on a tensor
    if tuple(in_shape) == tuple(out_shape):
        return ax
    if isinstance(ax, HeadAxes):
        return _merge_heads(ctx, ax, in_shape, out_shape)
    heads = _split_heads(ctx, ax, in_shape, out_shape)
    if heads is not None:
        return heads
    return _reshape_axis(ctx, ax, in_shape, out_shape)


def _reshape(ctx: TraceContext, node: fx.Node) -> FeatAxis | HeadAxes | None:
    return _flatten(ctx, node)


def _flatten_module(ctx: TraceContext, node: fx.Node) -> FeatAxis | HeadAxes | None:
    return _flatten(ctx, node)


def _broadcast_dim(ax: FeatAxis, in_rank: int, out_rank: int) -> FeatAxis:
    return FeatAxis(out_rank - (in_rank - ax.dim), ax.parts)


def _elementwise(ctx: TraceContext, node: fx.Node) -> FeatAxis | HeadAxes | None:
    """Binary/n-ary elementwise ops with broadcasting (add, mul, sub, div, ...).

    An operand that reads a parameter (``get_attr``, e.g. ViT's position table ``x + pos_embed``)
    along the permuted dimension has that parameter axis bound to the units."""
    out_shape = ctx.shape(node)
    if out_shape is None:
        return None
    if any(isinstance(ctx.raw_axis(a), HeadAxes) for a in list(node.args) + list(node.kwargs.values())):
        return _elementwise_heads(ctx, node)
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
            assert s is not None  # plain holds operands with a shape only
            k = len(s) - (out_rank - result.dim)
            if 0 <= k < len(s) and s[k] != 1:
                if _bind_param_src(ctx, a, k, result):
                    continue
                ctx.fail(
                    f"it combines the permuted units with an unpermuted tensor {a.name!r} of shape {tuple(s)} "
                    "along the same dimension"
                )
    return result


def _bind_param_src(ctx: TraceContext, a: Any, k: int, ax: FeatAxis) -> bool:
    """If fx node ``a`` reads a parameter (a class token, a position table; maybe expanded), bind
    its dimension ``k`` (a dimension of ``a``'s tensor) to ``ax`` and return True."""
    src = ctx.param_src.get(a) if isinstance(a, fx.Node) else None
    if src is None:
        return False
    key, shift, sliced = src
    if k - shift < 0 or k in sliced:
        return False
    ctx.bind(key, k - shift, ax)
    return True


def _elementwise_heads(ctx: TraceContext, node: fx.Node) -> HeadAxes | None:
    """Elementwise ops on attention heads: all operands with heads share them; other operands must
    be constant over both the head and the within-head dimensions (a scalar, or a mask over tokens)."""
    out_rank = len(cast("tuple[int, ...]", ctx.shape(node)))
    result: HeadAxes | None = None
    plain = []
    for a in list(node.args) + list(node.kwargs.values()):
        if not isinstance(a, fx.Node) or ctx.shape(a) is None:
            continue
        ax = ctx.raw_axis(a)
        s = ctx.shape(a)
        assert s is not None  # checked above
        if isinstance(ax, FeatAxis):
            ctx.fail(HEADS_REASON)
        if ax is None:
            plain.append(a)
            continue
        shift = out_rank - len(s)
        ax = HeadAxes(ax.head_dim + shift, None if ax.inner_dim is None else ax.inner_dim + shift, ax.elem)
        if result is None:
            result = ax
        elif (result.head_dim, result.inner_dim) != (ax.head_dim, ax.inner_dim):
            ctx.fail(HEADS_REASON)
        else:
            ctx.join_elements(result.elem, ax.elem)
    for a in plain:
        assert result is not None  # called because an operand carries heads
        s = ctx.shape(a)
        assert s is not None  # plain holds operands with a shape only
        for dim in (result.head_dim, result.inner_dim):
            k = None if dim is None else len(s) - (out_rank - dim)
            if k is not None and 0 <= k < len(s) and s[k] != 1:
                ctx.fail(
                    f"it combines attention heads with the tensor {a.name!r} of shape {tuple(s)}, which varies "
                    f"along the head or within-head dimension (e.g. rotary position embeddings); " + HEADS_REASON
                )
    return result


def _reduce(ctx: TraceContext, node: fx.Node) -> FeatAxis | None:
    ax = _first_axis(ctx)
    if ax is None:
        return None
    rank = len(cast("tuple[int, ...]", ctx.shape(node.args[0])))
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
    assert out_shape is not None  # torch.cat returns a tensor
    rank = len(out_shape)
    dim = dim % rank
    axes: list[Any] = [ctx.axis(t) for t in tensors]  # FeatAxis | None; the Nones are rejected below
    if all(a is None for a in axes):
        return None
    ref = next(a for a in axes if a is not None)
    if dim != ref.dim:  # a parameter concatenated along another dimension (ViT's class token)
        for i, (t, a) in enumerate(zip(tensors, axes)):
            if a is None and _bind_param_src(ctx, t, ref.dim, ref):
                axes[i] = ref
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


def _move_dims(ax: FeatAxis | HeadAxes, where: Callable[[int], int]) -> FeatAxis | HeadAxes:
    if isinstance(ax, HeadAxes):
        return HeadAxes(where(ax.head_dim), None if ax.inner_dim is None else where(ax.inner_dim), ax.elem)
    return FeatAxis(where(ax.dim), ax.parts)


def _permute(ctx: TraceContext, node: fx.Node) -> FeatAxis | HeadAxes | None:
    ax = ctx.raw_axis(node.args[0])
    if ax is None:
        return None
    rank = len(cast("tuple[int, ...]", ctx.shape(node.args[0])))
    dims: Sequence[Any] = node.args[1:] if node.op == "call_method" else (ctx.arg(1, "dims"),)
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = dims[0]
    dims = [d % rank for d in dims]
    return _move_dims(ax, dims.index)


def _transpose(ctx: TraceContext, node: fx.Node) -> FeatAxis | HeadAxes | None:
    ax = ctx.raw_axis(node.args[0])
    if ax is None:
        return None
    rank = len(cast("tuple[int, ...]", ctx.shape(node.args[0])))
    d0, d1 = ctx.arg(1, "dim0") % rank, ctx.arg(2, "dim1") % rank
    return _move_dims(ax, lambda d: d1 if d == d0 else d0 if d == d1 else d)


def _expand(ctx: TraceContext, node: fx.Node) -> FeatAxis | None:
    """``Tensor.expand``: new leading dimensions shift the units; a parameter stays a parameter."""
    src = cast(fx.Node, node.args[0])  # the tensor it reads
    out_rank = len(cast("tuple[int, ...]", ctx.shape(node)))
    shift = out_rank - len(cast("tuple[int, ...]", ctx.shape(src)))
    if src in ctx.param_src:
        key, s0, sliced = ctx.param_src[src]
        ctx.param_src[node] = (key, s0 + shift, frozenset(d + shift for d in sliced))
    ax = ctx.axis(src)
    if ax is None:
        return None
    if cast("tuple[int, ...]", ctx.shape(src))[ax.dim] != cast("tuple[int, ...]", ctx.shape(node))[ax.dim + shift]:
        ctx.fail("it expands the permuted dimension")
    return FeatAxis(ax.dim + shift, ax.parts)


def _getitem(ctx: TraceContext, node: fx.Node) -> FeatAxis | None:
    src = cast(fx.Node, node.args[0])  # the tensor it reads
    idx = node.args[1]
    if src in ctx.tuple_axes:  # an element of a tuple output (nn.MultiheadAttention's (output, weights))
        item = ctx.tuple_axes[src][idx] if isinstance(idx, int) and idx < len(ctx.tuple_axes[src]) else None
        if isinstance(item, str):
            ctx.fail(item)
        return item
    if src in ctx.param_src and not isinstance(idx, fx.Node):
        items = idx if isinstance(idx, tuple) else (idx,)
        key, shift, sliced = ctx.param_src[src]
        if all(isinstance(it, slice) for it in items):  # slices keep a parameter's dimensions (pos_embed[:, :T])
            cut = {i for i, it in enumerate(items) if it != slice(None)}
            ctx.param_src[node] = (key, shift, sliced | frozenset(cut))
    ax = ctx.axis(src)
    if ax is None:
        return None
    if not isinstance(idx, tuple):
        idx = (idx,)
    d = ax.dim
    pos = 0
    removed_before = 0
    for item in idx:
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
    rank = len(cast("tuple[int, ...]", ctx.shape(node.args[0])))
    k = len(pad) // 2  # pads the last k dimensions, last first
    padded = {rank - 1 - i for i in range(k) if pad[2 * i] or pad[2 * i + 1]}
    if ax.dim in padded:
        ctx.fail(
            "torch.nn.functional.pad pads the channel dimension (a zero-padding 'option-A' shortcut): the "
            "padded channels are not permutable units. Use a 1x1-convolution projection shortcut, or write "
            "the spec by hand"
        )
    return ax


def _no_axis(ctx: TraceContext, node: fx.Node) -> FeatAxis | None:
    return None


def _register_builtins() -> None:
    acts_mod = [
        nn.ReLU,
        nn.ReLU6,
        nn.LeakyReLU,
        nn.GELU,
        nn.SiLU,
        nn.Sigmoid,
        nn.Tanh,
        nn.ELU,
        nn.SELU,
        nn.CELU,
        nn.Softplus,
        nn.Mish,
        nn.Hardswish,
        nn.Hardsigmoid,
        nn.Hardtanh,
        nn.LogSigmoid,
        nn.Tanhshrink,
        nn.Softsign,
    ]
    for m in acts_mod:
        register_handler(m, passthrough, kind="activation")
    register_handler(nn.PReLU, _prelu, kind="activation")
    for m in [
        nn.Identity,
        nn.Dropout,
        nn.Dropout1d,
        nn.Dropout2d,
        nn.Dropout3d,
        nn.AlphaDropout,
        nn.Softmax,
        nn.LogSoftmax,
    ]:
        register_handler(m, passthrough)
    for m in [
        nn.MaxPool1d,
        nn.MaxPool2d,
        nn.MaxPool3d,
        nn.AvgPool1d,
        nn.AvgPool2d,
        nn.AvgPool3d,
        nn.AdaptiveAvgPool1d,
        nn.AdaptiveAvgPool2d,
        nn.AdaptiveAvgPool3d,
        nn.AdaptiveMaxPool1d,
        nn.AdaptiveMaxPool2d,
        nn.AdaptiveMaxPool3d,
        nn.Upsample,
    ]:
        register_handler(m, _channel_passthrough)
    register_handler(nn.Linear, _linear, kind="layer")
    for m in [nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d]:
        register_handler(m, _conv, kind="layer")
    for m in [nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d]:
        register_handler(m, _batchnorm, kind="norm")
    register_handler(nn.GroupNorm, _groupnorm, kind="norm")
    register_handler(nn.LayerNorm, _layernorm, kind="norm")
    register_handler(nn.Flatten, _flatten_module)

    f: Any  # the targets of the loops below (functions of several signatures)
    act_fns = [
        torch.relu,
        torch.relu_,
        F.relu,
        F.relu_,
        F.relu6,
        torch.sigmoid,
        F.sigmoid,
        torch.tanh,
        F.tanh,
        F.gelu,
        F.silu,
        F.leaky_relu,
        F.elu,
        F.selu,
        F.celu,
        F.softplus,
        F.mish,
        F.hardswish,
        F.hardsigmoid,
        F.hardtanh,
        F.logsigmoid,
        F.softsign,
    ]
    for f in act_fns:
        register_handler(f, passthrough, kind="activation")
    for name in ["relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_"]:
        register_handler(name, passthrough, kind="activation")
    for f in [
        F.dropout,
        F.dropout1d,
        F.dropout2d,
        F.dropout3d,
        F.softmax,
        F.log_softmax,
        torch.softmax,
        torch.log_softmax,
        operator.neg,
        torch.neg,
        operator.pos,
        torch.clone,
        torch.abs,
    ]:
        register_handler(f, passthrough)
    for f in [
        F.max_pool1d,
        F.max_pool2d,
        F.max_pool3d,
        F.avg_pool1d,
        F.avg_pool2d,
        F.avg_pool3d,
        F.adaptive_avg_pool1d,
        F.adaptive_avg_pool2d,
        F.adaptive_avg_pool3d,
        F.adaptive_max_pool1d,
        F.adaptive_max_pool2d,
        F.adaptive_max_pool3d,
        F.interpolate,
    ]:
        register_handler(f, _channel_passthrough)
    for name in [
        "contiguous",
        "clone",
        "detach",
        "float",
        "double",
        "to",
        "type_as",
        "neg",
        "abs",
        "softmax",
        "log_softmax",
    ]:
        register_handler(name, passthrough)
    for f in [
        operator.add,
        operator.sub,
        operator.mul,
        operator.truediv,
        operator.iadd,
        operator.isub,
        operator.imul,
        operator.itruediv,
        torch.add,
        torch.sub,
        torch.mul,
        torch.div,
        torch.maximum,
        torch.minimum,
    ]:
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
    register_handler("expand", _expand)
    for name in ["size", "dim", "numel"]:
        register_handler(name, _no_axis)


_register_builtins()


import llfc.permutation.attention  # noqa: E402, F401  (registers the transformer handlers; attention.py imports this module)

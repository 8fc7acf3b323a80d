"""Permutation handlers for transformers: attention heads, embeddings, torch's own attention modules.

The symmetries of multi-head attention (Vaswani et al. 2017, Eq. 1; derived for alignment in
Verma & Elbayad 2024 and Theus et al., "Generalized LMC for Transformers", NeurIPS 2025, §3):

- **heads**: head h computes softmax(Q_h K_hᵀ/√d_h) V_h from rows h·d_h:(h+1)·d_h of W_q, W_k, W_v
  and contributes through the same columns of W_o, so one permutation of the H heads moves those
  blocks together;
- **within a head (QK)**: Q_h K_hᵀ = Σ_a q_a k_a is invariant to one permutation of the d_h
  dimensions applied to the rows of W_q,h and W_k,h (and their biases);
- **within a head (OV)**: V_h feeds W_o,h V_h, invariant to one permutation of the rows of W_v,h and
  the columns of W_o,h;
- the **residual stream** and the MLP's hidden units are ordinary groups (LayerNorm's weight and
  bias are permuted with the stream, which keeps it equivariant).

A view of a Linear's (B, T, H·d_h) output into (B, T, H, d_h) splits its units into heads
(:class:`~llfc.permutation.spec.HeadAxes`); ``F.scaled_dot_product_attention`` joins the query and
key units (one QK permutation per head) and links the heads of the values to them. Anything else
applied to split heads (rotary embeddings, grouped-query attention, slicing head dimensions, an
attention written with matmul) is refused with :class:`~llfc.errors.UnsupportedOperationError`.
``nn.MultiheadAttention`` (packed ``in_proj_weight`` or separate projections, ``batch_first`` or
not), ``nn.TransformerEncoderLayer`` and ``nn.TransformerEncoder`` are fx leaf modules and get
whole-module handlers.
"""

from __future__ import annotations

import operator
from typing import Any, cast

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from llfc.permutation.graph import HEADS_REASON, TraceContext
from llfc.permutation.handlers import _FUNCTION_HANDLERS, _MODULE_HANDLERS, register_handler
from llfc.permutation.spec import FeatAxis, HeadAxes

GQA_REASON = (
    "grouped-query / multi-query attention (fewer key/value heads than query heads) shares each key/value "
    "head among several query heads, so heads are not interchangeable units; llfc refuses such models"
)


def _scaled_dot_product_attention(ctx: TraceContext, node: fx.Node) -> HeadAxes | None:
    """``F.scaled_dot_product_attention(q, k, v)`` on (…, H, L, d_h) tensors split into heads."""
    q, k, v = ctx.arg(0, "query"), ctx.arg(1, "key"), ctx.arg(2, "value")
    # FeatAxis | HeadAxes | None each; only HeadAxes (or all None) get past the checks below
    axes: list[Any] = [ctx.raw_axis(t) for t in (q, k, v)]
    if ctx.raw_axis(ctx.arg(3, "attn_mask")) is not None:
        ctx.fail("its attention mask depends on permuted features")
    if ctx.arg(7, "enable_gqa", False):
        ctx.fail(GQA_REASON)
    if all(a is None for a in axes):
        return None
    if any(isinstance(a, FeatAxis) for a in axes):
        ctx.fail(
            "its query, key or value carries permuted units that are not split into heads by a view of a "
            "(B, T, H·d_h) projection into (B, T, H, d_h)"
        )
    if any(a is None for a in axes):  # e.g. keys/values from the model input: nothing here may move
        for a in axes:
            ctx.fix(a)
        return axes[2]
    rank = len(cast("tuple[int, ...]", ctx.shape(q)))
    for a in axes:
        if a.inner_dim != rank - 1 or a.head_dim > rank - 3:
            ctx.fail(
                f"the head dimension ({a.head_dim}) / within-head dimension ({a.inner_dim}) of its inputs are "
                f"not a batch dimension / the last dimension of (…, H, L, d_h)"
            )
    n_heads = [ctx.splits[ctx.uf.find(a.elem)][0] for a in axes]
    if len(set(n_heads)) != 1:
        ctx.fail(f"{GQA_REASON} (query/key/value heads: {n_heads[0]}/{n_heads[1]}/{n_heads[2]})")
    if len({a.head_dim for a in axes}) != 1:
        ctx.fail("its query, key and value carry heads on different dimensions")
    qa, ka, va = axes
    ctx.join_elements(qa.elem, ka.elem)
    ctx.link_heads(qa.elem, va.elem)
    return HeadAxes(va.head_dim, va.inner_dim, va.elem)


def _embedding(ctx: TraceContext, node: fx.Node) -> FeatAxis:
    """``nn.Embedding``: its rows are looked up by index; the embedding dimension is a new group."""
    mod = cast(nn.Embedding, ctx.module())
    out = ctx.new_axis(mod.embedding_dim, len(cast("tuple[int, ...]", ctx.shape(node))) - 1)
    ctx.bind(ctx.param_key("weight"), 1, out)
    return out


def _constant(ctx: TraceContext, node: fx.Node) -> None:
    """Tensor factories (``torch.arange``, ``ones``, ``tril`` of a constant, ...): no units."""
    for a in list(node.args) + list(node.kwargs.values()):
        if isinstance(a, fx.Node) and ctx.raw_axis(a) is not None:
            ctx.fail("it builds a new tensor from permuted features (e.g. a mask computed from activations)")


def _matmul(ctx: TraceContext, node: fx.Node) -> None:
    """Matrix products of activations (attention written with matmul/einsum) are refused."""
    for a in list(node.args) + list(node.kwargs.values()):
        if isinstance(a, fx.Node) and ctx.raw_axis(a) is not None:
            ctx.fail(
                "it multiplies permuted activations as matrices (an attention written with matmul/bmm/einsum): "
                "llfc derives attention symmetries from torch.nn.functional.scaled_dot_product_attention and "
                "nn.MultiheadAttention; rewrite the attention with F.scaled_dot_product_attention"
            )


def _repeat_heads(ctx: TraceContext, node: fx.Node) -> None:
    """``repeat_interleave`` / ``repeat`` of heads: the key/value sharing of grouped-query attention."""
    for a in list(node.args) + list(node.kwargs.values()):
        if isinstance(a, fx.Node) and ctx.raw_axis(a) is not None:
            ctx.fail(
                GQA_REASON
                if isinstance(ctx.raw_axis(a), HeadAxes)
                else "it repeats permuted units (they would no longer be permutable one by one)"
            )


def _is_elementwise_activation(act: object) -> bool:
    if isinstance(act, nn.Module):
        return any(_MODULE_HANDLERS.get(c, (None, ""))[1] == "activation" for c in type(act).__mro__)
    try:
        return _FUNCTION_HANDLERS.get(act, (None, ""))[1] == "activation"
    except TypeError:
        return False


def bind_multihead_attention(
    ctx: TraceContext,
    prefix: str,
    mod: nn.MultiheadAttention,
    q_ax: FeatAxis | None,
    k_ax: FeatAxis | None,
    v_ax: FeatAxis | None,
    out_dim: int,
) -> FeatAxis:
    """Bind the parameters of an ``nn.MultiheadAttention`` at state-dict prefix ``prefix``.

    Heads, QK and OV units as in the module docstring; ``in_proj_weight`` (3·D, D) holds the query,
    key and value rows one after the other (offsets 0, D, 2·D). ``q_ax``/``k_ax``/``v_ax`` are the
    inputs' feature axes (units on their last dimension). Returns the feature axis (on ``out_dim``)
    of ``out_proj``'s output, a new group.
    """
    d, n_heads, dh = mod.embed_dim, mod.num_heads, mod.head_dim
    qk = ctx.new_axis(d, 0, origin=f"{prefix}.qk")
    v = ctx.new_axis(d, 0, origin=f"{prefix}.ov")
    e_qk, e_v = qk.parts[0][0], v.parts[0][0]
    ctx.split_heads(e_qk, n_heads, dh)
    ctx.split_heads(e_v, n_heads, dh)
    ctx.link_heads(e_qk, e_v, path=prefix)
    ins = [q_ax, k_ax, v_ax]
    if any(a is None for a in ins):  # a fixed input: its projection columns cannot move
        for a in ins:
            ctx.fix(a)
        ins = [None, None, None]
    if mod._qkv_same_embed_dim:
        packed = FeatAxis(0, ((e_qk, 1), (e_qk, 1), (e_v, 1)))
        ctx.bind(f"{prefix}.in_proj_weight", 0, packed)
        for a in ins:
            if a is not None:
                ctx.bind(f"{prefix}.in_proj_weight", 1, a)
    else:
        packed = FeatAxis(0, ((e_qk, 1), (e_qk, 1), (e_v, 1)))
        for name, rows, a in (("q", qk, ins[0]), ("k", qk, ins[1]), ("v", v, ins[2])):
            ctx.bind(f"{prefix}.{name}_proj_weight", 0, rows)
            if a is not None:
                ctx.bind(f"{prefix}.{name}_proj_weight", 1, a)
    if mod.in_proj_bias is not None:
        ctx.bind(f"{prefix}.in_proj_bias", 0, packed)
    if mod.bias_k is not None:
        ctx.bind(f"{prefix}.bias_k", 2, qk)
        ctx.bind(f"{prefix}.bias_v", 2, v)
    out = ctx.new_axis(d, out_dim, origin=f"{prefix}.out_proj")
    ctx.bind(f"{prefix}.out_proj.weight", 1, v)
    ctx.bind(f"{prefix}.out_proj.weight", 0, out)
    if mod.out_proj.bias is not None:
        ctx.bind(f"{prefix}.out_proj.bias", 0, out)
    return out


def _last_dim_axis(ctx: TraceContext, value: object, what: str) -> FeatAxis | None:
    ax = ctx.axis(value)
    shape = ctx.shape(value)
    if ax is not None and ax.dim != len(cast("tuple[int, ...]", shape)) - 1:  # a feature axis is on a tensor
        ctx.fail(f"the permuted units of its {what} are on dimension {ax.dim}, not on the last (embedding) dimension")
    if ax is not None and any(b != 1 for _, b in ax.parts):
        ctx.fail(f"its {what}'s units are flattened blocks")
    return ax


def _multihead_attention(ctx: TraceContext, node: fx.Node) -> None:
    """``nn.MultiheadAttention`` (a leaf module returning ``(output, weights)``)."""
    mod = cast(nn.MultiheadAttention, ctx.module())
    q, k, v = ctx.arg(0, "query"), ctx.arg(1, "key"), ctx.arg(2, "value")
    for i, name in ((3, "key_padding_mask"), (5, "attn_mask")):
        if ctx.raw_axis(ctx.arg(i, name)) is not None:
            ctx.fail(f"its {name} depends on permuted features")
    axes = [_last_dim_axis(ctx, t, w) for t, w in ((q, "query"), (k, "key"), (v, "value"))]
    rank = len(cast("tuple[int, ...]", ctx.shape(q)))
    out = bind_multihead_attention(
        ctx,
        str(node.target),
        mod,
        *cast("tuple[FeatAxis | None, FeatAxis | None, FeatAxis | None]", axes),
        out_dim=rank - 1,
    )
    weights = None
    if ctx.arg(4, "need_weights", True) and not ctx.arg(7, "average_attn_weights", True):
        weights = (
            "its per-head attention weights (average_attn_weights=False) are used: they expose the order of the heads"
        )
    ctx.tuple_axes[node] = (out, weights)


def _encoder_layer(ctx: TraceContext, prefix: str, mod: nn.TransformerEncoderLayer, ax: FeatAxis) -> FeatAxis:
    """Bind one ``nn.TransformerEncoderLayer`` (pre- or post-LN) around residual stream ``ax``."""
    if not _is_elementwise_activation(mod.activation):
        ctx.fail(f"its activation {mod.activation!r} is not a registered elementwise activation")
    out = bind_multihead_attention(ctx, f"{prefix}.self_attn", mod.self_attn, ax, ax, ax, out_dim=ax.dim)
    ctx.join(ax, out)
    for norm in ("norm1", "norm2"):
        ln = getattr(mod, norm)
        if ln.weight is not None:
            ctx.bind(f"{prefix}.{norm}.weight", 0, ax)
        if getattr(ln, "bias", None) is not None:
            ctx.bind(f"{prefix}.{norm}.bias", 0, ax)
    hidden = ctx.new_axis(mod.linear1.out_features, ax.dim, origin=f"{prefix}.linear1")
    ctx.bind(f"{prefix}.linear1.weight", 1, ax)
    ctx.bind(f"{prefix}.linear1.weight", 0, hidden)
    if mod.linear1.bias is not None:
        ctx.bind(f"{prefix}.linear1.bias", 0, hidden)
    ctx.bind(f"{prefix}.linear2.weight", 1, hidden)
    ctx.bind(f"{prefix}.linear2.weight", 0, ax)
    if mod.linear2.bias is not None:
        ctx.bind(f"{prefix}.linear2.bias", 0, ax)
    return ax


def _residual_input(ctx: TraceContext, node: fx.Node, d_model: int) -> FeatAxis:
    x = ctx.arg(0, "src")
    for i, name in ((1, "mask"), (2, "src_key_padding_mask")):
        if ctx.raw_axis(ctx.arg(i, name)) is not None:
            ctx.fail(f"its {name} depends on permuted features")
    ax = _last_dim_axis(ctx, x, "input")
    if ax is None:  # unpermuted input: the residual stream is a fixed group
        ax = ctx.new_axis(d_model, len(cast("tuple[int, ...]", ctx.shape(x))) - 1)
        ctx.fix(ax)
    return ax


def _transformer_encoder_layer(ctx: TraceContext, node: fx.Node) -> FeatAxis:
    mod = cast(nn.TransformerEncoderLayer, ctx.module())
    return _encoder_layer(ctx, str(node.target), mod, _residual_input(ctx, node, mod.self_attn.embed_dim))


def _transformer_encoder(ctx: TraceContext, node: fx.Node) -> FeatAxis:
    mod = cast(nn.TransformerEncoder, ctx.module())
    prefix = str(node.target)
    ax = _residual_input(ctx, node, mod.layers[0].self_attn.embed_dim)
    for i, layer in enumerate(mod.layers):
        ax = _encoder_layer(ctx, f"{prefix}.layers.{i}", layer, ax)
    if mod.norm is not None:
        ctx.bind(f"{prefix}.norm.weight", 0, ax)
        if getattr(mod.norm, "bias", None) is not None:
            ctx.bind(f"{prefix}.norm.bias", 0, ax)
    return ax


def _register() -> None:
    register_handler(F.scaled_dot_product_attention, _scaled_dot_product_attention, kind="other")
    register_handler(nn.Embedding, _embedding, kind="layer")
    register_handler(nn.MultiheadAttention, _multihead_attention, kind="other")
    register_handler(nn.TransformerEncoderLayer, _transformer_encoder_layer, kind="other")
    register_handler(nn.TransformerEncoder, _transformer_encoder, kind="other")
    for f in [
        torch.arange,
        torch.ones,
        torch.zeros,
        torch.full,
        torch.empty,
        torch.eye,
        torch.tril,
        torch.triu,
        torch.ones_like,
        torch.zeros_like,
    ]:
        register_handler(f, _constant)
    for name in ["tril", "triu", "new_ones", "new_zeros", "new_full", "new_empty"]:
        register_handler(name, _constant)
    for f in [torch.matmul, operator.matmul, torch.bmm, torch.einsum, torch.baddbmm]:
        register_handler(f, _matmul)
    for name in ["matmul", "bmm"]:
        register_handler(name, _matmul)
    for f in [torch.repeat_interleave]:
        register_handler(f, _repeat_heads)
    for name in ["repeat_interleave", "repeat"]:
        register_handler(name, _repeat_heads)


_register()

__all__ = ["GQA_REASON", "HEADS_REASON", "bind_multihead_attention"]

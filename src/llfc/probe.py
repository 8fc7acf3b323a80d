"""Which feature maps to measure, for any traceable ``nn.Module`` (torch.fx).

A *probe* is one node of the model's fx graph whose output is a feature map f^(ℓ)(θ; x)
(LLFC paper §3: "feature map of layer ℓ", flattened to C·H·W per sample). Kinds:

========== ==========================================================================
kind       what is captured
========== ==========================================================================
pre        output of a Linear / Conv layer (pre-activation; pre-normalisation in BN nets)
norm       output of a BatchNorm / LayerNorm / GroupNorm / InstanceNorm
post       output of an elementwise activation (ReLU, GELU, ... module *or* function)
residual   output of a residual addition of two feature maps
logits     the model's output
========== ==========================================================================

Activations written as functions inside ``forward`` (``F.relu(x)``, ``x.relu()``) are found as
well as modules, and in-place operations (``nn.ReLU(inplace=True)``, ``F.relu(x, inplace=True)``,
``x.relu_()``) are rewritten out-of-place in the traced copy, so a captured pre-activation is never
overwritten by the in-place ReLU that follows it. The user's model is not modified.

torch.fx keeps torch's own modules as leaves (one node, internals hidden). ``nn.TransformerEncoder`` and
``nn.TransformerEncoderLayer`` are traced through instead (in the traced copy, with torch's own slow-path
computation), so each encoder layer's linear, norm, activation and residual-addition nodes are probes; the
residual addition that ends a pre-LN layer (``norm_first=True``) is the residual stream after that block
(post-LN: ``norm2``). Built-in modules that stay leaves are probed at their output: ``nn.MultiheadAttention``
(its attention output, ``pre``: the output of its ``out_proj``), ``nn.TransformerDecoderLayer``,
``nn.TransformerDecoder`` and ``nn.Transformer`` (``residual``, or ``norm`` when their output is normalised).

:class:`FeatureExtractor` evaluates the traced graph with any state dict
(``torch.func.functional_call``), so one traced graph serves θ_A, θ_B and every θ_α.
"""

from __future__ import annotations

import copy
import operator
import warnings
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from llfc.errors import ConfigError, UnsupportedOperationError

KINDS = ("pre", "norm", "post", "residual", "logits")

_LAYER_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORM_MODULES = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
)
_ACT_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.GELU,
    nn.SiLU,
    nn.ELU,
    nn.Tanh,
    nn.Sigmoid,
    nn.Softplus,
    nn.Hardtanh,
    nn.Mish,
    nn.Hardswish,
)
_LAYER_FUNCS = {F.linear, F.conv1d, F.conv2d, F.conv3d}
_NORM_FUNCS = {F.batch_norm, F.layer_norm, F.group_norm, F.instance_norm}
_ACT_FUNCS = {
    F.relu,
    torch.relu,
    F.relu6,
    F.leaky_relu,
    F.gelu,
    F.silu,
    F.elu,
    torch.tanh,
    torch.sigmoid,
    F.softplus,
    F.hardtanh,
    F.mish,
    F.hardswish,
    torch.nn.functional.relu_,
}
_ACT_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_"}
_ACT_DISPLAY = {c.__name__.lower(): c.__name__ for c in _ACT_MODULES}


def activation_name(op: str) -> str:
    """The display name of an activation probe's ``op`` (:attr:`Probe.op`): the ``torch.nn`` class name
    for a module, a function or a Tensor method alike (``relu``, ``relu_``, ``ReLU`` → ``ReLU``;
    ``leaky_relu`` → ``LeakyReLU``; ``gelu`` → ``GELU``); other names unchanged."""
    return _ACT_DISPLAY.get(op.lower().rstrip("_").replace("_", ""), op)


_ADD = {operator.add, operator.iadd, torch.add}
_RELU_LIKE_MODULES = (nn.ReLU,)
_RELU_FUNCS = {F.relu, torch.relu, torch.nn.functional.relu_}
_RELU_METHODS = {"relu", "relu_"}


@dataclass(frozen=True)
class Probe:
    """One measured feature map.

    Attributes:
        name: human-readable, unique: the module path for modules (``layers.0``), else the
            enclosing module's path plus the function (``layer1.0.relu_1``); ``logits`` output.
        kind: one of :data:`KINDS`.
        node: the fx node name.
        op: the operation (``Linear``, ``Conv2d``, ``ReLU``, ``relu``, ``add`` ...).
        input_node: fx node of the operation's (first) input: the layer input H^(ℓ−1) for
            ``pre`` probes (and ``logits`` produced by a layer), the pre-activation g for
            ``post`` probes, else None.
        module: module path for module calls (layers: where the weight lives), else None.
        is_relu: True for ReLU activations (weak additivity, Def. 3, is defined for ReLU).
        from_input: True for ``pre`` probes whose input is the model input itself (reached
            through reshapes only); commutativity is trivial there (H_A = H_B).
    """

    name: str
    kind: str
    node: str
    op: str
    input_node: str | None = None
    module: str | None = None
    is_relu: bool = False
    from_input: bool = False


class _TracedEncoderLayer(nn.TransformerEncoderLayer):
    """``nn.TransformerEncoderLayer`` computing torch's slow path (its ``_sa_block`` and ``_ff_block``)
    without the fast-path checks that torch.fx cannot trace; same submodules and state-dict keys.
    Masks are passed to ``self_attn`` as given (it canonicalises them itself)."""

    def forward(
        self,
        src: torch.Tensor,
        src_mask: torch.Tensor | None = None,
        src_key_padding_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
            return x + self._ff_block(self.norm2(x))
        x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
        return self.norm2(x + self._ff_block(x))


class _TracedEncoder(nn.TransformerEncoder):
    """``nn.TransformerEncoder`` unrolled over its layers (torch's slow path), so that fx traces each layer."""

    def forward(
        self,
        src: torch.Tensor,
        mask: torch.Tensor | None = None,
        src_key_padding_mask: torch.Tensor | None = None,
        is_causal: bool | None = None,
    ) -> torch.Tensor:
        out = src
        for layer in self.layers:
            out = layer(out, src_mask=mask, src_key_padding_mask=src_key_padding_mask, is_causal=bool(is_causal))
        return self.norm(out) if self.norm is not None else out


_TRACED_CLASSES: dict[type, type] = {
    nn.TransformerEncoderLayer: _TracedEncoderLayer,
    nn.TransformerEncoder: _TracedEncoder,
}


def _trace(model: nn.Module) -> fx.GraphModule:
    m = copy.deepcopy(model).eval()
    for sub in m.modules():
        if hasattr(sub, "inplace") and isinstance(sub.inplace, bool):  # would overwrite captured features
            sub.inplace = False
        if type(sub) in _TRACED_CLASSES:  # the copy's torch leaf modules, traced through
            sub.__class__ = _TRACED_CLASSES[type(sub)]
    try:
        gm = fx.symbolic_trace(m)
    except Exception as e:  # noqa: BLE001 - re-raised with advice
        raise UnsupportedOperationError(
            f"torch.fx could not trace {type(model).__name__}: {type(e).__name__}: {e}. llfc needs "
            f"a traceable forward (no Python control flow that depends on tensor values); make "
            f"such branches static (e.g. decide them in __init__) or wrap the untraceable part in "
            f"a leaf module."
        ) from None
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.kwargs.get("inplace"):
            n.kwargs = {**n.kwargs, "inplace": False}
        if n.op == "call_function" and n.target is torch.nn.functional.relu_:
            n.target = F.relu
        if n.op == "call_function" and n.target is operator.iadd:
            n.target = operator.add
        if (
            n.op == "call_method"
            and isinstance(n.target, str)
            and n.target.endswith("_")
            and not n.target.startswith("_")
            and n.target[:-1] in {"relu", "sigmoid", "tanh", "add", "mul", "clamp"}
        ):
            n.target = n.target[:-1]
    gm.recompile()
    return gm


def _fname(target) -> str:
    if isinstance(target, str):
        return target
    return getattr(target, "__name__", str(target)).lstrip("_")


def _block_kind(mod: nn.Module) -> str | None:
    """Kind of the output of a torch transformer module kept as an fx leaf: ``norm`` when it ends with a
    LayerNorm (post-LN layers, stacks with a final norm, ``nn.Transformer``), else ``residual``; None for
    other modules."""
    if isinstance(mod, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        return "residual" if mod.norm_first else "norm"
    if isinstance(mod, (nn.TransformerEncoder, nn.TransformerDecoder)):
        last = mod.layers[-1]
        return "norm" if mod.norm is not None else "residual" if last.norm_first else "norm"
    if isinstance(mod, nn.Transformer):
        return "norm"
    return None


def _classify(gm: fx.GraphModule, n: fx.Node) -> tuple[str, str, bool] | None:
    """(kind, op, is_relu) for probe-able nodes, else None."""
    if n.op == "call_module":
        mod = gm.get_submodule(str(n.target))
        if isinstance(mod, _LAYER_MODULES):
            return "pre", type(mod).__name__, False
        if isinstance(mod, _NORM_MODULES):
            return "norm", type(mod).__name__, False
        if isinstance(mod, _ACT_MODULES):
            return "post", type(mod).__name__, isinstance(mod, _RELU_LIKE_MODULES)
        kind = _block_kind(mod)
        return (kind, type(mod).__name__, False) if kind else None
    if n.op == "call_function" and n.target is operator.getitem and n.args[1] == 0:
        src = n.args[0]
        if isinstance(src, fx.Node) and src.op == "call_module":
            if isinstance(gm.get_submodule(str(src.target)), nn.MultiheadAttention):
                return "pre", "MultiheadAttention", False  # its attention output (out_proj's output)
        return None
    if n.op == "call_function":
        if n.target in _LAYER_FUNCS:
            return "pre", _fname(n.target), False
        if n.target in _NORM_FUNCS:
            return "norm", _fname(n.target), False
        if n.target in _ACT_FUNCS:
            return "post", _fname(n.target), n.target in _RELU_FUNCS
        if n.target in _ADD and len(n.args) >= 2 and all(isinstance(a, fx.Node) for a in n.args[:2]):
            return "residual", "add", False
        return None
    if n.op == "call_method" and n.target in _ACT_METHODS:
        return "post", n.target, n.target in _RELU_METHODS
    if n.op == "call_method" and n.target == "add" and len(n.args) >= 2 and isinstance(n.args[1], fx.Node):
        return "residual", "add", False
    return None


_SHAPE_ONLY_FUNCS = {torch.flatten, torch.reshape}
_SHAPE_ONLY_METHODS = {"view", "reshape", "flatten", "contiguous"}


def _reaches_input(n: fx.Node) -> bool:
    """Whether ``n`` is the model input up to reshapes (flatten, view, reshape)."""
    while True:
        if n.op == "placeholder":
            return True
        if (
            (n.op == "call_function" and n.target in _SHAPE_ONLY_FUNCS)
            or (n.op == "call_method" and n.target in _SHAPE_ONLY_METHODS)
            or (
                n.op == "call_module"
                and n.graph.owning_module is not None
                and isinstance(n.graph.owning_module.get_submodule(str(n.target)), (nn.Flatten, nn.Identity))
            )
        ):
            if not n.args or not isinstance(n.args[0], fx.Node):
                return False
            n = n.args[0]
            continue
        return False


def _probe_name(n: fx.Node, used: set[str]) -> str:
    """Module calls (and the attention output of an ``nn.MultiheadAttention``) are named by their module
    path (unique, reserved in ``used`` beforehand); functions by the enclosing module's path and the
    function, suffixed _1, _2... on a clash."""
    if n.op == "call_module":
        return str(n.target)
    src = n.args[0] if n.target is operator.getitem else None
    if isinstance(src, fx.Node) and src.op == "call_module":  # a leaf module's output (attention)
        return str(src.target)
    stack = n.meta.get("nn_module_stack") or {}
    path = list(stack.keys())[-1] if stack else ""
    base = _fname(n.target).rstrip("_")
    name = f"{path}.{base}" if path else base
    if name in used:
        k = 1
        while f"{name}_{k}" in used:
            k += 1
        name = f"{name}_{k}"
    used.add(name)
    return name


class FeatureExtractor:
    """Evaluate a model and return its logits and chosen feature maps, for any state dict.

    Args:
        model: any fx-traceable ``nn.Module`` (it is deep-copied; the original is untouched).
        kinds: which probe kinds to measure (default: all of :data:`KINDS`).
        names: optional explicit probe names (see :meth:`probes`); overrides ``kinds``.

    Attributes:
        probes: the selected :class:`Probe` list, in graph order; the logits probe is last.
        all_probes: every probe-able node.

    Calling ``extractor(state_dict, x)`` returns ``{node_name: tensor}`` holding the output of
    every selected probe and the inputs they need (``Probe.input_node``); shapes (N, ...), in the
    dtype the state dict and ``x`` compute in (the graph runs with ``state_dict``'s tensors, not the
    model's own). ``state_dict`` maps the model's own state-dict keys to tensors.

    Raises:
        UnsupportedOperationError: the model cannot be traced (says why and what to do).
        UnknownNameError / ConfigError: an unknown probe name or kind.
    """

    def __init__(self, model: nn.Module, kinds: Sequence[str] | None = None, names: Sequence[str] | None = None):
        self.gm = _trace(model)
        self.all_probes = self._discover()
        self.probes = select_probes(self.all_probes, kinds=kinds, names=names)
        self._keys = set(self.gm.state_dict().keys())
        # tied parameters (e.g. a GPT's unembedding shared with its token embedding) are passed
        # to functional_call once, under their first name
        first = {n for n, _ in self.gm.named_parameters()}
        self._keys -= {n for n, _ in self.gm.named_parameters(remove_duplicate=False)} - first
        needed: list[str] = []
        for p in self.probes:
            for nn_name in (p.node, p.input_node):
                if nn_name is not None and nn_name not in needed:
                    needed.append(nn_name)
        self.outputs = needed
        self._install_outputs(needed)

    def _discover(self) -> list[Probe]:
        probes: list[Probe] = []
        used: set[str] = {str(n.target) for n in self.gm.graph.nodes if n.op == "call_module"}
        used.add("logits")
        out_node = next(n for n in self.gm.graph.nodes if n.op == "output")
        out_arg = out_node.args[0]
        if not isinstance(out_arg, fx.Node):
            raise UnsupportedOperationError(
                "llfc needs a model whose forward returns one tensor (the logits); this one returns "
                f"{type(out_arg).__name__}. Wrap it in a module that returns the logits tensor."
            )
        for n in self.gm.graph.nodes:
            c = _classify(self.gm, n)
            if n is out_arg:
                inp = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
                is_layer = c is not None and c[0] == "pre"
                probes.append(
                    Probe(
                        "logits",
                        "logits",
                        n.name,
                        c[1] if c else _fname(n.target),
                        input_node=inp.name if (is_layer and inp is not None) else None,
                        module=str(n.target) if n.op == "call_module" else None,
                        from_input=bool(is_layer and inp is not None and _reaches_input(inp)),
                    )
                )
                continue
            if c is None:
                continue
            kind, op, is_relu = c
            # a leaf module's output taken from its tuple (attention) has no layer input of its own
            leaf_output = n.target is operator.getitem
            inp = n.args[0] if n.args and isinstance(n.args[0], fx.Node) and not leaf_output else None
            name = _probe_name(n, used)
            probes.append(
                Probe(
                    name=name,
                    kind=kind,
                    node=n.name,
                    op=op,
                    input_node=inp.name if (inp is not None and kind in ("pre", "post")) else None,
                    module=str(n.target) if n.op == "call_module" else None,
                    is_relu=is_relu,
                    from_input=bool(kind == "pre" and inp is not None and _reaches_input(inp)),
                )
            )
        return probes

    def _install_outputs(self, names: list[str]) -> None:
        g = self.gm.graph
        nodes = {n.name: n for n in g.nodes}
        out_node = next(n for n in g.nodes if n.op == "output")
        out_node.args = (tuple(nodes[k] for k in names),)
        g.lint()
        self.gm.recompile()

    def __call__(self, state_dict: dict[str, torch.Tensor], x: torch.Tensor) -> dict[str, torch.Tensor]:
        sd = {k: v for k, v in state_dict.items() if k in self._keys}
        outs = functional_call(self.gm, sd, (x,))
        return dict(zip(self.outputs, outs))

    def module(self, path: str) -> nn.Module:
        """The traced copy's submodule at ``path`` (e.g. to read a layer's stride/padding)."""
        return self.gm.get_submodule(path)


def select_probes(
    probes: Sequence[Probe], kinds: Iterable[str] | None = None, names: Iterable[str] | None = None
) -> list[Probe]:
    """Filter probes by name (exact) or by kind; the logits probe is always kept.

    Raises:
        UnknownNameError: a name that is not a probe (the message lists valid names).
        ConfigError: an unknown kind.
    """
    from llfc.errors import unknown_name

    if names:
        by_name = {p.name: p for p in probes}
        for n in names:
            if n not in by_name:
                raise unknown_name("probe", n, by_name)
        keep = set(names) | {"logits"}
        return [p for p in probes if p.name in keep]
    kinds = tuple(kinds) if kinds else KINDS
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ConfigError(f"unknown probe kind(s) {bad}; valid kinds: {', '.join(KINDS)}.")
    return [p for p in probes if p.kind in kinds or p.kind == "logits"]


def warn_if_no_hidden_evidence(probes: Sequence[Probe]) -> None:
    """Warn (``UserWarning``) when the hidden probes cannot show whether LLFC holds: there are none, or
    every one is a layer applied to the model input itself (:attr:`Probe.from_input`). Such a feature
    W·x is linear in the weights, so LLFC holds there exactly for any pair (f_α = α f_A + (1−α) f_B) and
    a verdict over those layers says nothing about the network.

    Args:
        probes: the measured probes (e.g. :attr:`FeatureExtractor.probes`).
    """
    hidden = [p for p in probes if p.kind != "logits"]
    if any(not p.from_input for p in hidden):
        return
    what = (
        f"its only hidden probes ({', '.join(p.name for p in hidden)}) take the model input directly, so their "
        "features are linear in the weights and LLFC holds there for any pair"
        if hidden
        else "no hidden layer is probed"
    )
    warnings.warn(
        f"LLFC is measured at {', '.join(p.name for p in probes)} only: {what}; the LLFC verdict carries no "
        "evidence about the network's hidden layers. Measure more layers: kinds=/names= (measure_pair, "
        "FeatureExtractor) or --kinds/--probes (llfc run); `llfc probes` lists the probes this model has. A "
        "layer fx keeps as a leaf module (one node) is probed only at its output; write its computation in a "
        "traceable forward to probe inside it.",
        UserWarning,
        stacklevel=3,
    )


def list_probes(model: nn.Module) -> list[Probe]:
    """Every probe-able feature map of ``model`` in graph order (see module docstring)."""
    return FeatureExtractor(model).all_probes

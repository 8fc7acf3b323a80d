"""Identity model stitching (LLFC paper App. B.4, Tables 2–3; official ``scripts/model_stitching.py``).

For a layer ℓ, the *stitched* network is model B with the output of its layer ℓ replaced by model
A's layer-ℓ output for the same input x:

    stitch_ℓ(x) = g_B^(>ℓ)( f^(ℓ)(θ_A; x) )

where g_B^(>ℓ) is B's part of the graph after ℓ (every consumer of ℓ reads A's feature map; nodes
that do not depend on ℓ, e.g. a residual branch that forks before ℓ, are still B's own). No adapter
is trained ("identity" stitching). If A's layer-ℓ features are interchangeable with B's — as LLFC and
commutativity suggest for linearly connected pairs — the stitched error stays close to the endpoints'
errors; for independent pairs it rises towards chance. The paper reports 6.88–11.84% for spawned
VGG-16 (endpoints 6.87%, 7.1%) and 8.99–13.35% for spawned ResNet-20 (endpoints 8.69%, 8.58%) on the
CIFAR-10 test set.

Stitch points (``points``). The official script hooks module outputs: for VGG / MLP-like models
every Conv2d / Linear; for ResNets only ``conv1``, the output of every residual block (post-ReLU,
after the addition) and the final Linear (paper-digest §4.7). ``"official"`` (the default) follows
it: for models with residual additions, the first layer's output, every block output and the
logits; for other models every Linear / Conv output except the logits layer (stitching the logits
trivially gives A's error). ``"pre"`` stitches at every Linear / Conv output, including the
convolutions inside residual blocks (where a block's input still flows through B's own shortcut,
so these errors are not comparable with the paper's Table 3).

Implementation: the model is traced once with torch.fx (the same tracing as
:class:`llfc.probe.FeatureExtractor`, in-place operations made out-of-place); for every stitched
layer the graph is copied, node ℓ's consumers are rewired to read an extra placeholder, and the now
unused prefix of B is removed (dead-code elimination), so a stitched forward costs only the
layers after ℓ. Weights come from the state dicts through ``torch.func.functional_call``. One
streaming pass: per batch, A's features at all stitched layers are computed once (one forward of
A), then one forward of B and one stitched forward per layer; losses and error counts are summed
in float64. Memory is O(batch × largest layer × number of stitched layers) for A's features of one
batch.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from llfc.errors import IncompatibleModelsError
from llfc.interpolate import check_compatible
from llfc.metrics.lmc import as_classification
from llfc.probe import FeatureExtractor, Probe, _trace

__all__ = ["stitching_errors", "stitched_module", "official_points", "STITCH_COLUMNS", "STITCH_POINTS"]

#: keys of every row returned by :func:`stitching_errors`
STITCH_COLUMNS = ("layer", "role", "kind", "op", "error", "loss", "n_samples")

StateDict = dict[str, torch.Tensor]


def stitched_module(gm: fx.GraphModule, node_name: str) -> fx.GraphModule:
    """A copy of the traced model ``gm`` whose node ``node_name`` is replaced by a new input.

    The returned module is called as ``m(x, h)``: every consumer of node ``node_name`` reads ``h``
    instead (h must have that node's shape, (N, ...)); the part of the graph that only fed the
    node is removed. ``gm`` itself is not modified; submodules are shared with it (weights are
    meant to be supplied by ``torch.func.functional_call``).

    Raises:
        KeyError: no node of that name.
    """
    graph = fx.Graph()
    val_map: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, val_map)
    graph.output(out)
    nodes = {n.name: n for n in graph.nodes}
    if node_name not in nodes:
        raise KeyError(node_name)
    target = nodes[node_name]
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    with graph.inserting_after(placeholders[-1]):
        ph = graph.placeholder("stitched_features")
    target.replace_all_uses_with(ph)
    m = fx.GraphModule(gm, graph)
    m.graph.eliminate_dead_code()
    m.graph.lint()
    m.recompile()
    return m


STITCH_POINTS = ("official", "pre")


def official_points(probes: Sequence[Probe]) -> list[Probe]:
    """The official script's stitch points among ``probes`` (all probes of a model, graph order).

    Models with residual additions (ResNets): the first Linear / Conv output (``conv1``), every
    block output (the ReLU applied to a residual addition, else the addition itself) and the
    logits. Other models: every ``pre`` probe (Linear / Conv output) except the logits layer.
    """
    pre = [p for p in probes if p.kind == "pre"]
    if not any(p.kind == "residual" for p in probes):
        return pre
    out = pre[:1]
    for i, p in enumerate(probes):
        if p.kind == "residual":
            nxt = probes[i + 1] if i + 1 < len(probes) else None
            out.append(nxt if nxt is not None and nxt.kind == "post" and nxt.input_node == p.node else p)
    out += [p for p in probes if p.kind == "logits"]
    return out


def _select(extractor: FeatureExtractor, probes: Sequence[str] | None, points: str = "official") -> list[Probe]:
    if probes is None:
        if points == "pre":
            return [p for p in extractor.all_probes if p.kind == "pre"]
        return official_points(extractor.all_probes)
    wanted = set(probes)
    return [p for p in extractor.probes if p.name in wanted]


@torch.no_grad()
def stitching_errors(
    model: nn.Module,
    sd_a: StateDict,
    sd_b: StateDict,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    probes: Sequence[str] | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
    points: str = "official",
    sharded: bool = False,
) -> list[dict]:
    """Test error and loss of B with layer ℓ's output replaced by A's, for every probed layer ℓ.

    Source: LLFC paper App. B.4 (Tables 2–3) and the official ``scripts/model_stitching.py``,
    which overwrites the output of each Conv2d / Linear module of B with A's output (no adapter).

    Args:
        model: the architecture (any fx-traceable module; its own weights are not used).
        sd_a: state dict of model A (the donor of the features), the model's own keys.
        sd_b: state dict of model B (the receiver), same keys, shapes and dtypes.
        loader: iterable of (x, y) batches, x float (N, C, H, W) or (N, D), y int64 (N,), e.g. a
            DataLoader over the test set (the paper uses the test set). Iterated once.
        probes: names of the layers to stitch at (see ``llfc probes`` / :func:`llfc.probe.list_probes`;
            any probe, "logits" included); overrides ``points``. For BN networks the ``pre``
            output is pre-BN.
        device: where to compute.
        progress: show a tqdm progress bar.
        points: the default stitch points when ``probes`` is None (module docstring):
            ``"official"`` (the official script's: for ResNets conv1, every block output and the
            logits; else every Linear / Conv output except the logits layer) or ``"pre"`` (every
            Linear / Conv output, inside residual blocks too).
        sharded: ``loader`` is this rank's shard (:func:`llfc.distributed.shard_dataset`); the
            sums of all ranks are added once, after the pass.

    Returns:
        a list of dicts with keys :data:`STITCH_COLUMNS`: first the two endpoints (``role``
        "endpoint", ``layer`` "A" and "B"), then one row per stitched layer in graph order
        (``role`` "stitched", ``layer`` the probe name, ``kind`` and ``op`` of the probe).
        ``error`` is the fraction of misclassified samples in [0, 1]; ``loss`` the mean
        cross-entropy (nats); both accumulated in float64 over ``n_samples`` samples.

    Raises:
        IncompatibleModelsError: sd_a and sd_b differ in keys/shapes/dtypes, or lack some of the
            model's parameters or buffers.
        UnknownNameError: a name in ``probes`` that is not a probe of the model (lists valid ones).
        UnsupportedOperationError: the model cannot be traced by torch.fx.
        ConfigError: an unknown ``points``.
        ValueError: the loader yields no samples.
    """
    from tqdm.auto import tqdm

    from llfc.errors import ConfigError

    if points not in STITCH_POINTS:
        raise ConfigError(f"unknown stitch points {points!r}; valid: {', '.join(STITCH_POINTS)}.")
    check_compatible(sd_a, sd_b)
    if not probes:
        probes = [p.name for p in _select(FeatureExtractor(model), None, points)]
    extractor = FeatureExtractor(model, names=list(probes))
    need = set(extractor.gm.state_dict().keys())
    missing = sorted(need - set(sd_a))
    if missing:
        raise IncompatibleModelsError(
            f"the state dicts do not fit the model: {len(missing)} of its parameters/buffers are "
            f"missing (first: {missing[0]!r}). Pass state dicts of this architecture (strip any "
            f"'module.' / 'model.' prefix)."
        )
    dev = torch.device(device)
    sa = {k: v.to(dev) for k, v in sd_a.items() if k in need}
    sb = {k: v.to(dev) for k, v in sd_b.items() if k in need}
    chosen = _select(extractor, probes, points)
    logits_node = next(p for p in extractor.probes if p.kind == "logits").node
    plain = _trace(model)
    stitched = [stitched_module(plain, p.node) for p in chosen]

    n = 0
    L = len(chosen)
    loss = torch.zeros(L + 2, dtype=torch.float64, device=dev)  # on the device: no per-batch sync
    wrong = torch.zeros(L + 2, dtype=torch.float64, device=dev)

    def fold(k: int, logits: torch.Tensor, y: torch.Tensor) -> None:
        lg, y = as_classification(logits.to(torch.float64), y)
        loss[k] += F.cross_entropy(lg, y, reduction="sum")
        wrong[k] += (lg.argmax(1) != y).sum()

    for x, y in tqdm(loader, desc="stitching", disable=None if progress else True, leave=False):
        x, y = x.to(dev), y.to(dev)
        fa = extractor(sa, x)  # A's features at all stitched layers, once
        fold(0, fa[logits_node], y)
        fold(1, functional_call(plain, sb, (x,)), y)
        for i, (p, m) in enumerate(zip(chosen, stitched)):
            fold(2 + i, functional_call(m, sb, (x, fa[p.node])), y)
        n += y.numel()  # samples, or tokens of a language model
    if sharded:
        from llfc.distributed import all_reduce_sum

        loss, wrong, n_t = all_reduce_sum([loss, wrong, float(n)])
        n = int(n_t)
    loss, wrong = loss.cpu(), wrong.cpu()
    if n == 0:
        raise ValueError("stitching_errors: the loader yielded no samples")

    rows: list[dict[str, Any]] = [
        {"layer": "A", "role": "endpoint", "kind": None, "op": None},
        {"layer": "B", "role": "endpoint", "kind": None, "op": None},
    ] + [{"layer": p.name, "role": "stitched", "kind": p.kind, "op": p.op} for p in chosen]
    for k, r in enumerate(rows):
        r["error"] = float(wrong[k] / n)
        r["loss"] = float(loss[k] / n)
        r["n_samples"] = n
    return rows

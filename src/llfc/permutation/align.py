"""``align``: permute model B onto model A in one call (spec → matching → apply → verify)."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence, cast

import torch
import torch.nn as nn

from llfc.errors import ConfigError, NonFiniteWeightsError
from llfc.permutation.activation_matching import activation_matching
from llfc.permutation.apply import apply_permutation, check_compatible, strip_module_prefix, unwrap_model
from llfc.permutation.spec import DEFAULT_RTOL, PermutationSpec, SpecCheckError, derive_spec, relative_output_change
from llfc.permutation.ste import ste_matching
from llfc.permutation.weight_matching import moved_fraction, weight_distances, weight_matching

__all__ = ["AlignResult", "align", "example_input_for"]


def example_input_for(
    model: nn.Module, shape: Sequence[int], n: int = 4, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A random example batch for spec derivation: (n, *shape) float32 N(0, 1) values, or int64
    token ids in [0, num_embeddings) when the model's input feeds an ``nn.Embedding`` (a language
    model such as ``gpt``; only shapes matter for the spec, but an embedding needs valid ids)."""
    from llfc.permutation.graph import trace

    gm = trace(model)
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        for user in node.users:
            if user.op == "call_module" and isinstance(gm.get_submodule(str(user.target)), nn.Embedding):
                vocab = cast(nn.Embedding, gm.get_submodule(str(user.target))).num_embeddings
                return torch.randint(0, vocab, (n, *shape), generator=generator)
        break
    return torch.randn(n, *shape, generator=generator)


@dataclass
class AlignResult:
    """Result of :func:`align`.

    Attributes:
        state_dict: π(θ_B), B's weights permuted onto A (same keys as A's state dict, no prefix).
        perms: group -> LongTensor, ``perms[g][i]`` = index in B of the unit placed at position i.
        spec: the permutation spec used.
        report: JSON-serialisable dict: ``method``, ``objective`` (weight matching: Σ⟨θ_A, π(θ_B)⟩;
            activation matching: mean matched similarity over groups), ``moved_fraction`` per group,
            ``distance_before`` / ``distance_after`` per state-dict key (‖θ_A − θ_B‖_F, ‖θ_A − π(θ_B)‖_F),
            ``function_check`` (relative output change of π(θ_B) vs θ_B and its tolerance), ``time_s``,
            and ``details`` (the matching function's own report).
    """

    state_dict: dict[str, torch.Tensor]
    perms: dict[str, torch.Tensor]
    spec: PermutationSpec
    report: dict[str, Any]


def _split(model: nn.Module | Mapping[str, torch.Tensor]) -> tuple[nn.Module | None, dict[str, torch.Tensor]]:
    if isinstance(model, nn.Module):
        m = unwrap_model(model)
        return m, strip_module_prefix(m.state_dict())
    if isinstance(model, Mapping):
        return None, strip_module_prefix(model)
    raise ConfigError(f"align expects nn.Module or state dict models, got {type(model).__name__}.")


def align(
    model_a: nn.Module | Mapping[str, torch.Tensor],
    model_b: nn.Module | Mapping[str, torch.Tensor],
    example_input: torch.Tensor,
    method: str = "weight",
    loader: Iterable | None = None,
    seed: int = 0,
    spec: PermutationSpec | None = None,
    *,
    rtol: float = DEFAULT_RTOL,
    **matching_kwargs: Any,
) -> AlignResult:
    """Permute B's hidden units onto A's (Git Re-Basin) and verify that B's function is unchanged.

    Args:
        model_a, model_b: ``nn.Module`` (DataParallel/DDP unwrapped) or state dicts (a ``module.`` or
            ``_orig_mod.`` prefix is stripped); at least one must be a module (it defines the
            architecture). Neither is modified.
        example_input: a small batch for tracing and for the function check (e.g. (2, C, H, W)).
        method: ``"weight"`` (:func:`~llfc.permutation.weight_matching`), ``"ste"``
            (:func:`~llfc.permutation.ste_matching`, needs ``loader``) or ``"activation"``
            (:func:`~llfc.permutation.activation_matching`, needs ``loader``).
        loader: batches of training data for activation matching.
        seed: seed of weight matching's group order / restarts and of the spec self-test.
        spec: a permutation spec; derived from the model graph (and self-tested) when ``None``.
        rtol: tolerance of the final check ‖f(π(θ_B); x) − f(θ_B; x)‖ / ‖f(θ_B; x)‖ ≤ rtol
            (default 1e-4), evaluated in eval mode on ``example_input``.
        **matching_kwargs: passed to the matching function (e.g. ``restarts=``, ``max_batches=``,
            ``correlation=``).

    Returns:
        :class:`AlignResult`.

    Raises:
        IncompatibleModelsError: A and B differ in keys or shapes (the first difference is named).
        NonFiniteWeightsError: NaN/Inf in a permuted entry.
        ConfigError: bad ``method``, activation matching without ``loader``, no module given.
        UnsupportedOperationError / SpecCheckError: from deriving or checking the spec.
    """
    t0 = time.perf_counter()
    if method not in ("weight", "activation", "ste"):
        raise ConfigError(f"align: method must be 'weight', 'activation' or 'ste', got {method!r}.")
    mod_a, sd_a = _split(model_a)
    mod_b, sd_b = _split(model_b)
    check_compatible(sd_a, sd_b)
    template = mod_a if mod_a is not None else mod_b
    if template is None:
        raise ConfigError(
            "align needs at least one of model_a / model_b as an nn.Module (to know the architecture); "
            "build the model (llfc.models.create_model) and pass it."
        )
    if spec is None:
        spec = derive_spec(template, example_input, check=True, seed=seed)
    spec.resolve_sizes(sd_a)

    def instance(sd: dict[str, torch.Tensor], mod: nn.Module | None) -> nn.Module:
        if mod is not None:
            return mod
        m = copy.deepcopy(template)
        m.load_state_dict(sd)
        return m

    rep: Any  # the method's report (WeightMatchingReport, SteReport or ActivationMatchingReport)
    if method == "weight":
        perms, rep = weight_matching(spec, sd_a, sd_b, seed=seed, **matching_kwargs)
        details = rep.to_dict()
        objective = rep.objective
        aligned = apply_permutation(spec, perms, sd_b)
    elif method == "ste":
        if loader is None:
            raise ConfigError("align(method='ste') needs loader= (batches of training data).")
        perms, rep = ste_matching(copy.deepcopy(template), spec, sd_a, sd_b, loader, seed=seed, **matching_kwargs)
        details = rep.to_dict()
        objective = rep.best_loss
        aligned = apply_permutation(spec, perms, sd_b)
    else:
        if loader is None:
            raise ConfigError("align(method='activation') needs loader= (batches of training data).")
        for name, sd in (("A", sd_a), ("B", sd_b)):
            for k in spec.keys():
                if not torch.isfinite(sd[k]).all():
                    raise NonFiniteWeightsError(f"model {name}'s {k!r} holds NaN or Inf values.")
        perms, rep = activation_matching(instance(sd_a, mod_a), instance(sd_b, mod_b), spec, loader, **matching_kwargs)
        details = rep.to_dict()
        objective = float(sum(rep.objective.values()) / max(1, len(rep.objective)))
        aligned = apply_permutation(spec, perms, sd_b)

    rel = relative_output_change(template, sd_b, aligned, example_input)
    if not rel <= rtol:
        raise SpecCheckError(
            f"the aligned model B does not compute B's function (relative output change {rel:.3g} > rtol={rtol:g}); "
            "the permutation spec is wrong for this model. Run check_spec(model, spec, example_input) to find the "
            "offending group."
        )
    keys = spec.keys()
    report = {
        "method": method,
        "objective": objective,
        "moved_fraction": moved_fraction(perms),
        "distance_before": weight_distances(sd_a, sd_b, keys),
        "distance_after": weight_distances(sd_a, aligned, keys),
        "function_check": {"relative_change": rel, "rtol": rtol},
        "groups": {g: spec.sizes[g] for g in spec.groups},
        "time_s": time.perf_counter() - t0,
        "details": details,
    }
    return AlignResult(state_dict=aligned, perms=perms, spec=spec, report=report)

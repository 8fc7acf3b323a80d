"""Permutation alignment for ordinary PyTorch models (Git Re-Basin, Ainsworth et al. 2023).

- :func:`derive_spec` builds a :class:`PermutationSpec` from the model's torch.fx graph and checks it
  (:func:`check_spec`: a random permutation of every group leaves the output unchanged).
- :func:`apply_permutation`, :func:`random_permutation`, :func:`invert` act on state dicts.
- :func:`weight_matching` (coordinate descent over groups, one linear assignment per step) and
  :func:`activation_matching` (streaming cross-correlation of features, one assignment per group).
- :func:`ste_matching`: Git Re-Basin's straight-through estimator (learns π to lower the midpoint loss).
- :func:`align` does it all for two models and verifies the aligned B computes B's function.

Convention: ``perms[g][i]`` is the index in B of the unit that goes to position ``i``.
See docs/permutation.md.
"""

from llfc.permutation.activation_matching import (
    ActivationMatchingReport,
    CrossMoments,
    NodeOutputs,
    activation_matching,
)
from llfc.permutation.align import AlignResult, align
from llfc.permutation.apply import (
    apply_permutation,
    axis_index,
    check_compatible,
    compose,
    identity_permutation,
    invert,
    random_permutation,
    strip_module_prefix,
)
from llfc.permutation.spec import (
    DEFAULT_RTOL,
    AxisRef,
    FeatAxis,
    NodeRef,
    PermutationSpec,
    SpecCheckError,
    TraceContext,
    check_spec,
    derive_spec,
    register_handler,
)
from llfc.permutation.ste import SteReport, ste_matching
from llfc.permutation.weight_matching import WeightMatchingReport, moved_fraction, weight_distances, weight_matching

__all__ = [
    "DEFAULT_RTOL",
    "AxisRef",
    "FeatAxis",
    "NodeRef",
    "PermutationSpec",
    "SpecCheckError",
    "TraceContext",
    "check_spec",
    "derive_spec",
    "register_handler",
    "apply_permutation",
    "axis_index",
    "check_compatible",
    "compose",
    "identity_permutation",
    "invert",
    "random_permutation",
    "strip_module_prefix",
    "WeightMatchingReport",
    "moved_fraction",
    "weight_distances",
    "weight_matching",
    "ActivationMatchingReport",
    "CrossMoments",
    "NodeOutputs",
    "activation_matching",
    "SteReport",
    "ste_matching",
    "AlignResult",
    "align",
]

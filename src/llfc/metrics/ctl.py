"""Cross-Task Linearity (CTL) metrics (Zhou, Chen, Chen, Zhang, Yan, ICML 2024, "On the Emergence of
Cross-Task Linearity in the Pretraining-Finetuning Paradigm", arXiv 2402.03660).

CTL (paper §3, Definition 1 / Eq. 1) says that for two models θ_A, θ_B fine-tuned from one pretrained
θ_0, every layer ℓ satisfies

    f_ℓ(α θ_A + β θ_B) ≈ α f_ℓ(θ_A) + β f_ℓ(θ_B)

(the paper states it for β = 1 − α and uses free (α, β) for task arithmetic, §5; LLFC, Zhou et al.
2023, Def. 2, is the same relation for α + β = 1 along an LMC path). The official code
(``zzp1012/Cross-Task-Linearity``) measures, per layer and per (α, β), the cosine distance and the
least-squares coefficient of four pairs of feature maps:

=========== ==================================== ================================================
pair        compared                             meaning
=========== ==================================== ================================================
``target``  f_αβ vs α f_A + β f_B                CTL itself (small distance: CTL holds)
``A``       f_αβ vs f_A                          how far the merged model moved from A
``B``       f_αβ vs f_B                          ... from B
``AB``      f_A vs f_B                           the baseline (does not depend on (α, β))
=========== ==================================== ================================================

f_αβ = f_ℓ(α θ_A + β θ_B). Each pair (x, y) gets, per sample, the cosine distance 1 − cos(x_i, y_i) and
the least-squares coefficient s_i = ⟨x_i, y_i⟩/‖y_i‖² (the scale c with c·x ≈ y is 1/s; LLFC paper
App. B.2), reported as mean and standard deviation over samples, and the same two numbers for the
whole (N, D) tensor (⟨X, Y⟩_F / (‖X‖_F‖Y‖_F)). All of them follow from three per-sample float64 sums
‖x‖², ‖y‖², ‖x − y‖² (:func:`llfc.metrics.cosine.cosine_distance_from_sq`,
:func:`llfc.metrics.cosine.coef_from_sq`), so the accumulators stream: memory does not grow with the
number of samples. Zero vectors follow :mod:`llfc.metrics.cosine` (never NaN).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from llfc.errors import ConfigError
from llfc.metrics.cosine import coef_from_sq, cosine_distance_from_sq
from llfc.metrics.streaming import RunningMoments, RunningSum

#: the compared pairs, in the order of the results (see the module docstring)
CTL_PAIRS = ("target", "A", "B")


def check_coefficients(values, what: str) -> list[float]:
    """Validate a grid of real coefficients (λ, α or β): finite numbers; returns them as floats.

    Raises:
        ConfigError: a value that is not a number, or NaN/±Inf (names ``what``, e.g. "--lambdas").
    """
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"{what} must hold numbers, got {v!r}.")
        if not math.isfinite(float(v)):
            raise ConfigError(f"{what} must hold finite numbers, got {v!r}; remove NaN/Inf values.")
        out.append(float(v))
    return out


def check_points(points, what: str = "points") -> list[tuple[float, float]]:
    """Validate a list of (α, β) pairs (any finite reals; α + β need not be 1).

    Raises:
        ConfigError: not a list of pairs, or a non-finite value.
    """
    out = []
    for p in points:
        if not isinstance(p, (list, tuple)) or len(p) != 2:
            raise ConfigError(f"{what} must be a list of [alpha, beta] pairs, got {p!r}.")
        a, b = check_coefficients(p, what)
        out.append((a, b))
    if not out:
        raise ConfigError(f"{what} is empty; give at least one [alpha, beta] pair.")
    return out


def pair_sums(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample (‖x‖², ‖y‖², ‖x − y‖²) of two (N, *) feature maps, float64, shape (N, 3)."""
    xf = x.reshape(x.shape[0], -1).to(torch.float64)
    yf = y.reshape(y.shape[0], -1).to(torch.float64)
    return torch.stack([(xf * xf).sum(1), (yf * yf).sum(1), ((xf - yf) ** 2).sum(1)], 1)


def ctl_target(f_a: torch.Tensor, f_b: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """The CTL target α f_A + β f_B (paper Eq. 1; α, β free), same shape and dtype as ``f_a``."""
    return alpha * f_a + beta * f_b


class PairStats:
    """Streaming cosine distance and least-squares coefficient of one pair (x, y) of feature maps.

    ``update(sums)`` takes the (B, 3) output of :func:`pair_sums` (or (B, K, 3) for K pairs at once);
    ``compute()`` returns ``{"distance": {"mean", "std", "whole"}, "coef": {"mean", "std", "whole"}}``
    with per-sample mean/std over all samples and the whole-tensor value (CTL paper §3; official code's
    ``DissimilarityMetric`` "cosine" and ``coef``), as floats or lists of K floats.
    """

    def __init__(self, absolute: bool = False) -> None:
        self.absolute = absolute
        self.dist = RunningMoments()
        self.coef = RunningMoments()
        self.sums = RunningSum()

    def update(self, sums: torch.Tensor) -> None:
        """Fold in per-sample (‖x‖², ‖y‖², ‖x − y‖²), shape (B, ..., 3)."""
        sx, sy, sd = sums[..., 0], sums[..., 1], sums[..., 2]
        self.dist.update(cosine_distance_from_sq(sx, sy, sd, absolute=self.absolute))
        self.coef.update(coef_from_sq(sx, sy, sd))
        self.sums.update(sums)

    def compute(self) -> dict:
        """The statistics as JSON-ready floats (see the class docstring)."""
        dm, ds = self.dist.compute()
        cm, cs = self.coef.compute()
        S = self.sums.compute()
        whole = cosine_distance_from_sq(S[..., 0], S[..., 1], S[..., 2], absolute=self.absolute)
        cw = coef_from_sq(S[..., 0], S[..., 1], S[..., 2])
        return {
            "distance": {"mean": dm.tolist(), "std": ds.tolist(), "whole": whole.tolist()},
            "coef": {"mean": cm.tolist(), "std": cs.tolist(), "whole": cw.tolist()},
        }


def _check_finite(feats: dict, who: str) -> None:
    from llfc.errors import NonFiniteWeightsError

    for k, v in feats.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise NonFiniteWeightsError(
                f"{who} computes non-finite features at {k!r} (NaN/Inf); its cosine would read as distance 1. "
                f"Check the state (e.g. llfc.task_vectors.invalid_state: a negative BatchNorm running variance "
                f"after task arithmetic) and leave such points out."
            )


class CTLMeter:
    """Streaming CTL statistics of θ_A, θ_B and the merged models α θ_A + β θ_B, per probe.

    Args:
        extractor: a :class:`llfc.probe.FeatureExtractor` of the architecture.
        sd_a, sd_b: the endpoint state dicts (same keys and shapes).
        points: the (α, β) pairs (finite; α + β need not be 1); see :func:`check_points`.
        probes: names of the probes to measure (default: every probe of ``extractor``).
        states: the merged state dicts, one per point (default :func:`llfc.task_vectors.combine`
            of ``sd_a``, ``sd_b`` with (α, β)); pass them to measure other constructions, e.g. the
            negation θ_0 − λτ against (α, β) = (2, −1) with A = θ_0, B = θ_0 + λτ.
        absolute: the official code's 1 − |cos| instead of 1 − cos.

    ``update(x)`` takes a batch of inputs (B, ...); ``compute()`` returns a list with one entry per
    probe: ``{"name", "kind", "dim", "baseline": PairStats of (f_A, f_B), "target"/"A"/"B": PairStats
    with K-lists, one value per point}`` (CTL paper §3 Eq. 1; module docstring). Memory: the probed
    features of A, B and one merged model for one batch.

    Raises (in ``update``):
        NonFiniteWeightsError: a network computes NaN/Inf features (never reported as a distance).
    """

    def __init__(
        self,
        extractor,
        sd_a: dict,
        sd_b: dict,
        points: Sequence[Sequence[float]],
        probes: Sequence[str] | None = None,
        states: Sequence[dict] | None = None,
        *,
        absolute: bool = False,
    ) -> None:
        from llfc.task_vectors import combine

        self.fx = extractor
        self.points = check_points(points)
        self.sd_a, self.sd_b = sd_a, sd_b
        self.states = list(states) if states is not None else [combine([sd_a, sd_b], [a, b]) for a, b in self.points]
        if len(self.states) != len(self.points):
            raise ConfigError(f"{len(self.states)} merged states for {len(self.points)} (alpha, beta) points.")
        by_name = {p.name: p for p in extractor.probes}
        names = list(probes) if probes is not None else list(by_name)
        self.probes = [by_name[n] for n in names]
        self.base = {p.name: PairStats(absolute) for p in self.probes}
        self.acc = {(p.name, w): PairStats(absolute) for p in self.probes for w in CTL_PAIRS}
        self.n = 0

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Fold in one batch of inputs x (B, ...)."""
        fa = self.fx(self.sd_a, x)
        fb = self.fx(self.sd_b, x)
        rows: dict[tuple[str, str], list[torch.Tensor]] = {k: [] for k in self.acc}
        for f_end, who in ((fa, "A"), (fb, "B")):
            _check_finite(f_end, who)
        for (a, b), s in zip(self.points, self.states):
            f = self.fx(s, x)
            _check_finite(f, f"the merged model at (α, β) = ({a:g}, {b:g})")
            for p in self.probes:
                A, B, M = fa[p.node], fb[p.node], f[p.node]
                rows[(p.name, "target")].append(pair_sums(M, ctl_target(A, B, a, b)))
                rows[(p.name, "A")].append(pair_sums(M, A))
                rows[(p.name, "B")].append(pair_sums(M, B))
            del f
        for p in self.probes:
            self.base[p.name].update(pair_sums(fa[p.node], fb[p.node]))
            for w in CTL_PAIRS:
                self.acc[(p.name, w)].update(torch.stack(rows[(p.name, w)], 1))
        self.n += x.shape[0]

    def compute(self) -> list[dict]:
        """Per-probe results (see the class docstring).

        Raises:
            RuntimeError: before any ``update``.
        """
        if self.n == 0:
            raise RuntimeError("CTLMeter.compute() before any update()")
        out = []
        for p in self.probes:
            ly = {"name": p.name, "kind": p.kind, "op": p.op, "baseline": self.base[p.name].compute()}
            for w in CTL_PAIRS:
                ly[w] = self.acc[(p.name, w)].compute()
            out.append(ly)
        return out

"""When do LMC and LLFC "hold" for a pair: the thresholds, defined once (documented in docs/results.md).

Every summary, results document, sweep aggregate and co-occurrence table uses these functions; no other
module states a threshold.

* **LMC holds** when the Frankle error barrier (test set) is at most ``LMC_MAX_ERROR_BARRIER`` (a fraction:
  0.02 = 2 percentage points; Frankle et al. 2020, §3, call a pair stable when the error barrier is within
  2%).
* **LLFC holds** when, in every hidden probed layer (kinds ``HIDDEN_KINDS``) and at every interior α of
  ``LLFC_ALPHAS`` that was measured, the mean LLFC distance E_x[1 − cos(f_α, α f_A + (1−α) f_B)] (LLFC paper
  §3, Figs. 2–4) is both at most ``LLFC_MAX_RATIO`` × the A-vs-B baseline E_x[1 − cos(f_A, f_B)] *and* at
  most ``LLFC_MAX_DISTANCE`` in absolute terms. The ratio alone is not enough: two networks whose features
  already agree (small baseline) would pass on noise, and two very different networks pass the ratio with
  a large absolute distance.
"""

from __future__ import annotations

LMC_MAX_ERROR_BARRIER = 0.02
LLFC_MAX_RATIO = 0.2
LLFC_MAX_DISTANCE = 0.05
LLFC_ALPHAS = (0.25, 0.5, 0.75)
HIDDEN_KINDS = ("pre", "norm", "post", "residual")
_ROUNDING = 1e-12  # float64 rounding of a difference of error rates; far below one sample in 10^9


def ratio_to_baseline(d: float, base: float) -> float:
    """``d / base`` for two non-negative distances, with 0/0 = 0 and d/0 = inf.

    The LLFC ratio that ``LLFC_MAX_RATIO`` bounds is ``ratio_to_baseline(d, base)`` of a mean LLFC
    distance d = E_x[1 − cos(f_α, α f_A + (1−α) f_B)] and the A-vs-B baseline base = E_x[1 − cos(f_A,
    f_B)] (dimensionless; LLFC paper §3); the baseline is 0 only for identical features. Reports use it
    for other distance ratios too (commutativity: Dist_com over the smaller of Dist_W, Dist_H).
    """
    if base > 0:
        return d / base
    return 0.0 if d == 0 else float("inf")


def worst_layer(pair: dict, alphas=LLFC_ALPHAS, kinds=HIDDEN_KINDS) -> dict | None:
    """The hidden layer and α with the largest ratio E[1−cos_α] / E[1−cos_AB].

    Args:
        pair: one pair's entry of results.json (keys ``alphas`` and ``llfc``; schema docs/results.md).
        alphas: the α values considered (those not measured are skipped).
        kinds: probe kinds that count as hidden layers.

    Returns:
        ``{"layer", "alpha", "distance", "baseline", "ratio", "max_distance"}`` (``max_distance``: the largest
        mean distance over the same layers and α) or None when the pair has no LLFC results.
    """
    best, dmax = None, 0.0
    for ly in pair.get("llfc", []):
        if ly["kind"] not in kinds:
            continue
        base = ly["baseline"]["mean"]
        for i, a in enumerate(pair["alphas"]):
            if not any(abs(a - t) < 1e-9 for t in alphas):
                continue
            d = ly["distance"]["mean"][i]
            dmax = max(dmax, d)
            ratio = ratio_to_baseline(d, base)
            if best is None or ratio > best["ratio"]:
                best = {"layer": ly["name"], "alpha": a, "distance": d, "baseline": base, "ratio": ratio}
    if best is not None:
        best["max_distance"] = dmax
    return best


def lmc_holds(pair: dict) -> bool:
    """True when the pair's Frankle error barrier on the test set is ≤ ``LMC_MAX_ERROR_BARRIER``.

    ``pair``: a pair of results.json (``lmc.test.barriers``) or the dict returned by
    :func:`llfc.engine.measure_pair` (``lmc.barriers``, measured on the loader it was given).
    """
    lmc = pair["lmc"]
    # an error is a count over N samples: 9/450 computed as 0.020000000000000018 is exactly 2 pp
    return lmc.get("test", lmc)["barriers"]["error_barrier_frankle"] <= LMC_MAX_ERROR_BARRIER + _ROUNDING


def llfc_holds(pair: dict) -> bool | None:
    """True when every hidden layer passes both LLFC thresholds (module docstring); None without LLFC."""
    w = worst_layer(pair)
    if w is None:
        return None
    return w["ratio"] <= LLFC_MAX_RATIO and w["max_distance"] <= LLFC_MAX_DISTANCE


def describe_llfc(label: str = "LLFC holds") -> str:
    """The LLFC thresholds in words, after ``label`` (e.g. ``"CTL holds (LLFC thresholds)"`` for a table
    whose only verdict column uses them); ends with a reference to docs/results.md."""
    return (
        f"{label}: in every hidden layer at α ∈ {{{', '.join(f'{a:g}' for a in LLFC_ALPHAS)}}}, E[1−cos_α] ≤ "
        f"{LLFC_MAX_RATIO:g} × E[1−cos_AB] and ≤ {LLFC_MAX_DISTANCE:g} (docs/results.md)."
    )


def describe() -> str:
    """One line stating the LMC and LLFC thresholds, for summaries and generated documents that show both
    verdicts."""
    return f"LMC holds: Frankle error barrier ≤ {100 * LMC_MAX_ERROR_BARRIER:g} pp; {describe_llfc()}"

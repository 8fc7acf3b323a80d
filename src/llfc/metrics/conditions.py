"""The paper's two sufficient conditions for LLFC (Zhou et al. 2023 §4, Defs. 3–4, Theorem 1).

Pure functions over tensors, float64 results. Features are (N, *) with the sample axis first.
"""

from __future__ import annotations

import torch

from llfc.metrics.cosine import cosine_distance, normalized_distance


def weak_additivity_distance(
    g_a: torch.Tensor, g_b: torch.Tensor, alpha: float, *, absolute: bool = False
) -> torch.Tensor:
    """Per-sample violation of weak additivity of ReLU (Def. 3), shape (N,), float64:

        1 − cos( σ(α g_A + (1−α) g_B),  α σ(g_A) + (1−α) σ(g_B) )

    where g_A, g_B are each network's own pre-activations on the same inputs and α weights A.
    It is 0 for a sample exactly when no entry has g_A·g_B < 0 (for α ∈ (0, 1)).
    """
    g_a, g_b = g_a.to(torch.float64), g_b.to(torch.float64)
    left = torch.relu(alpha * g_a + (1 - alpha) * g_b)
    right = alpha * torch.relu(g_a) + (1 - alpha) * torch.relu(g_b)
    return cosine_distance(left, right, absolute=absolute)


def sign_agreement(g_a: torch.Tensor, g_b: torch.Tensor) -> torch.Tensor:
    """Per-sample fraction of entries with g_A·g_B ≥ 0, shape (N,), float64.

    Scalar weak additivity σ(αa + (1−α)b) = ασ(a) + (1−α)σ(b) for all α ∈ [0, 1] holds iff
    a·b ≥ 0 (paper-digest §3.5), so this is the fraction of units where Def. 3 holds exactly.
    """
    agree = (g_a.reshape(g_a.shape[0], -1) * g_b.reshape(g_b.shape[0], -1)) >= 0
    return agree.to(torch.float64).mean(1)


def commutativity_terms(
    wa_ha: torch.Tensor, wb_hb: torch.Tensor, wa_hb: torch.Tensor, wb_ha: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two sides of commutativity (Def. 4): (W_A H_A + W_B H_B, W_A H_B + W_B H_A).

    Their difference equals (W_A − W_B)(H_A − H_B), the residual that Theorem 1 needs to vanish.
    """
    return wa_ha + wb_hb, wa_hb + wb_ha


def dist_com(wa_ha, wb_hb, wa_hb, wb_ha) -> torch.Tensor:
    """Dist_com = dist(W_A H_A + W_B H_B, W_A H_B + W_B H_A) (paper Fig. 7; docs/results.md),
    with dist(X, Y) = ‖X−Y‖²_F/(‖X‖_F‖Y‖_F) over all samples; a float64 scalar."""
    left, right = commutativity_terms(wa_ha, wb_hb, wa_hb, wb_ha)
    return normalized_distance(left, right)


def linearity_defect(w_a, w_b, h_a, h_b, alpha: float) -> torch.Tensor:
    """W_α H_α − [α W_A H_A + (1−α) W_B H_B] for H_α = α H_A + (1−α) H_B (linear layers, no bias).

    By bilinearity this equals −α(1−α)(W_A − W_B)(H_A − H_B) exactly (the algebra of Theorem 1,
    LLFC paper §4, proof in App. A.2: expand both products).
    Shapes: W (out, in), H (in, N); returns (out, N) float64.
    """
    w_a, w_b, h_a, h_b = (t.to(torch.float64) for t in (w_a, w_b, h_a, h_b))
    w_al = alpha * w_a + (1 - alpha) * w_b
    h_al = alpha * h_a + (1 - alpha) * h_b
    return w_al @ h_al - (alpha * w_a @ h_a + (1 - alpha) * w_b @ h_b)

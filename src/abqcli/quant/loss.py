"""The distribution-correction loss of one block (DESIGN §4).

    L = MSE(Y_q, Y_1) + MSE(Y_q, Y_2) − log mean cos(Y_q, Y_1) − log mean cos(Y_q, Y_2)
        + KL(P_1 ‖ P_q) + KL(P_q ‖ P_1)

Y_q: quantized block on the quantized-chain input; Y_1: FP block on the FP-chain input; Y_2: FP block on
the quantized-chain input; P: attention probabilities averaged over heads. The KL is taken row-wise over
keys on the causal entries only, on P itself (the reference code's second softmax is not applied).

`loss.targets: fp_chain` keeps only the Y_1 terms of the MSE and the cosine (the block is trained to
give the FP chain's output from its quantized input, so that it corrects the error of the blocks before
it); `quantized_chain` only the Y_2 ones (the block reproduces the FP block on its own input).

`loss.token_normalized` replaces each MSE by the MSE of the token-normalized outputs,

    MSE_n(Y_q, Y) = 1/(T·H) · Σ_t ‖Y_q,t − Y_t‖² / r_t²,    r_t² = ‖Y_t‖² / H + ε    (r: no gradient),

the error as the next RMSNorm sees it. Plain MSE weighs a token by its squared norm: in SmolLM2 from block
12 on, the first token of every window carries "massive activations" (mean square ~10⁶ against a median
~30), so four such tokens hold ~98% of a batch's squared norm and the plain MSE trains those blocks on
them alone.

A batch is computed window by window (`window_terms` of each window's own forward), on one process as
over several (`abqcli.distributed`, each rank holding an equal slice of the batch), so that a window's
forward and gradient are the same computation wherever it runs and only the order of summing the
windows' gradients differs. Every term but the cosine one is a mean, so the mean of the windows'
gradients is the batch's gradient; −log of a mean is not, so the cosine term is taken with the batch's
mean cosine c̄ (over every window of every rank, no gradient): its value is −log c̄ and each window's
gradient −∇c_w / c̄, whose mean over the windows is ∇(−log c̄) (`window_loss`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from abqcli.distributed import DataParallel
from abqcli.recipe import LossSpec

PROB_EPS = 1e-10
RMS_EPS = 1e-6  # the ε of a typical RMSNorm


def token_normalized_mse(y_q: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """MSE_n of the module docstring: each token's squared error over its target's mean square."""
    y_q, y = y_q.float(), y.float()
    r2 = y.detach().pow(2).mean(dim=-1, keepdim=True) + RMS_EPS
    return ((y_q - y).pow(2) / r2).mean()


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The mean over tokens of the cosine similarity along the hidden dimension."""
    return F.cosine_similarity(a.float(), b.float(), dim=-1).mean()


def causal_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Mean over query rows of KL(p_row ‖ q_row), summing only causal entries (key ≤ query).

    p, q: [B, Tq, Tk] probabilities (rows sum to 1 over the causal keys).
    """
    tq, tk = p.shape[-2:]
    causal = torch.ones(tq, tk, dtype=torch.bool, device=p.device).tril(tk - tq)
    p, q = p.float(), q.float()
    terms = p * (torch.log(p.clamp_min(PROB_EPS)) - torch.log(q.clamp_min(PROB_EPS)))
    return terms.masked_fill(~causal, 0.0).sum(dim=-1).mean()


COSINE_TERMS = {"cos_1": "y_1", "cos_2": "y_2"}
TARGET_INDICES = {"both": ("1", "2"), "fp_chain": ("1",), "quantized_chain": ("2",)}  # loss.targets -> Y_i


def needs_y_2(spec: LossSpec) -> bool:
    """Whether the loss compares with Y_2 (else the FP block need not run on the quantized chain)."""
    return (spec.mse or spec.cosine) and "2" in TARGET_INDICES[spec.targets]


def window_terms(y_q: torch.Tensor, y_1: torch.Tensor, y_2: torch.Tensor | None, p_q: torch.Tensor | None,
                 p_1: torch.Tensor | None, spec: LossSpec) -> dict[str, torch.Tensor]:
    """Each enabled term of the loss of one window (or of a batch taken as a whole): the MSE and KL terms
    as they enter the loss, the cosine ones as the mean cosine c (the loss has −log c̄). `y_2` may be None
    where `needs_y_2(spec)` is false."""
    outputs = {"1": y_1, "2": y_2}
    targets = {i: outputs[i] for i in TARGET_INDICES[spec.targets]}
    terms: dict[str, torch.Tensor] = {}
    if spec.mse:
        mse = token_normalized_mse if spec.token_normalized else F.mse_loss
        for i, y in targets.items():
            terms[f"mse_{i}"] = mse(y_q.float(), y.float())
    if spec.cosine:
        for i, y in targets.items():
            terms[f"cos_{i}"] = mean_cosine(y_q, y)
    if spec.attention_kl and p_q is not None and p_1 is not None:
        terms["kl_fwd"] = causal_kl(p_1, p_q)
        terms["kl_rev"] = causal_kl(p_q, p_1)
    if not terms:
        raise ValueError("the block loss: every loss term is off (calibration.loss: enable mse, cosine or "
                         "attention_kl)")
    return terms


def window_loss(terms: dict[str, torch.Tensor], means: dict[str, float], windows: int) -> torch.Tensor:
    """What one of this process's `windows` windows of a batch back-propagates: its MSE and KL terms and
    the cosine surrogate (c_w.detach() − c_w) / c̄ (value 0, gradient −∇c_w / c̄), all divided by
    `windows` (over several processes the ranks then average their gradients); `means`: each term's batch mean (`batch_means`), c̄ for the cosine ones."""
    parts = [(t.detach() - t) / max(means[k], PROB_EPS) if k in COSINE_TERMS else t
             for k, t in terms.items()]
    return torch.stack(parts).sum() / windows


def batch_means(window_values: list[dict[str, float]], ranks: DataParallel | None = None) -> dict[str, float]:
    """Each term's mean over the batch (every window of every rank; float64, one all-reduce)."""
    ranks = ranks or DataParallel.single()
    keys = list(window_values[0])
    sums = ranks.sum_(torch.tensor([sum(v[k] for v in window_values) for k in keys], dtype=torch.float64))
    return dict(zip(keys, (sums / (len(window_values) * ranks.world)).tolist(), strict=True))


def term_values(means: dict[str, float]) -> dict[str, float]:
    """The loss terms' values from their batch means: the cosine ones as −log c̄."""
    return {k: -math.log(max(v, PROB_EPS)) if k in COSINE_TERMS else v for k, v in means.items()}


def block_loss(y_q: torch.Tensor, y_1: torch.Tensor, y_2: torch.Tensor | None, p_q: torch.Tensor | None,
               p_1: torch.Tensor | None, spec: LossSpec) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of a batch taken as a whole (the module docstring's L) and each enabled term's value: the
    definition that the window-by-window computation reproduces."""
    terms = window_terms(y_q, y_1, y_2, p_q, p_1, spec)
    terms = {k: -torch.log(t.clamp_min(PROB_EPS)) if k in COSINE_TERMS else t for k, t in terms.items()}
    return torch.stack(list(terms.values())).sum(), {k: v.item() for k, v in terms.items()}

"""The distribution-correction loss of one block (DESIGN §4).

    L = MSE(Y_q, Y_1) + MSE(Y_q, Y_2) − log mean cos(Y_q, Y_1) − log mean cos(Y_q, Y_2)
        + KL(P_1 ‖ P_q) + KL(P_q ‖ P_1)

Y_q: quantized block on the quantized-chain input; Y_1: FP block on the FP-chain input; Y_2: FP block on
the quantized-chain input; P: attention probabilities averaged over heads. The KL is taken row-wise over
keys on the causal entries only, on P itself (the reference code's second softmax is not applied).

Over several processes (`abqcli.distributed`) each rank holds an equal slice of the batch. Every term but
the cosine one is a mean, so the mean of the ranks' gradients is the batch's gradient; −log of a mean is
not, so the cosine term is computed with the batch's mean cosine c̄ (all-reduced, no gradient): its value
is −log c̄ and its gradient −∇c_r / c̄, whose mean over the ranks is ∇(−log c̄).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from abqcli.distributed import DataParallel
from abqcli.recipe import LossSpec

PROB_EPS = 1e-10


def neg_log_mean_cosine(a: torch.Tensor, b: torch.Tensor, ranks: DataParallel | None = None) -> torch.Tensor:
    """−log of the mean over tokens (of every rank's slice of the batch) of the cosine similarity along
    the hidden dimension."""
    cos = F.cosine_similarity(a.float(), b.float(), dim=-1).mean()
    if ranks is None or not ranks.active:
        return -torch.log(cos.clamp_min(PROB_EPS))
    batch = max(ranks.mean(cos.item()), PROB_EPS)
    return (cos.detach() - cos) / batch - math.log(batch)


def causal_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Mean over query rows of KL(p_row ‖ q_row), summing only causal entries (key ≤ query).

    p, q: [B, Tq, Tk] probabilities (rows sum to 1 over the causal keys).
    """
    tq, tk = p.shape[-2:]
    causal = torch.ones(tq, tk, dtype=torch.bool, device=p.device).tril(tk - tq)
    p, q = p.float(), q.float()
    terms = p * (torch.log(p.clamp_min(PROB_EPS)) - torch.log(q.clamp_min(PROB_EPS)))
    return terms.masked_fill(~causal, 0.0).sum(dim=-1).mean()


def block_loss(
    y_q: torch.Tensor,
    y_1: torch.Tensor,
    y_2: torch.Tensor,
    p_q: torch.Tensor | None,
    p_1: torch.Tensor | None,
    spec: LossSpec,
    ranks: DataParallel | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The total loss and each enabled term's value (for the log); `ranks`: the batch is split over
    several processes (module docstring)."""
    terms: dict[str, torch.Tensor] = {}
    if spec.mse:
        terms["mse_1"] = F.mse_loss(y_q.float(), y_1.float())
        terms["mse_2"] = F.mse_loss(y_q.float(), y_2.float())
    if spec.cosine:
        terms["cos_1"] = neg_log_mean_cosine(y_q, y_1, ranks)
        terms["cos_2"] = neg_log_mean_cosine(y_q, y_2, ranks)
    if spec.attention_kl and p_q is not None and p_1 is not None:
        terms["kl_fwd"] = causal_kl(p_1, p_q)
        terms["kl_rev"] = causal_kl(p_q, p_1)
    if not terms:
        raise ValueError("block_loss: every loss term is off (calibration.loss: enable mse, cosine or "
                         "attention_kl)")
    total = torch.stack(list(terms.values())).sum()
    return total, {k: v.item() for k, v in terms.items()}

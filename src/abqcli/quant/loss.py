"""The distribution-correction loss of one block (DESIGN §4).

    L = MSE(Y_q, Y_1) + MSE(Y_q, Y_2) − log mean cos(Y_q, Y_1) − log mean cos(Y_q, Y_2)
        + KL(P_1 ‖ P_q) + KL(P_q ‖ P_1)

Y_q: quantized block on the quantized-chain input; Y_1: FP block on the FP-chain input; Y_2: FP block on
the quantized-chain input; P: attention probabilities averaged over heads. The KL is taken row-wise over
keys on the causal entries only, on P itself (the reference code's second softmax is not applied).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from abqcli.recipe import LossSpec

PROB_EPS = 1e-10


def neg_log_mean_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """−log of the mean over tokens of the cosine similarity along the hidden dimension."""
    cos = F.cosine_similarity(a.float(), b.float(), dim=-1).mean()
    return -torch.log(cos.clamp_min(PROB_EPS))


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
) -> tuple[torch.Tensor, dict[str, float]]:
    """The total loss and each enabled term's value (for the log)."""
    terms: dict[str, torch.Tensor] = {}
    if spec.mse:
        terms["mse_1"] = F.mse_loss(y_q.float(), y_1.float())
        terms["mse_2"] = F.mse_loss(y_q.float(), y_2.float())
    if spec.cosine:
        terms["cos_1"] = neg_log_mean_cosine(y_q, y_1)
        terms["cos_2"] = neg_log_mean_cosine(y_q, y_2)
    if spec.attention_kl and p_q is not None and p_1 is not None:
        terms["kl_fwd"] = causal_kl(p_1, p_q)
        terms["kl_rev"] = causal_kl(p_q, p_1)
    if not terms:
        raise ValueError("block_loss: every loss term is off (calibration.loss: enable mse, cosine or "
                         "attention_kl)")
    total = torch.stack(list(terms.values())).sum()
    return total, {k: v.item() for k, v in terms.items()}

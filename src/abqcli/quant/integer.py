"""Integer-domain inference of a weight-and-activation quantized linear, on codes (no bit planes).

`integer_linear` quantizes the activations per token, multiplies centred activation codes by centred
weight codes exactly, and applies the scales. The fake-quant models (`QuantLinear` with its integer state)
and the CPU GEMM backend of the packed runtime (`abqcli.btc.backends.cpu`) both run it, so their outputs
are bit-identical for the same codes; the BTC epilogue (`abqcli.btc.gemm.epilogue`) is the same formula
written on the accumulators of a bit-plane GEMM.
"""

from __future__ import annotations

import torch

from abqcli.quant.quantizer import CentredWeight, activation_qparams, qmax_for

F32_EXACT = 2**24  # every integer of magnitude <= 2**24 is exact in float32
_ROW_BLOCK_BYTES = 1 << 21  # rows per block: keep a block's [rows, N] accumulator in cache


def quantize_activation_f32(x: torch.Tensor, bits: int,
                            clip: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token codes as float32 [M, K] with scale, zero [M, 1] — the same values as
    `quantize_activation` (same qparams, same round-half-even), without the uint8 round trip."""
    scale, zero = activation_qparams(x, bits, clip)
    codes = torch.div(x, scale).round_().add_(zero).clamp_(0, qmax_for(bits))
    return codes, scale, zero


@torch.no_grad()
def integer_linear(x: torch.Tensor, w: CentredWeight, act_bits: int, bias: torch.Tensor | None = None,
                   act_clip: float = 1.0) -> torch.Tensor:
    """A weight-and-activation quantized linear computed in the integer domain: x [..., K] -> [..., N]
    in x's dtype, on x's device (activations quantized per token with clip ratio `act_clip`). The packed CPU runtime and the fake-quant models both run this, so
    their outputs are bit-identical for the same codes.

    The epilogue's bracket for group g, `acc − za·wsum − zw·asum + |g|·za·zw`, is the integer
    `Σ_{k∈g} (qa − za)·(qw − zw)` (zero points are integers). It is formed directly as one matmul of
    centred activation codes against the centred weight codes per group: in float32 when
    `|g| · max|qa − za| · max|qw − zw| <= 2**24` (every partial sum is an integer below 2**24, so exact
    in any summation order), else in float64 (exact below 2**53). Then `y = sa · Σ_g sw_g · bracket_g`
    (+ bias), float32.
    """
    lead, k = x.shape[:-1], x.shape[-1]
    if k != w.values.shape[1]:
        raise ValueError(f"input has {k} features, the layer expects {w.values.shape[1]}")
    x2 = x.detach().reshape(-1, k).float()
    m, n = x2.shape[0], w.values.shape[0]
    codes, sa, za = quantize_activation_f32(x2, act_bits, act_clip)
    a_c = codes.sub_(za)  # centred activation codes, exact small integers
    w_c = w.values
    g = w.group_size or k
    a_bound = float(a_c.abs().max()) if a_c.numel() else 0.0
    dt = torch.float32 if g * a_bound * w.max_abs <= F32_EXACT else torch.float64
    if dt == torch.float64:
        a_c, w_c = a_c.double(), w_c.double()
    sa = sa.reshape(m, 1).to(dt)
    n_groups = w.scale.shape[1]
    if n_groups == 1:
        y = (a_c @ w_c.T).mul_(w.scale[:, 0].to(dt)).mul_(sa).float()
    else:
        sw = w.scale.T.to(dt).contiguous()  # [G, N]
        bounds = [(gi * g, min(k, (gi + 1) * g)) for gi in range(n_groups)]
        y = torch.empty(m, n, dtype=torch.float32, device=x2.device)
        rows = max(16, _ROW_BLOCK_BYTES // (4 * max(1, n)))
        for r0 in range(0, m, rows):
            r1 = min(m, r0 + rows)
            block = None
            for gi, (s, e) in enumerate(bounds):
                bracket = a_c[r0:r1, s:e] @ w_c[:, s:e].T
                block = bracket.mul_(sw[gi]) if block is None else block.addcmul_(bracket, sw[gi])
            y[r0:r1] = block.mul_(sa[r0:r1])
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*lead, n).to(x.dtype)

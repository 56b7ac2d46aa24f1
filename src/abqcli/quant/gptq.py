"""GPTQ rounding (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", Algorithm 1), written from the paper.

For one linear with weight W [N, K] and calibration inputs X [tokens, K], GPTQ rounds W column by column
to minimise the layer's output error ‖X Wᵀ − X Ŵᵀ‖² (one least-squares problem per output row, all
sharing the Hessian H = XᵀX):

    H ← H + λ·mean(diag H)·I                       dampening (λ = `damp`)
    U = chol(H⁻¹)ᵀ                                 upper Cholesky factor of the inverse Hessian
    for each column j (in act-order: by decreasing diag H, else 0..K-1):
        ŵ_j = Q(w_j)                               round to the grid of w_j's (row, group) quantizer
        e_j = (w_j − ŵ_j) / U[j, j]
        w_i ← w_i − e_j · U[j, i]   for every later column i      (error feedback)

The loop runs over blocks of `block_size` columns and applies the feedback of a finished block to the
later columns in one matrix product ("lazy batch updates"): the same arithmetic, reordered.

Static groups: the (scale, zero) of every (row, group) is fixed before the loop from the weight as it
comes in (with LWC's clipping factors when given), so act-order can visit columns in any order and the
result is exactly a `QuantizedWeight` of the usual layout: codes, scale and zero per row and group.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from abqcli.distributed import DataParallel
from abqcli.quant.quantizer import QuantizedWeight, WeightQuantSpec, fake_quantize_activation, weight_qparams

DEFAULT_BLOCK_SIZE = 128


class HessianAccumulator:
    """H = Σ xᵀx over every token a layer sees (float64; the scale of H does not matter to GPTQ)."""

    def __init__(self) -> None:
        self.hessian: torch.Tensor | None = None

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        """Add inputs [..., K] (any leading shape)."""
        x = x.reshape(-1, x.shape[-1]).float()
        update = (x.T @ x).double().cpu()
        self.hessian = update if self.hessian is None else self.hessian + update


@torch.no_grad()
def collect_hessians(linears: Mapping[str, nn.Module], run: Callable[[], object]) -> dict[str, torch.Tensor]:
    """The Hessian of every linear's input (after its online transform and activation-quantized at its
    `quant.act_bits`, as the layer computes it) over one `run()` of the block that holds them. Linears fed
    the same tensor with the same quantization (q/k/v, gate/up) share one accumulator: XᵀX is computed
    once for them."""
    accumulators: dict[str, HessianAccumulator] = {}
    last: list = [None, None, None]  # the previous hook's (input tensor, (act bits, transform, clip), accumulator)

    def hook(name: str):
        def pre_hook(module: nn.Module, args: tuple) -> None:
            x, seen = args[0], (module.quant.act_bits, module.quant.input_transform, module.quant.act_clip)
            if x is last[0] and seen == last[1] and accumulators.setdefault(name, last[2]) is last[2]:
                return  # the same tensor as the previous linear's: its accumulator already has it
            acc = accumulators.setdefault(name, HessianAccumulator())
            acc.add(fake_quantize_activation(module.transform_input(x), seen[0], seen[2]))
            last[:] = [x, seen, acc]
        return pre_hook

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in linears.items()]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return {name: acc.hessian for name, acc in accumulators.items() if acc.hessian is not None}


def reduce_hessians(hessians: dict[str, torch.Tensor], linears: Mapping[str, nn.Module],
                    ranks: DataParallel) -> dict[str, torch.Tensor]:
    """The Hessians summed over the ranks of a data-parallel run (each holds Σ xᵀx over its windows),
    in the order of `linears`; a linear no rank's tokens reached has none. Linears that share one
    accumulator still share the reduced tensor."""
    if not ranks.active:
        return hessians
    reduced: dict[int, torch.Tensor] = {}
    out = {}
    for name, module in linears.items():
        h = hessians.get(name)
        key = id(h) if h is not None else id(module)
        if key not in reduced:
            k = module.in_features
            local = h if h is not None else torch.zeros(k, k, dtype=torch.float64)
            reduced[key] = ranks.sum_(local.clone())
        out[name] = reduced[key]
    return {name: h for name, h in out.items() if bool(h.any())}


def inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """U, the upper Cholesky factor of (H + λ·mean(diag H)·I)⁻¹ (float64). A column no token ever
    reached (diag 0) gets diag 1: its weight then has no effect on the output and rounds to nearest."""
    h = hessian.double().clone()
    diag = torch.diagonal(h)
    diag[diag == 0] = 1.0
    diag += damp * diag.mean()
    h_inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(h_inv, upper=True)


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, spec: WeightQuantSpec,
                  lwc: tuple[torch.Tensor, torch.Tensor] | None = None, damp: float = 0.01,
                  act_order: bool = True, block_size: int = DEFAULT_BLOCK_SIZE) -> QuantizedWeight:
    """GPTQ codes of `weight` [N, K] for inputs with Hessian `hessian` [K, K] (see the module docstring).

    The arithmetic runs in float64 on the CPU, so the codes do not depend on the device; scales and zeros
    are the float32 values `quantize_weight` would give for the same weight and clipping."""
    w32 = weight.detach().float()
    scale_g, zero_g = weight_qparams(w32, spec, lwc)  # static groups: fixed before the loop
    k = w32.shape[1]
    col_group = torch.arange(k, device=w32.device) // (spec.group_size or k)
    col_scale, col_zero = (t[:, col_group].double().cpu() for t in (scale_g, zero_g))
    w = w32.double().cpu().clone()
    order = torch.argsort(torch.diagonal(hessian), descending=True, stable=True) if act_order else torch.arange(k)
    w, col_scale, col_zero = w[:, order], col_scale[:, order], col_zero[:, order]
    u = inverse_hessian_factor(hessian[order][:, order], damp)
    codes = torch.empty_like(w)
    for start in range(0, k, block_size):
        end = min(start + block_size, k)
        errors = _quantize_columns(w, u, codes, col_scale, col_zero, spec.qmax, start, end)
        w[:, end:] -= errors @ u[start:end, end:]
    unpermuted = torch.empty_like(codes)
    unpermuted[:, order] = codes
    return QuantizedWeight(unpermuted.to(torch.uint8).to(weight.device), scale_g.float(), zero_g.float(), spec)


def _quantize_columns(w: torch.Tensor, u: torch.Tensor, codes: torch.Tensor, col_scale: torch.Tensor,
                      col_zero: torch.Tensor, qmax: int, start: int, end: int) -> torch.Tensor:
    """Round columns start..end-1 of `w` in place with error feedback inside the block; write their codes
    and return the scaled errors e [N, end - start] for the update of the later blocks."""
    errors = torch.empty(w.shape[0], end - start, dtype=w.dtype)
    for j in range(start, end):
        s, z = col_scale[:, j], col_zero[:, j]
        q = torch.clamp(torch.round(w[:, j] / s) + z, 0, qmax)
        codes[:, j] = q
        err = (w[:, j] - (q - z) * s) / u[j, j]
        w[:, j + 1:end] -= err[:, None] * u[j, j + 1:end][None, :]
        errors[:, j - start] = err
    return errors

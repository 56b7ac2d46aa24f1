"""The `cpu` GEMM backend: exact integer arithmetic in torch, the reference every other backend matches.

`linear` runs `abqcli.quant.integer.integer_linear` on the weight's cached centred codes — the arithmetic
of the fake-quant twin, so `abq verify` holds it to free-running logits and perplexity as well.
`int_gemm_planes` is the plain bit-plane popcount GEMM (`abqcli.btc.gemm.popcount_gemm`, slow).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from abqcli.btc import gemm
from abqcli.btc.backends import ActivationPlanes, VerifyCriteria
from abqcli.btc.contract import check_btc_group, check_int32_bound
from abqcli.btc.format import PackedWeight
from abqcli.quant.integer import integer_linear
from abqcli.quant.quantizer import FP_BITS, qmax_for


class CpuBackend:
    """Computes on the CPU; an input on another device is moved there and the result moved back."""

    name = "cpu"
    kernel = "bit-plane popcount GEMM (CPU)"
    device = "cpu"
    verify_criteria = VerifyCriteria(free_running_logits_tol=1e-4, ppl_rel_tol=5e-5)

    def available(self) -> tuple[bool, str]:
        return True, "torch on the CPU"

    def require(self) -> None:
        return None

    def prepare(self, packed: PackedWeight, act_bits: int) -> None:
        if act_bits >= FP_BITS:
            packed.dequantized_f32()
        else:
            packed.centred_weight()

    def linear(self, x: torch.Tensor, packed: PackedWeight, act_bits: int,
               bias: torch.Tensor | None, act_clip: float = 1.0) -> torch.Tensor:
        if x.device.type != "cpu":
            bias = None if bias is None else bias.cpu()
            return self.linear(x.cpu(), packed, act_bits, bias, act_clip).to(x.device)
        if x.shape[-1] != packed.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, the layer expects {packed.in_features}")
        if act_bits >= FP_BITS:
            weight = packed.dequantized_f32().to(dtype=x.dtype)
            return F.linear(x, weight, None if bias is None else bias.to(x.dtype))
        check_btc_group(packed.group_size)
        check_int32_bound(packed.in_features, qmax_for(act_bits), packed.qmax)
        return integer_linear(x, packed.centred_weight(), act_bits, bias, act_clip)

    def int_gemm_planes(self, a_planes: torch.Tensor, w_planes: torch.Tensor,
                        group_words: int | None) -> torch.Tensor:
        acc = gemm.popcount_gemm(a_planes, w_planes, group_words)
        return acc if acc.dim() == 3 else acc.unsqueeze(-1)

    def quantize_pack(self, x: torch.Tensor, bits: int, group_size: int | None,
                      clip: float = 1.0) -> ActivationPlanes | None:
        return None  # the reference quantizer and packer themselves


CPU_BACKEND = CpuBackend()

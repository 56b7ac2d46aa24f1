"""Format `abq-packed` (DESIGN §5, docs/FORMAT.md): the BTC bit planes of every quantized linear, run by
the packed runtime (`BTCLinear`)."""

from __future__ import annotations

from abqcli.btc.format import FORMAT_VERSION, K_ALIGN
from abqcli.quant.quantizer import FP_BITS, WeightQuantSpec


class AbqPacked:
    name = "abq-packed"
    version = FORMAT_VERSION

    def layer_problem(self, weight: WeightQuantSpec, act_bits: int) -> str | None:
        """With quantized activations the BTC GEMM runs per-channel weights or groups of K_ALIGN columns."""
        gs = weight.group_size
        if act_bits >= FP_BITS or gs is None or gs % K_ALIGN == 0:
            return None
        return (f"group_size {gs} cannot be packed: with quantized activations (A{act_bits}) the BTC GEMM "
                f"needs per-channel weights (group_size: null) or a group size that is a multiple of "
                f"{K_ALIGN}; change group_size or drop abq-packed from output.formats")


ABQ_PACKED = AbqPacked()

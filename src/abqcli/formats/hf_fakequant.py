"""Format `hf-fakequant` (docs/HF_FAKEQUANT.md): a plain transformers checkpoint of the dequantized
weights plus the integer state of every quantized linear."""

from __future__ import annotations

from abqcli.quant.quantizer import WeightQuantSpec


class HfFakequant:
    name = "hf-fakequant"
    version = 1

    def layer_problem(self, weight: WeightQuantSpec, act_bits: int) -> str | None:
        """Any scheme: the checkpoint holds dequantized weights and the integer state as they are."""
        return None


HF_FAKEQUANT = HfFakequant()

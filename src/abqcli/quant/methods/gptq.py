"""`calibration.method: gptq`: GPTQ rounding of every weight as it is (no transform, no training).

The fast method of its own: per block one pass of the block on the quantized-chain input to accumulate
each linear's Hessian, then `abqcli.quant.gptq.gptq_quantize` (the base class's `fold` does both).
"""

from __future__ import annotations

from abqcli.quant.methods import GPTQ, CalibrationMethod


class GptqMethod(CalibrationMethod):
    """GPTQ on the unmodified weights: the base class's `fold` with `rounding: gptq`."""

    default_rounding = GPTQ
    roundings = (GPTQ,)

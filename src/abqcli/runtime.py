"""The packed runtime: `BTCLinear`, a quantized linear that runs from its BTC bit planes inside an
ordinary transformers model (built by the abq-packed format's reader, `abqcli.formats.abq_packed`).
"""

from __future__ import annotations

import torch
from torch import nn

from abqcli.btc.format import PackedWeight
from abqcli.btc.gemm import btc_linear
from abqcli.errors import InputError
from abqcli.quant.quantizer import FP_BITS

BACKENDS = ("cpu", "cupy")


class BTCLinear(nn.Module):
    """A quantized linear that runs from its BTC bit planes.

    forward = `btc_linear(x, packed, act_bits, bias, backend)`: per-token activation quantization, exact
    integer GEMM and the affine epilogue; weight-only (A16) layers dequantize and run a float matmul.
    The packed tensors stay on the CPU (the "cupy" backend keeps its own device copy); with backend
    "cpu" an input on another device is computed on the CPU and the result moved back.
    """

    def __init__(self, packed: PackedWeight, act_bits: int, bias: torch.Tensor | None = None,
                 backend: str = "cpu"):
        super().__init__()
        if backend not in BACKENDS:
            raise InputError(f"unknown backend {backend!r} (expected one of {', '.join(BACKENDS)})")
        self.packed = packed
        self.act_bits = int(act_bits)
        self.backend = backend
        self.in_features = packed.in_features
        self.out_features = packed.out_features
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def prepare(self) -> None:
        """Build the CPU path's cached operands now rather than on the first forward."""
        if self.backend != "cpu":
            return
        if self.act_bits >= FP_BITS:
            self.packed.dequantized_f32()
        else:
            self.packed.centred_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "cpu" and x.device.type != "cpu":
            bias = None if self.bias is None else self.bias.cpu()
            return btc_linear(x.cpu(), self.packed, self.act_bits, bias, "cpu").to(x.device)
        return btc_linear(x, self.packed, self.act_bits, self.bias, self.backend)

    def extra_repr(self) -> str:
        pw = self.packed
        g = f" g{pw.group_size}" if pw.group_size else ""
        return (f"{self.in_features}->{self.out_features}, W{pw.bits}{'*' if pw.balance else ''}{g}"
                f"A{self.act_bits}, {pw.planes.shape[0]} planes, backend={self.backend}")


def require_backend(backend: str) -> None:
    """InputError unless `backend` can run here (cupy: CuPy and an sm_80+ GPU)."""
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r} (expected one of {', '.join(BACKENDS)})")
    if backend == "cupy":
        from abqcli.btc import cuda as btc_cuda

        ok, reason = btc_cuda.available()
        if not ok:
            if reason.startswith("the GPU is sm_"):
                raise InputError(f"--backend cupy: {reason}; use --backend cpu")
            raise InputError(btc_cuda.NEEDS_GPU)

"""The packed runtime: `BTCLinear`, a quantized linear that runs from its BTC bit planes inside an
ordinary transformers model (built by the abq-packed format's reader, `abqcli.formats.abq_packed`).
"""

from __future__ import annotations

import torch
from torch import nn

from abqcli.btc.backends import GemmBackend
from abqcli.btc.format import PackedWeight
from abqcli.quant.hadamard import apply_input_transform
from abqcli.quant.quantizer import scheme_label
from abqcli.registry import BACKENDS


class BTCLinear(nn.Module):
    """A quantized linear that runs from its BTC bit planes on a GEMM backend (`abqcli.btc.backends`).

    forward = the backend's `linear(x', packed, act_bits, bias, act_clip)` on x' = the layer's online input
    transform of x (`input_transform`, e.g. the Hadamard transform of a rotated model's down_proj; none by
    default): per-token activation quantization (clip ratio `act_clip`), exact integer GEMM and the affine epilogue; weight-only (A16)
    layers dequantize and run a float matmul.
    The packed tensors stay on the CPU (the backend keeps any device copy it needs). `backend` names a
    registered backend (`abqcli.registry.BACKENDS`); an unknown one is an InputError.
    """

    def __init__(self, packed: PackedWeight, act_bits: int, bias: torch.Tensor | None = None,
                 backend: str = "cpu", input_transform: str | None = None, act_clip: float = 1.0):
        super().__init__()
        self.input_transform = input_transform
        self.act_clip = float(act_clip)
        self.gemm: GemmBackend = BACKENDS.load(backend)
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
        """Build the backend's cached operands now rather than on the first forward."""
        self.gemm.prepare(self.packed, self.act_bits)

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        return apply_input_transform(x, self.input_transform)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gemm.linear(self.transform_input(x), self.packed, self.act_bits, self.bias, self.act_clip)

    def extra_repr(self) -> str:
        pw = self.packed
        scheme = scheme_label(pw.bits, pw.balance, pw.group_size, self.act_bits)
        online = f", online {self.input_transform}" if self.input_transform else ""
        clip = f", clip {self.act_clip:g}" if self.act_clip != 1.0 else ""
        return (f"{self.in_features}->{self.out_features}, {scheme}{online}{clip}, {pw.planes.shape[0]} planes, "
                f"backend={self.backend}")


def require_backend(backend: str) -> GemmBackend:
    """The GEMM backend registered as `backend`, checked to run here: InputError for an unknown name or
    one that cannot run (cupy without CuPy and an sm_80+ GPU), with a one-line reason."""
    gemm: GemmBackend = BACKENDS.load(backend)
    gemm.require()
    return gemm

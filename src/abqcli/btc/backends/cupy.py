"""The `cupy` GEMM backend: the binary tensor-core kernels of `cuda/*.cu`, launched by `abqcli.btc.cuda`.

Its float epilogue rounds in its own order, so a value on a rounding tie of a downstream activation
quantizer can move to the neighbouring code, and the following layers amplify that: `abq verify` holds it
to teacher-forced logits (every backend's criterion) and a 1e-2 guard on log perplexity, not to
free-running logits. The launcher module is imported on first use (`_launcher`).
"""

from __future__ import annotations

import torch

from abqcli.btc.backends import ActivationPlanes, VerifyCriteria
from abqcli.btc.format import PackedWeight


def _launcher():
    from abqcli.btc import cuda

    return cuda


class CupyBackend:
    """Computes on the GPU; the packed weight stays on the CPU and is copied to the device once."""

    name = "cupy"
    kernel = "CUDA bit-plane GEMM"
    device = "cuda"
    verify_criteria = VerifyCriteria(nll_rel_tol=1e-2)

    def available(self) -> tuple[bool, str]:
        return _launcher().available()

    def require(self) -> None:
        _launcher()._require()  # the launchers' own check (one-line InputError), cached once it passes

    def prepare(self, packed: PackedWeight, act_bits: int) -> None:
        return None  # the device copy is made on the first forward, on the input's device

    def linear(self, x: torch.Tensor, packed: PackedWeight, act_bits: int,
               bias: torch.Tensor | None, act_clip: float = 1.0) -> torch.Tensor:
        return _launcher().btc_linear(x, packed, act_bits, bias=bias, act_clip=act_clip)

    def int_gemm_planes(self, a_planes: torch.Tensor, w_planes: torch.Tensor,
                        group_words: int | None) -> torch.Tensor:
        return _launcher().int_gemm_planes(a_planes, w_planes, group_words)

    def quantize_pack(self, x: torch.Tensor, bits: int, group_size: int | None,
                      clip: float = 1.0) -> ActivationPlanes | None:
        return _launcher().quantize_pack_activations(x, bits, group_size, clip)


CUPY_BACKEND = CupyBackend()

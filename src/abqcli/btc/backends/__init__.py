"""GEMM backends: how a packed (BTC) linear layer is computed — the `GemmBackend` protocol.

A backend is one module here holding one object that satisfies `GemmBackend`, registered by name in
`abqcli.registry.BACKENDS` (the `--backend` choices). `cpu` (`cpu.py`: exact integer arithmetic in
torch, the reference) and `cupy` (`cupy.py`: the binary tensor-core kernels of `cuda/*.cu`) exist today.
Everything that runs or checks packed layers asks the backend, never its name: `btc_linear` and the
runtime's `BTCLinear` call `linear`, `abq verify` compares `int_gemm_planes` (and `quantize_pack`) with
the exact reference and applies `verify_criteria`, `abq bench gemm` times `int_gemm_planes` and `linear`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from abqcli.btc.format import PackedWeight


@dataclass(frozen=True)
class VerifyCriteria:
    """What `abq verify` requires end to end of a backend against the export's fake-quant twin, besides
    what it requires of every backend (integer GEMMs identical to the exact reference, layer outputs and
    teacher-forced logits within their tolerances). A tolerance of None is not a criterion.

    free_running_logits_tol: max |Δlogits| / max |logits|, each model on its own activations;
    ppl_rel_tol: |ppl_packed − ppl_fakequant| / ppl_fakequant;
    nll_rel_tol: |ln ppl_packed − ln ppl_fakequant| / ln ppl_fakequant (a gross-error guard).
    """

    free_running_logits_tol: float | None = None
    ppl_rel_tol: float | None = None
    nll_rel_tol: float | None = None


ActivationPlanes = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class GemmBackend(Protocol):
    """One way of running the BTC GEMM. `linear` must compute what `abqcli.btc.gemm.epilogue` of the exact
    integer GEMM gives (activation codes bit for bit, accumulators exactly, float output up to rounding)."""

    name: str  # the registry name, shown in reports
    kernel: str  # what computes its integer GEMM, for reports ("bit-plane popcount GEMM (CPU)")
    device: str  # torch device type its models run on ("cpu", "cuda")
    verify_criteria: VerifyCriteria

    def available(self) -> tuple[bool, str]:
        """(True, what it runs on) or (False, why not), without raising."""
        ...

    def require(self) -> None:
        """InputError with a one-line reason (and the alternative) unless the backend can run here."""
        ...

    def prepare(self, packed: PackedWeight, act_bits: int) -> None:
        """Build the cached operands a layer needs, ahead of its first forward."""
        ...

    def linear(self, x: torch.Tensor, packed: PackedWeight, act_bits: int,
               bias: torch.Tensor | None, act_clip: float = 1.0) -> torch.Tensor:
        """x [..., K] -> [..., N] in x's dtype, on x's device. act_bits < 16: per-token activation
        quantization (clip ratio `act_clip`), exact integer GEMM, affine epilogue (+ bias); the weight must pass
        `contract.check_btc_group` and `contract.check_int32_bound`. act_bits >= 16 (weight-only): the
        dequantized weight in a float matmul, any group size."""
        ...

    def int_gemm_planes(self, a_planes: torch.Tensor, w_planes: torch.Tensor,
                        group_words: int | None) -> torch.Tensor:
        """Integer accumulators [M, N, G] (int32 or int64, on a_planes' device) of the bit-plane GEMM:
        a_planes [Pa, M, Kw], w_planes [Pw, N, Kw]; group_words None = one group of all Kw words."""
        ...

    def quantize_pack(self, x: torch.Tensor, bits: int, group_size: int | None,
                      clip: float = 1.0) -> ActivationPlanes | None:
        """The backend's own activation step (clip ratio `clip`), (planes [Pa, M, Kw], scale [M], zero [M], code sums [M, G])
        of x [M, K] on x's device; None when it quantizes with the reference quantizer (nothing to check)."""
        ...


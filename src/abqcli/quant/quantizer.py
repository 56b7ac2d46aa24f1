"""Uniform affine quantizer (DESIGN §4).

    q  = clamp(round(x / s) + z, 0, qmax)          round half to even
    x̂ = (q - z) · s
    s  = clamp((xmax - xmin) / qmax, 1e-5, 1e4)     asymmetric; weights: xmin <= 0 <= xmax
    s  = float32(float16(s))                        weights, `scale_dtype: float16` (the default)
    z  = round(-xmin / s)

`qmax = 2**bits - 1`, except bit balance (W2*): bits == 2 with balance gives `qmax = 4`, five levels.
Weights get one (s, z) per output row, or per row and group of `group_size` input columns (the last
group may be partial). Activations get one (s, z) per token, over the last dimension, computed on the
fly, from the token's range shrunk by a clip ratio r ∈ (0, 1]: `xmin = r·min(x)`, `xmax = r·max(x)`
(QuaRot's activation clipping; r = 1 covers the whole row, values beyond a shrunk range saturate). A weight scale is rounded to the precision the export stores it in (float16 by default, DESIGN §5)
before the zero point and the codes are computed from it, so the fake-quant model and the packed
artefact use the very same scale; activation scales are never stored and stay float32. In training, rounding passes gradients straight through (STE) and LWC scales the range with two
learnable factors per quantization row: `xmax' = σ(u)·xmax`, `xmin' = σ(l)·xmin`. Learned rounding
(AutoRound-style) adds a learnable offset v ∈ [−½, ½] per weight inside the rounding:
`q = clamp(round(x / s + v) + z, 0, qmax)`, so training can move each weight to its other neighbour.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SCALE_MIN = 1e-5
SCALE_MAX = 1e4
FP_BITS = 16  # activation / kv bits meaning "not quantized"


def qmax_for(bits: int, balance: bool = False) -> int:
    """Largest code for `bits` (W2* balance: 4, five centred levels)."""
    if balance:
        if bits != 2:
            raise ValueError(f"bit balance needs bits == 2, got {bits}")
        return 4
    return 2**bits - 1


def scheme_label(bits: int, balance: bool, group_size: int | None, act_bits: int) -> str:
    """The display name of one layer's scheme: `W4A4`, `W2*A8`, `W3A16 g128`."""
    return f"W{bits}{'*' if balance else ''}A{act_bits}" + (f" g{group_size}" if group_size else "")


def kv_label(kv_bits: int, act_bits: set[int]) -> str:
    """` (kv A8)` when q/k/v are quantized or differ from the activations, else ``."""
    return f" (kv A{kv_bits})" if kv_bits < FP_BITS or act_bits != {kv_bits} else ""


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even forward, identity backward."""
    return (torch.round(x) - x).detach() + x


def round_scale_ste(scale: torch.Tensor, dtype: str) -> torch.Tensor:
    """`scale` rounded to `dtype` ("float16" or "float32") and back, identity backward. Every clamped
    scale (1e-5 .. 1e4) is finite and non-zero in float16 (whose subnormals reach 6e-8)."""
    if dtype == "float32":
        return scale
    if dtype != "float16":
        raise ValueError(f"scale_dtype must be float16 or float32, got {dtype!r}")
    return (scale.half().to(scale.dtype) - scale).detach() + scale


def affine_params(xmin: torch.Tensor, xmax: torch.Tensor, qmax: int,
                  scale_dtype: str = "float32") -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (rounded to `scale_dtype`) and zero point of the asymmetric quantizer for a range
    (differentiable through STE)."""
    # divide by a tensor, not a Python scalar: on CUDA torch turns a scalar division into a multiply by
    # its reciprocal, which differs in the last bit from the true division the kernels and CPU use
    scale = ((xmax - xmin) / torch.full_like(xmax, qmax)).clamp(SCALE_MIN, SCALE_MAX)
    scale = round_scale_ste(scale, scale_dtype)
    zero = round_ste(-xmin / scale)
    return scale, zero


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmax: int,
             offset: torch.Tensor | None = None) -> torch.Tensor:
    """Integer codes in [0, qmax] (as floats, STE through the rounding); `offset`: learned rounding."""
    t = x / scale if offset is None else x / scale + offset
    return torch.clamp(round_ste(t) + zero, 0, qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (q - zero) * scale


@dataclass(frozen=True)
class WeightQuantSpec:
    """How one linear's weight is quantized; `scale_dtype`: the precision of its scales (float16, the
    abq-packed default, or float32)."""

    bits: int
    group_size: int | None = None
    balance: bool = False
    scale_dtype: str = "float16"

    @property
    def qmax(self) -> int:
        return qmax_for(self.bits, self.balance)

    def num_groups(self, in_features: int) -> int:
        g = self.group_size or in_features
        return -(-in_features // g)


def _grouped(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """[N, K] -> [N, G, g]; a partial last group is padded by repeating its last column,
    which leaves that group's min and max unchanged."""
    n, k = w.shape
    g = group_size or k
    pad = (-k) % g
    if pad:
        w = torch.cat([w, w[:, -1:].expand(n, pad)], dim=1)
    return w.reshape(n, -1, g)


def weight_range(
    w: torch.Tensor, spec: WeightQuantSpec, lwc: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(xmin, xmax) per row and group, [N, G]; LWC factors (u, l) are logits of shape [N, G].

    The range always contains 0 (xmin <= 0 <= xmax, before and after LWC), so the zero point lies in
    [0, qmax]: a group whose weights all have one sign would otherwise get a zero point outside the
    codes' range, which no export format stores."""
    wg = _grouped(w, spec.group_size)
    xmin, xmax = wg.amin(dim=-1).clamp(max=0), wg.amax(dim=-1).clamp(min=0)
    if lwc is not None:
        upper, lower = lwc
        xmax = torch.sigmoid(upper) * xmax
        xmin = torch.sigmoid(lower) * xmin
    return xmin, xmax


def weight_qparams(
    w: torch.Tensor, spec: WeightQuantSpec, lwc: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero per row and group, both [N, G]."""
    xmin, xmax = weight_range(w, spec, lwc)
    return affine_params(xmin, xmax, spec.qmax, spec.scale_dtype)


def _apply_grouped(w: torch.Tensor, spec: WeightQuantSpec, fn) -> torch.Tensor:
    n, k = w.shape
    wg = _grouped(w, spec.group_size)
    return fn(wg).reshape(n, -1)[:, :k]


def _grouped_offset(offset: torch.Tensor | None, spec: WeightQuantSpec) -> torch.Tensor | None:
    return None if offset is None else _grouped(offset, spec.group_size)


def fake_quantize_weight(
    w: torch.Tensor, spec: WeightQuantSpec, lwc: tuple[torch.Tensor, torch.Tensor] | None = None,
    offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quantize and dequantize a [N, K] weight (differentiable: STE, LWC and the rounding offset [N, K])."""
    scale, zero = weight_qparams(w, spec, lwc)
    s, z, v = scale.unsqueeze(-1), zero.unsqueeze(-1), _grouped_offset(offset, spec)
    return _apply_grouped(w, spec, lambda wg: dequantize(quantize(wg, s, z, spec.qmax, v), s, z))


@dataclass(frozen=True)
class LayerQuant:
    """What one linear gets: its weight quantizer, the bit width of its input activations, the online
    transform applied to its input before the activation quantizer (`quant.hadamard`; None: none) and
    that quantizer's clip ratio."""

    weight: WeightQuantSpec
    act_bits: int
    input_transform: str | None = None
    act_clip: float = 1.0


@dataclass
class QuantizedWeight:
    """Integer state of one quantized linear: what the BTC packer consumes.

    codes: uint8 [N, K] in [0, qmax]; scale, zero: float32 [N, G] (zero holds integers).
    Dequantized weight: (codes - zero[:, k // group]) * scale[:, k // group].
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    spec: WeightQuantSpec

    def _col_group(self) -> torch.Tensor:
        k = self.codes.shape[1]
        return torch.arange(k, device=self.codes.device) // (self.spec.group_size or k)

    def dequantize(self) -> torch.Tensor:
        col_group = self._col_group()
        return (self.codes.float() - self.zero[:, col_group]) * self.scale[:, col_group]

    def centred(self) -> CentredWeight:
        """The operand of integer-domain inference: `codes − zero` per row and group."""
        values = self.codes.float() - self.zero[:, self._col_group()]
        max_abs = float(values.abs().max()) if values.numel() else 0.0
        return CentredWeight(values, self.scale.float(), self.spec.group_size, max_abs)


@dataclass
class CentredWeight:
    """A quantized weight as integer-domain inference uses it (`abqcli.quant.integer.integer_linear`).

    values: float32 [N, K], `codes − zero` per row and group: exact small integers (zero points are
    integers); scale: float32 [N, G]; max_abs: max |values| (decides when float32 sums stay exact).
    The layer output is `sa · Σ_g sw_g · Σ_{k∈g} (qa − za)·values` — the BTC epilogue's bracket.
    """

    values: torch.Tensor
    scale: torch.Tensor
    group_size: int | None
    max_abs: float


@torch.no_grad()
def quantize_weight(
    w: torch.Tensor, spec: WeightQuantSpec, lwc: tuple[torch.Tensor, torch.Tensor] | None = None,
    offset: torch.Tensor | None = None,
) -> QuantizedWeight:
    """Integer codes and (scale, zero) of a [N, K] weight, computed in float32."""
    w = w.float()
    scale, zero = weight_qparams(w, spec, lwc)
    s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
    v = _grouped_offset(None if offset is None else offset.float(), spec)
    codes = _apply_grouped(w, spec, lambda wg: quantize(wg, s, z, spec.qmax, v))
    return QuantizedWeight(codes.to(torch.uint8), scale.float(), zero.float(), spec)


def activation_qparams(x: torch.Tensor, bits: int, clip: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (last dimension) dynamic scale and zero, shaped [..., 1], of the range
    [clip·min(x), clip·max(x)] (one float multiply each; clip 1 leaves the range as it is)."""
    xmin = x.amin(dim=-1, keepdim=True)
    xmax = x.amax(dim=-1, keepdim=True)
    if clip != 1.0:
        xmin, xmax = xmin * clip, xmax * clip
    return affine_params(xmin, xmax, qmax_for(bits))


class _ActivationFakeQuant(torch.autograd.Function):
    """Per-token fake quantization with a straight-through (identity) gradient.

    The forward runs without building a graph and the backward passes the gradient unchanged (also for
    values a clip ratio below 1 saturates), so the only gradient dropped is the one through the dynamic
    (min, max) of each token, and skipping that graph makes calibration steps several times cheaper on
    a CPU (element-wise work on [tokens, channels] dominates there)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bits: int, clip: float) -> torch.Tensor:
        xf = x.float()  # the codes of a bf16 input (autocast training) are computed in float32 too
        scale, zero = activation_qparams(xf, bits, clip)
        q = torch.clamp(torch.round(xf / scale) + zero, 0, qmax_for(bits))
        return ((q - zero) * scale).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None, None


def fake_quantize_activation(x: torch.Tensor, bits: int, clip: float = 1.0) -> torch.Tensor:
    """Per-token asymmetric fake quantization over the last dimension; 16 bits = identity."""
    if bits >= FP_BITS:
        return x
    return _ActivationFakeQuant.apply(x, bits, clip)


@torch.no_grad()
def quantize_activation(x: torch.Tensor, bits: int,
                        clip: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token codes (uint8, same shape as x) and (scale, zero) shaped [..., 1], in float32."""
    x = x.float()
    scale, zero = activation_qparams(x, bits, clip)
    return quantize(x, scale, zero, qmax_for(bits)).to(torch.uint8), scale, zero

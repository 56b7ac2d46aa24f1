"""Fake quantization of a transformers model: small wrappers, no copies of decoder-layer classes.

- Every quantized linear inside a decoder block becomes a `QuantLinear`: its input is fake-quantized
  per token at `act_bits`; its weight is whatever tensor it holds (RTN puts the fake-quantized
  weight there once; calibration substitutes trained weights through `torch.func.functional_call`).
  Quantized models for inference (RTN, a calibrated export) also give it their integer state, and
  it then computes in the integer domain exactly as the packed runtime does.
- q, k, v are fake-quantized per (head, token) over head_dim inside the attention function, which is
  registered with transformers' attention registry as "abq" (k after RoPE, as the model computes it).
  The per-module bit width lives on the attention module as `abq_kv_bits`; a rotated model also
  transforms q and k online (after RoPE, before their quantizer) by `abq_kv_transform` (R3: q·kᵀ is
  unchanged by an orthogonal transform of both).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from abqcli.models.adapters import Adapter
from abqcli.quant.hadamard import apply_input_transform
from abqcli.quant.integer import integer_linear
from abqcli.quant.quantizer import (
    FP_BITS,
    CentredWeight,
    LayerQuant,
    QuantizedWeight,
    fake_quantize_activation,
    quantize_weight,
)

ATTN_IMPLEMENTATION = "abq"


class QuantLinear(nn.Module):
    """nn.Linear with per-token fake-quantized input. Shares the original parameters.

    Two forward paths:

    * float (calibration, and any layer without integer state): `F.linear(x̂, W)` with the per-token
      fake-quantized input x̂ and whatever weight the layer holds;
    * integer domain, once `use_integer_weight(state)` has given it the layer's codes and scales and the
      input is activation-quantized: `integer_linear` — the exact integer product of centred codes, then
      the scales, i.e. the BTC layer's arithmetic. Mathematically the same function as the float path;
      in floating point it is the one the packed runtime computes, so a fake-quant model and its packed
      export give bit-identical outputs (a float-path rounding difference of one ulp can move a
      downstream activation across a rounding boundary, and at A4 such flips add up over many layers).
      Inference only: it passes no gradient.
    """

    def __init__(self, linear: nn.Linear, quant: LayerQuant):
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.quant = quant
        self.register_buffer("centred_codes", None, persistent=False)
        self.register_buffer("code_scales", None, persistent=False)
        self.centred_max_abs = 0.0

    @torch.no_grad()
    def use_integer_weight(self, state: QuantizedWeight) -> None:
        """Run inference in the integer domain with this integer state (the weight already holds its
        dequantized values; the state's codes are what the packed export stores)."""
        if tuple(state.codes.shape) != (self.out_features, self.in_features):
            raise ValueError(f"integer state {list(state.codes.shape)} does not fit a "
                             f"{self.in_features}->{self.out_features} linear")
        if self.quant.act_bits >= FP_BITS:
            return  # weight-only: F.linear on the dequantized weight is already the packed arithmetic
        centred = state.centred()
        device = self.weight.device
        self.centred_codes = centred.values.to(device)
        self.code_scales = centred.scale.to(device)
        self.centred_max_abs = centred.max_abs

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input as the activation quantizer sees it: after the layer's online transform, if any."""
        return apply_input_transform(x, self.quant.input_transform)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bits = self.quant.act_bits
        x = self.transform_input(x)
        if self.centred_codes is not None:  # only activation-quantized layers hold them
            weight = CentredWeight(self.centred_codes, self.code_scales, self.quant.weight.group_size,
                                   self.centred_max_abs)
            return integer_linear(x, weight, bits, self.bias, self.quant.act_clip)
        return F.linear(fake_quantize_activation(x, bits, self.quant.act_clip), self.weight, self.bias)

    def extra_repr(self) -> str:
        w = self.quant.weight
        g = f" g{w.group_size}" if w.group_size else ""
        online = f", online {self.quant.input_transform}" if self.quant.input_transform else ""
        clip = f", clip {self.quant.act_clip:g}" if self.quant.act_clip != 1.0 else ""
        return (f"{self.in_features}->{self.out_features}, W{w.bits}{'*' if w.balance else ''}{g}"
                f"A{self.quant.act_bits}{online}{clip}")


def causal_probs(
    query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """Softmax attention probabilities [B, H, Tq, Tk] in float32, causal when no mask is given; with
    `softcap` (Gemma-2) the scores are soft-capped first: cap · tanh(score / cap)."""
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scaling
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    tq, tk = scores.shape[-2:]
    if attention_mask is None:
        causal = torch.ones(tq, tk, dtype=torch.bool, device=scores.device).tril(tk - tq)
        scores = scores.masked_fill(~causal, float("-inf"))
    elif attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask[..., :tk], float("-inf"))
    else:
        scores = scores + attention_mask[..., :tk].float()
    return torch.softmax(scores, dim=-1)


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def abq_attention(module: nn.Module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention with q/k/v fake-quantized at `module.abq_kv_bits` (16 = off).

    With `module.abq_record_probs` set (the student in training), it runs eagerly, its output the
    product of the probabilities it leaves (averaged over heads) in `module.abq_probs` for the
    attention-KL loss; with `module.abq_observe_probs` set (the FP teacher), it leaves them there too but
    its output is what it would be without (the observation does not change the pass's other results).
    With a `softcap` (Gemma-2's attention logit soft-capping, which SDPA cannot do) it runs eagerly;
    otherwise it calls SDPA. A sliding window is already in `attention_mask` (masks are built as for SDPA).
    """
    bits = getattr(module, "abq_kv_bits", FP_BITS)
    clip = getattr(module, "abq_kv_clip", 1.0)
    transform = getattr(module, "abq_kv_transform", None)
    query, key = apply_input_transform(query, transform), apply_input_transform(key, transform)
    query = fake_quantize_activation(query, bits, clip)
    key = fake_quantize_activation(key, bits, clip)
    value = fake_quantize_activation(value, bits, clip)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    groups = query.shape[1] // key.shape[1]
    key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    softcap = kwargs.get("softcap")
    record = getattr(module, "abq_record_probs", False)
    keep = record or getattr(module, "abq_observe_probs", False)
    if record or softcap:
        probs = causal_probs(query, key, attention_mask, scaling, softcap)
        if keep:
            module.abq_probs = probs.mean(dim=1)
        out = torch.matmul(probs.to(value.dtype), value)
    else:
        if keep:
            module.abq_probs = causal_probs(query, key, attention_mask, scaling).mean(dim=1)
        mask = attention_mask[..., : key.shape[-2]] if attention_mask is not None else None
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, is_causal=mask is None and query.shape[-2] > 1, scale=scaling
        )
    return out.transpose(1, 2).contiguous(), None


def register_attention() -> None:
    """Make "abq" a valid attn_implementation (idempotent). Masks are built as for SDPA."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, abq_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, sdpa_mask)


def set_kv_quant(model: nn.Module, adapter: Adapter, kv_bits: int, kv_transform: str | None = None,
                 kv_clip: float = 1.0) -> None:
    """Route every block's attention through "abq" with q/k/v at `kv_bits` (clip ratio `kv_clip`), q and
    k transformed online by `kv_transform` (None: not) before their quantizer."""
    register_attention()
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    for block in adapter.blocks(model):
        attention = block.get_submodule(adapter.attention)
        attention.abq_kv_bits = kv_bits
        attention.abq_kv_clip = kv_clip
        attention.abq_kv_transform = kv_transform


def wrap_block_linears(
    block: nn.Module, adapter: Adapter, prefix: str, layer_quant: Callable[[str], LayerQuant | None]
) -> dict[str, QuantLinear]:
    """Replace the block's linears that `layer_quant` selects (by full name `prefix.rel`) with
    QuantLinear wrappers (weights untouched); returns them keyed by name relative to the block."""
    wrapped: dict[str, QuantLinear] = {}
    for rel in adapter.linear_names(block):
        quant = layer_quant(f"{prefix}.{rel}")
        if quant is None:
            continue
        parent_name, _, child = rel.rpartition(".")
        parent = block.get_submodule(parent_name) if parent_name else block
        wrapped[rel] = QuantLinear(getattr(parent, child), quant)
        setattr(parent, child, wrapped[rel])
    return wrapped


def wrap_linears(
    model: nn.Module, adapter: Adapter, layer_quant: Callable[[str], LayerQuant | None]
) -> dict[str, QuantLinear]:
    """QuantLinear wrappers for every decoder block, keyed by full module name."""
    wrapped: dict[str, QuantLinear] = {}
    for index, block in enumerate(adapter.blocks(model)):
        prefix = adapter.block_prefix(index)
        for rel, qlinear in wrap_block_linears(block, adapter, prefix, layer_quant).items():
            wrapped[f"{prefix}.{rel}"] = qlinear
    return wrapped


@torch.no_grad()
def apply_rtn(
    model: nn.Module, adapter: Adapter, layer_quant: Callable[[str], LayerQuant | None], kv_bits: int,
    kv_transform: str | None = None, kv_clip: float = 1.0,
) -> tuple[dict[str, QuantLinear], dict[str, QuantizedWeight]]:
    """Round-to-nearest fake quantization of the whole model, in place: each quantized linear holds its
    dequantized weight and runs in the integer domain (see `QuantLinear`). Returns the wrappers and
    their integer states (what an export writes), both keyed by full module name."""
    wrapped = wrap_linears(model, adapter, layer_quant)
    states = {}
    for name, qlinear in wrapped.items():
        states[name] = quantize_weight(qlinear.weight, qlinear.quant.weight)
        qlinear.weight.copy_(states[name].dequantize().to(qlinear.weight.dtype))
        qlinear.use_integer_weight(states[name])
    set_kv_quant(model, adapter, kv_bits, kv_transform, kv_clip)
    return wrapped, states

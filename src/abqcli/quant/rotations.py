"""Orthogonal rotations of a model before calibration (QuaRot / SpinQuant style; docs/ROTATION.md).

With row vectors (a linear computes y = x·Wᵀ with W [out, in]) and an orthogonal Q (Q·Qᵀ = I):

- norms first: an RMSNorm's weight g is folded into the linears that read it (and a MoE router, which
  reads it in float: W ← W·diag(g), g ← 1), the
  final norm's into the lm_head, because RMSNorm(x·Q) = RMSNorm(x)·Q holds only without a weight;
- R1, the residual stream h becomes h·Q: the embeddings E ← E·Q, every linear reading the stream
  W ← W·Q, every linear writing to it W ← Qᵀ·W (bias b ← b·Q), the lm_head W ← W·Q;
- R2, per attention head: v_proj's rows of kv head j W_j ← R2ᵀ·W_j (bias b_j ← b_j·R2) and o_proj's
  columns of query head h W[:, h] ← W[:, h]·R2 — one R2 for every head, so GQA's head sharing holds;
- R4, online: the input x of each `adapter.online_rotated` linear is transformed at inference by the
  Hadamard transform x·H (`quant.hadamard`), so its weight becomes W ← W·H; the layer records
  `input_transform: hadamard` and every runtime applies it before the activation quantizer. The rotated
  nn.Linear itself gets a forward pre-hook that applies the transform, so the rotated model (and any
  copy of its blocks: the FP teacher of calibration) still computes the original function; the
  quantized wrappers (`QuantLinear`, `BTCLinear`) apply it themselves;
- R3, online, only when kv is quantized: q and k are transformed by the Hadamard transform of head_dim
  after RoPE and before their quantizer (q·H·(k·H)ᵀ = q·kᵀ); the export records `kv_transform`.

The model computes the same function in exact arithmetic. R1 and R2 live in the weights (zero runtime
cost). Tied embeddings are untied (the lm_head gets the final norm's weight, the embeddings do not).
All products are taken in float64 and cast back to the model's dtype.

`calibration.rotation`: `hadamard` uses Q = diag(±1)·H/√n (random signs from `calibration.seed`, H of
`quant.hadamard`), `random-orthogonal` a seeded Haar-random orthogonal matrix (QR of a Gaussian); R4 is
the plain Hadamard transform in both (a third party rebuilds it from its order alone).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch
from torch import nn

from abqcli.errors import InputError
from abqcli.quant.hadamard import HADAMARD, apply_input_transform, has_hadamard, orthonormal_hadamard
from abqcli.quant.quantizer import FP_BITS, LayerQuant

if TYPE_CHECKING:  # the recipe reads ROTATIONS: this module stays free of the model layer at import
    from abqcli.models.adapters import Adapter

NONE, RANDOM_HADAMARD, RANDOM_ORTHOGONAL = "none", "hadamard", "random-orthogonal"
ROTATIONS = (NONE, RANDOM_HADAMARD, RANDOM_ORTHOGONAL)  # calibration.rotation


@dataclass(frozen=True)
class RotationResult:
    """What a rotation did: its kind, the online transform of each linear (full name), and whether the
    tied embeddings were untied."""

    kind: str = NONE
    online: dict[str, str] = field(default_factory=dict)
    untied_embeddings: bool = False
    kv_transform: str | None = None

    def layer_quant(self, layer_quant: Callable[[str], LayerQuant | None]) -> Callable[[str], LayerQuant | None]:
        """`layer_quant` with each rotated linear's online transform added."""
        online = self.online

        def with_transform(name: str) -> LayerQuant | None:
            quant = layer_quant(name)
            if quant is None or name not in online:
                return quant
            return replace(quant, input_transform=online[name])

        return with_transform

    def provenance(self) -> dict:
        online = set(self.online.values()) | ({self.kv_transform} if self.kv_transform else set())
        return {"kind": self.kind, "online": sorted(online), "untied_embeddings": self.untied_embeddings,
                "kv_transform": self.kv_transform}


def _dims(model: nn.Module, adapter: Adapter) -> tuple[int, int, int]:
    """(hidden size, head_dim, kv heads)."""
    config = model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.hidden_size, head_dim, getattr(config, "num_key_value_heads", None) or heads


def rotation_problem(model: nn.Module, adapter: Adapter, kind: str,
                     quantized: Callable[[str], bool]) -> str | None:
    """Why `kind` cannot rotate this model exactly (one sentence), or None. (head_dim needs a Hadamard
    matrix for R2 with `hadamard`, and for R3 with either kind when kv is quantized: checked always.)"""
    if kind == NONE:
        return None
    if adapter.rotation_problem:
        return f"calibration.rotation: {adapter.rotation_problem}"
    hidden, head_dim, _ = _dims(model, adapter)
    sizes = {"hidden size": hidden} if kind == RANDOM_HADAMARD else {}
    sizes["head_dim"] = head_dim
    for index, block in enumerate(adapter.blocks(model)):
        for rel in adapter.matching(block, adapter.online_rotated):
            if quantized(f"{adapter.block_prefix(index)}.{rel}"):
                sizes[f"{rel} input"] = block.get_submodule(rel).in_features
    for what, n in sizes.items():
        if not has_hadamard(n):
            return (f"calibration.rotation: abq knows no Hadamard matrix of order {n} (the {what}; orders "
                    "2^k·m with m 1, 2 or a Paley order q+1 or 2(q+1), q prime)")
    return None


def rotation_matrix(n: int, kind: str, generator: torch.Generator) -> torch.Tensor:
    """An orthogonal [n, n] float64 matrix of this kind (module docstring)."""
    if kind == RANDOM_HADAMARD:
        signs = torch.randint(0, 2, (n,), generator=generator, dtype=torch.float64) * 2 - 1
        return signs.unsqueeze(1) * orthonormal_hadamard(n)
    if kind == RANDOM_ORTHOGONAL:
        q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
        return q * torch.sign(torch.diagonal(r)).unsqueeze(0)  # sign fix: Haar-distributed
    raise ValueError(f"unknown rotation {kind!r}")


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    param.data.copy_(value.to(param.dtype))


def _right(linear: nn.Module, q: torch.Tensor) -> None:
    """W ← W·q (the linear reads a rotated input)."""
    _set(linear.weight, linear.weight.double() @ q)


def _left(linear: nn.Module, q: torch.Tensor) -> None:
    """W ← qᵀ·W, b ← b·q (the linear's output is rotated)."""
    _set(linear.weight, q.T @ linear.weight.double())
    if linear.bias is not None:
        _set(linear.bias, linear.bias.double() @ q)


def untie_embeddings(model: nn.Module, adapter: Adapter) -> bool:
    """Give the lm_head its own weight when it shares the embeddings'; True when it did."""
    head = model.get_submodule(adapter.lm_head)
    embed = model.get_submodule(adapter.embeddings)
    if head.weight is not embed.weight and head.weight.data_ptr() != embed.weight.data_ptr():
        return False
    head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=False)
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.tie_word_embeddings = False
    return True


def fuse_norms(model: nn.Module, adapter: Adapter) -> None:
    """Fold every norm weight into the linears that read it, and set it to 1."""
    for block in adapter.blocks(model):
        for pair in adapter.let_pairs(block):
            if pair.kind == "norm":
                readers = (*pair.consumers, *pair.float_readers)
                _fold_norm(block.get_submodule(pair.producer), [block.get_submodule(c) for c in readers])
    _fold_norm(model.get_submodule(adapter.final_norm), [model.get_submodule(adapter.lm_head)])


def _fold_norm(norm: nn.Module, consumers: list[nn.Module]) -> None:
    if getattr(norm, "bias", None) is not None:
        raise InputError("calibration.rotation: a norm with a bias cannot be folded into its linears")
    g = norm.weight.double()
    for linear in consumers:
        _set(linear.weight, linear.weight.double() * g)
    _set(norm.weight, torch.ones_like(g))


def rotate_residual(model: nn.Module, adapter: Adapter, q: torch.Tensor) -> None:
    """R1 (norms already fused)."""
    embed = model.get_submodule(adapter.embeddings)
    _set(embed.weight, embed.weight.double() @ q)
    for block in adapter.blocks(model):
        for pair in adapter.let_pairs(block):
            if pair.kind == "norm":
                for name in (*pair.consumers, *pair.float_readers):
                    _right(block.get_submodule(name), q)
        for name in adapter.matching(block, adapter.residual_writers):
            _left(block.get_submodule(name), q)
    _right(model.get_submodule(adapter.lm_head), q)


def rotate_heads(model: nn.Module, adapter: Adapter, r2: torch.Tensor) -> None:
    """R2: every head's values rotated by r2 in v_proj, undone in o_proj's columns."""
    _, head_dim, kv_heads = _dims(model, adapter)
    for block in adapter.blocks(model):
        value, out = block.get_submodule(adapter.value_proj), block.get_submodule(adapter.attention_out)
        _left(value, torch.block_diag(*[r2] * kv_heads))
        _right(out, torch.block_diag(*[r2] * (out.in_features // head_dim)))


def online_hadamard_hook(_module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook of an FP linear rotated by R4: its input gets the online Hadamard transform."""
    return (apply_input_transform(args[0], HADAMARD), *args[1:])


def rotate_online(model: nn.Module, adapter: Adapter, quantized: Callable[[str], bool]) -> dict[str, str]:
    """R4: W ← W·H for every quantized `online_rotated` linear, which gets `online_hadamard_hook`;
    returns their online transforms."""
    online = {}
    for index, block in enumerate(adapter.blocks(model)):
        for rel in adapter.matching(block, adapter.online_rotated):
            name = f"{adapter.block_prefix(index)}.{rel}"
            if quantized(name):
                linear = block.get_submodule(rel)
                _right(linear, orthonormal_hadamard(linear.in_features))
                linear.register_forward_pre_hook(online_hadamard_hook)
                online[name] = HADAMARD
    return online


@torch.no_grad()
def rotate_model(model: nn.Module, adapter: Adapter, kind: str, seed: int,
                 quantized: Callable[[str], bool], kv_bits: int = FP_BITS) -> RotationResult:
    """Rotate `model` in place (module docstring); `quantized(name)` says which linears are quantized
    (only those get the online transform), `kv_bits` < 16 adds R3. Refuses what cannot be rotated
    exactly."""
    if kind == NONE:
        return RotationResult()
    problem = rotation_problem(model, adapter, kind, quantized)
    if problem:
        raise InputError(problem)
    hidden, head_dim, _ = _dims(model, adapter)
    generator = torch.Generator().manual_seed(seed)
    untied = untie_embeddings(model, adapter)
    fuse_norms(model, adapter)
    rotate_residual(model, adapter, rotation_matrix(hidden, kind, generator))
    rotate_heads(model, adapter, rotation_matrix(head_dim, kind, generator))
    online = rotate_online(model, adapter, quantized)
    return RotationResult(kind, online, untied, HADAMARD if kv_bits < FP_BITS else None)

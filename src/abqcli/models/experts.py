"""Mixture-of-experts blocks as abq quantizes them: one pair of nn.Linear modules per expert.

transformers 5 stores the experts of a sparse MoE block fused, as two 3-D parameters,

    experts.gate_up_proj [E, 2I, H]   (rows: gate | up)        experts.down_proj [E, H, I]

and computes, for the tokens x the router sends to expert e with router weight w_e(x),

    y(x) = Σ_e∈topk(x) w_e(x) · D_e·(act(G_e·x) ⊙ U_e·x),   [G_e; U_e] = gate_up_proj[e],  D_e = down_proj[e].

abq quantizes every expert matrix as a linear of its own, so `unfuse_experts` replaces the fused module
with `ExpertLinears`: the same sum with `experts.<e>.gate_up_proj` ([2I, H]) and `experts.<e>.down_proj`
([H, I]) nn.Linear modules, experts taken in the same order as transformers' eager loop (the same
F.linear on the same values). Every per-linear part of abq (the QuantLinear wrappers, LET, GPTQ, the
formats, verify) then sees the experts as it sees any other linear; the router stays in float.
`fused_experts` puts the fused layout back (with the current weights) while a plain transformers
checkpoint is written. `counting_tokens` counts the tokens routed to each expert (the calibration log).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from abqcli.errors import InputError

_EXPERT_NAME = re.compile(r"\.experts\.(\d+)\.[^.]+$")


def expert_index(linear_name: str) -> int | None:
    """The expert a linear belongs to (`...experts.<e>.down_proj` -> e), or None for any other linear."""
    match = _EXPERT_NAME.search(linear_name)
    return int(match.group(1)) if match else None


def expert_role(linear_name: str) -> str:
    """The linear's name with its expert index as `*` (`mlp.experts.3.down_proj` -> `mlp.experts.*.down_proj`):
    the same for that linear of every expert, whose inputs do not depend on each other."""
    match = _EXPERT_NAME.search(linear_name)
    if not match:
        return linear_name
    return f"{linear_name[:match.start(1)]}*{linear_name[match.end(1):]}"


class Expert(nn.Module):
    """One expert: its gate_up_proj (rows gate | up) and down_proj as linears."""

    def __init__(self, gate_up_proj: nn.Linear, down_proj: nn.Linear):
        super().__init__()
        self.gate_up_proj = gate_up_proj
        self.down_proj = down_proj


def _linear(weight: torch.Tensor) -> nn.Linear:
    """An nn.Linear without bias holding a copy of `weight` [out, in]."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
    return linear


def _check_fused_layout(fused: nn.Module) -> None:
    """The layout `ExpertLinears` computes: concatenated gate | up, not transposed, no biases, gated."""
    layout = {"is_transposed": False, "is_concatenated": True, "has_bias": False, "has_gate": True}
    odd = [k for k, want in layout.items() if getattr(fused, k, want) != want]
    gate_up, down = getattr(fused, "gate_up_proj", None), getattr(fused, "down_proj", None)
    if odd or gate_up is None or down is None or gate_up.dim() != 3 or down.dim() != 3:
        raise InputError(f"unsupported mixture-of-experts layout in {type(fused).__name__} "
                         f"({', '.join(odd) or 'not gate_up_proj [E, 2I, H] and down_proj [E, H, I]'})")


class ExpertLinears(nn.ModuleList):
    """The experts of one MoE block as `Expert` modules `0 .. E-1`; forward as the fused module's.

    The fused module is kept (outside the module tree, without its 3-D parameters) for its activation
    and for `fused_experts`. `token_counts`, while not None, gets the number of tokens routed to each
    expert added by every forward."""

    def __init__(self, fused: nn.Module):
        _check_fused_layout(fused)
        super().__init__(Expert(_linear(gate_up), _linear(down))
                         for gate_up, down in zip(fused.gate_up_proj, fused.down_proj, strict=True))
        self._fused = (fused,)  # a tuple keeps nn.Module from registering it
        self.release_fused()
        self.token_counts: list[int] | None = None

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        """hidden_states [S, H], top_k_index / top_k_weights [S, k] -> [S, H] (module docstring)."""
        act = self._fused[0].act_fn
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            choice, token = torch.where(top_k_index.T == e)  # ordered as transformers' eager loop
            if self.token_counts is not None:
                self.token_counts[e] += int(token.numel())
            if token.numel() == 0:
                continue
            gate, up = expert.gate_up_proj(hidden_states[token]).chunk(2, dim=-1)
            y = expert.down_proj(act(gate) * up) * top_k_weights[token, choice, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out

    def fused(self) -> nn.Module:
        """The fused module with the experts' current weights stacked into its 3-D parameters."""
        fused = self._fused[0]
        fused.gate_up_proj = nn.Parameter(torch.stack([e.gate_up_proj.weight.detach() for e in self]),
                                          requires_grad=False)
        fused.down_proj = nn.Parameter(torch.stack([e.down_proj.weight.detach() for e in self]),
                                       requires_grad=False)
        return fused

    def release_fused(self) -> None:
        """Free the fused module's 3-D parameters: the experts' linears hold the weights."""
        self._fused[0].gate_up_proj = None
        self._fused[0].down_proj = None


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` at the dotted `name` of `model`."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def unfuse_experts(model: nn.Module, experts_path: str) -> None:
    """Replace every fused experts module (`<block>.<experts_path>`, e.g. `mlp.experts`) with
    `ExpertLinears`, in place."""
    for name, module in list(model.named_modules()):
        if name.endswith(f".{experts_path}") and not isinstance(module, ExpertLinears):
            _replace(model, name, ExpertLinears(module))


@contextmanager
def fused_experts(model: nn.Module) -> Iterator[None]:
    """While active, every `ExpertLinears` of `model` is replaced by its fused module holding the current
    (e.g. dequantized) weights: what `save_pretrained` must see to write transformers' own layout."""
    swapped = {name: module for name, module in model.named_modules() if isinstance(module, ExpertLinears)}
    for name, module in swapped.items():
        _replace(model, name, module.fused())
    try:
        yield
    finally:
        for name, module in swapped.items():
            module.release_fused()
            _replace(model, name, module)


@contextmanager
def counting_tokens(module: nn.Module) -> Iterator[dict[str, list[int]]]:
    """While active, every `ExpertLinears` inside `module` counts the tokens routed to each of its experts;
    yields {its name inside `module`: tokens per expert}, filled as `module` runs."""
    experts = {name: m for name, m in module.named_modules() if isinstance(m, ExpertLinears)}
    counts = {name: [0] * len(m) for name, m in experts.items()}
    for name, m in experts.items():
        m.token_counts = counts[name]
    try:
        yield counts
    finally:
        for m in experts.values():
            m.token_counts = None


def unrouted_linears(counts: dict[str, list[int]], linears: Iterable[str]) -> frozenset[str]:
    """Those of `linears` (names inside a block) that belong to an expert `counts` gives 0 tokens."""
    empty = tuple(f"{name}.{e}." for name, tokens in counts.items() for e, n in enumerate(tokens) if n == 0)
    return frozenset(rel for rel in linears if rel.startswith(empty)) if empty else frozenset()

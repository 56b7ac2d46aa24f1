"""Calibration methods: how one decoder block's float weights become integer weights.

A method is a plain class registered by name in `abqcli.registry.METHODS` (`calibration.method`). The
block loop (`abqcli.quant.calibrate`) owns everything around it: the teacher outputs, the two input
chains, the device, progress and the checkpoint. For every block it calibrates (a checkpointed block is
loaded instead) it makes one `BlockContext` and calls, in this order:

    method.prepare(ctx)                    # per-block state: learnable tensors, statistics, Hessians ...
    method.steps(ctx) -> int               # optimizer steps train() takes (progress); 0: it does not train
    method.train(ctx, on_step) -> Training # optional; on_step(epoch, step, loss) after every step
    method.fold(ctx) -> {linear: QuantizedWeight}   # writes the dequantized weights into ctx.qblock

`fold` writes the folded parameters into ctx.qblock, then turns every linear's weight into codes with
the recipe's `calibration.rounding` (`rounding`; None = the method's `default_rounding`):

    nearest   round to nearest (`quantize_weight`) with the method's clipping (`clipping(name)`: LWC);
    gptq      GPTQ (`abqcli.quant.gptq`): the Hessian of every linear is accumulated on the folded block
              run on the quantized-chain input (the inputs the layer really sees), then each weight is
              rounded column by column with inverse-Hessian error feedback, on the same clipped grid;
    learned   round to nearest after a learned per-weight offset (`rounding_offset(name)`; abq trains it).

A method that trains overrides `train`, and `folded_params` when it transforms the block before rounding.
A new method is one module in this package plus one line in `registry.METHODS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from abqcli.distributed import DataParallel
from abqcli.models.adapters import Adapter
from abqcli.models.experts import expert_role
from abqcli.quant.cache import ActivationCache
from abqcli.quant.fakequant import QuantLinear
from abqcli.quant.gptq import collect_hessians, gptq_quantize, reduce_hessians
from abqcli.quant.quantizer import QuantizedWeight, quantize_weight
from abqcli.recipe import Recipe

NEAREST, GPTQ, LEARNED = "nearest", "gptq", "learned"  # calibration.rounding (recipe.ROUNDINGS)

StepCallback = Callable[[int, int, float], None]  # (epoch, step, loss), both counted from 0


def batches(n: int, batch_size: int) -> list[slice]:
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


@torch.no_grad()
def run_block(block: nn.Module, inputs: torch.Tensor, kwargs: dict, device: torch.device,
              cache: ActivationCache | None = None, bf16: bool = False) -> torch.Tensor:
    """`block` (float32) on every window of `inputs` ([n, T, H], CPU), one window at a time on `device`;
    the outputs on the CPU in a tensor of `cache` (default: float32 in RAM). Window by window, so that
    these outputs (teachers, chains, Hessians) do not depend on how the windows are batched for
    training or split between processes: float rounding of a matmul can depend on how many rows it
    multiplies at once. `bf16`: the block's products under bf16 autocast (`calibration.autocast_passes`)."""
    outputs = None
    for i in range(len(inputs)):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            window = block(inputs[i:i + 1].to(device, torch.float32), **kwargs)
        if outputs is None:
            outputs = (cache or ActivationCache()).empty((len(inputs), *window.shape[1:]))
        outputs[i] = window[0]
    return outputs


@dataclass
class BlockContext:
    """What the loop gives a method for one block. The tensors of the two chains stay on the CPU; a
    method moves one batch at a time to `device`.

    qblock:   the block being quantized, on `device` in float32, its quantized linears wrapped in
              QuantLinear (`qlinears`, keyed by name relative to the block) and its KV cache quantized;
    fp_block: a float copy of it before any change (FP KV cache): the teacher;
    fp_in:    the FP-chain input [n, T, H] (the FP model's hidden states entering this block);
    q_in:     the quantized-chain input [n, T, H] (what the already quantized blocks before this one give);
              the inputs of qblock's linears on it (hooks on `qlinears`, `run(qblock, q_in)`) are what a
              Hessian-based rounding accumulates; these three and every `run` output are `cache` tensors
              (`abqcli.quant.cache`: in RAM or memory-mapped, in the cache dtype): a method reads a batch
              of them with `batch`, in float32 on the device;
    fp_out:   fp_block on fp_in: the FP-chain output Y_1 (the next block's fp_in);
    kwargs:   the keyword arguments of the block's forward (position embeddings, mask), on `device`;
    expert_tokens: a MoE block's calibration tokens per expert as the FP model routes them (fp_block on
              fp_in), per experts module (name inside the block);
    unrouted: the quantized linears of experts no calibration token was routed to: rounded to nearest
              on their full range (no learned clipping or rounding, no Hessian), i.e. RTN;
    ranks:    this process's place in a data-parallel run: the chains hold its share of the windows, and
              what feeds the block's learnable tensors is reduced across ranks (`abqcli.distributed`);
    bf16_passes: the chains' passes (`run`: the FP block on the FP chain and on the quantized chain, the
              quantized block on its chain) under bf16 autocast (`calibration.autocast_passes` with a bf16
              `autocast`); else float32.
    """

    index: int
    num_blocks: int
    qblock: nn.Module
    fp_block: nn.Module
    qlinears: dict[str, QuantLinear]
    fp_in: torch.Tensor
    q_in: torch.Tensor
    fp_out: torch.Tensor
    kwargs: dict
    device: torch.device
    batch_size: int
    expert_tokens: dict[str, list[int]] = field(default_factory=dict)
    unrouted: frozenset[str] = frozenset()
    ranks: DataParallel = field(default_factory=DataParallel.single)
    cache: ActivationCache = field(default_factory=ActivationCache)
    bf16_passes: bool = False

    def batches(self) -> list[slice]:
        """The calibration batches over the windows (`calibration.batch_size`)."""
        return batches(len(self.q_in), self.batch_size)

    def run(self, module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        """`module` (qblock or fp_block) on every window of `inputs`, without gradients; CPU output."""
        return run_block(module, inputs, self.kwargs, self.device, self.cache, self.bf16_passes)

    def batch(self, cached: torch.Tensor, b: slice) -> torch.Tensor:
        """Windows `b` of a cached tensor on the device, in float32 (what the block computes in)."""
        return cached[b].to(self.device, torch.float32)


@dataclass
class Training:
    """What `train` reports for the block log: mean loss over the first / last epoch (None when it did
    not train) and each loss term of the last step."""

    loss_first: float | None = None
    loss_last: float | None = None
    terms: dict[str, float] = field(default_factory=dict)


class NonFiniteLoss(Exception):
    """Training met a NaN or infinite loss; the loop turns it into a RunError that says what to do."""

    def __init__(self, epoch: int, step: int):
        super().__init__(f"non-finite loss at epoch {epoch}, step {step}")
        self.epoch, self.step = epoch, step


def _first_stage(hessians: dict[str, torch.Tensor]) -> list[str]:
    """The linears of the first stage among `hessians` (in call order): those sharing the first one's
    input, and the same linear of every other expert."""
    first = next(iter(hessians))
    return [rel for rel, h in hessians.items() if h is hessians[first] or expert_role(rel) == expert_role(first)]


class CalibrationMethod:
    """Base of every calibration method (see the module docstring for the order of the calls). One
    instance serves a whole run; `prepare` starts a block and replaces the previous block's state.

    needs_loss:       it trains on `calibration.loss`, so a recipe with every loss term off is refused
                      (`abqcli.recipe_checks.check_loss_terms`); it runs its training steps under
                      `calibration.autocast`, which is refused for a method that does not train;
    default_rounding: the rounding when the recipe leaves `calibration.rounding` empty;
    roundings:        the roundings it can run (others are refused before loading the model).
    """

    needs_loss: ClassVar[bool] = False
    default_rounding: ClassVar[str] = NEAREST
    roundings: ClassVar[tuple[str, ...]] = (NEAREST, GPTQ)

    def __init__(self, recipe: Recipe, adapter: Adapter):
        self.recipe, self.adapter = recipe, adapter
        self.rounding = self.rounding_of(recipe)

    @classmethod
    def rounding_of(cls, recipe: Recipe) -> str:
        return recipe.calibration.rounding or cls.default_rounding

    def prepare(self, ctx: BlockContext) -> None:
        """Set up this block's state (nothing by default)."""

    def steps(self, ctx: BlockContext) -> int:
        return 0

    def train(self, ctx: BlockContext, on_step: StepCallback) -> Training:
        return Training()

    def folded_params(self, ctx: BlockContext) -> dict[str, torch.Tensor]:
        """New values of block parameters (by `named_parameters()` name) to fold before rounding."""
        return {}

    def clipping(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """LWC logits (upper, lower) of linear `name`, or None: the full range of each group."""
        return None

    def rounding_offset(self, name: str) -> torch.Tensor | None:
        """The learned rounding offset of linear `name` ([N, K] in [-1/2, 1/2]), or None."""
        return None

    def round_weight(self, ctx: BlockContext, name: str, weight: torch.Tensor,
                     hessian: torch.Tensor | None = None) -> QuantizedWeight:
        """The integer state of linear `name` (relative to the block) from its folded float weight: RTN for
        an unrouted expert's linear, GPTQ when a Hessian is given, else round to nearest (after the
        learned offset, if any)."""
        spec = ctx.qlinears[name].quant.weight
        if name in ctx.unrouted:
            return quantize_weight(weight, spec)
        if hessian is not None:
            g = self.recipe.calibration.gptq
            return gptq_quantize(weight, hessian, spec, self.clipping(name), g.damp, g.act_order, g.block_size)
        return quantize_weight(weight, spec, self.clipping(name), self.rounding_offset(name))

    @torch.no_grad()
    def fold(self, ctx: BlockContext) -> dict[str, QuantizedWeight]:
        """Write the folded parameters and then every quantized linear's dequantized weight into
        ctx.qblock; return the integer states (what the checkpoint and the exports keep)."""
        named = dict(ctx.qblock.named_parameters())
        for key, value in self.folded_params(ctx).items():
            named[key].copy_(value.to(named[key].dtype))
        if self.rounding == GPTQ:
            states = self._gptq_states(ctx)
        else:
            states = {rel: self.round_weight(ctx, rel, lin.weight) for rel, lin in ctx.qlinears.items()}
        for rel, lin in ctx.qlinears.items():
            lin.weight.copy_(states[rel].dequantize().to(lin.weight.dtype))
        return states

    def _gptq_states(self, ctx: BlockContext) -> dict[str, QuantizedWeight]:
        """GPTQ for every linear. With `gptq.sequential` the block is rounded stage by stage, a stage being
        the linears fed one tensor (q/k/v, then o, gate/up, down), and in a MoE block that linear of every
        expert (`expert_role`: every gate_up_proj, then every down_proj): each stage's Hessians are
        collected with the stages before it already quantized, i.e. on the inputs it will see (one pass
        per stage); without it, one pass collects every Hessian on the float block."""
        sequential = self.recipe.calibration.gptq.sequential
        states: dict[str, QuantizedWeight] = {}
        remaining = dict(ctx.qlinears)
        for rel in ctx.unrouted:  # RTN, before any Hessian pass
            lin = remaining.pop(rel)
            states[rel] = self.round_weight(ctx, rel, lin.weight)
            lin.weight.copy_(states[rel].dequantize().to(lin.weight.dtype))
        while remaining:
            hessians = reduce_hessians(collect_hessians(remaining, lambda: ctx.run(ctx.qblock, ctx.q_in)),
                                       remaining, ctx.ranks)
            for rel in _first_stage(hessians) if sequential and hessians else list(remaining):
                lin = remaining.pop(rel)
                states[rel] = self.round_weight(ctx, rel, lin.weight, hessians.get(rel))
                lin.weight.copy_(states[rel].dequantize().to(lin.weight.dtype))
        return states

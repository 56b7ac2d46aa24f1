"""`calibration.method: abq`: LET, compensation and LWC trained on the distribution-correction loss
(DESIGN §4, steps 2-4 of the loop).

prepare: LET scales/shifts and compensation vectors (`BlockTransform`, scales initialised from the FP
         block's activation statistics), LWC clipping factors per quantized linear; the statistics and
         the FP block's attention maps P_1 (the KL term's teacher) come from one pass over the FP chain;
train:   AdamW over `epochs` passes of the calibration batches on the block loss (`abqcli.quant.loss`,
         window by window) of the quantized block
         on the quantized-chain input against Y_1 (FP block, FP-chain input) and Y_2 (FP block,
         quantized-chain input);
fold:    LET and compensation folded into the weights, then rounding on the learned LWC clipping:
         nearest, GPTQ, or (`rounding: learned`) nearest after a per-weight offset v ∈ [−½, ½] trained
         with the rest (AutoRound's idea, on ABQ's loss: Adam on v, clamped to [−½, ½] after each step).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call

from abqcli.models.adapters import Adapter
from abqcli.quant.loss import batch_means, needs_y_2, term_values, window_loss, window_terms
from abqcli.quant.methods import (
    GPTQ,
    LEARNED,
    NEAREST,
    BlockContext,
    CalibrationMethod,
    NonFiniteLoss,
    StepCallback,
    Training,
)
from abqcli.quant.quantizer import FP_BITS, QuantizedWeight, fake_quantize_weight
from abqcli.quant.transforms import ActStats, BlockTransform, recording_input_ranges
from abqcli.recipe import Recipe
from abqcli.recipe_checks import resolve_autocast

TEACHER_PROBS_CACHE_BYTES = 1 << 30  # keep teacher attention maps for the whole block below this size


@torch.no_grad()
def record_probs(block: nn.Module, adapter: Adapter, inputs: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """Head-averaged attention probabilities of `block` on `inputs`."""
    attn = adapter.attention_module(block)
    attn.abq_observe_probs = True
    try:
        block(inputs, **kwargs)
    finally:
        attn.abq_observe_probs = False
    probs, attn.abq_probs = attn.abq_probs, None
    return probs


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


class AbqMethod(CalibrationMethod):
    """Trains the block's LET / compensation / LWC parameters, then folds and rounds with them."""

    needs_loss = True
    roundings = (NEAREST, GPTQ, LEARNED)

    def __init__(self, recipe: Recipe, adapter: Adapter):
        super().__init__(recipe, adapter)
        shift = recipe.calibration.let.shift
        self.use_shift = shift is True or (
            shift == "auto" and adapter.let_shift and recipe.activations.bits < FP_BITS
        )
        self.transform: BlockTransform | None = None
        self.lwc: dict[str, tuple[nn.Parameter, nn.Parameter]] = {}
        self.offsets: dict[str, nn.Parameter] = {}
        self.teacher_probs: list[torch.Tensor] | None = None

    def prepare(self, ctx: BlockContext) -> None:
        cal = self.recipe.calibration
        stats, self.teacher_probs = self._observe_teacher(ctx)
        compensate = ctx.index < cal.compensation.first or ctx.index >= ctx.num_blocks - cal.compensation.last
        self.transform = BlockTransform(
            ctx.qblock, self.adapter, stats, let=cal.let.enabled, alpha=cal.let.alpha, shift=self.use_shift,
            compensation=cal.compensation.enabled and compensate,
        )
        self.lwc = {}
        learned = {rel: lin for rel, lin in ctx.qlinears.items() if rel not in ctx.unrouted}  # the rest: RTN
        if cal.lwc.enabled:
            for rel, lin in learned.items():
                shape = (lin.out_features, lin.quant.weight.num_groups(lin.in_features))
                init = torch.full(shape, cal.lwc.init, device=lin.weight.device)
                self.lwc[rel] = (nn.Parameter(init.clone()), nn.Parameter(init.clone()))
        self.offsets = {}
        if self.rounding == LEARNED:
            self.offsets = {rel: nn.Parameter(torch.zeros_like(lin.weight, dtype=torch.float32))
                            for rel, lin in learned.items()}

    def steps(self, ctx: BlockContext) -> int:
        return self.recipe.epochs * len(ctx.batches())

    def param_groups(self) -> list[dict]:
        """The AdamW parameter groups of this block (a method that learns more adds its group here)."""
        cal = self.recipe.calibration
        return [
            {"params": self.transform.let_parameters(), "lr": cal.let.lr},
            {"params": [p for pair in self.lwc.values() for p in pair], "lr": cal.lwc.lr},
            {"params": self.transform.compensation_parameters(), "lr": cal.compensation.lr},
            {"params": list(self.offsets.values()), "lr": cal.learned.lr},
        ]

    def train(self, ctx: BlockContext, on_step: StepCallback) -> Training:
        groups = [g for g in self.param_groups() if g["params"]]
        if not groups:
            return Training()
        optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
        fp_on_q = self.fp_on_quantized_chain(ctx)
        teacher_probs = self.teacher_probs
        epoch_losses: list[list[float]] = []
        terms: dict[str, float] = {}
        for epoch in range(self.recipe.epochs):
            epoch_losses.append([])
            for step, b in enumerate(ctx.batches()):
                p_1 = teacher_probs[step] if teacher_probs else None
                optimizer.zero_grad(set_to_none=True)
                terms = self._backward(ctx, b, fp_on_q, p_1)
                value = sum(terms.values())  # the global batch's loss (every rank stops together)
                if not math.isfinite(value):
                    raise NonFiniteLoss(epoch, step)
                optimizer.step()
                self._clamp_offsets()
                epoch_losses[-1].append(value)
                on_step(epoch, step, value)
        return Training(_mean(epoch_losses[0]), _mean(epoch_losses[-1]), terms)

    def fp_on_quantized_chain(self, ctx: BlockContext) -> torch.Tensor | None:
        """Y_2 of every window (the FP block on the quantized chain), or None where the loss has no Y_2
        term (`loss.needs_y_2`)."""
        return ctx.run(ctx.fp_block, ctx.q_in) if needs_y_2(self.recipe.calibration.loss) else None

    def _autocast(self, ctx: BlockContext) -> torch.autocast:
        """`calibration.autocast: bfloat16`: the student's training passes with bf16 products; the
        teacher passes, the chains and the rounding stay float32. `auto` is resolved by the run
        (`resolve_autocast`), or here, by the same rule, for a caller of the loop who did not."""
        bf16 = resolve_autocast(self.recipe, str(ctx.device)).calibration.autocast == "bfloat16"
        return torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=bf16)

    @torch.no_grad()
    def _clamp_offsets(self) -> None:
        for offset in self.offsets.values():
            offset.clamp_(-0.5, 0.5)

    @torch.no_grad()
    def _observe_teacher(self, ctx: BlockContext) -> tuple[dict[str, ActStats] | None, list[torch.Tensor] | None]:
        """One pass of the FP block over the FP-chain batches for what does not change within the block:
        LET's input statistics (`let.enabled`) and P_1 of every batch for the attention-KL term. P_1 is
        kept when small (heads are averaged: nsamples * T^2 floats), else None and `_window_terms`
        records it per window (DESIGN §4: long windows on big models)."""
        n, t = ctx.fp_in.shape[:2]
        want_stats = self.recipe.calibration.let.enabled
        want_probs = self.recipe.calibration.loss.attention_kl and n * t * t * 4 <= TEACHER_PROBS_CACHE_BYTES
        if not (want_stats or want_probs):
            return None, None
        probs: list[torch.Tensor] = []
        # float32 even with `calibration.autocast_passes`: P_1 in bf16 raised the KL terms' floor at SmolLM2's
        # blocks 3-11 by 1.7x (W3A16 g128: 0.0129 against 0.0077 at block 3)
        with recording_input_ranges(ctx.fp_block) as ranges:  # record_probs leaves the statistics as they are
            for b in ctx.batches():
                inputs = ctx.batch(ctx.fp_in, b)
                if want_probs:
                    probs.append(record_probs(ctx.fp_block, self.adapter, inputs, ctx.kwargs))
                else:
                    ctx.fp_block(inputs, **ctx.kwargs)
        return (ranges.stats(ctx.ranks) if want_stats else None), (probs if want_probs else None)

    def quantized_params(self, ctx: BlockContext) -> dict[str, torch.Tensor]:
        """Transformed block parameters with every quantized linear's weight fake-quantized (differentiable):
        what the loss sees."""
        params = dict(self.transform.transformed_params())
        for rel, lin in ctx.qlinears.items():
            key = f"{rel}.weight"
            params[key] = fake_quantize_weight(params.get(key, lin.weight), lin.quant.weight, self.lwc.get(rel),
                                               self.offsets.get(rel))
        return params

    def _backward(self, ctx: BlockContext, b: slice, fp_on_q: torch.Tensor | None,
                  p_1: torch.Tensor | None) -> dict[str, float]:
        """The gradient of batch `b`'s loss; each term's value over the global batch.

        The batch's windows share one fake-quantization of the block's weights (`quantized_params`, the
        bulk of the element-wise work of a CPU step): each window back-propagates its loss
        (`abqcli.quant.loss`, window by window, the same computation on one process or several) into
        detached copies of those parameters, the ranks average the copies' gradients, and one backward
        through `quantized_params` carries the mean to the learned tensors, the same on every rank."""
        params = self.quantized_params(ctx)
        shared = {k: v.detach().requires_grad_(v.requires_grad) for k, v in params.items()}
        windows = range(b.start, b.stop)
        terms = [self._window_terms(ctx, slice(w, w + 1), shared, fp_on_q, None if p_1 is None else p_1[i:i + 1])
                 for i, w in enumerate(windows)]
        means = batch_means([{k: t.item() for k, t in window.items()} for window in terms], ctx.ranks)
        for window in terms:
            window_loss(window, means, len(windows)).backward()
        learned = [k for k, v in shared.items() if v.requires_grad]
        ctx.ranks.mean_gradients([shared[k] for k in learned])
        reached = [k for k in learned if shared[k].grad is not None]
        if reached:
            torch.autograd.backward([params[k] for k in reached], [shared[k].grad for k in reached])
        return term_values(means)

    def _window_terms(self, ctx: BlockContext, w: slice, params: dict[str, torch.Tensor],
                      fp_on_q: torch.Tensor | None, p_1: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The loss terms of window `w` (`loss.window_terms`): Y_q against Y_1 = fp_out and Y_2 = fp_on_q
        (None where the loss has no Y_2 term), with the block's quantized parameters `params`."""
        attn_q = self.adapter.attention_module(ctx.qblock)
        want_kl = self.recipe.calibration.loss.attention_kl
        if want_kl and p_1 is None:
            p_1 = record_probs(ctx.fp_block, self.adapter, ctx.batch(ctx.fp_in, w), ctx.kwargs)
        attn_q.abq_record_probs = want_kl
        try:
            with self._autocast(ctx):
                y_q = functional_call(ctx.qblock, params, (ctx.batch(ctx.q_in, w),), ctx.kwargs)
        finally:
            attn_q.abq_record_probs = False
        p_q, attn_q.abq_probs = getattr(attn_q, "abq_probs", None), None
        y_2 = None if fp_on_q is None else ctx.batch(fp_on_q, w)
        return window_terms(y_q.float(), ctx.batch(ctx.fp_out, w), y_2,
                            None if p_q is None else p_q.float(), p_1, self.recipe.calibration.loss)

    def folded_params(self, ctx: BlockContext) -> dict[str, torch.Tensor]:
        return self.transform.transformed_params()

    def clipping(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self.lwc.get(name)

    def rounding_offset(self, name: str) -> torch.Tensor | None:
        return self.offsets.get(name)

    def fold(self, ctx: BlockContext) -> dict[str, QuantizedWeight]:
        states = super().fold(ctx)
        # the block is done: free its learnable tensors and teacher maps
        self.transform, self.lwc, self.offsets, self.teacher_probs = None, {}, {}, None
        return states

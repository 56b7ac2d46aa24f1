"""End-to-end tuning of the weight scales after the block loop (`finetune` in the recipe).

EfficientQAT's E2E-QP (Chen et al. 2024), on a distillation loss. The block loop fits each block to its
own teacher output and cannot see how one block's error grows through the blocks after it. Once every
block is quantized, the codes q and zero points z stay fixed and the scales of every quantized linear
(one per row and group) are trained through the whole model:

    W(s) = (q − z) · s,    s = s₀ · (1 + t),  t = 0 at the start, trained by Adam at `finetune.lr`
    L    = 1/T · Σ_tokens KL(p_FP ‖ p_Q)      next-token distributions of the FP model and the quantized one

over the calibration windows, `calibration.batch_size` windows a step in an order drawn from
`calibration.seed`, for `finetune.steps` steps (the windows are cycled), the learning rate constant or
(`finetune.schedule: cosine`) falling from `finetune.lr` at step 0 towards 0 after the last step,

    lr_k = lr · ½ · (1 + cos(π · k / steps)),    k = 0 … steps − 1.

The quantized model runs as in calibration: activations and q/k/v fake-quantized per token (gradients
straight through), online transforms applied, its products under `calibration.autocast`; the FP teacher
runs as loaded. Relative steps (t) make one learning rate fit every layer, whatever the size of its
weights.

At the end every scale is clamped to the quantizer's range and rounded to its stored precision
(`weights.scale_dtype`), and each quantized linear's weight becomes (q − z)·s: codes and zero points,
and so packing, `verify` and every export format, are those of any other run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from abqcli.errors import RunError
from abqcli.quant.fakequant import QuantLinear
from abqcli.quant.quantizer import SCALE_MAX, SCALE_MIN, QuantizedWeight
from abqcli.recipe import FinetuneSpec

FinetuneStep = Callable[[int, float], None]  # (step counted from 0, loss)


@dataclass
class FinetuneLog:
    """What the stage reports for quant_log.json: the KL of the first step's windows before training
    (that step's loss) and after it, on the same windows, so the two compare."""

    steps: int
    loss_first: float
    loss_last: float
    seconds: float


class TrainableScales:
    """One quantized linear's weight as a function of its relative scale steps t [N, G]."""

    def __init__(self, state: QuantizedWeight, dtype: torch.dtype, device: torch.device):
        k = state.codes.shape[1]
        self.state = state
        self.col_group = torch.arange(k, device=device) // (state.spec.group_size or k)
        # q − z: small integers (|q − z| <= 255), kept as int16 to spare memory
        self.centred = (state.codes.to(device, torch.int16) - state.zero.to(device, torch.int16)[:, self.col_group])
        self.base = state.scale.float().to(device)
        self.t = nn.Parameter(torch.zeros_like(self.base))
        self.dtype = dtype

    def scale(self) -> torch.Tensor:
        return (self.base * (1 + self.t)).clamp(SCALE_MIN, SCALE_MAX)

    def weight(self) -> torch.Tensor:
        """(q − z) · s, differentiable in t, in the model's dtype."""
        return (self.centred.float() * self.scale()[:, self.col_group]).to(self.dtype)

    @torch.no_grad()
    def final_state(self) -> QuantizedWeight:
        """The integer state with the trained scales, rounded to their stored precision."""
        scale = self.scale().cpu()
        if self.state.spec.scale_dtype == "float16":
            scale = scale.half()
        return QuantizedWeight(self.state.codes, scale.float(), self.state.zero, self.state.spec)


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(p_teacher ‖ p_student), both from logits [..., V], in float32."""
    log_q = F.log_softmax(student_logits.float(), dim=-1).flatten(0, -2)
    log_p = F.log_softmax(teacher_logits.float(), dim=-1).flatten(0, -2)
    return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")


def window_order(n: int, steps: int, batch_size: int, seed: int) -> list[torch.Tensor]:
    """The windows of each step: passes over a seeded permutation of the n windows, `batch_size` at a
    time (a pass's last batch may be smaller), until `steps` batches."""
    generator = torch.Generator().manual_seed(seed)
    batches: list[torch.Tensor] = []
    while len(batches) < steps:
        order = torch.randperm(n, generator=generator)
        batches.extend(order[i:i + batch_size] for i in range(0, n, batch_size))
    return batches[:steps]


def finetune_scales(model: nn.Module, teacher: nn.Module, qlinears: dict[str, QuantLinear],
                    states: dict[str, QuantizedWeight], windows: torch.Tensor, spec: FinetuneSpec,
                    batch_size: int, seed: int, autocast: bool, device: torch.device,
                    on_step: FinetuneStep | None = None, teacher_autocast: bool = False) -> FinetuneLog:
    """Train the scales of `qlinears` (full names, their integer states in `states`) through `model`
    against `teacher` on `windows` [n, T] for `spec.steps` steps at `spec.lr` on `spec.schedule`; replaces
    `states`' entries and the linears' weights with the result. Both models run on `device` and go back
    to the CPU. `autocast`, `teacher_autocast`: the model's, the teacher's products under bf16 autocast."""
    start = time.perf_counter()
    model.to(device)
    teacher.to(device)
    trainable = {name: TrainableScales(states[name], qlinears[name].weight.dtype, device) for name in qlinears}
    optimizer = torch.optim.Adam([s.t for s in trainable.values()], lr=spec.lr)
    schedule = learning_rate_schedule(optimizer, spec)
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    first = math.nan
    order = window_order(len(windows), spec.steps, batch_size, seed)
    try:
        for step, batch in enumerate(order):
            optimizer.zero_grad(set_to_none=True)
            loss = _step_backward(model, teacher, trainable, windows[batch], (autocast, teacher_autocast), device)
            if not math.isfinite(loss):
                raise RunError(f"non-finite loss at finetune step {step} (counted from 0); the calibrated blocks "
                               "are checkpointed: lower finetune.lr (e.g. --set finetune.lr=1e-4) and rerun "
                               "with --resume")
            optimizer.step()
            schedule.step()
            first = loss if step == 0 else first
            if on_step is not None:
                on_step(step, loss)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    _write_back(trainable, qlinears, states)
    after = _batch_kl(model, teacher, windows[order[0]], (autocast, teacher_autocast), device)
    model.to("cpu")
    teacher.to("cpu")
    return FinetuneLog(len(order), first, after, round(time.perf_counter() - start, 3))


def learning_rate_schedule(optimizer: torch.optim.Optimizer,
                           spec: FinetuneSpec) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning rate of each step (module docstring), stepped once after each optimizer step."""
    if spec.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=spec.steps, eta_min=0.0)
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


def _window_kl(model: nn.Module, teacher: nn.Module, ids: torch.Tensor, autocast: tuple[bool, bool],
               weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """KL of one window [1, T]: the teacher without gradients, the model (with `weights` substituted);
    `autocast`: (model, teacher) under bf16 autocast."""
    with torch.no_grad(), torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast[1]):
        target = teacher(ids).logits
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast[0]):
        logits = functional_call(model, weights or {}, (ids,)).logits
    return distillation_kl(logits, target)


def _step_backward(model: nn.Module, teacher: nn.Module, trainable: dict[str, TrainableScales],
                   batch: torch.Tensor, autocast: tuple[bool, bool], device: torch.device) -> float:
    """The gradient of one step's mean KL in every t; returns that loss. The step's windows share one
    computation of the weights: each window back-propagates into detached copies of them, and one
    backward carries their summed gradient to the scales (a window's logits [T, V] at a time in memory)."""
    weights = {f"{name}.weight": s.weight() for name, s in trainable.items()}
    shared = {key: w.detach().requires_grad_(True) for key, w in weights.items()}
    total = 0.0
    for window in batch:
        loss = _window_kl(model, teacher, window.unsqueeze(0).to(device), autocast, shared) / len(batch)
        loss.backward()
        total += loss.item()
    reached = [key for key in weights if shared[key].grad is not None]  # a MoE expert no token reached: none
    if reached:
        torch.autograd.backward([weights[key] for key in reached], [shared[key].grad for key in reached])
    return total


@torch.no_grad()
def _batch_kl(model: nn.Module, teacher: nn.Module, batch: torch.Tensor, autocast: tuple[bool, bool],
              device: torch.device) -> float:
    """The mean KL of `batch`'s windows, as a training step computes it, without gradients."""
    return sum(float(_window_kl(model, teacher, w.unsqueeze(0).to(device), autocast)) for w in batch) / len(batch)


@torch.no_grad()
def _write_back(trainable: dict[str, TrainableScales], qlinears: dict[str, QuantLinear],
                states: dict[str, QuantizedWeight]) -> None:
    for name, scales in trainable.items():
        states[name] = scales.final_state()
        qlinears[name].weight.copy_(states[name].dequantize().to(qlinears[name].weight.dtype))

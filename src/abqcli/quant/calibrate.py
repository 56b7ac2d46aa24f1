"""The block-wise calibration loop (DESIGN §4, "The loop").

For each decoder block, in order:
1. teacher outputs: Y_1 = FP block on the FP-chain input (Y_2, the FP block on the quantized-chain input,
   is the method's to compute when it trains); in a MoE block this pass also counts the tokens the FP
   model routes to each expert (an expert with none is rounded to nearest: `BlockContext.unrouted`);
2. the calibration method (`calibration.method`, from `abqcli.registry.METHODS`; `abqcli.quant.methods`)
   prepares the block, optionally trains it, folds its weights and returns the integer codes and
   (scale, zero) per linear: `rtn` rounds the weights as they are, `abq` trains LET / compensation / LWC;
3. run the folded quantized block to produce the next block's quantized-chain input;
4. write a checkpoint (`abqcli.quant.checkpoint`), so that an interrupted run resumes at the next block.

Only one block is on the compute device at a time; the chain inputs stay on the CPU. Over several
processes (`abqcli.distributed`) each rank runs the loop on its share of the windows, with the
statistics, gradients and Hessians that feed the block's learnable tensors reduced across ranks.
"""

from __future__ import annotations

import copy
import resource
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import send_to_device
from torch import nn

from abqcli.distributed import DataParallel
from abqcli.errors import RunError
from abqcli.models.adapters import Adapter
from abqcli.models.experts import counting_tokens, unrouted_linears
from abqcli.quant.cache import ActivationCache
from abqcli.quant.checkpoint import BlockLog, Checkpoint, chain_hash, fingerprint
from abqcli.quant.fakequant import wrap_block_linears
from abqcli.quant.methods import BlockContext, CalibrationMethod, NonFiniteLoss, run_block
from abqcli.quant.quantizer import FP_BITS, LayerQuant, QuantizedWeight
from abqcli.recipe import Recipe
from abqcli.recipe_checks import bf16_passes
from abqcli.registry import METHODS


@dataclass
class CalibrationResult:
    quantized: dict[str, QuantizedWeight]  # full linear name -> integer state
    layers: dict[str, LayerQuant]
    kv_bits: int
    log: list[BlockLog]
    fingerprint: str


class BlockSource:
    """Where the loop's blocks come from and where a finished block goes. This default: the whole model
    is in memory and every integer state is kept for the exports (`CalibrationResult.quantized`). A
    blockwise run (`model.loading: blockwise`) loads each block when the loop reaches it and hands it
    on to be written and dropped (`abqcli.pipeline.StreamedBlocks`)."""

    keeps_states = True

    def state_items(self, model: nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
        """The model's state dict, in name order: what the run's fingerprint hashes."""
        return sorted(model.state_dict().items())

    def capture(self, adapter: Adapter, model: nn.Module, windows: torch.Tensor,
                cache: ActivationCache) -> tuple[torch.Tensor, list[dict]]:
        """The first block's inputs and every block's keyword arguments (`Adapter.capture_block_inputs`)."""
        return adapter.capture_block_inputs(model, windows, cache)

    def load(self, index: int, block: nn.Module) -> None:
        """Block `index`'s weights, before the loop moves it to the device."""

    def finish(self, index: int, block: nn.Module, states: dict[str, QuantizedWeight],
               layers: dict[str, LayerQuant]) -> None:
        """Block `index`, folded and back in the model dtype on the CPU, with its linears' integer states
        and schemes (by full name)."""

    def export_shards(self) -> object:
        """Once calibrated, what the exports get as `ExportInput.shards` (the model made whole where it
        must be): None here, the model holds every block."""
        return None


class Progress:
    """Callbacks the loop reports through; the CLI renders them with rich. Default: silent."""

    def block_start(self, block: int, num_blocks: int, steps: int) -> None: ...

    def step(self, block: int, epoch: int, step: int, loss: float) -> None: ...

    def block_end(self, log: BlockLog) -> None: ...

    def finetune_start(self, steps: int) -> None: ...

    def finetune_step(self, step: int, loss: float) -> None: ...

    def finetune_end(self, log) -> None: ...


def _non_finite_message(index: int, num_blocks: int, epoch: int, step: int, checkpoint_dir: Path) -> str:
    """What stopped the run, what is kept, and advice that works: the learning rates are part of the
    checkpoint's fingerprint, so a run with lowered ones starts again (--overwrite), never --resume."""
    where = (f"non-finite loss at block {index}, epoch {epoch}, step {step} (counted from 0; block "
             f"{index + 1}/{num_blocks} in the progress lines)")
    lower = ("lower calibration.lwc.lr, calibration.let.lr or calibration.compensation.lr "
             "(e.g. --set calibration.lwc.lr=1e-3)")
    if index == 0:
        return f"{where}; no block is checkpointed yet: {lower} and start again with --overwrite"
    kept = "the first block is" if index == 1 else f"the first {index} blocks are"
    return (f"{where}; {kept} checkpointed in {checkpoint_dir}: the same command with --resume retries "
            f"from block {index + 1}/{num_blocks}; or {lower} and start again with --overwrite "
            "(a changed recipe cannot --resume)")


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


class Calibrator:
    """Runs the loop over all blocks with checkpoints (see module docstring)."""

    def __init__(self, model: nn.Module, adapter: Adapter, recipe: Recipe, windows: torch.Tensor,
                 checkpoint_dir: Path, device: torch.device, progress: Progress | None = None,
                 layer_quant: Callable[[str], LayerQuant | None] | None = None, ranks: DataParallel | None = None,
                 source: BlockSource | None = None, cache: ActivationCache | None = None):
        """`layer_quant` (default `recipe.layer_quant`): each linear's quantization, online transforms
        of a rotated model included (`RotationResult.layer_quant`); `ranks`: this process's share of a
        data-parallel run (default: one process, every window); `source`: where the blocks come from
        (default: the model in memory); `cache`: where the activations are kept (default: float32 in RAM)."""
        self.model, self.adapter, self.recipe, self.windows = model, adapter, recipe, windows
        self.layer_quant = layer_quant or recipe.layer_quant
        self.checkpoint_dir = checkpoint_dir
        self.device = device
        self.progress = progress or Progress()
        self.blocks = adapter.blocks(model)
        self.kv_bits, self.kv_clip = recipe.kv_bits, recipe.kv_clip
        self.ranks = ranks or DataParallel.single()
        self.local = self.ranks.local_windows(len(windows), recipe.calibration.batch_size)
        self.batch_size = recipe.calibration.batch_size // self.ranks.world
        self.method: CalibrationMethod = METHODS.load(recipe.calibration.method)(recipe, adapter)
        self.source = source or BlockSource()
        self.cache = cache or ActivationCache()
        self.bf16_passes = bf16_passes(recipe, str(device))

    def run(self, resume: bool = False) -> CalibrationResult:
        """Every block in order (see the module docstring); with a `BlockSource` that does not keep the
        integer states, `CalibrationResult.quantized` is empty (the blocks went to their writer)."""
        run_fingerprint = fingerprint(self.source.state_items(self.model), self.recipe, self.windows)
        checkpoint = (Checkpoint.resume if resume else Checkpoint.start)(self.checkpoint_dir, run_fingerprint,
                                                                         self.ranks)
        fp_in, block_kwargs = self.source.capture(self.adapter, self.model, self.windows[self.local], self.cache)
        q_in = fp_in
        quantized: dict[str, QuantizedWeight] = {}
        layers: dict[str, LayerQuant] = {}
        logs = checkpoint.logs()
        for index, block in enumerate(self.blocks):
            self.source.load(index, block)
            dtype = next(block.parameters()).dtype
            ctx = self._context(index, block, fp_in, q_in, block_kwargs[index])
            states, q_out = self._block(ctx, checkpoint, logs)
            prefix = self.adapter.block_prefix(index)
            block_states = {f"{prefix}.{rel}": qw for rel, qw in states.items()}
            block_layers = {f"{prefix}.{rel}": ctx.qlinears[rel].quant for rel in states}
            layers.update(block_layers)
            if self.source.keeps_states:
                quantized.update(block_states)
            block.to(dtype).to("cpu")
            fp_in, q_in = ctx.fp_out, q_out
            del ctx, states  # frees the FP copy on the device before the next block moves there
            self.source.finish(index, block, block_states, block_layers)
            del block_states
        return CalibrationResult(quantized, layers, self.kv_bits, logs, run_fingerprint)

    def _context(self, index: int, block: nn.Module, fp_in: torch.Tensor, q_in: torch.Tensor,
                 kwargs: dict) -> BlockContext:
        """Block `index` on the device in float32 with its quantized linears wrapped and its KV cache
        quantized, an FP copy of it, and the FP copy's output on the FP chain."""
        block.to(self.device)
        block.float()
        fp_block = copy.deepcopy(block)
        self.adapter.attention_module(fp_block).abq_kv_bits = FP_BITS
        prefix = self.adapter.block_prefix(index)
        qlinears = wrap_block_linears(block, self.adapter, prefix, self.layer_quant)
        attention = self.adapter.attention_module(block)
        attention.abq_kv_bits, attention.abq_kv_clip = self.kv_bits, self.kv_clip
        dev_kwargs = send_to_device(kwargs, self.device)
        with counting_tokens(fp_block) as expert_tokens:  # the FP model's routing of the calibration tokens
            fp_out = run_block(fp_block, fp_in, dev_kwargs, self.device, self.cache, self.bf16_passes)
        expert_tokens = {name: self.ranks.sum_(torch.tensor(counts)).tolist()
                         for name, counts in sorted(expert_tokens.items())}
        return BlockContext(index, len(self.blocks), block, fp_block, qlinears, fp_in, q_in, fp_out, dev_kwargs,
                            self.device, self.batch_size, expert_tokens, unrouted_linears(expert_tokens, qlinears),
                            self.ranks, self.cache, self.bf16_passes)

    def _block(self, ctx: BlockContext, checkpoint: Checkpoint,
               logs: list[BlockLog]) -> tuple[dict[str, QuantizedWeight], torch.Tensor]:
        """One block: loaded from the checkpoint (and checked) or calibrated (and checkpointed); its integer
        states and its quantized-chain output."""
        done = ctx.index < checkpoint.blocks()
        if done:
            states = checkpoint.load_block(ctx.index, ctx.qblock, ctx.qlinears)
        else:
            states, log = self._calibrate_block(ctx)
            logs.append(log)
        q_out = ctx.run(ctx.qblock, ctx.q_in)
        hashes = chain_hash(ctx.fp_out, self.ranks, self.local), chain_hash(q_out, self.ranks, self.local)
        if done:
            checkpoint.check_block(ctx.index, *hashes)
        else:
            checkpoint.save_block(ctx.index, ctx.qblock, states, *hashes, logs)
            self.progress.block_end(logs[-1])
        return states, q_out

    def _calibrate_block(self, ctx: BlockContext) -> tuple[dict[str, QuantizedWeight], BlockLog]:
        start = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        for p in ctx.qblock.parameters():
            p.requires_grad_(False)
        self.method.prepare(ctx)
        self.progress.block_start(ctx.index, ctx.num_blocks, self.method.steps(ctx))
        try:
            training = self.method.train(ctx, lambda epoch, step, loss: self.progress.step(ctx.index, epoch, step,
                                                                                           loss))
        except NonFiniteLoss as exc:
            raise RunError(_non_finite_message(ctx.index, ctx.num_blocks, exc.epoch, exc.step,
                                               self.checkpoint_dir)) from exc
        states = self.method.fold(ctx)
        log = BlockLog(ctx.index, training.loss_first, training.loss_last,
                       round(time.perf_counter() - start, 3), round(_peak_memory_mb(self.device), 1),
                       training.terms, ctx.expert_tokens)
        return states, log

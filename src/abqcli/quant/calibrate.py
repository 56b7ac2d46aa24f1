"""The block-wise ABQ calibration loop (DESIGN §4, "The loop").

For each decoder block, in order:
1. teacher outputs: Y_1 = FP block on the FP-chain input, Y_2 = FP block on the quantized-chain input;
2. build the trainable quantized block: LET / compensation (`BlockTransform`), LWC factors per linear;
3. train with AdamW on the distribution-correction loss (`loss.block_loss`);
4. fold LET, compensation and LWC into the weights; keep integer codes and (scale, zero) per linear;
5. run the folded quantized block to produce the next block's quantized-chain input;
6. write a checkpoint, so that an interrupted run resumes at the next block.

Method `rtn` skips 2-3: the weights are rounded to nearest as they are.
Only one block is on the compute device at a time; the chain inputs stay on the CPU.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import resource
import time
from dataclasses import asdict, dataclass, field
from dataclasses import fields as dataclass_fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.func import functional_call

from abqcli.checksums import sha256_file
from abqcli.errors import InputError, RunError
from abqcli.models.adapters import Adapter
from abqcli.quant.fakequant import QuantLinear, wrap_block_linears
from abqcli.quant.loss import block_loss
from abqcli.quant.quantizer import FP_BITS, LayerQuant, QuantizedWeight, fake_quantize_weight, quantize_weight
from abqcli.quant.transforms import BlockTransform, collect_activation_stats
from abqcli.recipe import Recipe

CHECKPOINT_STATE = "state.json"
TEACHER_PROBS_CACHE_BYTES = 1 << 30  # keep teacher attention maps for the whole block below this size


@dataclass
class BlockLog:
    """What one block's calibration did (one entry of quant_log.json).

    loss_first / loss_last: mean loss over the first / last epoch (None for RTN)."""

    block: int
    loss_first: float | None
    loss_last: float | None
    seconds: float
    peak_memory_mb: float
    loss_terms_last: dict[str, float] = field(default_factory=dict)


@dataclass
class CalibrationResult:
    quantized: dict[str, QuantizedWeight]  # full linear name -> integer state
    layers: dict[str, LayerQuant]
    kv_bits: int
    log: list[BlockLog]
    fingerprint: str


class Progress:
    """Callbacks the loop reports through; the CLI renders them with rich. Default: silent."""

    def block_start(self, block: int, num_blocks: int, steps: int) -> None: ...

    def step(self, block: int, epoch: int, step: int, loss: float) -> None: ...

    def block_end(self, log: BlockLog) -> None: ...


class _StopForward(Exception):
    pass


def tensor_hash(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def capture_block_inputs(model: nn.Module, adapter: Adapter, windows: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The first block's input hidden states for every window, [n, T, H] on the CPU, and the keyword
    arguments the model passes to its blocks (position embeddings, mask; the same for every window)."""
    first = adapter.blocks(model)[0]
    hidden: list[torch.Tensor] = []
    shared: dict = {}

    def grab(_module, args, kwargs):
        hidden.append((args[0] if args else kwargs["hidden_states"]).detach().cpu())
        if not shared:
            shared.update({k: v for k, v in kwargs.items() if k not in ("hidden_states", "cache", "use_cache")})
        raise _StopForward

    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for window in windows:
                try:
                    model(window.unsqueeze(0).to(device))
                except _StopForward:
                    pass
    finally:
        handle.remove()
    return torch.cat(hidden), _to_device(shared, "cpu")


def _to_device(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple | list):
        return type(obj)(_to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


def _batches(n: int, batch_size: int) -> list[slice]:
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


@torch.no_grad()
def _run_block(block: nn.Module, inputs: torch.Tensor, kwargs: dict, batch_size: int, device) -> torch.Tensor:
    return torch.cat([block(inputs[b].to(device), **kwargs).cpu() for b in _batches(len(inputs), batch_size)])


def _attention(block: nn.Module, adapter: Adapter) -> nn.Module:
    return block.get_submodule(adapter.attention)


@torch.no_grad()
def _record_probs(block: nn.Module, adapter: Adapter, inputs: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """Head-averaged attention probabilities of `block` on `inputs`."""
    attn = _attention(block, adapter)
    attn.abq_record_probs = True
    try:
        block(inputs, **kwargs)
    finally:
        attn.abq_record_probs = False
    probs, attn.abq_probs = attn.abq_probs, None
    return probs


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


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


class BlockCalibrator:
    """Trains and folds one block. Holds the learnable LET/compensation/LWC parameters."""

    def __init__(self, qblock: nn.Module, fp_block: nn.Module, qlinears: dict[str, QuantLinear],
                 adapter: Adapter, recipe: Recipe, stats, use_shift: bool, compensate: bool):
        cal = recipe.calibration
        self.qblock, self.fp_block, self.qlinears, self.adapter = qblock, fp_block, qlinears, adapter
        self.recipe = recipe
        train = cal.method == "abq"
        self.transform = BlockTransform(
            qblock, adapter, stats if (train and cal.let.enabled) else None,
            let=train and cal.let.enabled, alpha=cal.let.alpha, shift=use_shift,
            compensation=train and compensate,
        )
        self.lwc: dict[str, tuple[nn.Parameter, nn.Parameter]] = {}
        if train and cal.lwc.enabled:
            for rel, lin in qlinears.items():
                shape = (lin.out_features, lin.quant.weight.num_groups(lin.in_features))
                init = torch.full(shape, cal.lwc.init, device=lin.weight.device)
                self.lwc[rel] = (nn.Parameter(init.clone()), nn.Parameter(init.clone()))

    def optimizer(self) -> torch.optim.Optimizer | None:
        cal = self.recipe.calibration
        groups = [
            {"params": self.transform.let_parameters(), "lr": cal.let.lr},
            {"params": [p for pair in self.lwc.values() for p in pair], "lr": cal.lwc.lr},
            {"params": self.transform.compensation_parameters(), "lr": cal.compensation.lr},
        ]
        groups = [g for g in groups if g["params"]]
        return torch.optim.AdamW(groups, weight_decay=0.0) if groups else None

    def quantized_params(self) -> dict[str, torch.Tensor]:
        """Transformed block parameters with every quantized linear's weight fake-quantized (differentiable)."""
        params = dict(self.transform.transformed_params())
        for rel, lin in self.qlinears.items():
            key = f"{rel}.weight"
            params[key] = fake_quantize_weight(params.get(key, lin.weight), lin.quant.weight, self.lwc.get(rel))
        return params

    @torch.no_grad()
    def fold(self) -> dict[str, QuantizedWeight]:
        """Write transformed, quantized-dequantized weights into the block; return the integer states."""
        params = dict(self.transform.transformed_params())
        named = dict(self.qblock.named_parameters())
        states: dict[str, QuantizedWeight] = {}
        for rel, lin in self.qlinears.items():
            key = f"{rel}.weight"
            state = quantize_weight(params.get(key, lin.weight), lin.quant.weight, self.lwc.get(rel))
            states[rel] = state
            params[key] = state.dequantize()
        for key, value in params.items():
            named[key].copy_(value.to(named[key].dtype))
        return states


def block_file_name(index: int) -> str:
    return f"block_{index:04d}.safetensors"


def _state_problem(state: object) -> str | None:
    """What is wrong with the shape of a parsed state.json, or None."""
    if not isinstance(state, dict) or not isinstance(state.get("fingerprint"), str):
        return "not a checkpoint state (no fingerprint)"
    done, log, sums = state.get("done"), state.get("log"), state.get("block_sha256")
    if not all(isinstance(v, list) for v in (done, log, sums)) or not len(done) == len(log) == len(sums):
        return "'done', 'log' and 'block_sha256' are not lists of one entry per block"
    fields = {f.name for f in dataclass_fields(BlockLog)}
    if not all(isinstance(d, dict) and set(d) == {"fp", "q"} for d in done):
        return "a 'done' entry is not {fp, q}"
    if not all(isinstance(entry, dict) and set(entry) == fields for entry in log):
        return "a 'log' entry is not a block log"
    if not all(isinstance(h, str) for h in sums):
        return "a 'block_sha256' entry is not a checksum"
    return None


def read_checkpoint(checkpoint_dir: Path) -> dict:
    """The state of a checkpoint, its shape and every block file's sha256 checked (without the model, so
    a resume is refused before any heavy work); InputError naming what is missing or corrupted."""
    path = checkpoint_dir / CHECKPOINT_STATE
    again = "run with --overwrite instead of --resume to start again"
    if not path.is_file():
        raise InputError(f"nothing to resume: no checkpoint at {path}")
    try:
        state = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"checkpoint {path} is corrupted (not JSON: {exc}); {again}") from exc
    problem = _state_problem(state)
    if problem:
        raise InputError(f"checkpoint {path} is corrupted ({problem}); {again}")
    for index, expected in enumerate(state["block_sha256"]):
        block = checkpoint_dir / block_file_name(index)
        if not block.is_file():
            raise InputError(f"checkpoint file missing: {block}; {again}")
        if sha256_file(block) != expected:
            raise InputError(f"checkpoint file {block} is truncated or corrupted (checksum mismatch); {again}")
    return state


class Calibrator:
    """Runs the loop over all blocks with checkpoints (see module docstring)."""

    def __init__(self, model: nn.Module, adapter: Adapter, recipe: Recipe, windows: torch.Tensor,
                 checkpoint_dir: Path, device: torch.device, progress: Progress | None = None):
        self.model, self.adapter, self.recipe, self.windows = model, adapter, recipe, windows
        self.checkpoint_dir = checkpoint_dir
        self.device = device
        self.progress = progress or Progress()
        self.blocks = adapter.blocks(model)
        self.kv_bits = recipe.kv_bits
        cal = recipe.calibration
        self.use_shift = cal.let.shift is True or (
            cal.let.shift == "auto" and adapter.family == "opt" and recipe.activations.bits < FP_BITS
        )

    # ---------------------------------------------------------------- fingerprint and checkpoints
    def fingerprint(self) -> str:
        """sha256 over the model weights, the recipe fields that change the result, and the data."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().float().contiguous().numpy().tobytes())
        relevant = {k: v for k, v in self.recipe.to_dict().items() if k not in ("output", "eval")}
        digest.update(json.dumps(relevant, sort_keys=True).encode())
        digest.update(self.windows.numpy().tobytes())
        return digest.hexdigest()

    def _state_path(self) -> Path:
        return self.checkpoint_dir / CHECKPOINT_STATE

    def _load_state(self, fingerprint: str) -> dict:
        path = self._state_path()
        state = read_checkpoint(self.checkpoint_dir)
        if state["fingerprint"] != fingerprint:
            raise InputError(
                "cannot resume: the checkpoint was made with a different model, recipe or calibration data "
                f"({path}); run without --resume (and --overwrite) to start again"
            )
        return state

    def _save_block(self, index: int, qblock: nn.Module, states: dict[str, QuantizedWeight],
                    state: dict) -> None:
        tensors = {f"param.{k}": v.detach().cpu().contiguous() for k, v in qblock.state_dict().items()}
        for rel, qw in states.items():
            tensors[f"codes.{rel}"] = qw.codes.cpu().contiguous()
            tensors[f"scale.{rel}"] = qw.scale.cpu().contiguous()
            tensors[f"zero.{rel}"] = qw.zero.cpu().contiguous()
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        block_file = self.checkpoint_dir / block_file_name(index)
        save_file(tensors, str(block_file))
        state["block_sha256"] = [*state["block_sha256"][:index], sha256_file(block_file)]
        tmp = self._state_path().with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(self._state_path())  # atomic: a kill leaves the previous state intact

    def _load_block(self, index: int, qblock: nn.Module, qlinears: dict[str, QuantLinear]):
        tensors = load_file(str(self.checkpoint_dir / block_file_name(index)))
        qblock.load_state_dict({k[len("param."):]: v for k, v in tensors.items() if k.startswith("param.")})
        return {rel: QuantizedWeight(tensors[f"codes.{rel}"], tensors[f"scale.{rel}"], tensors[f"zero.{rel}"],
                                     lin.quant.weight) for rel, lin in qlinears.items()}

    # ---------------------------------------------------------------- the loop
    def run(self, resume: bool = False) -> CalibrationResult:
        fingerprint = self.fingerprint()
        state = (self._load_state(fingerprint) if resume
                 else {"fingerprint": fingerprint, "done": [], "log": [], "block_sha256": []})
        if not resume and self.checkpoint_dir.exists():
            for stale in self.checkpoint_dir.glob("*"):
                stale.unlink()
        fp_in, kwargs = capture_block_inputs(self.model, self.adapter, self.windows)
        q_in = fp_in
        quantized: dict[str, QuantizedWeight] = {}
        layers: dict[str, LayerQuant] = {}
        logs = [BlockLog(**entry) for entry in state["log"]]
        for index in range(len(self.blocks)):
            block = self.blocks[index]
            prefix = self.adapter.block_prefix(index)
            block.to(self.device)
            dtype = next(block.parameters()).dtype
            block.float()
            fp_block = copy.deepcopy(block)
            _attention(fp_block, self.adapter).abq_kv_bits = FP_BITS
            qlinears = self._wrap(block, prefix)
            _attention(block, self.adapter).abq_kv_bits = self.kv_bits
            dev_kwargs = _to_device(kwargs, self.device)
            fp_out = _run_block(fp_block, fp_in, dev_kwargs, self.recipe.calibration.batch_size, self.device)
            if index < len(state["done"]):
                states = self._load_block(index, block, qlinears)
            else:
                states, log = self._calibrate_block(index, block, fp_block, qlinears, fp_in, q_in, fp_out, dev_kwargs)
                logs.append(log)
            q_out = _run_block(block, q_in, dev_kwargs, self.recipe.calibration.batch_size, self.device)
            hashes = {"fp": tensor_hash(fp_out), "q": tensor_hash(q_out)}
            if index < len(state["done"]):
                if state["done"][index] != hashes:
                    raise RunError(f"cannot resume: block {index} reproduces different outputs than the "
                                   "checkpoint recorded (different torch build or thread count?)")
            else:
                state["done"].append(hashes)
                state["log"] = [asdict(entry) for entry in logs]
                self._save_block(index, block, states, state)
                self.progress.block_end(logs[-1])
            for rel, qw in states.items():
                quantized[f"{prefix}.{rel}"] = qw
                layers[f"{prefix}.{rel}"] = qlinears[rel].quant
            block.to(dtype).to("cpu")
            del fp_block
            fp_in, q_in = fp_out, q_out
        return CalibrationResult(quantized, layers, self.kv_bits, logs, fingerprint)

    def _wrap(self, block: nn.Module, prefix: str) -> dict[str, QuantLinear]:
        wrapped = wrap_block_linears(block, self.adapter, prefix, self.recipe.layer_quant)
        for rel, lin in wrapped.items():
            group = lin.quant.weight.group_size
            if group is not None and group > lin.in_features:
                raise InputError(f"weights.group_size {group} is larger than the input size "
                                 f"({lin.in_features}) of {prefix}.{rel}")
        return wrapped

    def _calibrate_block(self, index, qblock, fp_block, qlinears, fp_in, q_in, fp_out, kwargs):
        cal = self.recipe.calibration
        start = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        for p in qblock.parameters():
            p.requires_grad_(False)
        train = cal.method == "abq"
        stats = None
        if train and cal.let.enabled:
            stats = collect_activation_stats(
                fp_block, self.adapter,
                [((fp_in[b].to(self.device),), kwargs) for b in _batches(len(fp_in), cal.batch_size)],
            )
        compensate = index < cal.compensation.first or index >= len(self.blocks) - cal.compensation.last
        calib = BlockCalibrator(qblock, fp_block, qlinears, self.adapter, self.recipe, stats, self.use_shift,
                                cal.compensation.enabled and compensate)
        optimizer = calib.optimizer() if train else None
        epoch_losses: list[list[float]] = []
        terms: dict[str, float] = {}
        batches = _batches(len(q_in), cal.batch_size)
        self.progress.block_start(index, len(self.blocks), self.recipe.epochs * len(batches) if train else 0)
        if optimizer is not None:
            fp_on_q = _run_block(fp_block, q_in, kwargs, cal.batch_size, self.device)
            teacher_probs = self._teacher_probs(fp_block, fp_in, batches, kwargs)
            for epoch in range(self.recipe.epochs):
                epoch_losses.append([])
                for step, b in enumerate(batches):
                    p_1 = teacher_probs[step] if teacher_probs else None
                    loss, terms = self._step(calib, b, q_in, fp_in, fp_out, fp_on_q, kwargs, p_1)
                    if not math.isfinite(loss.item()):
                        raise RunError(_non_finite_message(index, len(self.blocks), epoch, step,
                                                           self.checkpoint_dir))
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    epoch_losses[-1].append(loss.item())
                    self.progress.step(index, epoch, step, loss.item())
        states = calib.fold()
        first, last = (_mean(epoch_losses[0]), _mean(epoch_losses[-1])) if epoch_losses else (None, None)
        log = BlockLog(index, first, last,
                       round(time.perf_counter() - start, 3), round(_peak_memory_mb(self.device), 1), terms)
        return states, log

    def _teacher_probs(self, fp_block: nn.Module, fp_in: torch.Tensor, batches: list[slice], kwargs):
        """P_1 for every batch, kept when small (heads are averaged: nsamples * T^2 floats), else None
        and `_step` recomputes them per batch (DESIGN §4: long windows on big models)."""
        n, t = fp_in.shape[:2]
        if not self.recipe.calibration.loss.attention_kl or n * t * t * 4 > TEACHER_PROBS_CACHE_BYTES:
            return None
        return [_record_probs(fp_block, self.adapter, fp_in[b].to(self.device), kwargs) for b in batches]

    def _step(self, calib: BlockCalibrator, b: slice, q_in, fp_in, fp_out, fp_on_q, kwargs, p_1=None):
        dev = self.device
        attn_q = _attention(calib.qblock, self.adapter)
        want_kl = self.recipe.calibration.loss.attention_kl
        if want_kl and p_1 is None:
            p_1 = _record_probs(calib.fp_block, self.adapter, fp_in[b].to(dev), kwargs)
        attn_q.abq_record_probs = want_kl
        try:
            y_q = functional_call(calib.qblock, calib.quantized_params(), (q_in[b].to(dev),), kwargs)
        finally:
            attn_q.abq_record_probs = False
        p_q, attn_q.abq_probs = getattr(attn_q, "abq_probs", None), None
        return block_loss(y_q, fp_out[b].to(dev), fp_on_q[b].to(dev), p_q, p_1, self.recipe.calibration.loss)


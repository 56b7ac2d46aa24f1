"""`abq quantize` as a library call: load -> calibration windows -> calibrate -> write each format.

Output layout (predictable whatever the recipe lists):

    <output.dir>/abq-output.json      marker: written first, so that --overwrite knows the directory is abq's
    <output.dir>/recipe.yaml          resolved recipe
    <output.dir>/quant_log.json       per-block losses, seconds, peak memory; totals
    <output.dir>/checkpoint/          while running (removed when the run completes)
    <output.dir>/hf-fakequant/        when listed in output.formats
    <output.dir>/abq-packed/          when listed in output.formats

The output is resolved, checked (`abqcli.outputs`: never the model, the working directory or what is not
abq's) and locked before the model loads. A run's checkpoint lives in `<output.dir>/checkpoint/`; the
complete new tree is assembled in a temporary sibling and swapped in at the end, so that an interrupted
`--overwrite` run leaves the previous output as it was.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from abqcli.distributed import DataParallel
from abqcli.errors import InputError
from abqcli.evaluate import resolve_device
from abqcli.formats import RECIPE_YAML, ExportInput, read_json
from abqcli.outputs import (
    entries,
    is_abq_dir,
    output_lock,
    refuse_foreign,
    remove_stale,
    replacing,
    resolve_output,
    write_marker,
)
from abqcli.quant.calibrate import BlockSource, CalibrationResult, Calibrator, Progress
from abqcli.quant.checkpoint import CHECKPOINT_STATE, read_checkpoint
from abqcli.recipe import Recipe, describe, dump_recipe
from abqcli.recipe_checks import (
    bf16_passes,
    check_blockwise,
    check_finetune_processes,
    check_loss_terms,
    check_recipe_fits,
    check_rounding,
    has_native_bfloat16,
    resolve_autocast,
)
from abqcli.registry import FORMATS, METHODS

if TYPE_CHECKING:
    from abqcli.data import TextSource

QUANT_LOG = "quant_log.json"
CHECKPOINT_DIR = "checkpoint"
MARKER_KIND = "abq quantize output"
# what an output of an abq from before the marker holds: only these names
PRE_MARKER_NAMES = frozenset({RECIPE_YAML, QUANT_LOG, CHECKPOINT_DIR, *FORMATS.names()})
START, RESUME, RESTART, COMPLETE = "start", "resume", "restart", "complete"


@dataclass(frozen=True)
class OutputPlan:
    """What a run does with its output: START (new, empty or --overwrite), RESUME (a checkpoint),
    RESTART (--resume with no checkpoint yet: from the beginning), COMPLETE (--resume of this very
    recipe's finished output: nothing to do). `checkpointed`: blocks the checkpoint already holds;
    `checkpoint_processes`: how many processes wrote it."""

    action: str
    checkpointed: int = 0
    checkpoint_processes: int = 1


class StreamedBlocks(BlockSource):
    """`model.loading: blockwise`: each block read from the checkpoint when the loop reaches it
    (`abqcli.models.blockwise`), written into its abq-packed shard once quantized (`PackedShards`, rank 0
    only: `shards` None on the others), then dropped; no integer state is kept."""

    keeps_states = False

    def __init__(self, weights, shards):
        self.weights, self.shards = weights, shards

    def state_items(self, model):
        return self.weights.state_items()

    def capture(self, adapter, model, windows, cache):
        with self.weights.outside_blocks():  # the embeddings, for the time of embedding the windows
            return super().capture(adapter, model, windows, cache)

    def load(self, index, block) -> None:
        self.weights.materialize(index, block)

    def finish(self, index, block, states, layers) -> None:
        if self.shards is not None:
            self.shards.write_block(index, block, layers, states)
        self.weights.release(block)

    def export_shards(self):
        self.weights.load_outside_blocks()  # for the export's last shard
        return self.shards


class QuantizeInterrupted(KeyboardInterrupt):
    """Ctrl-C during `run_quantize`; `advice` says whether a rerun with --resume continues the run."""

    def __init__(self, checkpoint: Path, blocks: int):
        super().__init__(str(checkpoint), blocks)
        self.advice = (f"interrupted: {blocks} completed block(s) are checkpointed in {checkpoint}; "
                       "rerun with --resume" if blocks else
                       "interrupted before any block was checkpointed: nothing to resume yet")


class _CountingProgress(Progress):
    """Forwards the loop's callbacks; counts the checkpointed blocks (`block_end` follows each save)."""

    def __init__(self, inner: Progress, blocks: int = 0):
        self.inner, self.blocks = inner, blocks

    def block_start(self, block: int, num_blocks: int, steps: int) -> None:
        self.inner.block_start(block, num_blocks, steps)

    def step(self, block: int, epoch: int, step: int, loss: float) -> None:
        self.inner.step(block, epoch, step, loss)

    def block_end(self, log) -> None:
        self.blocks += 1
        self.inner.block_end(log)

    def finetune_start(self, steps: int) -> None:
        self.inner.finetune_start(steps)

    def finetune_step(self, step: int, loss: float) -> None:
        self.inner.finetune_step(step, loss)

    def finetune_end(self, log) -> None:
        self.inner.finetune_end(log)


def is_quantize_output(directory: Path) -> bool:
    """Written by abq: its marker or an export manifest, or an output of an abq from before the marker
    (nothing but abq's own names, with a quant_log.json or a checkpoint state among them)."""
    if is_abq_dir(directory):
        return True
    return set(entries(directory)) <= PRE_MARKER_NAMES and (
        (directory / QUANT_LOG).is_file() or (directory / CHECKPOINT_DIR / CHECKPOINT_STATE).is_file())


def check_output_dir(out_dir: Path, recipe: Recipe, overwrite: bool, resume: bool) -> OutputPlan:
    """What this run does with its (resolved) output; refuses what it must not touch. Only reads: the
    previous output is replaced once the new one is complete (`replacing`)."""
    shown = recipe.output.dir
    occupied = bool(entries(out_dir))
    if occupied and (overwrite or resume) and not is_quantize_output(out_dir):
        refuse_foreign(out_dir, Path(shown))
    if resume:
        return _resume_plan(out_dir, recipe)
    if occupied and not overwrite:
        raise InputError(f"output directory exists: {shown} (pass --overwrite to replace it, "
                         "or --resume to continue an interrupted run)")
    return OutputPlan(START)


def _resume_plan(out_dir: Path, recipe: Recipe) -> OutputPlan:
    """--resume: the checkpoint (verified now, before the model loads), else from the beginning, or
    nothing to do when the output is already this recipe's complete result."""
    shown = recipe.output.dir
    if (out_dir / CHECKPOINT_DIR / CHECKPOINT_STATE).is_file():
        state = read_checkpoint(out_dir / CHECKPOINT_DIR)
        return OutputPlan(RESUME, len(state["done"]), int(state.get("world_size", 1)))
    if not (out_dir / QUANT_LOG).is_file():
        return OutputPlan(RESTART)
    saved = out_dir / RECIPE_YAML
    if not saved.is_file() or _result_recipe(saved.read_text()) != _result_recipe(dump_recipe(recipe)):
        raise InputError(f"nothing to resume: {shown} is complete and holds the result of a different recipe "
                         "(pass --overwrite to replace it)")
    missing = [fmt for fmt in recipe.output.formats if not is_abq_dir(out_dir / fmt)]
    if missing:
        raise InputError(f"nothing to resume: {shown} is complete but lacks {', '.join(missing)} "
                         "(pass --overwrite to run again)")
    return OutputPlan(COMPLETE)


def _result_recipe(text: str) -> object:
    """A recipe.yaml as data, less output.dir: where a result lies is not part of it."""
    import yaml

    data = yaml.safe_load(text)
    if isinstance(data, dict) and isinstance(data.get("output"), dict):
        data["output"].pop("dir", None)
    return data


def model_inputs(name: str) -> list[tuple[str, Path]]:
    """The model's folder (or GGUF file, and the cached copy of one): an output never overlaps them."""
    from abqcli.models.loading import resolve_model

    source = resolve_model(name)
    paths = [Path(source.directory) / source.gguf_file if source.gguf_file else Path(source.directory)]
    if source.origin:
        paths.append(Path(source.origin))
    return [("the model", path) for path in paths if path.exists()]


@dataclass
class CalibrationData:
    """The token windows of a run: the block loop's, the finetune stage's (None without the stage; the
    same tensor with `finetune.data: calibration`, else `finetune.steps` x `calibration.batch_size` windows
    that share no token with the block loop's), and the text they come from."""

    windows: torch.Tensor
    finetune_windows: torch.Tensor | None
    text: TextSource


def calibration_windows(recipe: Recipe, tokenizer, data_dir: str | None) -> CalibrationData:
    from abqcli import data

    cal, spec = recipe.calibration, recipe.finetune
    text = data.load_text(cal.dataset, "calib", data_dir)
    ids, _ = data.tokenize(tokenizer, text.text)
    windows = data.calibration_windows(ids, cal.nsamples, cal.seqlen, cal.seed)
    finetune_windows = None
    if spec.enabled:
        finetune_windows = windows if spec.data == "calibration" else data.heldout_windows(
            ids, spec.steps * cal.batch_size, cal.nsamples, cal.seqlen, cal.seed)
    return CalibrationData(windows, finetune_windows, text)


def model_sha256(source) -> str:
    """sha256 over the files a model was loaded from (the GGUF file, or the config and weight files of
    its directory, in name order): identifies the model without naming a path of this machine."""
    from abqcli.checksums import sha256_file

    if source.origin or source.gguf_file:
        files = [Path(source.origin or Path(source.directory) / source.gguf_file)]
    else:
        from abqcli.models.loading import local_directory

        files = sorted(p for p in local_directory(source).iterdir() if p.name == "config.json"
                       or p.suffix in (".safetensors", ".bin"))
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        digest.update(sha256_file(file).encode())
    return digest.hexdigest()


def build_provenance(recipe: Recipe, source, text, fingerprint: str) -> dict:
    """What produced an export, recorded in its abq.json: names as the recipe gives them and content
    hashes, never an absolute path of this machine (so identical runs give identical files anywhere)."""
    cal = recipe.calibration
    return {
        "model": recipe.model.path,
        "model_sha256": model_sha256(source),
        "dataset": cal.dataset,
        "dataset_file": text.file,
        "dataset_sha256": text.sha256,
        "nsamples": cal.nsamples,
        "seqlen": cal.seqlen,
        "seed": cal.seed,
        "method": cal.method,
        "rounding": METHODS.load(cal.method).rounding_of(recipe),
        "scheme": describe(recipe),
        "fingerprint": fingerprint,
    }


def run_quantize(recipe: Recipe, data_dir: str | None = None, overwrite: bool = False, resume: bool = False,
                 progress: Progress | None = None, notify: Callable[[str], None] | None = None,
                 ranks: DataParallel | None = None, max_memory: int | None = None) -> dict:
    """Calibrate per the recipe and write every requested format; returns the summary (also in quant_log).

    Before the model loads, the output is resolved and checked, its parent created and its lock taken (one
    run per output), and leftovers of killed runs removed. `notify` gets one-line notices: a --resume
    that starts from the beginning, or finds the output already complete (then nothing is touched and
    its quant_log is the summary), or resumes a checkpoint written by another number of processes.
    Ctrl-C is re-raised as QuantizeInterrupted. `ranks`: this process's place in a data-parallel run
    (`abqcli.distributed`): rank 0 owns the output and tells the others the plan; the others calibrate
    their share of the windows and return a short summary. `max_memory`: the bytes the activation caches
    may take in RAM before `calibration.cache: auto` maps them to disk (`abqcli.quant.cache`)."""
    ranks = ranks or DataParallel.single()
    out_dir = resolve_output(Path(recipe.output.dir), model_inputs(recipe.model.path))
    check_loss_terms(recipe)
    check_rounding(recipe)
    check_blockwise(recipe)
    check_finetune_processes(recipe, ranks.world)
    device = resolve_device(recipe.calibration.device, "calibration.device")  # refused before the output is
    recipe = resolve_autocast(recipe, device)  # touched; the run records the resolved autocast
    notify = notify or (lambda line: None)
    if recipe.calibration.autocast == "bfloat16" and not has_native_bfloat16(device):
        notify(f"calibration.autocast bfloat16: {device} has no native bf16 products (emulated: slower than "
               "float32 here); calibration.autocast: auto runs float32 on this machine")
    counting = _CountingProgress(progress or Progress())
    try:
        with output_lock(out_dir) if ranks.rank == 0 else nullcontext():
            plan = _shared_plan(ranks, lambda: _output_plan(out_dir, recipe, overwrite, resume))
            counting.blocks = plan.checkpointed
            if plan.action == COMPLETE:
                notify(f"{recipe.output.dir} is already complete for this recipe: nothing to do")
                return read_json(out_dir / QUANT_LOG) if ranks.rank == 0 else {}
            if plan.action == RESTART:
                notify(f"nothing to resume in {recipe.output.dir} (no checkpoint yet): starting from the beginning")
            if plan.action == RESUME and plan.checkpoint_processes != ranks.world:
                notify(f"the checkpoint was written by {plan.checkpoint_processes} process(es), this run has "
                       f"{ranks.world}: its {plan.checkpointed} block(s) are re-run from their saved state and "
                       "their outputs recorded anew (equal up to float rounding, so not compared byte for byte)")
            return _calibrate_and_export(recipe, out_dir, data_dir, plan.action == RESUME, counting, ranks,
                                         max_memory)
    except KeyboardInterrupt as exc:
        raise QuantizeInterrupted(Path(recipe.output.dir) / CHECKPOINT_DIR, counting.blocks) from exc


def _output_plan(out_dir: Path, recipe: Recipe, overwrite: bool, resume: bool) -> OutputPlan:
    remove_stale(out_dir)
    return check_output_dir(out_dir, recipe, overwrite, resume)


def _shared_plan(ranks: DataParallel, make: Callable[[], OutputPlan]) -> OutputPlan:
    """Rank 0 makes the plan (or meets an InputError) and every other rank gets the same outcome."""
    if not ranks.active:
        return make()
    if ranks.rank == 0:
        try:
            plan = make()
        except InputError as exc:
            ranks.broadcast(str(exc))
            raise
        return ranks.broadcast(plan)
    outcome = ranks.broadcast(None)
    if isinstance(outcome, str):
        raise InputError(outcome)
    return outcome


def _open_output(out_dir: Path, recipe_yaml: str) -> None:
    """A new (or empty) output gets abq's marker first, then the recipe being run. A previous output is
    left as it is (the run's checkpoint goes into its checkpoint/) until the new one replaces it."""
    if entries(out_dir):
        return
    out_dir.mkdir(exist_ok=True)
    write_marker(out_dir, MARKER_KIND)
    (out_dir / RECIPE_YAML).write_text(recipe_yaml)


def _calibrate_and_export(recipe: Recipe, out_dir: Path, data_dir: str | None, resume: bool,
                          progress: Progress, ranks: DataParallel, max_memory: int | None) -> dict:
    """The run itself, in its checked and locked output `out_dir`: load, calibrate (checkpoint in
    out_dir/checkpoint), then assemble the whole new output in a temporary sibling and swap it in
    (rank 0; another rank returns once its share is calibrated)."""
    from abqcli.models.adapters import adapter_for
    from abqcli.quant.fakequant import set_kv_quant
    from abqcli.quant.rotations import rotate_model

    cal = recipe.calibration
    device = torch.device(ranks.device(resolve_device(cal.device, "calibration.device")))
    model, tokenizer, source, blocks = _load(recipe, out_dir, ranks)
    adapter = adapter_for(model)
    check_recipe_fits(recipe, model, adapter)
    calibration_data = calibration_windows(recipe, tokenizer, data_dir)
    windows, text = calibration_data.windows, calibration_data.text
    recipe_yaml = dump_recipe(recipe)
    if ranks.rank == 0:
        _open_output(out_dir, recipe_yaml)
    start = time.perf_counter()
    teacher = copy.deepcopy(model) if recipe.finetune.enabled else None  # the FP model, for the finetune stage
    rotation = rotate_model(model, adapter, cal.rotation, cal.seed, lambda name: recipe.layer_quant(name) is not None,
                            recipe.kv_bits)
    set_kv_quant(model, adapter, 16, rotation.kv_transform)  # blocks run through abq's attention; FP until calibrated
    cache = _activation_cache(recipe, model, len(windows) // ranks.world, max_memory, out_dir / CHECKPOINT_DIR)
    calibrator = Calibrator(model, adapter, recipe, windows, out_dir / CHECKPOINT_DIR, device, progress,
                            rotation.layer_quant(recipe.layer_quant), ranks, blocks, cache)
    result: CalibrationResult = calibrator.run(resume=resume)
    processes = {"world_size": ranks.world, "backend": ranks.backend or None,
                 "windows_per_process": len(calibrator.local)}
    if ranks.rank != 0:
        return {"rank": ranks.rank, **processes, "seconds": round(time.perf_counter() - start, 2)}
    set_kv_quant(model, adapter, result.kv_bits, rotation.kv_transform, recipe.kv_clip)
    finetuned = (_finetune(recipe, model, teacher, result, calibration_data.finetune_windows, device, progress)
                 if teacher else None)
    del teacher
    provenance = build_provenance(recipe, source, text, result.fingerprint)
    provenance["rotation"] = rotation.provenance()
    with replacing(out_dir) as stage:  # the previous output (and the checkpoint) go once this is complete
        write_marker(stage, MARKER_KIND)
        (stage / RECIPE_YAML).write_text(recipe_yaml)
        export = ExportInput(model, tokenizer, recipe_yaml, result.kv_bits, result.layers, result.quantized,
                             provenance, rotation.kv_transform, blocks.export_shards(), recipe.kv_clip)
        outputs = _write_formats(stage, recipe, export)
        summary = {
            "scheme": describe(recipe),
            "method": cal.method,
            "rounding": provenance["rounding"],
            "rotation": provenance["rotation"]["kind"],
            "quantized_linears": len(result.layers),
            **expert_summary(result, adapter),
            "processes": processes,
            "loading": recipe.model.loading,
            "activation_cache": {"place": cache.place, "dtype": str(cache.dtype).removeprefix("torch.")},
            "outputs": outputs,
            "seconds": round(time.perf_counter() - start, 2),
            "peak_memory_mb": max((b.peak_memory_mb for b in result.log), default=0.0),
            "blocks": [asdict(b) for b in result.log],
            "finetune": asdict(finetuned) if finetuned else None,
            "provenance": provenance,
        }
        (stage / QUANT_LOG).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _finetune(recipe: Recipe, model, teacher, result: CalibrationResult, windows: torch.Tensor,
              device: torch.device, progress: Progress):
    """The finetune stage (`abqcli.quant.finetune`) on the calibrated model: `result.quantized` gets the
    trained scales, the model's quantized linears their weights."""
    from abqcli.quant.fakequant import QuantLinear
    from abqcli.quant.finetune import finetune_scales

    spec, cal = recipe.finetune, recipe.calibration
    qlinears = {name: module for name, module in model.named_modules()
                if isinstance(module, QuantLinear) and name in result.quantized}
    progress.finetune_start(spec.steps)
    log = finetune_scales(model, teacher, qlinears, result.quantized, windows, spec, cal.batch_size, cal.seed,
                          cal.autocast == "bfloat16", device, progress.finetune_step,
                          teacher_autocast=bf16_passes(recipe, str(device)))
    progress.finetune_end(log)
    return log


def _load(recipe: Recipe, out_dir: Path, ranks: DataParallel):
    """(model, tokenizer, source, block source): the whole model (and the default `BlockSource`), or with
    `model.loading: blockwise` its skeleton and the `StreamedBlocks` that load and write each block."""
    from abqcli.evaluate import check_seqlen
    from abqcli.formats.abq_packed import PackedShards
    from abqcli.models.loading import load_model, load_model_blockwise

    check = lambda cfg: check_seqlen(recipe.calibration.seqlen, cfg)
    if recipe.model.loading != "blockwise":
        return (*load_model(recipe.model.path, recipe.model.dtype, "cpu", check), BlockSource())
    model, tokenizer, source, weights = load_model_blockwise(recipe.model.path, recipe.model.dtype, check)
    shards = PackedShards(out_dir / CHECKPOINT_DIR, weights.block_prefixes) if ranks.rank == 0 else None
    return model, tokenizer, source, StreamedBlocks(weights, shards)


def _activation_cache(recipe: Recipe, model, windows: int, max_memory: int | None, directory: Path):
    """The run's activation cache (`calibration.cache`, `calibration.cache_dtype`)."""
    from abqcli.models.loading import torch_dtype
    from abqcli.quant.cache import cache_bytes, choose_cache

    cal = recipe.calibration
    dtype = torch.float32 if cal.cache_dtype == "float32" else torch_dtype(recipe.model.dtype)
    hidden = model.get_input_embeddings().embedding_dim
    return choose_cache(cal.cache, dtype, cache_bytes(windows, cal.seqlen, hidden, dtype), max_memory, directory)


def expert_summary(result: CalibrationResult, adapter) -> dict:
    """For a MoE model: how many quantized linears are experts', and the experts (full names) the FP
    model routed no calibration token to, which were rounded to nearest (RTN). Empty for a dense model."""
    from abqcli.models.experts import expert_index

    experts = sum(expert_index(name) is not None for name in result.layers)
    if not experts:
        return {}
    unrouted = [f"{adapter.block_prefix(log.block)}.{module}.{e}" for log in result.log
                for module, tokens in log.expert_tokens.items() for e, n in enumerate(tokens) if n == 0]
    return {"expert_linears": experts, "experts_without_tokens_rtn": unrouted}


def _write_formats(stage: Path, recipe: Recipe, export: ExportInput) -> dict[str, str]:
    """Each requested format into `stage`, in the recipe's order; returns format -> its path in the final
    output."""
    outputs = {}
    for fmt in recipe.output.formats:
        outputs[fmt] = str(Path(recipe.output.dir) / fmt)
        FORMATS.load(fmt).write(stage / fmt, export)
    return outputs

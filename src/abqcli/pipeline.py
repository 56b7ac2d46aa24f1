"""`abq quantize` as a library call: load -> calibration windows -> calibrate -> write each format.

Output layout (predictable whatever the recipe lists):

    <output.dir>/recipe.yaml          resolved recipe
    <output.dir>/quant_log.json       per-block losses, seconds, peak memory; totals
    <output.dir>/checkpoint/          while running (removed when the run completes)
    <output.dir>/hf-fakequant/        when listed in output.formats
    <output.dir>/abq-packed/          when listed in output.formats
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

from abqcli.errors import InputError
from abqcli.quant.calibrate import CalibrationResult, Calibrator, Progress
from abqcli.recipe import Recipe, describe, dump_recipe

QUANT_LOG = "quant_log.json"
CHECKPOINT_DIR = "checkpoint"


def check_output_dir(out_dir: Path, overwrite: bool, resume: bool) -> None:
    """Refuse to clobber an existing output unless asked; resuming needs the checkpoint.
    Only checks: `clear_output_dir` removes the old output once every other input check has passed."""
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"output path exists and is not a directory: {out_dir}")
    if resume:
        if not (out_dir / CHECKPOINT_DIR).is_dir():
            raise InputError(f"nothing to resume in {out_dir} (no {CHECKPOINT_DIR}/ there)")
        return
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise InputError(f"output directory exists: {out_dir} (pass --overwrite to replace it, "
                         "or --resume to continue an interrupted run)")


def clear_output_dir(out_dir: Path, resume: bool) -> None:
    """With --overwrite (checked by `check_output_dir`): remove the previous output; never when resuming."""
    if not resume and out_dir.is_dir() and any(out_dir.iterdir()):
        shutil.rmtree(out_dir)


def check_loss_terms(recipe: Recipe) -> None:
    """ABQ training needs at least one loss term."""
    cal = recipe.calibration
    if cal.method == "abq" and not (cal.loss.mse or cal.loss.cosine or cal.loss.attention_kl):
        raise InputError("calibration.loss: every term is off (mse, cosine, attention_kl); enable at least one, "
                         "or use calibration.method: rtn")


def check_group_sizes(recipe: Recipe, model, adapter) -> None:
    """A weight group larger than a quantized linear's input size is a recipe error (before any output)."""
    for index, block in enumerate(adapter.blocks(model)):
        prefix = adapter.block_prefix(index)
        for rel in adapter.linear_names(block):
            quant = recipe.layer_quant(f"{prefix}.{rel}")
            group = None if quant is None else quant.weight.group_size
            in_features = block.get_submodule(rel).in_features
            if group is not None and group > in_features:
                raise InputError(f"weights.group_size {group} is larger than the input size ({in_features}) "
                                 f"of {prefix}.{rel}")


def check_overrides_match(recipe: Recipe, linear_names: list[str]) -> None:
    """An override pattern that matches no linear of this architecture is a recipe error."""
    from fnmatch import fnmatch

    for pattern in recipe.overrides:
        if not any(fnmatch(name, pattern) for name in linear_names):
            raise InputError(f"overrides.{pattern!r}: matches no linear layer of this model "
                             f"(layers look like {linear_names[0]!r})")


def check_adapter_maps(model, adapter) -> list[str]:
    """Every module the adapter relies on exists in every block; returns all block linear names."""
    names = []
    for index, block in enumerate(adapter.blocks(model)):
        modules = dict(block.named_modules())
        needed = {adapter.attention, adapter.compensation_target}
        for pair in adapter.let_pairs(block):
            needed |= {pair.producer, *pair.consumers}
        missing = sorted(n for n in needed if n not in modules)
        if missing:
            raise InputError(f"the {adapter.family} adapter cannot map block {index} of this model: "
                             f"missing {', '.join(missing)}")
        names += [f"{adapter.block_prefix(index)}.{rel}" for rel in adapter.linear_names(block)]
    return names


def calibration_windows(recipe: Recipe, tokenizer, data_dir: str | None):
    from abqcli import data

    cal = recipe.calibration
    text = data.load_text(cal.dataset, "calib", data_dir)
    ids, _ = data.tokenize(tokenizer, text.text)
    return data.calibration_windows(ids, cal.nsamples, cal.seqlen, cal.seed), text


def model_sha256(source) -> str:
    """sha256 over the files a model was loaded from (the GGUF file, or the config and weight files of
    its directory, in name order): identifies the model without naming a path of this machine."""
    from abqcli.export import sha256_file

    if source.origin or source.gguf_file:
        files = [Path(source.origin or Path(source.directory) / source.gguf_file)]
    else:
        directory = Path(source.directory)
        if not directory.is_dir():  # a hub id: its snapshot folder in the local cache
            from huggingface_hub import try_to_load_from_cache

            directory = Path(try_to_load_from_cache(source.directory, "config.json")).parent
        files = sorted(p for p in directory.iterdir() if p.name == "config.json"
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
        "scheme": describe(recipe),
        "fingerprint": fingerprint,
    }


def run_quantize(recipe: Recipe, data_dir: str | None = None, overwrite: bool = False, resume: bool = False,
                 progress: Progress | None = None) -> dict:
    """Calibrate per the recipe and write every requested format; returns the summary (also in quant_log)."""
    from abqcli.evaluate import check_seqlen, resolve_device
    from abqcli.export import write_fakequant
    from abqcli.models.adapters import adapter_for
    from abqcli.models.loading import load_model
    from abqcli.quant.fakequant import set_kv_quant

    out_dir = Path(recipe.output.dir)
    check_output_dir(out_dir, overwrite, resume)
    check_loss_terms(recipe)
    cal = recipe.calibration
    device = torch.device(resolve_device(cal.device))
    model, tokenizer, source = load_model(recipe.model.path, recipe.model.dtype, "cpu",
                                          lambda cfg: check_seqlen(cal.seqlen, cfg))
    adapter = adapter_for(model)
    check_overrides_match(recipe, check_adapter_maps(model, adapter))
    check_group_sizes(recipe, model, adapter)
    windows, text = calibration_windows(recipe, tokenizer, data_dir)
    set_kv_quant(model, adapter, 16)  # blocks run through abq's attention; FP until calibrated
    clear_output_dir(out_dir, resume)
    out_dir.mkdir(parents=True, exist_ok=True)
    recipe_yaml = dump_recipe(recipe)
    if not resume:  # a resume writes it once the checkpoint's fingerprint has matched
        (out_dir / "recipe.yaml").write_text(recipe_yaml)
    start = time.perf_counter()
    calibrator = Calibrator(model, adapter, recipe, windows, out_dir / CHECKPOINT_DIR, device, progress)
    result: CalibrationResult = calibrator.run(resume=resume)
    (out_dir / "recipe.yaml").write_text(recipe_yaml)
    set_kv_quant(model, adapter, result.kv_bits)
    provenance = build_provenance(recipe, source, text, result.fingerprint)
    outputs = {}
    if "hf-fakequant" in recipe.output.formats:
        outputs["hf-fakequant"] = str(out_dir / "hf-fakequant")
        write_fakequant(out_dir / "hf-fakequant", model, tokenizer, recipe_yaml, result.kv_bits,
                        result.layers, result.quantized, provenance)
    if "abq-packed" in recipe.output.formats:
        from abqcli.export import write_packed

        outputs["abq-packed"] = str(out_dir / "abq-packed")
        write_packed(out_dir / "abq-packed", model, tokenizer, recipe_yaml, result.kv_bits,
                     result.layers, result.quantized, provenance)
    summary = {
        "scheme": describe(recipe),
        "method": cal.method,
        "outputs": outputs,
        "seconds": round(time.perf_counter() - start, 2),
        "peak_memory_mb": max((b.peak_memory_mb for b in result.log), default=0.0),
        "blocks": [asdict(b) for b in result.log],
        "provenance": provenance,
    }
    (out_dir / QUANT_LOG).write_text(json.dumps(summary, indent=2) + "\n")
    shutil.rmtree(out_dir / CHECKPOINT_DIR, ignore_errors=True)
    return summary

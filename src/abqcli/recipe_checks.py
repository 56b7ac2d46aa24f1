"""Checks of a valid recipe against the model it is applied to, shared by `abq quantize` and `abq eval`.

`recipe_from_dict` checks what a recipe says on its own; these check what it means for one model (its
architecture, its layer sizes), once the model's structure is known and before any calibration or
rounding runs. Each raises one InputError (exit 2).
"""

from __future__ import annotations

import dataclasses
from fnmatch import fnmatch

import torch

from abqcli.errors import InputError
from abqcli.quant.quantizer import LayerQuant
from abqcli.recipe import Recipe, show_value
from abqcli.registry import FORMATS, METHODS


def check_loss_terms(recipe: Recipe) -> None:
    """A method that trains on the loss (`needs_loss`: abq) needs at least one loss term."""
    cal = recipe.calibration
    if METHODS.load(cal.method).needs_loss and not (cal.loss.mse or cal.loss.cosine or cal.loss.attention_kl):
        raise InputError("calibration.loss: every term is off (mse, cosine, attention_kl); enable at least one, "
                         "or use calibration.method: rtn")


def has_native_bfloat16(device: str) -> bool:
    """Whether `device` (a resolved torch device) multiplies bf16 matrices natively, i.e. faster than
    float32: a CUDA GPU with bf16 support, or a CPU with AMX or AVX512-BF16 (without them torch emulates
    bf16 on the CPU: on an AVX2 EPYC its products were 7x and a calibration block 10x slower than float32;
    README, Calibration step)."""
    if device.startswith("cuda"):
        return torch.cuda.is_bf16_supported()
    cpu = torch.cpu
    return any(getattr(cpu, probe, lambda: False)() for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


def resolve_autocast(recipe: Recipe, device: str) -> Recipe:
    """The recipe with `calibration.autocast: auto` made concrete for `device` (resolved): bfloat16 for a
    method that trains on a device with native bf16 products (`has_native_bfloat16`), else none. The
    resolved value is what the run's fingerprint, its recipe.yaml and its quant_log record, so a resume
    on a machine that resolves it otherwise is refused as a changed recipe. An explicit bfloat16 changes
    the dtype of the training passes only: a method that does not train (`needs_loss` false: gptq,
    rtn) would ignore it, so that recipe is refused instead."""
    cal = recipe.calibration
    trains = METHODS.load(cal.method).needs_loss
    if cal.autocast == "bfloat16" and not trains:
        trainers = [name for name in METHODS.names() if METHODS.load(name).needs_loss]
        raise InputError(f"calibration.autocast {cal.autocast}: method {cal.method} does not train; set "
                         f"calibration.autocast: none or auto, or calibration.method: {' or '.join(trainers)}")
    if cal.autocast != "auto":
        return recipe
    autocast = "bfloat16" if trains and has_native_bfloat16(device) else "none"
    return dataclasses.replace(recipe, calibration=dataclasses.replace(cal, autocast=autocast))


def bf16_passes(recipe: Recipe, device: str) -> bool:
    """Whether the chains' forward passes and the finetune stage's teacher run under bf16 autocast:
    `calibration.autocast_passes` with an `autocast` that is, or resolves to on `device`, bfloat16."""
    cal = resolve_autocast(recipe, device).calibration
    return cal.autocast_passes and cal.autocast == "bfloat16"


def check_rounding(recipe: Recipe) -> None:
    """`calibration.rounding` must be one the method runs (learned rounding needs a method that trains)."""
    cal = recipe.calibration
    method = METHODS.load(cal.method)
    rounding = method.rounding_of(recipe)
    if rounding not in method.roundings:
        choices = ", ".join(method.roundings)
        trains = [name for name in METHODS.names() if rounding in METHODS.load(name).roundings]
        raise InputError(f"calibration.rounding: method {cal.method} rounds with {choices}, not {rounding}; "
                         f"use calibration.method: {' or '.join(trains)} for {rounding} rounding")


def check_blockwise(recipe: Recipe) -> None:
    """`model.loading: blockwise` streams the model's blocks in and the abq-packed export out, block by
    block: what needs the whole model at once is refused (a rotation, the other formats)."""
    if recipe.model.loading != "blockwise":
        return
    if recipe.calibration.rotation != "none":
        raise InputError(f"calibration.rotation {recipe.calibration.rotation} rotates the whole model at once: "
                         "not with model.loading: blockwise (use model.loading: full)")
    if recipe.finetune.enabled:
        raise InputError("finetune trains through the whole model at once: not with model.loading: blockwise "
                         "(use model.loading: full, or finetune.enabled: false)")
    others = [fmt for fmt in recipe.output.formats if fmt != "abq-packed"]
    if others:
        raise InputError(f"model.loading: blockwise writes abq-packed only, block by block; output.formats "
                         f"also lists {', '.join(others)} (use model.loading: full for them)")


def quantized_linears(recipe: Recipe, model, adapter) -> dict[str, tuple[LayerQuant, int]]:
    """Every block linear the recipe quantizes: full name -> (its quantization, its input size)."""
    linears = {}
    for index, block in enumerate(adapter.blocks(model)):
        prefix = adapter.block_prefix(index)
        for rel in adapter.linear_names(block):
            quant = recipe.layer_quant(f"{prefix}.{rel}")
            if quant is not None:
                linears[f"{prefix}.{rel}"] = (quant, block.get_submodule(rel).in_features)
    return linears


def check_group_sizes(recipe: Recipe, model, adapter) -> None:
    """A weight group larger than a quantized linear's input size is a recipe error (before any output)."""
    for name, (quant, in_features) in quantized_linears(recipe, model, adapter).items():
        group = quant.weight.group_size
        if group is not None and group > in_features:
            raise InputError(f"weights.group_size {group} is larger than the input size ({in_features}) of {name}")


def check_overrides_match(recipe: Recipe, linear_names: list[str]) -> None:
    """An override pattern that matches no linear of this architecture is a recipe error."""
    for pattern in recipe.overrides:
        if not any(fnmatch(name, pattern) for name in linear_names):
            raise InputError(f"overrides.{show_value(pattern)}: matches no linear layer of this model "
                             f"(layers look like {linear_names[0]!r})")


def check_something_quantized(recipe: Recipe, linear_names: list[str]) -> None:
    """A recipe whose `ignore` patterns leave every block linear in full precision quantizes nothing."""
    if not any(recipe.layer_quant(name) is not None for name in linear_names):
        patterns = ", ".join(show_value(p) for p in recipe.ignore[:4])
        raise InputError(f"ignore: {patterns} leaves none of the {len(linear_names)} linear layers of this "
                         f"model quantized (layers look like {linear_names[0]!r}); narrow the patterns")


def check_adapter_maps(model, adapter) -> list[str]:
    """Every module the adapter relies on exists in every block; returns all block linear names."""
    names = []
    for index, block in enumerate(adapter.blocks(model)):
        modules = dict(block.named_modules())
        needed = {adapter.attention, adapter.compensation_target}
        for pair in adapter.let_pairs(block):
            needed |= {pair.producer, *pair.consumers, *pair.float_readers}
        missing = sorted(n for n in needed if n not in modules)
        if missing:
            raise InputError(f"the {adapter.family} adapter cannot map block {index} of this model: "
                             f"missing {', '.join(missing)}")
        names += [f"{adapter.block_prefix(index)}.{rel}" for rel in adapter.linear_names(block)]
    return names


def check_recipe_fits(recipe: Recipe, model, adapter) -> None:
    """Everything a recipe must satisfy for this model: the adapter maps every block, each override
    matches a linear, at least one linear is quantized, no weight group exceeds its layer's input, and the
    rotation (if any) is exact for it."""
    names = check_adapter_maps(model, adapter)
    check_overrides_match(recipe, names)
    check_something_quantized(recipe, names)
    check_group_sizes(recipe, model, adapter)
    check_rotation(recipe, model, adapter)
    check_formats_hold(recipe, model, adapter)


def check_rotation(recipe: Recipe, model, adapter) -> None:
    """`calibration.rotation` must rotate this model exactly (architecture, Hadamard orders)."""
    from abqcli.quant.rotations import rotation_problem

    problem = rotation_problem(model, adapter, recipe.calibration.rotation,
                               lambda name: recipe.layer_quant(name) is not None)
    if problem:
        raise InputError(problem)


def check_formats_hold(recipe: Recipe, model, adapter) -> None:
    """Each listed output format must hold this model as the recipe quantizes it (`recipe_problem`:
    e.g. compressed-tensors needs group sizes that divide every layer's input size), before calibrating."""
    linears = quantized_linears(recipe, model, adapter)
    layers = {name: quant for name, (quant, _) in linears.items()}
    in_features = {name: k for name, (_, k) in linears.items()}
    for fmt in recipe.output.formats:
        problem = FORMATS.load(fmt).recipe_problem(recipe.calibration.rotation, recipe.kv_bits, in_features, layers)
        if problem:
            raise InputError(f"output.formats {fmt}: {problem}")


def check_finetune_processes(recipe: Recipe, processes: int) -> None:
    """The finetune stage runs in one process: refused under torchrun with several."""
    if recipe.finetune.enabled and processes > 1:
        raise InputError(f"finetune runs in one process, this run has {processes} (torchrun): run it without "
                         "torchrun, or with finetune.enabled: false")

"""Format `hf-fakequant` (docs/HF_FAKEQUANT.md): a plain transformers checkpoint whose quantized linears
(and MoE experts, written in transformers' own layout) hold the dequantized (folded) weights, plus `quant_state.safetensors` with the integer state per linear
(`<name>.codes` uint8 [N, K], `<name>.scales` / `<name>.zeros` float32 [N, G]).

Opened by abq, each quantized linear computes in the integer domain from that state (as the packed
runtime does) and activation and kv quantization are re-applied from abq.json; `abq pack` reads it
(`export_input`) to write the abq-packed format.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from abqcli.errors import InputError
from abqcli.formats import CONFIG_JSON, QUANT_STATE, RECIPE_YAML, ExportInput, describe_layers
from abqcli.formats.manifest import (
    base_manifest,
    check_format,
    kv_clip_of,
    kv_transform_of,
    layer_meta,
    layer_quant_from_meta,
    read_manifest,
    write_dir_atomically,
    write_manifest,
)
from abqcli.models.experts import fused_experts
from abqcli.models.loading import attention_for
from abqcli.quant.hadamard import apply_input_transform
from abqcli.quant.quantizer import LayerQuant, QuantizedWeight, WeightQuantSpec


class HfFakequant:
    name = "hf-fakequant"
    version = 3  # 2: layers may have an online input transform (a rotated model), folded back for plain loads;
    # 3: layers may have an activation clip ratio (act_clip)

    def layer_problem(self, weight: WeightQuantSpec, act_bits: int) -> str | None:
        """Any scheme: the checkpoint holds dequantized weights and the integer state as they are."""
        return None

    def recipe_problem(self, rotation: str, kv_bits: int, in_features: dict[str, int],
                       layers: dict[str, LayerQuant]) -> str | None:
        """Every model and rotation the layers' schemes allow."""
        return None

    def required_files(self, directory: Path) -> list[str]:
        """config.json, the integer state and the checkpoint's weight files (with their index)."""
        from abqcli.models.loading import SAFETENSORS_INDEX, weight_files

        required = [CONFIG_JSON, QUANT_STATE, *(p.name for p in weight_files(directory))]
        if (directory / SAFETENSORS_INDEX).is_file():
            required.append(SAFETENSORS_INDEX)
        return required

    def write(self, target: Path, export: ExportInput, overwrite: bool = True) -> None:
        """The directory: loadable by plain transformers, plus the integer state."""
        write_dir_atomically(target, lambda tmp: self._fill(tmp, export), overwrite)

    def _fill(self, tmp: Path, export: ExportInput) -> None:
        model = export.model
        attn = model.config._attn_implementation
        model.set_attn_implementation(attention_for(model.config))  # a plain load must not need abq's attention
        try:
            with _plain_load_weights(model, export.layers, export.quantized), fused_experts(model):
                model.save_pretrained(tmp)
        finally:
            model.set_attn_implementation(attn)
        export.tokenizer.save_pretrained(tmp)
        state = {}
        for name, qw in export.quantized.items():
            state[f"{name}.codes"] = qw.codes.contiguous()
            state[f"{name}.scales"] = qw.scale.contiguous()
            state[f"{name}.zeros"] = qw.zero.contiguous()
        save_file(state, str(tmp / QUANT_STATE))
        (tmp / RECIPE_YAML).write_text(export.recipe_yaml)
        manifest = base_manifest(self, export.kv_bits, layer_meta(export.layers, export.quantized), export.provenance,
                                 export.kv_transform, export.kv_clip)
        manifest["plain_load"] = plain_load_note(export.layers)
        write_manifest(tmp, manifest)

    def open(self, directory: Path, dtype: str, device: str, backend: str) -> tuple[nn.Module, Any, str]:
        """The fake-quant model ("calibrated fake-quant W4A4 (abq)"); `backend` plays no part."""
        model, tokenizer, manifest = open_fakequant(directory, dtype, device)
        scheme = describe_layers(manifest["layers"], manifest["kv_bits"])
        return model, tokenizer, f"calibrated fake-quant {scheme} ({method_label(manifest.get('provenance', {}))})"


def method_label(provenance: dict) -> str:
    """`abq`, `gptq`, `rtn`, or `abq + gptq rounding` when the rounding is not the method's plain one."""
    method, rounding = provenance.get("method", "abq"), provenance.get("rounding", "nearest")
    return method if rounding in ("nearest", method) else f"{method} + {rounding} rounding"


HF_FAKEQUANT = HfFakequant()


def plain_load_note(layers: dict[str, LayerQuant]) -> dict:
    """What a plain transformers load of the checkpoint computes (abq.json `plain_load`)."""
    online = sorted(name for name, quant in layers.items() if quant.input_transform)
    return {
        "computes": "the weight-quantized model; activations and kv in full precision",
        "w_a_exact": False,
        "online_transforms_needed": online,
    }


@contextmanager
def _plain_load_weights(model: nn.Module, layers: dict[str, LayerQuant], quantized: dict[str, QuantizedWeight]):
    """While saving, a linear with an online input transform T holds Ŵ·Tᵀ instead of its dequantized Ŵ:
    x·(Ŵ·Tᵀ)ᵀ = T(x)·Ŵᵀ, so a plain load (which knows no transform) computes the weight-quantized layer."""
    saved = {}
    with torch.no_grad():
        for name, quant in layers.items():
            if quant.input_transform:
                weight = model.get_submodule(name).weight
                saved[name] = weight.detach().clone()
                folded = apply_input_transform(quantized[name].dequantize().double(), quant.input_transform,
                                               inverse=True)
                weight.copy_(folded.to(weight.dtype))
        try:
            yield
        finally:
            for name, weight in saved.items():
                model.get_submodule(name).weight.copy_(weight)


def read_quant_state(directory: Path, manifest: dict) -> dict[str, QuantizedWeight]:
    """The integer state of an hf-fakequant directory."""
    from abqcli.models.loading import load_tensors

    tensors = load_tensors(Path(directory) / QUANT_STATE)
    states = {}
    for name, meta in manifest["layers"].items():
        try:
            codes, scale, zero = (tensors[f"{name}.{k}"] for k in ("codes", "scales", "zeros"))
        except KeyError as exc:
            raise InputError(f"{QUANT_STATE} in {directory} lacks tensor {exc.args[0]}") from exc
        states[name] = QuantizedWeight(codes, scale, zero, layer_quant_from_meta(meta).weight)
    return states


def open_fakequant(directory: Path, dtype: str, device: str):
    """(model, tokenizer, manifest) of an hf-fakequant directory, with activation and kv quantization
    re-applied from the metadata (the weights are already quantized) and each quantized linear running
    in the integer domain from the stored integer state (as the packed export does)."""
    from abqcli.models.adapters import adapter_for
    from abqcli.models.loading import load_model
    from abqcli.quant.fakequant import set_kv_quant, wrap_linears

    manifest = read_manifest(directory)
    check_format(manifest, HF_FAKEQUANT, directory)
    states = read_quant_state(directory, manifest)
    model, tokenizer, _ = load_model(str(directory), dtype, device, as_fakequant=True)
    layers = {name: layer_quant_from_meta(meta) for name, meta in manifest["layers"].items()}
    adapter = adapter_for(model)
    for name, qlinear in wrap_linears(model, adapter, layers.get).items():
        if name not in states:
            raise InputError(f"{QUANT_STATE} in {directory} has no integer state for {name}")
        if qlinear.quant.input_transform:  # the checkpoint holds Ŵ·Tᵀ for plain loads; abq applies T itself
            with torch.no_grad():
                qlinear.weight.copy_(states[name].dequantize().to(qlinear.weight.dtype))
        qlinear.use_integer_weight(states[name])
    set_kv_quant(model, adapter, manifest["kv_bits"], kv_transform_of(manifest), kv_clip_of(manifest))
    return model, tokenizer, manifest


def export_input(directory: Path, manifest: dict) -> ExportInput:
    """What `abq pack` writes from a checked hf-fakequant directory: the integer state for the quantized
    linears, the checkpoint (float32, CPU) for everything else, the recipe and the provenance (which
    gains `packed_from`)."""
    from abqcli.models.loading import load_model

    states = read_quant_state(directory, manifest)
    layers = {name: layer_quant_from_meta(meta) for name, meta in manifest["layers"].items()}
    model, tokenizer, _ = load_model(str(directory), "float32", "cpu", as_fakequant=True)
    recipe_path = directory / RECIPE_YAML
    recipe_yaml = recipe_path.read_text() if recipe_path.is_file() else ""
    provenance = {**manifest.get("provenance", {}), "packed_from": str(directory)}
    return ExportInput(model, tokenizer, recipe_yaml, manifest["kv_bits"], layers, states, provenance,
                       kv_transform_of(manifest), kv_clip=kv_clip_of(manifest))

"""Format `compressed-tensors` (docs/COMPRESSED_TENSORS.md): a standard checkpoint of the original
architecture whose quantized linears are stored by the `compressed-tensors` library, with the
`quantization_config` that transformers (with compressed-tensors installed) and vLLM read.

Written with the library itself (`apply_quantization_config`, then `ModelCompressor.compress_model`):
abq puts its own integer state into the library's parameters and the library packs it. The codes map
one to one; only the code's origin moves, to the library's signed range:

    abq:                Ŵ = (q − z) · s,          q, z ∈ [0, qmax]
    compressed-tensors: Ŵ = (q' − z') · s,        q' = q − 2^(b−1), z' = z − 2^(b−1), b = stored bits

Weight-only W2..W8 (per channel or grouped, asymmetric) → `pack-quantized` (b = bits); W2* (five levels)
→ b = 3 with codes 0..4 (q' ∈ [−4, 0]); W8A8 → `int-quantized` int8 weights per channel with dynamic
per-token asymmetric int8 input activations (the library's own activation quantizer, which widens each
token's range to include 0: abq's range is the token's own min..max). Anything else, online rotations,
quantized kv and MoE experts are refused (`layer_problem`, `recipe_problem`): use abq-packed.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from abqcli.errors import InputError
from abqcli.formats import CONFIG_JSON, RECIPE_YAML, ExportInput, describe_layers
from abqcli.formats.manifest import (
    base_manifest,
    check_format,
    layer_meta,
    read_manifest,
    write_dir_atomically,
    write_manifest,
)
from abqcli.models.loading import attention_for
from abqcli.quant.quantizer import FP_BITS, LayerQuant, QuantizedWeight, WeightQuantSpec

USE_INSTEAD = "use abq-packed"
PACKED, INT_QUANTIZED = "pack-quantized", "int-quantized"


def stored_bits(spec: WeightQuantSpec) -> int:
    """Bits of the library's integer type for an abq weight: W2* (codes 0..4) needs 3."""
    return 3 if spec.balance else spec.bits


def group_size_problem(in_features: dict[str, int], layers: dict[str, LayerQuant]) -> str | None:
    """compressed-tensors needs each group size to divide its layer's input size (abq allows a partial
    last group); the message names the layers and the group sizes that divide every layer's input."""
    from abqcli.errors import name_list

    bad = [name for name, quant in layers.items()
           if quant.weight.group_size and in_features[name] % quant.weight.group_size]
    if not bad:
        return None
    common = math.gcd(*in_features.values())
    working = [g for g in range(16, common + 1, 16) if common % g == 0]
    sizes = sorted({layers[name].weight.group_size for name in bad})
    shown = name_list([f"{name} ({in_features[name]} columns)" for name in bad], shown=3)
    return (f"compressed-tensors needs the weight group size to divide each quantized layer's input size: "
            f"group_size {', '.join(map(str, sizes))} does not divide {len(bad)} of them ({shown}); group sizes "
            f"that divide every one: {', '.join(map(str, working)) or 'none'} (or group_size: null, or abq-packed)")


def online_transform_problem(what: str) -> str:
    return (f"compressed-tensors cannot hold {what} exactly: its online transforms are not abq's Hadamard "
            f"construction; set calibration.rotation: none or {USE_INSTEAD}")


def experts_problem(layers: dict[str, LayerQuant]) -> str | None:
    """transformers builds a MoE model's experts as fused 3-D parameters, not the nn.Linear modules the
    library quantizes, so a plain load could not place their quantized weights."""
    from abqcli.models.experts import expert_index

    if not any(expert_index(name) is not None for name in layers):
        return None
    return ("compressed-tensors cannot hold quantized MoE experts for transformers, which builds them as fused "
            f"3-D parameters rather than linears; {USE_INSTEAD}")


def kv_problem(kv_bits: int) -> str | None:
    if kv_bits >= FP_BITS:
        return None
    return f"compressed-tensors cannot hold abq's per-token kv quantization (kv A{kv_bits}); set kv.bits: 16 or {USE_INSTEAD}"


def clip_problem(layers: dict[str, LayerQuant]) -> str | None:
    clip = next((q.act_clip for q in layers.values() if q.act_clip != 1.0), None)
    if clip is None:
        return None
    return (f"compressed-tensors cannot hold abq's activation clipping (activations.clip {clip:g}); set "
            f"activations.clip: 1 or {USE_INSTEAD}")


class CompressedTensors:
    name = "compressed-tensors"
    version = 1

    def layer_problem(self, weight: WeightQuantSpec, act_bits: int) -> str | None:
        """Weight-only W2..W8 (and W2*) with 16-bit activations, or W8A8 per channel."""
        if act_bits >= FP_BITS:
            return None
        if act_bits == 8 and weight.bits == 8 and not weight.group_size:
            return None
        scheme = f"W{weight.bits}{'*' if weight.balance else ''}A{act_bits}"
        return (f"compressed-tensors cannot hold {scheme}: it holds weight-only W2..W8 A16 and W8A8 (per channel) "
                f"with abq's arithmetic; {USE_INSTEAD}")

    def recipe_problem(self, rotation: str, kv_bits: int, in_features: dict[str, int],
                       layers: dict[str, LayerQuant]) -> str | None:
        """What the model and recipe need beyond each layer's scheme: no online rotation, kv unquantized,
        no activation clipping, no MoE experts, and group sizes that divide every quantized layer's input
        size."""
        if rotation != "none":
            return online_transform_problem(f"calibration.rotation {rotation!r}")
        return (kv_problem(kv_bits) or clip_problem(layers) or experts_problem(layers)
                or group_size_problem(in_features, layers))

    def required_files(self, directory: Path) -> list[str]:
        from abqcli.models.loading import SAFETENSORS_INDEX, weight_files

        required = [CONFIG_JSON, *(p.name for p in weight_files(directory))]
        if (directory / SAFETENSORS_INDEX).is_file():
            required.append(SAFETENSORS_INDEX)
        return required

    def write(self, target: Path, export: ExportInput, overwrite: bool = True) -> None:
        check_export(self, export)
        write_dir_atomically(target, lambda tmp: self._fill(tmp, export), overwrite)

    def _fill(self, tmp: Path, export: ExportInput) -> None:
        from compressed_tensors.compressors import ModelCompressor

        model = plain_copy(export.model)
        quantization_config, fmt = quantization_config_for(export.layers, model)
        load_integer_state(model, quantization_config, export.quantized)
        compressor = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
        compressor.compress_model(model)
        model.save_pretrained(tmp)
        compressor.update_config(str(tmp))
        export.tokenizer.save_pretrained(tmp)
        (tmp / RECIPE_YAML).write_text(export.recipe_yaml)
        manifest = base_manifest(self, export.kv_bits, layer_meta(export.layers, export.quantized), export.provenance)
        manifest["compressed_tensors"] = {
            "format": fmt,
            "library_version": _library_version(),
            "code_offset": "stored code = abq code - 2**(bits - 1); W2* is stored as 3 bits, codes 0..4 -> -4..0",
            "scale_dtype": str(model.dtype).removeprefix("torch."),
        }
        write_manifest(tmp, manifest)

    def open(self, directory: Path, dtype: str, device: str, backend: str) -> tuple[nn.Module, Any, str]:
        """The checkpoint as transformers loads it (the compressed-tensors integration decompresses the
        weights); `backend` plays no part."""
        from transformers import AutoModelForCausalLM

        from abqcli.models.loading import ModelSource, load_tokenizer, torch_dtype

        manifest = read_manifest(directory)
        check_format(manifest, self, directory)
        model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch_dtype(dtype)).to(device).eval()
        tokenizer = load_tokenizer(ModelSource(str(directory), Path(directory)))
        scheme = describe_layers(manifest["layers"], manifest["kv_bits"])
        return model, tokenizer, f"compressed-tensors {scheme} (transformers loader)"


COMPRESSED_TENSORS = CompressedTensors()


def linear_bytes(directory: Path) -> tuple[int, int]:
    """(bytes the quantized linears of an export take — packed or int8 weights, scales, zero points —,
    bytes the same linears take in FP16), read from `model.safetensors`."""
    from safetensors import safe_open

    quantized = fp16 = 0
    with safe_open(str(Path(directory) / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        for key in sorted(keys):
            layer, _, leaf = key.rpartition(".")
            if leaf not in ("weight_packed", "weight") or f"{layer}.weight_scale" not in keys:
                continue
            shape = f.get_tensor(f"{layer}.weight_shape").tolist() if leaf == "weight_packed" else \
                f.get_slice(key).get_shape()
            fp16 += 2 * math.prod(shape)
            quantized += sum(f.get_tensor(f"{layer}.{part}").nbytes for part in
                             (leaf, "weight_scale", "weight_zero_point") if f"{layer}.{part}" in keys)
    return quantized, fp16


def _library_version() -> str:
    import compressed_tensors

    return compressed_tensors.__version__


def check_export(fmt: CompressedTensors, export: ExportInput) -> None:
    """Refuse what the format cannot hold (for `abq pack --format`, whose source was calibrated for
    another format): schemes, online transforms, quantized kv, activation clipping, group sizes, zero
    points."""
    online = export.kv_transform or any(q.input_transform for q in export.layers.values())
    in_features = {name: int(qw.codes.shape[1]) for name, qw in export.quantized.items()}
    problems = [fmt.layer_problem(q.weight, q.act_bits) for q in export.layers.values()]
    problems += [online_transform_problem("this export's online input transforms") if online else None,
                 kv_problem(export.kv_bits), clip_problem(export.layers), experts_problem(export.layers),
                 group_size_problem(in_features, export.layers)]
    for name, qw in export.quantized.items():
        if qw.zero.min() < 0 or qw.zero.max() > qw.spec.qmax:
            problems.append(f"{name} has zero points outside 0..{qw.spec.qmax}, which compressed-tensors "
                            f"cannot store; {USE_INSTEAD}")
    problem = next((p for p in problems if p), None)
    if problem:
        raise InputError(problem)


def plain_copy(model: nn.Module) -> nn.Module:
    """A plain transformers model of the same architecture and dtype holding the export's weights
    (abq's wrapped linears and attention left behind), for the library to compress."""
    config = copy.deepcopy(model.config)
    config._attn_implementation = attention_for(config)
    plain = type(model)(config).to(model.dtype).eval()
    plain.load_state_dict(model.state_dict(), strict=True)
    return plain


def _weight_args(spec: WeightQuantSpec) -> dict:
    from compressed_tensors.quantization import QuantizationArgs

    strategy = "group" if spec.group_size else "channel"
    return {"weights": QuantizationArgs(num_bits=stored_bits(spec), type="int", symmetric=False, strategy=strategy,
                                        group_size=spec.group_size)}


def _scheme_args(quant: LayerQuant) -> dict:
    """The library's QuantizationScheme fields of one abq layer scheme."""
    from compressed_tensors.quantization import QuantizationArgs

    args = _weight_args(quant.weight)
    if quant.act_bits < FP_BITS:
        args["input_activations"] = QuantizationArgs(num_bits=quant.act_bits, type="int", symmetric=False,
                                                     strategy="token", dynamic=True)
    return args


def quantization_config_for(layers: dict[str, LayerQuant], model: nn.Module):
    """(QuantizationConfig, format): one config group per distinct layer scheme, targeting the layers by
    name; every other linear is listed in `ignore`."""
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme, QuantizationStatus

    by_scheme: dict[tuple, list[str]] = {}
    for name, quant in sorted(layers.items()):
        by_scheme.setdefault((quant.weight, quant.act_bits), []).append(name)
    groups = {f"group_{i}": QuantizationScheme(targets=names, **_scheme_args(layers[names[0]]))
              for i, names in enumerate(by_scheme.values())}
    ignore = [name for name, mod in model.named_modules() if isinstance(mod, nn.Linear) and name not in layers]
    fmt = INT_QUANTIZED if any(q.act_bits < FP_BITS for q in layers.values()) else PACKED
    config = QuantizationConfig(config_groups=groups, ignore=ignore, quantization_status=QuantizationStatus.FROZEN,
                                format=fmt)
    return config, fmt


@torch.no_grad()
def load_integer_state(model: nn.Module, config, quantized: dict[str, QuantizedWeight]) -> None:
    """Attach the library's quantization parameters to `model` and fill them with abq's state: the
    dequantized weight, the scales and the zero points moved to the signed range."""
    from compressed_tensors.quantization import apply_quantization_config

    apply_quantization_config(model, config)
    for name, qw in quantized.items():
        module = model.get_submodule(name)
        offset = 2 ** (stored_bits(qw.spec) - 1)
        module.weight.copy_(qw.dequantize().to(module.weight.dtype))
        module.weight_scale.copy_(qw.scale.reshape(module.weight_scale.shape).to(module.weight_scale.dtype))
        zero = (qw.zero - offset).reshape(module.weight_zero_point.shape)
        module.weight_zero_point.copy_(zero.to(module.weight_zero_point.dtype))

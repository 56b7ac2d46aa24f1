"""Format `abq-packed` (DESIGN §5, docs/FORMAT.md): the BTC bit planes of every quantized linear, run
by the packed runtime (`BTCLinear`).

`model.safetensors` holds the BTC tensors of every quantized linear
(`<name>.btc_planes|btc_scales|btc_zeros`; versions 1 and 2 also `btc_code_sums`) and every other tensor of the model's state
dict once (tied tensors are stored under one name and listed in `quantization_config.tied_tensors`);
`config.json` carries `quantization_config` (quant_method "abq", format "btc-bitplane", format_version,
kv_bits, modules, tied_tensors).

Reading (`build`) checks the manifest and the format versions, builds the model from `config.json` —
with `quantization_config` removed from the config object before the model is instantiated, so
transformers never looks for a quantizer called "abq" — loads every unquantized tensor from
`model.safetensors`, and replaces each quantized linear with a `BTCLinear` built from its BTC tensors
(mode "packed") or with its fake-quant twin (mode "fakequant": QuantLinear with the dequantized weights
and the integer state, same tensors otherwise), which `abq verify` compares against. q/k/v quantization
goes through abq's registered attention (`set_kv_quant`).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from abqcli import __version__, outputs
from abqcli.btc.contract import K_ALIGN, check_btc_group, check_int32_bound
from abqcli.btc.format import (
    BTC_SUFFIXES,
    FORMAT_VERSION,
    PackedWeight,
    packed_weight_from_tensors,
    packed_weight_meta,
    packed_weight_to_tensors,
    padded_k,
    tensor_names,
)
from abqcli.errors import InputError
from abqcli.formats import (
    ABQ_JSON,
    CONFIG_JSON,
    QUANT_METHOD,
    RECIPE_YAML,
    ExportInput,
    describe_layers,
    read_json,
)
from abqcli.formats.manifest import (
    activation_quantizer_keys,
    base_manifest,
    check_format,
    kv_clip_of,
    kv_quantizer_keys,
    kv_transform_of,
    layer_meta,
    layer_quant_from_meta,
    read_manifest,
    resolve_output_dir,
    write_dir_atomically,
    write_manifest,
)
from abqcli.models.loading import SAFETENSORS_INDEX, attention_for
from abqcli.quant.quantizer import FP_BITS, LayerQuant, QuantizedWeight, WeightQuantSpec, qmax_for
from abqcli.registry import FORMATS
from abqcli.runtime import BTCLinear, require_backend

PACKED_WEIGHTS = "model.safetensors"
PACKED_INDEX = SAFETENSORS_INDEX  # a sharded export (format_version 4): tensor -> shard
TENSOR_FORMAT = "btc-bitplane"
PACKED, TWIN = "packed", "fakequant"  # what `build` puts in place of each quantized linear


class AbqPacked:
    name = "abq-packed"
    version = FORMAT_VERSION

    def layer_problem(self, weight: WeightQuantSpec, act_bits: int) -> str | None:
        """With quantized activations the BTC GEMM runs per-channel weights or groups of K_ALIGN columns."""
        gs = weight.group_size
        if act_bits >= FP_BITS or gs is None or gs % K_ALIGN == 0:
            return None
        return (f"group_size {gs} cannot be packed: with quantized activations (A{act_bits}) the BTC GEMM "
                f"needs per-channel weights (group_size: null) or a group size that is a multiple of "
                f"{K_ALIGN}; change group_size or drop abq-packed from output.formats")

    def recipe_problem(self, rotation: str, kv_bits: int, in_features: dict[str, int],
                       layers: dict[str, LayerQuant]) -> str | None:
        """Every model and rotation the layers' schemes allow."""
        return None

    def required_files(self, directory: Path) -> list[str]:
        """config.json and model.safetensors, or (sharded) the index and every shard it names."""
        if not (Path(directory) / PACKED_INDEX).is_file():
            return [CONFIG_JSON, PACKED_WEIGHTS]
        return [CONFIG_JSON, PACKED_INDEX, *sorted(set(_weight_map(Path(directory)).values()))]

    def write(self, target: Path, export: ExportInput, overwrite: bool = True) -> None:
        """The directory, written atomically. `export.layers` / `export.quantized` are keyed by full
        module name; the model's `<name>.weight` of those modules is replaced by the BTC tensors packed
        from `export.quantized[name]` (the model's own weights are not used for them); every other
        tensor of the state dict is written as it is, tied tensors once. With `export.shards` (a
        `PackedShards` that wrote each decoder block as it was calibrated) the blocks' shards are moved
        in and the rest of the model is written as the last shard."""
        # packed (and checked) before the target is touched; a blockwise run's blocks are packed already
        part = packed_part(export.model.state_dict(), export.layers, export.quantized) if export.shards is None \
            else None
        write_dir_atomically(Path(target), lambda tmp: self._fill(tmp, export, part), overwrite)

    def _fill(self, tmp: Path, export: ExportInput, part: PackedPart | None) -> None:
        model = export.model
        if part is None:
            part = export.shards.finish(tmp, model)
        else:
            save_tensors(part.tensors, tmp / PACKED_WEIGHTS)
        config = _model_config_dict(model, tmp)
        config["quantization_config"] = _quantization_config(part.modules, export.kv_bits, part.tied,
                                                             export.kv_transform, export.kv_clip)
        (tmp / CONFIG_JSON).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None:
            try:
                generation_config.save_pretrained(tmp)
            except (ValueError, TypeError, OSError):  # an invalid generation config is not ours to fix
                pass
        export.tokenizer.save_pretrained(tmp)
        (tmp / RECIPE_YAML).write_text(export.recipe_yaml)
        for weights in tmp.glob("*.safetensors"):
            shutil.copymode(tmp / RECIPE_YAML, weights)  # safetensors creates it 0600
        manifest = base_manifest(self, export.kv_bits, part.layers, export.provenance, export.kv_transform,
                                 export.kv_clip)
        manifest["tensor_format"] = TENSOR_FORMAT
        write_manifest(tmp, manifest)

    def open(self, directory: Path, dtype: str, device: str, backend: str) -> tuple[nn.Module, Any, str]:
        """The packed model ("packed BTC W4A4 (backend cpu)")."""
        model, tokenizer, manifest = load_packed(directory, dtype, device, backend)
        scheme = describe_layers(model.abq_quantization_config["modules"], manifest["kv_bits"])
        return model, tokenizer, f"packed BTC {scheme} (backend {backend})"


ABQ_PACKED = AbqPacked()


# ------------------------------------------------------------------------------------------- writing


@dataclass
class PackedPart:
    """The packed form of (part of) a model: its tensors (BTC tensors of the quantized linears, the rest
    as they are, tied ones once), the tied aliases, each quantized linear's quantization_config.modules
    entry and its abq.json layer entry."""

    tensors: dict[str, torch.Tensor]
    tied: dict[str, str]
    modules: dict[str, dict]
    layers: dict[str, dict]


def packed_part(state: dict[str, torch.Tensor], layers: dict[str, LayerQuant],
                quantized: dict[str, QuantizedWeight]) -> PackedPart:
    """`state` (state-dict tensors by full name) packed: the linears of `layers` from their integer states."""
    packed = _packed_weights(layers, quantized)
    tensors, tied = _unquantized_tensors(state, set(packed))
    written = {name: packed_weight_to_tensors(name, pw) for name, pw in packed.items()}
    for layer_tensors in written.values():
        tensors.update(layer_tensors)
    meta = layer_meta(layers, quantized)
    for name, pw in packed.items():
        meta[name].update(packed_layer_stats(name, pw, written[name]))
    return PackedPart(tensors, tied, {name: _module_meta(pw, layers[name]) for name, pw in packed.items()}, meta)


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    # one metadata key: safetensors writes its metadata map in a per-process random order, so more
    # keys would make two identical exports differ in bytes (config.json holds the format facts)
    save_file(tensors, str(path), metadata={"format": "pt"})


def shard_name(index: int, count: int) -> str:
    """The file name of shard `index` (from 0) of `count`, as transformers names them."""
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


class PackedShards:
    """An abq-packed export written as the calibration loop goes (`model.loading: blockwise`): shard i
    holds decoder block i (`write_block`, into `directory` until the export is assembled), the last
    shard everything outside the blocks, and `model.safetensors.index.json` maps every tensor to its
    shard (`finish`). Nothing of a block stays in memory once its shard is written."""

    def __init__(self, directory: Path, block_prefixes: list[str]):
        self.directory, self.block_prefixes = directory, block_prefixes
        self.count = len(block_prefixes) + 1
        self.modules: dict[str, dict] = {}
        self.layers: dict[str, dict] = {}
        self.names: dict[int, list[str]] = {}

    def _shard(self, index: int) -> Path:
        return self.directory / f"packed-{shard_name(index, self.count)}"

    def write_block(self, index: int, block: nn.Module, layers: dict[str, LayerQuant],
                    quantized: dict[str, QuantizedWeight]) -> None:
        """Block `index` (folded, in the model dtype) with its linears' schemes and integer states."""
        prefix = self.block_prefixes[index]
        part = packed_part({f"{prefix}.{k}": v for k, v in block.state_dict().items()}, layers, quantized)
        if part.tied:
            raise InputError(f"block {index} shares tensors ({', '.join(part.tied)}): cannot be written as a shard")
        self.directory.mkdir(parents=True, exist_ok=True)
        save_tensors(part.tensors, self._shard(index))
        self.modules.update(part.modules)
        self.layers.update(part.layers)
        self.names[index] = sorted(part.tensors)

    def finish(self, tmp: Path, model: nn.Module) -> PackedPart:
        """Move every block's shard into `tmp`, write the rest of `model` (its blocks are not read) as the
        last shard and the index; the whole export's modules, layers and tied aliases."""
        missing = [i for i in range(self.count - 1) if i not in self.names]
        if missing:
            raise InputError(f"blocks {missing} were never written: cannot assemble the export")
        rest = {name: t for name, t in model.state_dict().items()
                if not any(name.startswith(prefix + ".") for prefix in self.block_prefixes)}
        part = packed_part(rest, {}, {})
        last = self.count - 1
        save_tensors(part.tensors, tmp / shard_name(last, self.count))
        weight_map = {name: shard_name(last, self.count) for name in part.tensors}
        for index, names in self.names.items():
            self._shard(index).replace(tmp / shard_name(index, self.count))
            weight_map.update({name: shard_name(index, self.count) for name in names})
        total = sum(file.stat().st_size for file in tmp.glob("*.safetensors"))
        index_json = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / PACKED_INDEX).write_text(json.dumps(index_json, indent=2) + "\n")
        return PackedPart({}, part.tied, dict(sorted(self.modules.items())), dict(sorted(self.layers.items())))


def _packed_weights(layers: dict[str, LayerQuant], quantized: dict[str, QuantizedWeight]) -> dict[str, PackedWeight]:
    """The BTC form of every quantized linear, each checked runnable by the BTC GEMM and readable."""
    missing = sorted(set(layers) ^ set(quantized))
    if missing:
        raise InputError(f"layers and quantized states differ for: {', '.join(missing)}")
    packed = {}
    for name in sorted(layers):
        pw = PackedWeight.from_quantized(quantized[name])
        _check_packable(name, pw, layers[name].act_bits)
        try:
            pw.check_qparams()  # what a reader refuses is never written (the codes are packed valid)
        except ValueError as exc:
            raise InputError(f"{name}: cannot pack: {exc}") from exc
        packed[name] = pw
    return packed


def _quantization_config(modules: dict[str, dict], kv_bits: int, tied: dict[str, str],
                         kv_transform: str | None, kv_clip: float) -> dict:
    """config.json's quantization_config, what the runtime builds the model from."""
    config = {
        "quant_method": QUANT_METHOD,
        "format": TENSOR_FORMAT,
        "format_version": FORMAT_VERSION,
        "kv_bits": kv_bits,
        "modules": modules,
        "tied_tensors": tied,
    }
    return {**config, **kv_quantizer_keys(kv_transform, kv_clip)}


def _module_meta(pw: PackedWeight, quant: LayerQuant) -> dict:
    """One linear in quantization_config.modules: its BTC tensors' metadata, its activation bits,
    (format_version 2) the online transform before its activation quantizer, when it has one, and
    (format_version 5) that quantizer's clip ratio, when it is not 1."""
    return {**packed_weight_meta(pw), "act_bits": quant.act_bits, **activation_quantizer_keys(quant)}


def packed_layer_stats(name: str, pw: PackedWeight, written: dict[str, torch.Tensor]) -> dict:
    """Storage of one packed linear `name` from the tensors written for it (`packed_weight_to_tensors`):
    planes, padding, groups, scale dtype, bytes and bits per weight (`storage_bits`)."""
    names = tensor_names(name)
    sizes = {key: written[tname].numel() * written[tname].element_size() for key, tname in names.items()}
    return {
        "planes": int(pw.planes.shape[0]),
        "padded_in_features": padded_k(pw.in_features),
        "groups": pw.num_groups,
        "scale_dtype": str(written[names["scales"]].dtype).removeprefix("torch."),
        **storage_bits(sizes, pw.out_features * pw.in_features, int(pw.planes.shape[0]) * pw.out_features * pw.in_features),
    }


def storage_bits(sizes: dict[str, int], weights: int, code_bits: int) -> dict:
    """Bytes and bits per weight of quantized linears holding `weights` real (unpadded) weights whose
    codes are `code_bits` bits (planes × weights) and whose BTC tensors take `sizes` bytes (by key:
    planes, scales, zeros[, code_sums]); every rate is over the real weights:

        bits_per_weight          = code_bits / weights                    (the codes themselves)
        overhead_bits_per_weight = 8·(scales + zeros [+ code_sums]) / weights
        bits_per_weight_with_overhead = bits_per_weight + overhead_bits_per_weight
        padding_bits_per_weight  = 8·planes / weights − bits_per_weight   (columns K … Kp−1, code 0)
        stored_bits_per_weight   = 8·total / weights
    """
    total = sum(sizes.values())
    codes, overhead = code_bits / weights, (total - sizes["planes"]) * 8 / weights
    return {
        "bytes": {**sizes, "total": total},
        "bits_per_weight": codes,
        "overhead_bits_per_weight": overhead,
        "bits_per_weight_with_overhead": codes + overhead,
        "padding_bits_per_weight": sizes["planes"] * 8 / weights - codes,
        "stored_bits_per_weight": total * 8 / weights,
    }


def _check_packable(name: str, pw: PackedWeight, act_bits: int) -> None:
    """Activation-quantized layers must be runnable by the BTC GEMM; refuse with the reason."""
    if act_bits >= FP_BITS:
        return
    try:
        check_btc_group(pw.group_size)
        check_int32_bound(pw.in_features, qmax_for(act_bits), pw.qmax)
    except ValueError as exc:
        raise InputError(f"{name}: cannot pack for the BTC GEMM: {exc}") from exc


def _unquantized_tensors(state: dict[str, torch.Tensor], quantized: set[str]) -> tuple[dict[str, torch.Tensor],
                                                                                       dict[str, str]]:
    """Every tensor of `state` (a state dict) outside the `quantized` linears (whose `.bias` alone is
    kept), on the CPU, each storage saved once.

    Returns (tensors, tied): a tensor that is the very same view as one already kept (tied embeddings:
    `lm_head.weight` is `embed_tokens.weight`) is left out and recorded as tied[name] = kept name;
    a tensor that overlaps another's storage in some other way is cloned (safetensors refuses shared
    storage)."""
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    seen_views: dict[tuple, str] = {}
    seen_storages: set[tuple] = set()
    for name, t in state.items():
        owner, _, leaf = name.rpartition(".")
        if owner in quantized and leaf != "bias":  # the weight (and anything a wrapper may hold)
            continue
        t = t.detach()
        storage = (t.device.type, t.untyped_storage().data_ptr())
        view = (*storage, t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if view in seen_views:
            tied[name] = seen_views[view]
            continue
        seen_views[view] = name
        if storage in seen_storages:
            t = t.clone()
        seen_storages.add(storage)
        tensors[name] = t.cpu().contiguous()
    # a tensor that is a view into a larger storage is written as its own copy
    for name, t in tensors.items():
        if t.untyped_storage().nbytes() != t.numel() * t.element_size():
            tensors[name] = t.clone()
    return tensors, tied


def _model_config_dict(model: nn.Module, tmp: Path) -> dict:
    """config.json as transformers writes it (attention set back to the architecture's own for the file)."""
    attn = getattr(model.config, "_attn_implementation", None)
    if attn is not None:
        model.config._attn_implementation = attention_for(model.config)
    try:
        model.config.save_pretrained(tmp)
    finally:
        if attn is not None:
            model.config._attn_implementation = attn
    config = json.loads((tmp / CONFIG_JSON).read_text())
    config.pop("quantization_config", None)
    return config


def pack_fakequant(src_dir: Path, out_dir: Path, overwrite: bool = False, fmt: str = "abq-packed") -> Path:
    """`abq pack FAKEQUANT_DIR --output DIR [--format F]`: the `fmt` export (abq-packed, or another
    registered format such as compressed-tensors) of an hf-fakequant directory
    (`hf_fakequant.export_input`: its integer state, its checkpoint for everything else, its recipe and
    provenance). The output is checked (`outputs.resolve_output`: never the source, nor around or inside
    it) and locked before the model loads; it replaces only an abq output.
    """
    from abqcli.formats.hf_fakequant import HF_FAKEQUANT, export_input

    src_dir, out_dir = Path(src_dir), Path(out_dir)
    manifest = read_manifest(src_dir)
    check_format(manifest, HF_FAKEQUANT, src_dir)
    target = outputs.resolve_output(out_dir, [("the pack source", src_dir)])
    with outputs.output_lock(target):
        outputs.remove_stale(target)
        if target.exists() and not overwrite:
            raise InputError(f"output directory exists: {out_dir} (pass --overwrite to replace it)")
        if outputs.entries(target) and not outputs.is_abq_dir(target):
            outputs.refuse_foreign(target, out_dir)
        FORMATS.load(fmt).write(target, export_input(src_dir, manifest), overwrite=overwrite)
    return out_dir


# ------------------------------------------------------------------------------------------- reading


@dataclass
class PackedExport:
    """What an abq-packed directory says about itself, checked."""

    directory: Path
    manifest: dict
    quant_config: dict  # config.json's quantization_config
    config_dict: dict  # config.json without quantization_config

    @property
    def modules(self) -> dict[str, dict]:
        return self.quant_config["modules"]

    @property
    def version(self) -> int:
        return int(self.quant_config["format_version"])

    @property
    def kv_bits(self) -> int:
        return int(self.quant_config["kv_bits"])

    @property
    def tied(self) -> dict[str, str]:
        return dict(self.quant_config.get("tied_tensors") or {})


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def read_packed_export(directory: str | Path, verify: bool = True) -> PackedExport:
    """Manifest (checksums verified), format and version checks of abq.json and config.json."""
    directory = Path(directory)
    manifest = read_manifest(directory, verify=verify)
    check_format(manifest, ABQ_PACKED, directory)
    config_path = directory / CONFIG_JSON
    if not config_path.is_file():
        raise InputError(f"{directory} has no {CONFIG_JSON}")
    config = read_json(config_path)
    qc = config.pop("quantization_config", None)
    if not isinstance(qc, dict):
        raise InputError(f"{config_path} has no quantization_config: not an abq-packed export")
    if qc.get("quant_method") != QUANT_METHOD or qc.get("format") != TENSOR_FORMAT:
        raise InputError(f"{config_path}: quantization_config is {qc.get('quant_method')!r}/{qc.get('format')!r}, "
                         f"expected {QUANT_METHOD!r}/{TENSOR_FORMAT!r}")
    version = qc.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= FORMAT_VERSION:
        newer = isinstance(version, int) and version > FORMAT_VERSION
        raise InputError(f"{config_path}: {TENSOR_FORMAT} format_version {version!r}; this abq ({__version__}) "
                         f"reads versions 1 to {FORMAT_VERSION}" + (": upgrade abq" if newer else ""))
    if not isinstance(qc.get("modules"), dict) or not isinstance(qc.get("kv_bits"), int):
        raise InputError(f"{config_path}: quantization_config lacks 'modules' or 'kv_bits'")
    _check_agreement(manifest, qc, config_path)
    return PackedExport(directory, manifest, qc, config)


_AGREEING_FIELDS = ("bits", "balance", "group_size", "act_bits", "in_features", "out_features", "input_transform",
                    "act_clip")


def _check_agreement(manifest: dict, quant_config: dict, config_path: Path) -> None:
    """config.json's quantization_config (what the runtime builds from) and abq.json (what was
    exported, and what the checksums seal) describe the same quantization; else InputError naming the
    first layer and field that differ."""
    layers, modules = manifest["layers"], quant_config["modules"]
    where = f"{config_path} and {ABQ_JSON} disagree"
    for name in sorted(set(layers) | set(modules)):
        if name not in layers or name not in modules:
            only = config_path.name if name in modules else ABQ_JSON
            raise InputError(f"{where}: {name} is quantized in {only} only")
        if not isinstance(modules[name], dict):
            raise InputError(f"{config_path}: quantization_config.modules[{name!r}] is not a mapping")
        for field in _AGREEING_FIELDS:
            ours, theirs = modules[name].get(field), layers[name].get(field)
            if ours != theirs:
                raise InputError(f"{where} on {name} {field}: {ours!r} in {config_path.name}, "
                                 f"{theirs!r} in {ABQ_JSON}")
    for key in ("format_version", "kv_bits", "kv_transform", "kv_clip"):
        if quant_config.get(key) != manifest.get(key):
            raise InputError(f"{where} on {key}: {quant_config.get(key)!r} in {config_path.name}, "
                             f"{manifest.get(key)!r} in {ABQ_JSON}")


def _instantiate(export: PackedExport, dtype: torch.dtype) -> tuple[nn.Module, object]:
    """The bare model from config.json (quantization_config removed first); weights uninitialised."""
    import transformers
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from abqcli.models.adapters import adapter_for_config

    transformers.utils.logging.disable_progress_bar()
    try:
        config = CONFIG_MAPPING[export.config_dict["model_type"]].from_dict(export.config_dict)
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"cannot read the model config in {export.directory}: {_one_line(exc)}") from exc
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    adapter = adapter_for_config(config)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attention_for(config))
    adapter.prepare_model(model)
    return model, adapter


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
    except AttributeError as exc:
        raise InputError(f"quantized module {name} does not exist in this model") from exc
    if not isinstance(old, nn.Linear):
        raise InputError(f"quantized module {name} is a {type(old).__name__}, not a Linear")
    if (old.in_features, old.out_features) != (module.in_features, module.out_features):
        raise InputError(f"quantized module {name}: {module.in_features}->{module.out_features} does not match "
                         f"the model's {old.in_features}->{old.out_features}")
    setattr(parent, child, module)


def _twin_linear(pw: PackedWeight, quant: LayerQuant, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Module:
    """The fake-quant twin of one packed linear: QuantLinear with the dequantized weights and the
    integer state (and the same online input transform)."""
    from abqcli.quant.fakequant import QuantLinear

    linear = nn.Linear(pw.in_features, pw.out_features, bias=bias is not None, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(pw.dequantized_f32())
        if bias is not None:
            linear.bias.copy_(bias)
    module = QuantLinear(linear, quant)
    module.use_integer_weight(pw.to_quantized())
    return module


def _replace_quantized(model: nn.Module, export: PackedExport, tensors: dict[str, torch.Tensor], mode: str,
                       backend: str, dtype: torch.dtype) -> set[str]:
    """Put a `BTCLinear` (mode PACKED) or its fake-quant twin (TWIN) in place of every quantized linear;
    returns the state-dict names they replace."""
    replaced = set()
    for name, meta in sorted(export.modules.items()):
        pw = packed_weight_from_tensors(name, tensors, meta, export.version)
        quant = layer_quant_from_meta({**meta, "act_bits": int(meta.get("act_bits", FP_BITS))})
        bias = tensors.get(f"{name}.bias")
        if mode == PACKED:
            module = BTCLinear(pw, quant.act_bits, bias, backend, quant.input_transform, quant.act_clip)
        else:
            module = _twin_linear(pw, quant, bias, dtype)
        _replace(model, name, module)
        replaced.add(f"{name}.weight")
    return replaced


def _load_unquantized(model: nn.Module, export: PackedExport, tensors: dict[str, torch.Tensor],
                      replaced: set[str]) -> None:
    """Load every tensor but the BTC ones (tied aliases restored); refuse a missing or foreign one."""
    from abqcli.errors import name_list

    rest = {k: v for k, v in tensors.items() if not k.endswith(BTC_SUFFIXES)}
    for alias, source in export.tied.items():
        if source not in rest:
            raise InputError(f"tensor missing from {PACKED_WEIGHTS}: {source} (tied to {alias})")
        rest[alias] = rest[source]
    missing, unexpected = model.load_state_dict(rest, strict=False)
    missing = [k for k in missing if k not in replaced]
    if missing:
        raise InputError(f"tensor missing from {PACKED_WEIGHTS}: {name_list(missing)}")
    if unexpected:
        raise InputError(f"{PACKED_WEIGHTS} holds tensors this model does not have: {name_list(unexpected)}")
    if export.tied and getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()


def _weight_map(directory: Path) -> dict[str, str]:
    """A sharded export's index: tensor name -> shard file name (a plain file name of the directory)."""
    from abqcli.models.loading import read_weight_map

    weight_map = read_weight_map(directory / PACKED_INDEX)
    if not all(v.endswith(".safetensors") and Path(v).name == v for v in weight_map.values()):
        raise InputError(f"{directory / PACKED_INDEX}: every shard must be a .safetensors file of the directory")
    return weight_map


def packed_weight_files(directory: Path) -> list[Path]:
    """The safetensors files of an export: model.safetensors, or the shards its index names."""
    if not (directory / PACKED_INDEX).is_file():
        return [directory / PACKED_WEIGHTS]
    return [directory / shard for shard in sorted(set(_weight_map(directory).values()))]


def load_packed_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an export; a sharded one's shards must hold exactly the tensors its index maps to them."""
    from abqcli.models.loading import load_tensors

    if not (directory / PACKED_INDEX).is_file():
        return load_tensors(directory / PACKED_WEIGHTS)
    weight_map, tensors = _weight_map(directory), {}
    for file in packed_weight_files(directory):
        shard = load_tensors(file)
        listed = {name for name, where in weight_map.items() if where == file.name}
        if set(shard) != listed:
            odd = min(set(shard) ^ listed)
            raise InputError(f"{file} and {PACKED_INDEX} disagree: {odd} is "
                             f"{'in the shard only' if odd in shard else 'listed but not in the shard'}")
        tensors.update(shard)
    return tensors


def build(directory: str | Path, dtype: str, device: str, backend: str, mode: str, verify: bool = True):
    """(model, tokenizer, export): the packed model (mode PACKED, its linears on `backend`) or its
    fake-quant twin (TWIN). The caller checks that `backend` can run here (`require_backend`)."""
    from abqcli.models.loading import (
        ModelSource,
        check_tokenizer_files,
        load_tokenizer,
        torch_dtype,
    )
    from abqcli.quant.fakequant import set_kv_quant

    dt = torch_dtype(dtype)
    export = read_packed_export(resolve_output_dir(directory), verify=verify)
    directory = export.directory
    check_tokenizer_files(str(directory), directory)
    tensors = load_packed_tensors(directory)
    model, adapter = _instantiate(export, dt)
    replaced = _replace_quantized(model, export, tensors, mode, backend, dt)
    _load_unquantized(model, export, tensors, replaced)
    set_kv_quant(model, adapter, export.kv_bits, kv_transform_of(export.quant_config),
                 kv_clip_of(export.quant_config))
    model.eval().to(device)
    if mode == PACKED:
        for module in model.modules():
            if isinstance(module, BTCLinear):
                module.prepare()
    tokenizer = load_tokenizer(ModelSource(str(directory), str(directory)))
    model.abq_quantization_config = export.quant_config
    return model, tokenizer, export


def load_packed(directory: str | Path, dtype: str = "float32", device: str = "cpu", backend: str = "cpu"):
    """(model, tokenizer, manifest) of an abq-packed directory: a runnable transformers model whose
    quantized linears are `BTCLinear` modules; refuses bad input with an InputError."""
    require_backend(backend)
    model, tokenizer, export = build(directory, dtype, device, backend, PACKED)
    return model, tokenizer, export.manifest


def load_fakequant_twin(directory: str | Path, dtype: str = "float32", device: str = "cpu", verify: bool = True):
    """(model, tokenizer, manifest): the same export as a fake-quant model (QuantLinear with the
    dequantized weights, same activation and kv quantization) — the reference `abq verify` uses."""
    model, tokenizer, export = build(directory, dtype, device, "cpu", TWIN, verify=verify)
    return model, tokenizer, export.manifest

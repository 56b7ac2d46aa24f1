"""Writing and reading abq output directories (DESIGN §5), with manifests and checksums.

Every output directory holds `abq.json` (tool version, format, provenance, per-layer metadata and the
sha256 of every other file) and the resolved `recipe.yaml`. Directories are written into a temporary
sibling and renamed into place, so an interrupted write never leaves a half directory behind.

Format `hf-fakequant`: a plain transformers checkpoint whose quantized linears hold the dequantized
(folded) weights, plus `quant_state.safetensors` with the integer state per linear
(`<name>.codes` uint8 [N, K], `<name>.scales` / `<name>.zeros` float32 [N, G]).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path, PurePosixPath

import torch
from safetensors.torch import save_file
from torch import nn

from abqcli import __version__, outputs
from abqcli.checksums import sha256_file
from abqcli.errors import InputError
from abqcli.quant.quantizer import LayerQuant, QuantizedWeight, WeightQuantSpec

ABQ_JSON = "abq.json"
RECIPE_YAML = "recipe.yaml"
QUANT_STATE = "quant_state.safetensors"
FAKEQUANT = "hf-fakequant"
FAKEQUANT_VERSION = 1
MANIFEST_SHA256 = "manifest_sha256"
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# files that transformers' loaders read when present: the manifest must cover them too
READ_IF_PRESENT = ("generation_config.json", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt",
                   "vocab.txt", "spiece.model", "chat_template.jinja", "chat_template.json")


def write_dir_atomically(target: Path, fill: Callable[[Path], None], overwrite: bool = True) -> None:
    """Run `fill(tmp)` on a fresh sibling directory, then swap it in as `target` (`outputs.replacing`:
    a previous `target` is removed only once the new one is complete)."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise InputError(f"output directory exists: {target} (pass --overwrite to replace it)")
    with outputs.replacing(target) as tmp:
        fill(tmp)


def write_manifest(directory: Path, manifest: dict) -> None:
    """Write abq.json with the sha256 of every other file in the directory, sealed by `manifest_sha256`."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != ABQ_JSON)
    manifest = {**manifest, "files": {str(p.relative_to(directory)): sha256_file(p) for p in files}}
    manifest[MANIFEST_SHA256] = manifest_digest(manifest)
    (directory / ABQ_JSON).write_text(_canonical_json(manifest))


def _canonical_json(manifest: dict) -> str:
    return json.dumps(manifest, indent=2, sort_keys=True) + "\n"


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON without its own `manifest_sha256`: abq.json sets how the
    model computes (activation and kv bits), so it is checked like the files it lists. Computed over
    the parsed content, so only a change of meaning (not of whitespace or key order) breaks it."""
    body = {key: value for key, value in manifest.items() if key != MANIFEST_SHA256}
    return hashlib.sha256(_canonical_json(body).encode()).hexdigest()


def read_json(path: Path) -> object:
    """A JSON file, or an InputError naming it and where it is broken."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}") from exc
    except UnicodeDecodeError as exc:
        raise InputError(f"{path} is not valid JSON: not UTF-8 text (byte {exc.start})") from exc


def read_manifest(directory: Path, verify: bool = True) -> dict:
    """abq.json of an output directory, checked: a format version this abq reads, well-formed `files`
    and `layers`, every file its format's reader needs listed, the manifest's own seal and (`verify`)
    the listed files' checksums. InputError if anything is off."""
    directory = Path(directory)
    path = directory / ABQ_JSON
    if not path.is_file():
        raise InputError(f"not an abq output directory (no {ABQ_JSON}): {directory}")
    manifest = read_json(path)
    if not isinstance(manifest, dict) or "format" not in manifest or "files" not in manifest:
        raise InputError(f"{path} is not an abq manifest (missing 'format' or 'files')")
    fmt = manifest["format"]
    supported = _supported_version(fmt)
    if supported is not None:  # a newer abq's manifest is refused as such, whatever else it holds
        check_format(manifest, fmt, supported, directory)
    files = _checked_files(manifest["files"], path)
    _check_layers(manifest, path)
    for name in _required_files(directory, fmt):
        if name not in files:
            raise InputError(f"{path} does not list {name}, which the {fmt} reader needs: the export is "
                             f"incomplete or its manifest was edited")
    if MANIFEST_SHA256 not in manifest:
        raise InputError(f"{path} has no {MANIFEST_SHA256} (written by an older abq, or edited): export it again")
    if manifest[MANIFEST_SHA256] != manifest_digest(manifest):
        raise InputError(f"{path} was modified or is corrupted (its {MANIFEST_SHA256} does not match its "
                         f"content)")
    if verify:
        for name, expected in files.items():
            file = directory / name
            if not file.is_file():
                raise InputError(f"missing file listed in {ABQ_JSON}: {file}")
            if sha256_file(file) != expected:
                raise InputError(f"checksum mismatch: {file} is corrupted or was modified")
    return manifest


def _supported_version(fmt: object) -> int | None:
    """The newest format_version of `fmt` this abq reads; None for a format it does not know."""
    from abqcli.btc.format import FORMAT_VERSION

    return {FAKEQUANT: FAKEQUANT_VERSION, PACKED: FORMAT_VERSION}.get(fmt) if isinstance(fmt, str) else None


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _checked_files(files: object, path: Path) -> dict[str, str]:
    """`files` of a manifest: relative paths inside the directory -> 64-hex sha256, or InputError."""
    if not isinstance(files, dict):
        raise InputError(f"{path}: 'files' must map relative paths to sha256 digests, "
                         f"got a {type(files).__name__}")
    for name, digest in files.items():
        relative = PurePosixPath(name)
        if not name or relative.is_absolute() or ".." in relative.parts or "\\" in name:
            raise InputError(f"{path}: 'files' entry {_short(name)} is not a relative path inside the "
                             f"directory")
        if not isinstance(digest, str) or not SHA256_HEX.fullmatch(digest):
            raise InputError(f"{path}: 'files' entry {_short(name)} is not a sha256 digest: {_short(digest)}")
    return files


def _check_layers(manifest: dict, path: Path) -> None:
    """`kv_bits` and the per-layer `bits`, `balance`, `group_size`, `act_bits` have the right types."""
    layers = manifest.get("layers")
    if not _is_int(manifest.get("kv_bits")) or not isinstance(layers, dict):
        raise InputError(f"{path}: 'kv_bits' must be an integer and 'layers' a mapping")
    for name, meta in layers.items():
        if not isinstance(meta, dict):
            raise InputError(f"{path}: layer {_short(name)} is not a mapping")
        group = meta.get("group_size")
        if not (_is_int(meta.get("bits")) and _is_int(meta.get("act_bits"))
                and isinstance(meta.get("balance"), bool) and (group is None or _is_int(group))):
            raise InputError(f"{path}: layer {_short(name)} needs integer bits and act_bits, boolean balance "
                             f"and integer or null group_size")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _required_files(directory: Path, fmt: object) -> list[str]:
    """Files of `directory` that its format's reader loads, so the manifest must cover them: the fixed
    ones of the format, the checkpoint's weight files (hf-fakequant) and the tokenizer and generation
    files present."""
    from abqcli.models.loading import SAFETENSORS_INDEX, weight_files

    if fmt == PACKED:
        required = [CONFIG_JSON, PACKED_WEIGHTS]
    elif fmt == FAKEQUANT:
        required = [CONFIG_JSON, QUANT_STATE, *(p.name for p in weight_files(directory))]
        if (directory / SAFETENSORS_INDEX).is_file():
            required.append(SAFETENSORS_INDEX)
    else:
        return []
    return required + [name for name in READ_IF_PRESENT if (directory / name).is_file()]


def is_abq_output(path: str | os.PathLike) -> bool:
    return (Path(path) / ABQ_JSON).is_file()


def layer_meta(layers: dict[str, LayerQuant], quantized: dict[str, QuantizedWeight]) -> dict[str, dict]:
    """Per-layer metadata and statistics recorded in abq.json."""
    meta = {}
    for name, quant in sorted(layers.items()):
        codes = quantized[name].codes
        meta[name] = {
            "bits": quant.weight.bits,
            "balance": quant.weight.balance,
            "group_size": quant.weight.group_size,
            "act_bits": quant.act_bits,
            "out_features": int(codes.shape[0]),
            "in_features": int(codes.shape[1]),
            "distinct_codes_max_per_row": int(max(len(torch.unique(row)) for row in codes[:64])),
        }
    return meta


def layer_quant_from_meta(meta: dict) -> LayerQuant:
    return LayerQuant(WeightQuantSpec(meta["bits"], meta["group_size"], meta["balance"]), meta["act_bits"])


def base_manifest(fmt: str, version: int, kv_bits: int, layers: dict, provenance: dict) -> dict:
    return {
        "tool": "abq",
        "tool_version": __version__,
        "format": fmt,
        "format_version": version,
        "kv_bits": kv_bits,
        "layers": layers,
        "provenance": provenance,
    }


def write_fakequant(target: Path, model: nn.Module, tokenizer, recipe_yaml: str, kv_bits: int,
                    layers: dict[str, LayerQuant], quantized: dict[str, QuantizedWeight], provenance: dict,
                    overwrite: bool = True) -> None:
    """The `hf-fakequant` directory: loadable by plain transformers, plus the integer state."""

    def fill(tmp: Path) -> None:
        attn = model.config._attn_implementation
        model.set_attn_implementation("sdpa")  # a plain transformers load must not need abq's attention
        try:
            model.save_pretrained(tmp)
        finally:
            model.set_attn_implementation(attn)
        tokenizer.save_pretrained(tmp)
        state = {}
        for name, qw in quantized.items():
            state[f"{name}.codes"] = qw.codes.contiguous()
            state[f"{name}.scales"] = qw.scale.contiguous()
            state[f"{name}.zeros"] = qw.zero.contiguous()
        save_file(state, str(tmp / QUANT_STATE))
        (tmp / RECIPE_YAML).write_text(recipe_yaml)
        write_manifest(tmp, base_manifest(FAKEQUANT, FAKEQUANT_VERSION, kv_bits, layer_meta(layers, quantized),
                                          provenance))

    write_dir_atomically(target, fill, overwrite)


def check_format(manifest: dict, fmt: str, supported_version: int, directory: Path) -> None:
    if manifest.get("format") != fmt:
        raise InputError(f"{directory} holds format {manifest.get('format')!r}, expected {fmt!r}")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > supported_version:
        raise InputError(f"{directory} has {fmt} format_version {version}; this abq ({__version__}) reads "
                         f"up to {supported_version}: upgrade abq")


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
    check_format(manifest, FAKEQUANT, FAKEQUANT_VERSION, directory)
    states = read_quant_state(directory, manifest)
    model, tokenizer, _ = load_model(str(directory), dtype, device, as_fakequant=True)
    layers = {name: layer_quant_from_meta(meta) for name, meta in manifest["layers"].items()}
    adapter = adapter_for(model)
    for name, qlinear in wrap_linears(model, adapter, layers.get).items():
        if name not in states:
            raise InputError(f"{QUANT_STATE} in {directory} has no integer state for {name}")
        qlinear.use_integer_weight(states[name])
    set_kv_quant(model, adapter, manifest["kv_bits"])
    return model, tokenizer, manifest


# ------------------------------------------------------------------------------------------ abq-packed
#
# Appended with the packed exporter. Format `abq-packed` (docs/FORMAT.md): `model.safetensors` holds the
# BTC tensors of every quantized linear (`<name>.btc_planes|btc_scales|btc_zeros|btc_code_sums`) and
# every other tensor of the model's state dict once (tied tensors are stored under one name and listed
# in `quantization_config.tied_tensors`); `config.json` carries `quantization_config` (quant_method
# "abq", format "btc-bitplane", format_version, kv_bits, modules, tied_tensors).

PACKED = "abq-packed"
PACKED_WEIGHTS = "model.safetensors"
CONFIG_JSON = "config.json"
QUANT_METHOD = "abq"
TENSOR_FORMAT = "btc-bitplane"


def packed_layer_stats(pw) -> dict:
    """Storage of one packed linear: planes, padding, byte counts and bits per weight."""
    from abqcli.btc.format import padded_k

    n, k = pw.out_features, pw.in_features
    sizes = {
        "planes": pw.planes.numel() * 4,
        "scales": pw.scale.numel() * 4,
        "zeros": pw.zero.numel() * 4,
        "code_sums": pw.code_sums.numel() * 4,
    }
    total = sum(sizes.values())
    return {
        "planes": int(pw.planes.shape[0]),
        "padded_in_features": padded_k(k),
        "groups": pw.num_groups,
        "bytes": {**sizes, "total": total},
        "bits_per_weight": sizes["planes"] * 8 / (n * k),
        "bits_per_weight_with_overhead": total * 8 / (n * k),
    }


def _check_packable(name: str, pw, act_bits: int) -> None:
    """Activation-quantized layers must be runnable by the BTC GEMM; refuse with the reason."""
    from abqcli.btc.gemm import _check_btc_group, check_int32_bound
    from abqcli.quant.quantizer import FP_BITS, qmax_for

    if act_bits >= FP_BITS:
        return
    try:
        _check_btc_group(pw)
        check_int32_bound(pw.in_features, qmax_for(act_bits), pw.qmax)
    except ValueError as exc:
        raise InputError(f"{name}: cannot pack for the BTC GEMM: {exc}") from exc


def _unquantized_tensors(model: nn.Module, quantized: set[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every state-dict tensor outside the `quantized` linears (whose `.bias` alone is kept), on the CPU,
    each storage saved once.

    Returns (tensors, tied): a tensor that is the very same view as one already kept (tied embeddings:
    `lm_head.weight` is `embed_tokens.weight`) is left out and recorded as tied[name] = kept name;
    a tensor that overlaps another's storage in some other way is cloned (safetensors refuses shared
    storage)."""
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    seen_views: dict[tuple, str] = {}
    seen_storages: set[tuple] = set()
    for name, t in model.state_dict(keep_vars=False).items():
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
    """config.json as transformers writes it (attention set back to sdpa for the file)."""
    attn = getattr(model.config, "_attn_implementation", None)
    if attn is not None:
        model.config._attn_implementation = "sdpa"
    try:
        model.config.save_pretrained(tmp)
    finally:
        if attn is not None:
            model.config._attn_implementation = attn
    config = json.loads((tmp / CONFIG_JSON).read_text())
    config.pop("quantization_config", None)
    return config


def write_packed(target: Path, model: nn.Module, tokenizer, recipe_yaml: str, kv_bits: int,
                 layers: dict[str, LayerQuant], quantized: dict[str, QuantizedWeight], provenance: dict,
                 overwrite: bool = True) -> None:
    """The `abq-packed` directory (DESIGN §5, docs/FORMAT.md), written atomically.

    `layers` / `quantized` are keyed by full module name; the model's `<name>.weight` of those modules
    is replaced by the BTC tensors packed from `quantized[name]` (the model's own weights are not used
    for them); every other tensor of the state dict is written as it is, tied tensors once.
    """
    from abqcli.btc.format import FORMAT_VERSION, PackedWeight, packed_weight_meta, packed_weight_to_tensors

    missing = sorted(set(layers) ^ set(quantized))
    if missing:
        raise InputError(f"layers and quantized states differ for: {', '.join(missing)}")
    packed = {}
    for name in sorted(layers):
        pw = PackedWeight.from_quantized(quantized[name])
        _check_packable(name, pw, layers[name].act_bits)
        packed[name] = pw

    def fill(tmp: Path) -> None:
        tensors, tied = _unquantized_tensors(model, set(packed))
        for name, pw in packed.items():
            tensors.update(packed_weight_to_tensors(name, pw))
        # one metadata key: safetensors writes its metadata map in a per-process random order, so more
        # keys would make two identical exports differ in bytes (config.json holds the format facts)
        save_file(tensors, str(tmp / PACKED_WEIGHTS), metadata={"format": "pt"})
        modules = {name: {**packed_weight_meta(pw), "act_bits": layers[name].act_bits}
                   for name, pw in packed.items()}
        config = _model_config_dict(model, tmp)
        config["quantization_config"] = {
            "quant_method": QUANT_METHOD,
            "format": TENSOR_FORMAT,
            "format_version": FORMAT_VERSION,
            "kv_bits": kv_bits,
            "modules": modules,
            "tied_tensors": tied,
        }
        (tmp / CONFIG_JSON).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None:
            try:
                generation_config.save_pretrained(tmp)
            except (ValueError, TypeError, OSError):  # an invalid generation config is not ours to fix
                pass
        tokenizer.save_pretrained(tmp)
        (tmp / RECIPE_YAML).write_text(recipe_yaml)
        shutil.copymode(tmp / RECIPE_YAML, tmp / PACKED_WEIGHTS)  # safetensors creates it 0600
        meta = layer_meta(layers, quantized)
        for name, pw in packed.items():
            meta[name].update(packed_layer_stats(pw))
        manifest = base_manifest(PACKED, FORMAT_VERSION, kv_bits, meta, provenance)
        manifest["tensor_format"] = TENSOR_FORMAT
        write_manifest(tmp, manifest)

    write_dir_atomically(Path(target), fill, overwrite)


def pack_fakequant(src_dir: Path, out_dir: Path, overwrite: bool = False) -> Path:
    """`abq pack FAKEQUANT_DIR --output DIR`: the abq-packed export of an hf-fakequant directory.

    Uses the integer state (`quant_state.safetensors`) for the quantized linears and the checkpoint for
    everything else; the recipe and provenance are carried over (provenance gains `packed_from`).
    The output is checked (`outputs.resolve_output`: never the source, nor around or inside it) and
    locked before the model loads; it replaces only an abq output.
    """
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    manifest = read_manifest(src_dir)
    check_format(manifest, FAKEQUANT, FAKEQUANT_VERSION, src_dir)
    target = outputs.resolve_output(out_dir, [("the pack source", src_dir)])
    with outputs.output_lock(target):
        outputs.remove_stale(target)
        if target.exists() and not overwrite:
            raise InputError(f"output directory exists: {out_dir} (pass --overwrite to replace it)")
        if outputs.entries(target) and not outputs.is_abq_dir(target):
            outputs.refuse_foreign(target, out_dir)
        _pack_into(target, src_dir, manifest, overwrite)
    return out_dir


def _pack_into(out_dir: Path, src_dir: Path, manifest: dict, overwrite: bool) -> None:
    """The body of `pack_fakequant`, once its output is checked and locked."""
    from abqcli.models.loading import load_model

    states = read_quant_state(src_dir, manifest)
    layers = {name: layer_quant_from_meta(meta) for name, meta in manifest["layers"].items()}
    model, tokenizer, _ = load_model(str(src_dir), "float32", "cpu", as_fakequant=True)
    recipe_path = src_dir / RECIPE_YAML
    recipe_yaml = recipe_path.read_text() if recipe_path.is_file() else ""
    provenance = {**manifest.get("provenance", {}), "packed_from": str(src_dir)}
    write_packed(out_dir, model, tokenizer, recipe_yaml, manifest["kv_bits"], layers, states, provenance,
                 overwrite=overwrite)

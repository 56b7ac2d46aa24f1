"""The manifest every abq output directory holds, and how such a directory is written and opened.

`abq.json` records the tool version, the format and its version, the kv bits, per-layer metadata, the
provenance and the sha256 of every other file, and is sealed by `manifest_sha256` (the digest of its own
canonical content). Directories are written into a temporary sibling and swapped into place
(`outputs.replacing`), so an interrupted write never leaves a half directory behind. Reading checks the
seal, the checksums and that every file the format's reader needs is listed; opening dispatches on the
manifest's `format` through `abqcli.registry.FORMATS`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path, PurePosixPath

import torch

from abqcli import __version__, outputs
from abqcli.checksums import sha256_file
from abqcli.errors import InputError
from abqcli.formats import ABQ_JSON, OutputFormat, read_json
from abqcli.quant.hadamard import INPUT_TRANSFORMS
from abqcli.quant.quantizer import LayerQuant, QuantizedWeight, WeightQuantSpec
from abqcli.registry import FORMATS

MANIFEST_SHA256 = "manifest_sha256"
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# files that transformers' loaders read when present: the manifest must cover them too
READ_IF_PRESENT = ("generation_config.json", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt",
                   "vocab.txt", "spiece.model", "chat_template.jinja", "chat_template.json")


# ------------------------------------------------------------------------------------------- writing


def write_dir_atomically(target: Path, fill: Callable[[Path], None], overwrite: bool = True) -> None:
    """Run `fill(tmp)` on a fresh sibling directory, then swap it in as `target` (`outputs.replacing`:
    a previous `target` is removed only once the new one is complete)."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise InputError(f"output directory exists: {target} (pass --overwrite to replace it)")
    with outputs.replacing(target) as tmp:
        fill(tmp)


def base_manifest(fmt: OutputFormat, kv_bits: int, layers: dict, provenance: dict,
                  kv_transform: str | None = None, kv_clip: float = 1.0) -> dict:
    manifest = {
        "tool": "abq",
        "tool_version": __version__,
        "format": fmt.name,
        "format_version": fmt.version,
        "kv_bits": kv_bits,
        "layers": layers,
        "provenance": provenance,
    }
    return {**manifest, **kv_quantizer_keys(kv_transform, kv_clip)}


def kv_quantizer_keys(kv_transform: str | None, kv_clip: float) -> dict:
    """The optional keys of the q/k/v quantizer, each only when set: `kv_transform`, `kv_clip`
    (abq.json and abq-packed's quantization_config both carry them)."""
    keys: dict = {"kv_transform": kv_transform} if kv_transform else {}
    return {**keys, "kv_clip": kv_clip} if kv_clip != 1.0 else keys


def activation_quantizer_keys(quant: LayerQuant) -> dict:
    """The optional keys of one layer's activation quantizer, each only when set: `input_transform`,
    `act_clip` (abq.json's layers and abq-packed's quantization_config modules both carry them)."""
    keys: dict = {"input_transform": quant.input_transform} if quant.input_transform else {}
    return {**keys, "act_clip": quant.act_clip} if quant.act_clip != 1.0 else keys


def kv_transform_of(meta: dict) -> str | None:
    """A manifest's (or quantization_config's) `kv_transform`, checked: an unknown one is an InputError."""
    return _known_transform(meta.get("kv_transform"), "kv_transform")


def kv_clip_of(meta: dict) -> float:
    """A manifest's (or quantization_config's) `kv_clip`, checked (absent: 1)."""
    return clip_ratio(meta.get("kv_clip", 1.0), "kv_clip")


def _known_transform(transform: str | None, key: str) -> str | None:
    if transform is not None and transform not in INPUT_TRANSFORMS:
        raise InputError(f"unknown {key} {transform!r} (this abq knows: {', '.join(INPUT_TRANSFORMS)})")
    return transform


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
            **activation_quantizer_keys(quant),
        }
    return meta


def layer_quant_from_meta(meta: dict) -> LayerQuant:
    """A layer's quantization from its metadata; an unknown `input_transform` or an `act_clip` outside
    (0, 1] is an InputError (absent: 1, no clipping)."""
    transform = _known_transform(meta.get("input_transform"), "input_transform")
    return LayerQuant(WeightQuantSpec(meta["bits"], meta["group_size"], meta["balance"]), meta["act_bits"],
                      transform, clip_ratio(meta.get("act_clip", 1.0), "act_clip"))


def clip_ratio(value: object, key: str) -> float:
    """A metadata clip ratio, checked: a number in (0, 1], else an InputError naming `key`."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 < value <= 1.0:
        raise InputError(f"{key} must be a number above 0, up to 1, got {value!r}")
    return float(value)


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


# ------------------------------------------------------------------------------------------- reading


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
    fmt = known_format(manifest)
    if fmt is not None:  # a newer abq's manifest is refused as such, whatever else it holds
        check_format(manifest, fmt, directory)
    files = _checked_files(manifest["files"], path)
    _check_layers(manifest, path)
    for name in _required_files(directory, fmt):
        if name not in files:
            raise InputError(f"{path} does not list {name}, which the {fmt.name} reader needs: the export is "
                             f"incomplete or its manifest was edited")
    if MANIFEST_SHA256 not in manifest:
        raise InputError(f"{path} has no {MANIFEST_SHA256} (written by an older abq, or edited): export it again")
    if manifest[MANIFEST_SHA256] != manifest_digest(manifest):
        raise InputError(f"{path} was modified or is corrupted (its {MANIFEST_SHA256} does not match its "
                         f"content)")
    if verify:
        _verify_checksums(directory, files)
    return manifest


def known_format(manifest: dict) -> OutputFormat | None:
    """The registered format the manifest names; None for a format this abq does not know."""
    fmt = manifest.get("format")
    return FORMATS.load(fmt) if isinstance(fmt, str) and fmt in FORMATS else None


def check_format(manifest: dict, fmt: OutputFormat, directory: Path) -> None:
    """InputError unless the manifest is of format `fmt`, at a version this abq reads."""
    if manifest.get("format") != fmt.name:
        raise InputError(f"{directory} holds format {manifest.get('format')!r}, expected {fmt.name!r}")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > fmt.version:
        raise InputError(f"{directory} has {fmt.name} format_version {version}; this abq ({__version__}) reads "
                         f"up to {fmt.version}: upgrade abq")


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


def _required_files(directory: Path, fmt: OutputFormat | None) -> list[str]:
    """Files of `directory` that its format's reader loads, so the manifest must cover them: the
    format's own (`required_files`) and the tokenizer and generation files present."""
    if fmt is None:
        return []
    return fmt.required_files(directory) + [name for name in READ_IF_PRESENT if (directory / name).is_file()]


def _verify_checksums(directory: Path, files: dict[str, str]) -> None:
    for name, expected in files.items():
        file = directory / name
        if not file.is_file():
            raise InputError(f"missing file listed in {ABQ_JSON}: {file}")
        if sha256_file(file) != expected:
            raise InputError(f"checksum mismatch: {file} is corrupted or was modified")


# ------------------------------------------------------------------------------------------- opening


def resolve_output_dir(directory: str | Path, prefer: str = "abq-packed") -> Path:
    """An abq output directory: the path itself when it holds abq.json, else the `prefer` (then the
    other registered) format folder inside an `abq quantize` output directory."""
    path = Path(directory).expanduser()
    if (path / ABQ_JSON).is_file() or not path.is_dir():
        return path
    for sub in dict.fromkeys((prefer, *FORMATS.names())):
        if (path / sub / ABQ_JSON).is_file():
            return path / sub
    return path


def open_abq_output(directory: str | Path, dtype: str = "float32", device: str = "cpu", backend: str = "cpu"):
    """(model, tokenizer, description) of an abq output directory, opened by the format its manifest
    names: "packed BTC W4A4 (backend cpu)", "calibrated fake-quant W4A4 (abq)". An `abq quantize` output
    folder opens its abq-packed export (else its hf-fakequant one)."""
    path = resolve_output_dir(directory)
    manifest = read_manifest(path, verify=False)
    fmt = known_format(manifest)
    if fmt is None:
        expected = " or ".join(repr(name) for name in FORMATS.names())
        raise InputError(f"{path} holds abq format {manifest.get('format')!r}; expected {expected}")
    return fmt.open(path, dtype, device, backend)

"""Output formats of abq: each is one module here with one `OutputFormat` object, registered by name in
`abqcli.registry.FORMATS` (docs/ARCHITECTURE.md). `abq quantize` writes every format its recipe lists
(`output.formats`), reading an output dispatches on its manifest's `format` (`manifest.open_abq_output`),
and the recipe asks each listed format which layer schemes it can hold (`layer_problem`).

This package module is what every format shares and sits at the bottom of abq's modules (the output
rules and the model loader read its file names): the `OutputFormat` protocol, `ExportInput` (what a
writer needs) and the names of the files abq writes. It imports no format.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from torch import nn

from abqcli.errors import InputError
from abqcli.quant.quantizer import (
    FP_BITS,
    LayerQuant,
    QuantizedWeight,
    WeightQuantSpec,
    kv_label,
    scheme_label,
)

ABQ_JSON = "abq.json"  # the manifest of every output directory (formats/manifest.py)
RECIPE_YAML = "recipe.yaml"
CONFIG_JSON = "config.json"
QUANT_STATE = "quant_state.safetensors"  # the integer state of an hf-fakequant directory
QUANT_METHOD = "abq"  # config.json quantization_config.quant_method of an abq-packed directory


@dataclass(frozen=True)
class ExportInput:
    """What a format writes: the model (its quantized linears' weights already folded), its tokenizer,
    the resolved recipe text, the kv bits, and per quantized linear (full module name) its scheme and
    integer state; `provenance` is recorded as it is in abq.json; `kv_transform`: the online transform
    of q and k before their quantizer (a rotated model with quantized kv), None for none; `shards`: a
    blockwise run's `abq_packed.PackedShards`, which already holds every decoder block (the model's
    blocks are then not loaded, and `quantized` is empty): only abq-packed takes it; `kv_clip`: the clip
    ratio of the q/k/v quantizer."""

    model: nn.Module
    tokenizer: Any
    recipe_yaml: str
    kv_bits: int
    layers: dict[str, LayerQuant]
    quantized: dict[str, QuantizedWeight]
    provenance: dict
    kv_transform: str | None = None
    shards: Any = None
    kv_clip: float = 1.0


class OutputFormat(Protocol):
    """One output format: the `format` / `format_version` its manifest records, how it is written and
    opened, and what it requires."""

    name: str  # the output.formats entry, the manifest's "format" and the sub-folder of an abq quantize output
    version: int  # the newest format_version this abq writes and reads

    def layer_problem(self, weight: WeightQuantSpec, act_bits: int) -> str | None:
        """Why this format cannot hold a layer of this scheme (one sentence), or None."""

    def recipe_problem(self, rotation: str, kv_bits: int, in_features: dict[str, int],
                       layers: dict[str, LayerQuant]) -> str | None:
        """Why this format cannot hold the model as the recipe quantizes it (`calibration.rotation`, the kv
        bits, each quantized linear's input size and scheme), or None; checked before calibrating."""

    def required_files(self, directory: Path) -> list[str]:
        """The files of `directory` its reader loads, which its manifest must therefore list."""

    def write(self, target: Path, export: ExportInput, overwrite: bool = True) -> None:
        """Write the directory `target` atomically (complete or not at all)."""

    def open(self, directory: Path, dtype: str, device: str, backend: str) -> tuple[nn.Module, Any, str]:
        """(model, tokenizer, one-line description) of a directory of this format, checked."""


def read_json(path: Path) -> object:
    """A JSON file, or an InputError naming it and where it is broken."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}") from exc
    except UnicodeDecodeError as exc:
        raise InputError(f"{path} is not valid JSON: not UTF-8 text (byte {exc.start})") from exc


def is_abq_output(path: str | os.PathLike) -> bool:
    return (Path(path) / ABQ_JSON).is_file()


def describe_layers(layers: dict[str, dict], kv_bits: int) -> str:
    """Short scheme text of an export's per-layer metadata, e.g. `W4A4`, `W2*A8 (kv A8)`, `W3A16 g128`;
    mixed ones are listed most frequent first."""
    counts: dict[str, int] = {}
    acts = set()
    for meta in layers.values():
        act_bits = meta.get("act_bits", FP_BITS)
        text = scheme_label(meta["bits"], bool(meta.get("balance")), meta.get("group_size"), act_bits)
        counts[text] = counts.get(text, 0) + 1
        acts.add(act_bits)
    scheme = "/".join(sorted(counts, key=lambda t: -counts[t])) if counts else "no quantized layers"
    return scheme + kv_label(kv_bits, acts)

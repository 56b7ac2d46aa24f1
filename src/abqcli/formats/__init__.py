"""Output formats of abq: each is one module here with one `OutputFormat` object, registered by name in
`abqcli.registry.FORMATS` (docs/ARCHITECTURE.md). `abq quantize` writes every format its recipe lists
(`output.formats`), reading an output dispatches on its manifest's `format` (`manifest.open_abq_output`),
and the recipe asks each listed format which layer schemes it can hold (`layer_problem`).

This package module is what every format shares and sits at the bottom of abq's modules (the output
rules and the model loader read its file names): the `OutputFormat` protocol, `ExportInput` (what a
writer needs) and the names of the files abq writes. It imports no format.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from torch import nn

from abqcli.quant.quantizer import LayerQuant, QuantizedWeight, WeightQuantSpec

ABQ_JSON = "abq.json"  # the manifest of every output directory (formats/manifest.py)
RECIPE_YAML = "recipe.yaml"
CONFIG_JSON = "config.json"
QUANT_STATE = "quant_state.safetensors"  # the integer state of an hf-fakequant directory
QUANT_METHOD = "abq"  # config.json quantization_config.quant_method of an abq-packed directory


@dataclass(frozen=True)
class ExportInput:
    """What a format writes: the model (its quantized linears' weights already folded), its tokenizer,
    the resolved recipe text, the kv bits, and per quantized linear (full module name) its scheme and
    integer state; `provenance` is recorded as it is in abq.json."""

    model: nn.Module
    tokenizer: Any
    recipe_yaml: str
    kv_bits: int
    layers: dict[str, LayerQuant]
    quantized: dict[str, QuantizedWeight]
    provenance: dict


class OutputFormat(Protocol):
    """One output format: the `format` / `format_version` its manifest records, how it is written and
    opened, and what it requires."""

    name: str  # the output.formats entry, the manifest's "format" and the sub-folder of an abq quantize output
    version: int  # the newest format_version this abq writes and reads

    def layer_problem(self, weight: WeightQuantSpec, act_bits: int) -> str | None:
        """Why this format cannot hold a layer of this scheme (one sentence), or None."""

    def required_files(self, directory: Path) -> list[str]:
        """The files of `directory` its reader loads, which its manifest must therefore list."""

    def write(self, target: Path, export: ExportInput, overwrite: bool = True) -> None:
        """Write the directory `target` atomically (complete or not at all)."""

    def open(self, directory: Path, dtype: str, device: str, backend: str) -> tuple[nn.Module, Any, str]:
        """(model, tokenizer, one-line description) of a directory of this format, checked."""

"""The extension points of abq, each a table of name -> "module:attribute".

A new calibration method, output format or GEMM backend is one new module plus one line here
(docs/ARCHITECTURE.md). Entries are import paths, loaded on first use: the registries sit at the bottom
of the package, so the recipe can list and check names without importing the code behind them (no import
cycles), and a command loads only the plug-ins it uses.
"""

from __future__ import annotations

import importlib

from abqcli.errors import InputError


class Registry:
    """Named plug-ins of one kind, loaded lazily from their import paths."""

    def __init__(self, kind: str, entries: dict[str, str]):
        self.kind = kind
        self._entries = dict(entries)

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def load(self, name: str) -> object:
        """The plug-in registered as `name`; InputError naming the choices for an unknown one."""
        if name not in self._entries:
            raise InputError(f"unknown {self.kind} {name!r} (expected one of {', '.join(self._entries)})")
        module, _, attribute = self._entries[name].partition(":")
        return getattr(importlib.import_module(module), attribute)


# calibration.method -> a CalibrationMethod class (abqcli/quant/methods/)
METHODS = Registry("calibration method", {
    "abq": "abqcli.quant.methods.abq:AbqMethod",
    "gptq": "abqcli.quant.methods.gptq:GptqMethod",
    "rtn": "abqcli.quant.methods.rtn:RtnMethod",
})

# output.formats entry / manifest "format" -> an OutputFormat (abqcli/formats/)
FORMATS = Registry("output format", {
    "abq-packed": "abqcli.formats.abq_packed:ABQ_PACKED",
    "hf-fakequant": "abqcli.formats.hf_fakequant:HF_FAKEQUANT",
    "compressed-tensors": "abqcli.formats.compressed_tensors:COMPRESSED_TENSORS",
})

# --backend -> a GemmBackend (abqcli/btc/backends/)
BACKENDS = Registry("backend", {
    "cpu": "abqcli.btc.backends.cpu:CPU_BACKEND",
    "cupy": "abqcli.btc.backends.cupy:CUPY_BACKEND",
})

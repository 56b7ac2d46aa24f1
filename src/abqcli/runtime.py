"""Running a packed (`abq-packed`) export: `BTCLinear` modules inside an ordinary transformers model.

`load_packed(directory)` checks the manifest (sha256 of every file) and the format versions, builds the
model from `config.json` — with `quantization_config` removed from the config object before the model
is instantiated, so transformers never looks for a quantizer called "abq" — loads every unquantized
tensor from `model.safetensors`, and replaces each quantized linear with a `BTCLinear` built from its
BTC tensors. q/k/v quantization goes through abq's registered attention (`set_kv_quant`).

The same builder also gives the fake-quant twin of an export (QuantLinear with the dequantized weights
and the integer state, same tensors otherwise), which `abq verify` compares against.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from abqcli.btc.format import (
    FORMAT_VERSION,
    PackedWeight,
    packed_weight_from_tensors,
    tensor_names,
)
from abqcli.btc.gemm import btc_linear
from abqcli.errors import InputError
from abqcli.quant.quantizer import FP_BITS, LayerQuant

BACKENDS = ("cpu", "cupy")
_BTC_SUFFIXES = tuple(s for s in tensor_names("").values())


class BTCLinear(nn.Module):
    """A quantized linear that runs from its BTC bit planes.

    forward = `btc_linear(x, packed, act_bits, bias, backend)`: per-token activation quantization, exact
    integer GEMM and the affine epilogue; weight-only (A16) layers dequantize and run a float matmul.
    The packed tensors stay on the CPU (the "cupy" backend keeps its own device copy); with backend
    "cpu" an input on another device is computed on the CPU and the result moved back.
    """

    def __init__(self, packed: PackedWeight, act_bits: int, bias: torch.Tensor | None = None,
                 backend: str = "cpu"):
        super().__init__()
        if backend not in BACKENDS:
            raise InputError(f"unknown backend {backend!r} (expected one of {', '.join(BACKENDS)})")
        self.packed = packed
        self.act_bits = int(act_bits)
        self.backend = backend
        self.in_features = packed.in_features
        self.out_features = packed.out_features
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def prepare(self) -> None:
        """Build the CPU path's cached operands now rather than on the first forward."""
        if self.backend != "cpu":
            return
        if self.act_bits >= FP_BITS:
            self.packed.dequantized_f32()
        else:
            self.packed.centred_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "cpu" and x.device.type != "cpu":
            bias = None if self.bias is None else self.bias.cpu()
            return btc_linear(x.cpu(), self.packed, self.act_bits, bias, "cpu").to(x.device)
        return btc_linear(x, self.packed, self.act_bits, self.bias, self.backend)

    def extra_repr(self) -> str:
        pw = self.packed
        g = f" g{pw.group_size}" if pw.group_size else ""
        return (f"{self.in_features}->{self.out_features}, W{pw.bits}{'*' if pw.balance else ''}{g}"
                f"A{self.act_bits}, {pw.planes.shape[0]} planes, backend={self.backend}")


# ----------------------------------------------------------------------------------------- reading


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
    def kv_bits(self) -> int:
        return int(self.quant_config["kv_bits"])

    @property
    def tied(self) -> dict[str, str]:
        return dict(self.quant_config.get("tied_tensors") or {})


def resolve_output_dir(directory: str | Path, prefer: str = "abq-packed") -> Path:
    """An abq output directory: the path itself when it holds abq.json, else the `prefer` (then the
    other) format folder inside an `abq quantize` output directory."""
    from abqcli.export import ABQ_JSON, FAKEQUANT, PACKED

    path = Path(directory).expanduser()
    if (path / ABQ_JSON).is_file() or not path.is_dir():
        return path
    for sub in dict.fromkeys((prefer, PACKED, FAKEQUANT)):
        if (path / sub / ABQ_JSON).is_file():
            return path / sub
    return path


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def read_packed_export(directory: str | Path, verify: bool = True) -> PackedExport:
    """Manifest (checksums verified), format and version checks of abq.json and config.json."""
    from abqcli.export import (
        CONFIG_JSON,
        PACKED,
        QUANT_METHOD,
        TENSOR_FORMAT,
        check_format,
        read_json,
        read_manifest,
    )

    directory = Path(directory)
    manifest = read_manifest(directory, verify=verify)
    check_format(manifest, PACKED, FORMAT_VERSION, directory)
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
    if not isinstance(version, int) or version > FORMAT_VERSION:
        from abqcli import __version__

        raise InputError(f"{config_path}: {TENSOR_FORMAT} format_version {version}; this abq ({__version__}) "
                         f"reads up to {FORMAT_VERSION}: upgrade abq")
    if not isinstance(qc.get("modules"), dict) or not isinstance(qc.get("kv_bits"), int):
        raise InputError(f"{config_path}: quantization_config lacks 'modules' or 'kv_bits'")
    _check_agreement(manifest, qc, config_path)
    return PackedExport(directory, manifest, qc, config)


_AGREEING_FIELDS = ("bits", "balance", "group_size", "act_bits", "in_features", "out_features")


def _check_agreement(manifest: dict, quant_config: dict, config_path: Path) -> None:
    """config.json's quantization_config (what the runtime builds from) and abq.json (what was
    exported, and what the checksums seal) describe the same quantization; else InputError naming the
    first layer and field that differ."""
    from abqcli.export import ABQ_JSON

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
    if quant_config["kv_bits"] != manifest["kv_bits"]:
        raise InputError(f"{where} on kv_bits: {quant_config['kv_bits']!r} in {config_path.name}, "
                         f"{manifest['kv_bits']!r} in {ABQ_JSON}")


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
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
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


def _build(directory: str | Path, dtype: str, device: str, backend: str, mode: str, verify: bool = True):
    """(model, tokenizer, export): the packed model (mode "packed") or its fake-quant twin ("fakequant")."""
    from abqcli.export import PACKED_WEIGHTS
    from abqcli.models.loading import (
        ModelSource,
        check_tokenizer_files,
        load_tensors,
        load_tokenizer,
        name_list,
        torch_dtype,
    )
    from abqcli.quant.fakequant import QuantLinear, set_kv_quant

    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r} (expected one of {', '.join(BACKENDS)})")
    dt = torch_dtype(dtype)
    export = read_packed_export(resolve_output_dir(directory), verify=verify)
    directory = export.directory
    check_tokenizer_files(str(directory), directory)
    tensors = load_tensors(directory / PACKED_WEIGHTS)
    model, adapter = _instantiate(export, dt)

    replaced = set()
    for name, meta in sorted(export.modules.items()):
        pw = packed_weight_from_tensors(name, tensors, meta)
        act_bits = int(meta.get("act_bits", FP_BITS))
        bias = tensors.get(f"{name}.bias")
        if mode == "packed":
            module = BTCLinear(pw, act_bits, bias, backend)
        else:
            linear = nn.Linear(pw.in_features, pw.out_features, bias=bias is not None, dtype=dt)
            with torch.no_grad():
                linear.weight.copy_(pw.dequantized_f32())
                if bias is not None:
                    linear.bias.copy_(bias)
            module = QuantLinear(linear, LayerQuant(pw.spec, act_bits))
            module.use_integer_weight(pw.to_quantized())
        _replace(model, name, module)
        replaced.add(f"{name}.weight")

    rest = {k: v for k, v in tensors.items() if not k.endswith(_BTC_SUFFIXES)}
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
    set_kv_quant(model, adapter, export.kv_bits)
    model.eval().to(device)
    if mode == "packed":
        for module in model.modules():
            if isinstance(module, BTCLinear):
                module.prepare()
    tokenizer = load_tokenizer(ModelSource(str(directory), str(directory)))
    model.abq_quantization_config = export.quant_config
    return model, tokenizer, export


def load_packed(directory: str | Path, dtype: str = "float32", device: str = "cpu", backend: str = "cpu"):
    """(model, tokenizer, manifest) of an abq-packed directory: a runnable transformers model whose
    quantized linears are `BTCLinear` modules; refuses bad input with an InputError."""
    if backend == "cupy":
        require_backend(backend)
    model, tokenizer, export = _build(directory, dtype, device, backend, "packed")
    return model, tokenizer, export.manifest


def load_fakequant_twin(directory: str | Path, dtype: str = "float32", device: str = "cpu", verify: bool = True):
    """(model, tokenizer, manifest): the same export as a fake-quant model (QuantLinear with the
    dequantized weights, same activation and kv quantization) — the reference `abq verify` uses."""
    model, tokenizer, export = _build(directory, dtype, device, "cpu", "fakequant", verify=verify)
    return model, tokenizer, export.manifest


def require_backend(backend: str) -> None:
    """InputError unless `backend` can run here (cupy: CuPy and an sm_80+ GPU)."""
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r} (expected one of {', '.join(BACKENDS)})")
    if backend == "cupy":
        from abqcli.btc import cuda as btc_cuda

        ok, reason = btc_cuda.available()
        if not ok:
            if reason.startswith("the GPU is sm_"):
                raise InputError(f"--backend cupy: {reason}; use --backend cpu")
            raise InputError(btc_cuda.NEEDS_GPU)


# ------------------------------------------------------------------------------------- open outputs


def describe_layers(modules: dict[str, dict], kv_bits: int) -> str:
    """Short scheme text of an export, e.g. `W4A4`, `W2*A8 (kv A8)`, `W3A16 g128`; mixed ones are
    listed most frequent first."""
    counts: dict[str, int] = {}
    acts = set()
    for meta in modules.values():
        text = f"W{meta['bits']}{'*' if meta.get('balance') else ''}A{meta.get('act_bits', FP_BITS)}"
        if meta.get("group_size"):
            text += f" g{meta['group_size']}"
        counts[text] = counts.get(text, 0) + 1
        acts.add(meta.get("act_bits", FP_BITS))
    if not counts:
        scheme = "no quantized layers"
    else:
        scheme = "/".join(sorted(counts, key=lambda t: -counts[t]))
    if kv_bits < FP_BITS or acts != {kv_bits}:
        scheme += f" (kv A{kv_bits})"
    return scheme


def open_abq_output(directory: str | Path, dtype: str = "float32", device: str = "cpu", backend: str = "cpu"):
    """(model, tokenizer, mode) of an abq output directory, dispatched on its manifest's format:
    `abq-packed` -> `load_packed` ("packed BTC W4A4 (backend cpu)"), `hf-fakequant` -> `open_fakequant`
    ("calibrated fake-quant W4A4 (abq)"). An `abq quantize` output folder opens its abq-packed export
    (else its hf-fakequant one)."""
    from abqcli.export import FAKEQUANT, PACKED, open_fakequant, read_manifest

    path = resolve_output_dir(directory)
    fmt = read_manifest(path, verify=False).get("format")
    if fmt == PACKED:
        model, tokenizer, manifest = load_packed(path, dtype, device, backend)
        scheme = describe_layers(model.abq_quantization_config["modules"], manifest["kv_bits"])
        return model, tokenizer, f"packed BTC {scheme} (backend {backend})"
    if fmt == FAKEQUANT:
        model, tokenizer, manifest = open_fakequant(path, dtype, device)
        scheme = describe_layers(manifest["layers"], manifest["kv_bits"])
        method = manifest.get("provenance", {}).get("method", "abq")
        return model, tokenizer, f"calibrated fake-quant {scheme} ({method})"
    raise InputError(f"{path} holds abq format {fmt!r}; expected {PACKED!r} or {FAKEQUANT!r}")

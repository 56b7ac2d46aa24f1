"""Perplexity by the GPTQ/ABQ protocol (DESIGN §7).

The test text is tokenised once as one string; non-overlapping windows of `seqlen` tokens (remainder
dropped); within each window every token after the first is scored; PPL = exp(mean NLL).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from abqcli.errors import InputError, RunError


@dataclass
class PerplexityResult:
    """Every protocol field printed and recorded with a perplexity."""

    ppl: float
    dataset: str
    data_file: str
    data_sha256: str
    seqlen: int
    windows: int
    tokens_scored: int
    bos: str
    model: str
    mode: str
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def window_nll(model: nn.Module, window: torch.Tensor) -> tuple[float, int]:
    """Summed NLL (float64) and number of scored tokens for one [1, T] window."""
    logits = model(window).logits[0, :-1].float()
    nll = F.cross_entropy(logits, window[0, 1:], reduction="sum")
    return nll.double().item(), window.shape[1] - 1


def perplexity(
    model: nn.Module,
    segments: torch.Tensor,
    device: str | torch.device = "cpu",
    on_window: Callable[[int, float], None] | None = None,
) -> tuple[float, int, float]:
    """(ppl, tokens scored, seconds) over [n, seqlen] segments; `on_window(i, running_ppl)` after each."""
    total_nll, total_tokens = 0.0, 0
    start = time.perf_counter()
    for i, window in enumerate(segments):
        nll, count = window_nll(model, window.unsqueeze(0).to(device))
        if not math.isfinite(nll):
            raise RunError(f"non-finite loss on window {i}: the model produces NaN/inf logits")
        total_nll += nll
        total_tokens += count
        if on_window is not None:
            on_window(i, math.exp(total_nll / total_tokens))
    return math.exp(total_nll / total_tokens), total_tokens, time.perf_counter() - start


def resolve_device(device: str, name: str = "--device") -> str:
    """The torch device for a device option (`name` says which, for the message): `auto` -> cuda when a
    GPU is visible, else cpu; `cuda` / `cuda:N` only when GPU N is visible here. Anything else is an
    InputError, raised before any model loads."""
    from abqcli.recipe import DEVICE_CHOICES, DEVICE_RE, show_value

    if not (isinstance(device, str) and DEVICE_RE.fullmatch(device)):
        raise InputError(f"{name}: expected one of: {', '.join(DEVICE_CHOICES)}, got {show_value(device)}")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device == "auto":
        return "cuda" if count else "cpu"
    if device == "cpu":
        return device
    index = int(device.partition(":")[2] or 0)
    if index >= count:
        visible = f"{count} CUDA device(s) visible (cuda:0..cuda:{count - 1})" if count else "no CUDA device"
        raise InputError(f"{name} {device}: {visible} on this machine (use auto or cpu)")
    return f"cuda:{index}" if ":" in device else device


@dataclass
class OpenedModel:
    model: nn.Module
    tokenizer: object
    source: str  # where the weights came from
    mode: str  # fp | fake-quant RTN ... | calibrated ... | packed ...


def open_model(name, dtype, device, recipe=None, backend="cpu", check_config=None) -> OpenedModel:
    """The model to evaluate: FP, RTN fake-quant of an FP model under `recipe`, or an abq export."""
    from abqcli.formats import is_abq_output
    from abqcli.formats.manifest import open_abq_output, resolve_output_dir
    from abqcli.models.adapters import adapter_for
    from abqcli.models.loading import load_model
    from abqcli.quant.fakequant import apply_rtn
    from abqcli.quant.rotations import NONE, rotate_model
    from abqcli.recipe import describe

    if Path(name).is_dir() and is_abq_output(resolve_output_dir(name)):
        if recipe is not None:
            raise InputError(f"{name} is already quantized: drop --recipe/--scheme")
        model, tokenizer, mode = open_abq_output(name, dtype, device, backend)
        if check_config is not None:
            check_config(model.config)
        return OpenedModel(model, tokenizer, str(name), mode)
    model, tokenizer, source = load_model(name, dtype, device, check_config, for_quantization=recipe is not None)
    if recipe is None:
        return OpenedModel(model, tokenizer, source.describe(), "fp")
    from abqcli.recipe_checks import check_recipe_fits

    adapter = adapter_for(model)
    check_recipe_fits(recipe, model, adapter)  # the checks of abq quantize, before any weight is rounded
    cal = recipe.calibration
    rotation = rotate_model(model, adapter, cal.rotation, cal.seed, lambda name: recipe.layer_quant(name) is not None,
                            recipe.kv_bits)
    apply_rtn(model, adapter, rotation.layer_quant(recipe.layer_quant), recipe.kv_bits, rotation.kv_transform,
              recipe.kv_clip)
    rotated = f", {cal.rotation} rotation" if cal.rotation != NONE else ""
    return OpenedModel(model, tokenizer, source.describe(), f"fake-quant RTN {describe(recipe)}{rotated}")


@dataclass
class EvalRequest:
    """Everything `abq eval` needs; `recipe` None means the FP model."""

    model: str
    dataset: str = "wikitext2"
    data_dir: str | None = None
    seqlen: int = 2048
    limit: int | None = None
    device: str = "auto"
    dtype: str = "float32"
    recipe: Recipe | None = None  # noqa: F821 - imported lazily to keep this module light
    backend: str = "cpu"


def check_seqlen(seqlen: int, config) -> None:
    context = getattr(config, "max_position_embeddings", None)
    if seqlen < 2:
        raise InputError(f"seqlen must be at least 2, got {seqlen}")
    if context is not None and seqlen > context:
        raise InputError(f"seqlen {seqlen} is longer than the model's context ({context} tokens)")


def run_eval(req: EvalRequest, on_window: Callable[[int, int, float], None] | None = None,
             on_status: Callable[[str], None] | None = None) -> PerplexityResult:
    """Load, optionally fake-quantize (RTN) or open a quantized export, and measure perplexity.

    For progress display: `on_status(text)` once the model is loaded and the windows are cut (every input
    check has passed by then, so a refused input prints only its error line), `on_window(i, n,
    running_ppl)` after each window.
    """
    from abqcli import data

    if req.limit is not None and req.limit < 1:
        raise InputError(f"--limit must be at least 1, got {req.limit}")
    device = resolve_device(req.device)
    text = data.load_text(req.dataset, "test", req.data_dir)  # fail on bad data before loading weights
    opened = open_model(req.model, req.dtype, device, recipe=req.recipe, backend=req.backend,
                        check_config=lambda cfg: check_seqlen(req.seqlen, cfg))
    ids, has_bos = data.tokenize(opened.tokenizer, text.text)
    segments = data.eval_segments(ids, req.seqlen, req.limit)
    n = segments.shape[0]
    if on_status is not None:
        on_status(f"loaded {req.model} ({opened.mode}): scoring {n} windows of {req.seqlen} tokens")
    callback = (lambda i, ppl: on_window(i, n, ppl)) if on_window else None
    ppl, tokens, seconds = perplexity(opened.model, segments, device, callback)
    return PerplexityResult(
        ppl=ppl,
        dataset=req.dataset,
        data_file=text.origin,
        data_sha256=text.sha256,
        seqlen=req.seqlen,
        windows=n,
        tokens_scored=tokens,
        bos="BOS prepended once to the whole text" if has_bos else "no BOS added (tokenizer default)",
        model=opened.source,
        mode=opened.mode,
        seconds=seconds,
    )

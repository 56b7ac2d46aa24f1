"""Recipes: what to quantize and how (DESIGN §3).

A recipe is a YAML mapping, validated on load by the pydantic schema below. Unknown keys are errors,
types are checked strictly (`true` is not an integer, `"4"` is not an integer) and every problem is
reported as one `InputError` whose message names the key path, the bad value and what was expected::

    recipe.yaml: calibration.lwc.lr: expected a positive number, got 'abc'
    recipe.yaml: overrides."*.down_proj".weights.bits: expected an integer from 1 to 8, got 9

Entry points:

* `load_recipe(spec, sets)` -- a preset name (`w4a4`, `w2*a8`, see `PRESETS`) or a YAML file, with
  `--set key.path=value` overrides applied before validation;
* `recipe_from_dict(data, source)` -- validate an already-parsed mapping;
* `apply_sets(data, sets)` -- the `--set` mechanics on a plain dict;
* `dump_recipe(recipe)` -- the resolved recipe as YAML (written into every output directory); it loads
  back to an equal `Recipe`.

A scheme string `w{1..8}[*]a{4..16}` sets `weights.bits`, `weights.balance` (the `*`, 2-bit only) and
`activations.bits`; fields written explicitly under `weights` / `activations` override the scheme.
Per-module settings come from `ignore` (glob patterns left in full precision) and `overrides` (glob
pattern -> partial `weights` / `activations` settings, applied in the order written, later ones winning);
`Recipe.layer_quant(name)` resolves them for one module.

The schema: each section is a frozen pydantic dataclass (constructed by keyword or position, like the
plain dataclasses it replaces) whose fields have a checked type (`_int`, `_number`, `_text`,
`_choice`, ...) carrying its bounds and the words of its error message; a new option is one field.
Strictness sits in those types (`Strict()`), not in the config: a strict config would accept only
instances, not mappings, for the nested sections. Pydantic reports every problem; `_input_error` turns
the first one, in the order a reader meets them, into the one-line message. What no single field can
check (bit balance needs 2 bits; each listed output format's `layer_problem`) is checked after.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import fnmatch
import json
import re
import reprlib
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, ConfigDict, Field, Strict, TypeAdapter, ValidationError, WrapValidator
from pydantic.dataclasses import dataclass
from pydantic_core import PydanticCustomError
from typing_extensions import TypedDict  # pydantic reads typing.TypedDict only from Python 3.12

from abqcli.errors import InputError
from abqcli.quant.quantizer import FP_BITS, LayerQuant, WeightQuantSpec, kv_label, scheme_label
from abqcli.quant.rotations import ROTATIONS
from abqcli.registry import FORMATS, METHODS

__all__ = [
    "DEVICE_CHOICES",
    "DTYPES",
    "PRESETS",
    "ROUNDINGS",
    "ActivationSpec",
    "CalibrationSpec",
    "CompensationSpec",
    "EvalSpec",
    "FinetuneSpec",
    "GptqSpec",
    "KVSpec",
    "LETSpec",
    "LWCSpec",
    "LayerOverride",
    "LayerQuant",
    "LearnedRoundingSpec",
    "LossSpec",
    "ModelSpec",
    "OutputSpec",
    "Recipe",
    "WeightSpec",
    "apply_sets",
    "default_epochs",
    "describe",
    "dump_recipe",
    "load_recipe",
    "parse_scheme",
    "recipe_from_dict",
    "show_value",
]

DTYPES = ("float32", "float16", "bfloat16")
SCALE_DTYPES = ("float16", "float32")  # the precision a weight scale is computed in and stored with
ROUNDINGS = ("nearest", "gptq", "learned")  # calibration.rounding: how a (folded) weight becomes codes
DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")
LOADINGS = ("full", "blockwise")  # model.loading
# calibration.cache: the activation caches in RAM, in memory-mapped files under the output, or on disk
# when they exceed the memory budget (--max-memory); calibration.cache_dtype: the model's dtype or float32
CACHE_PLACES = ("auto", "memory", "disk")
CACHE_DTYPES = ("model", "float32")
FINETUNE_SCHEDULES = ("constant", "cosine")  # finetune.schedule: the learning rate over the steps
# finetune.data: the stage's windows: the block loop's (calibration), or new ones of the same text that
# share no token with them (heldout), steps x batch_size of them, each seen once
FINETUNE_DATA = ("calibration", "heldout")
# calibration.loss.targets: the outputs the block's MSE and cosine terms compare Y_q with: Y_1 (the FP
# block on the FP-chain input) and Y_2 (the FP block on the quantized-chain input), or one of them
LOSS_TARGETS = ("both", "fp_chain", "quantized_chain")
AUTOCASTS = ("none", "bfloat16", "auto")  # calibration.autocast: the dtype of ABQ's training passes
# (auto: bfloat16 where the device multiplies in bf16 natively, else none; `recipe_checks.resolve_autocast`)
DEVICE_RE = re.compile(r"auto|cpu|cuda(:\d+)?")

W_BITS_MIN, W_BITS_MAX = 1, 8
A_BITS_MIN, A_BITS_MAX = 4, 16

# Upper bounds far above any real run, so that a typo (or 1e23) is refused here, not deep in torch.
MAX_NSAMPLES = 1_000_000
MAX_SEQLEN = 1 << 20  # tokens per window
MAX_BATCH_SIZE = MAX_NSAMPLES
MAX_EPOCHS = 10_000
MAX_FINETUNE_STEPS = 1_000_000
MAX_GROUP_SIZE = 1 << 20  # input features of one linear
MAX_BLOCKS = 10_000  # compensation.first / last count decoder blocks
MAX_SEED = 2**32 - 1  # numpy / torch seed range
MAX_NUMBER = 1e300  # learning rates and factors stay far inside float range
MAX_YAML_VALUES = 100_000  # values in a recipe after alias expansion; real recipes have a few hundred
SHOW_LIMIT = 60  # characters of a user's value quoted in an error message

# (weight bits, activation bits) whose reference recipes train for 40 epochs; the rest use 20.
# Bit balance (W2*) does not change the count.
LONG_EPOCH_SCHEMES = frozenset({(2, 16), (2, 8), (2, 6), (8, 8)})
EPOCHS_LONG = 40
EPOCHS_SHORT = 20

_PRESET_ABITS = (4, 6, 8, 16)
PRESETS: tuple[str, ...] = tuple(f"w{w}a{a}" for w in range(2, 9) for a in _PRESET_ABITS) + tuple(
    f"w2*a{a}" for a in _PRESET_ABITS
)
"""Preset names accepted by `load_recipe`: `w2a4` ... `w8a16` and the balanced `w2*a4` ... `w2*a16`.
A preset is the default recipe with that scheme."""


# --------------------------------------------------------------------------------------------------
# Values in messages
# --------------------------------------------------------------------------------------------------

_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _bounded_repr() -> reprlib.Repr:
    """repr that looks at a few items per level and a few levels only: formatting a value into an error
    costs the same for a 9^9-element alias bomb as for `[1, 2]`."""
    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxtuple, r.maxdict, r.maxset, r.maxfrozenset = 3, 8, 8, 6, 8, 8
    r.maxstring = r.maxother = r.maxlong = SHOW_LIMIT
    return r


_REPR = _bounded_repr()


def show_value(value: object, limit: int = SHOW_LIMIT) -> str:
    """A user's value as they would recognise it, at most about `limit` characters: YAML spelling for
    null/booleans, a bounded repr otherwise. Every user value formatted into a message goes through this."""
    if value is None:
        return "null"
    if value is True or value is False:
        return "true" if value else "false"
    if isinstance(value, Mapping):
        prefix = "a mapping "
    elif isinstance(value, (list, tuple)):
        prefix = "a list "
    else:
        prefix = ""
    text = _REPR.repr(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return prefix + text


def _fmt_key(key: object) -> str:
    if isinstance(key, str) and len(key) <= SHOW_LIMIT:
        return key if _PLAIN_KEY.fullmatch(key) else json.dumps(key)
    return show_value(key)


def _fmt_path(path: Sequence[object]) -> str:
    return ".".join(_fmt_key(k) for k in path) if path else "(top level)"


# --------------------------------------------------------------------------------------------------
# Field types: pydantic's checks plus the words of the message when they fail
# --------------------------------------------------------------------------------------------------

_PROBLEM = "abq_problem"  # the pydantic error type of a problem already worded for the user


def _problem(text: str, at: object = None) -> PydanticCustomError:
    """An error worded for the user; `at` names an item of the value (`output.formats.1`)."""
    return PydanticCustomError(_PROBLEM, "{problem}", {"problem": text, "at": at})


def _on_error(describe: Callable[[object], str], items: bool = False) -> WrapValidator:
    """Replace whatever the checks inside report about a value by `describe(value)`. With `items`, the
    type holds items (a list, a mapping) whose own errors are kept, each at its own key path."""

    def wrap(value: object, handler: Callable[[object], object]) -> object:
        try:
            return handler(value)
        except ValidationError as err:
            errors = err.errors(include_url=False)
            if any(e["type"] == _PROBLEM or (items and e["loc"]) for e in errors):
                raise
            raise _problem(describe(value)) from None

    return WrapValidator(wrap)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _expect(expected: str, cap: int | None = None, number: bool = False,
            items: bool = False) -> WrapValidator:
    """`expected <expected>, got <value>`. `cap` is a sanity bound, named only for an integer above it;
    `number` explains a quoted number such as '1e-3'."""

    def describe(value: object) -> str:
        text = expected + (f" up to {cap}" if cap is not None and _is_int(value) and value > cap else "")
        text = f"expected {text}, got {show_value(value)}"
        if number and isinstance(value, str) and _EXP_FLOAT.match(value.strip()):
            text += " (a string, not a number: write it unquoted, e.g. 1.0e-2)"
        return text

    return _on_error(describe, items)


def _check(ok: Callable[[Any], object]) -> AfterValidator:
    """A check pydantic has no constraint for; its failure is worded by the `_expect` around it."""

    def check(value: Any) -> Any:
        if not ok(value):
            raise ValueError("check failed")
        return value

    return AfterValidator(check)


def _int(lo: int, hi: int | None = None, cap: int | None = None) -> Any:
    """An integer (not a bool, not a float such as 1e23 or 1.0) from `lo` to `hi`, or from `lo` (0 or 1)
    up to the sanity bound `cap`."""
    if hi is not None:
        return Annotated[int, Strict(), Field(ge=lo, le=hi), _expect(f"an integer from {lo} to {hi}")]
    expected = {0: "a non-negative integer", 1: "a positive integer"}[lo]
    return Annotated[int, Strict(), Field(ge=lo, le=cap), _expect(expected, cap)]


def _number(expected: str, **bounds: float) -> Any:
    """A finite int or float, read as a float, within `bounds` (pydantic's gt / ge / lt / le)."""
    bounds = {"gt": -MAX_NUMBER, "lt": MAX_NUMBER, **bounds}
    return Annotated[float, Strict(), Field(allow_inf_nan=False, **bounds), _expect(expected, number=True)]


def _text(expected: str) -> Any:
    """A string that is not blank."""
    return Annotated[str, Strict(), _check(str.strip), _expect(expected)]


def _choice(choices: Sequence[str]) -> Any:
    """One of `choices`, compared exactly."""
    return Annotated[str, Strict(), _check(lambda v: v in choices), _expect(f"one of: {', '.join(choices)}")]


def _listed_once(items: list[str]) -> list[str]:
    for i, item in enumerate(items):
        if item in items[:i]:
            raise _problem(f"{item!r} is listed twice", at=i)
    return items


def _scheme(text: str) -> str:
    parsed, reason = _scheme_problem(text)
    if parsed is None:
        raise _problem(f"invalid scheme {show_value(text)}: {reason}")
    return text.lower()


Flag = Annotated[bool, Strict(), _expect("true or false")]
WeightBits = _int(W_BITS_MIN, W_BITS_MAX)
ActBits = _int(A_BITS_MIN, A_BITS_MAX)
GroupSize = Annotated[Annotated[int, Strict(), Field(gt=0, le=MAX_GROUP_SIZE)] | None,
                      _expect(f"null (per channel) or a positive integer up to {MAX_GROUP_SIZE}")]
Rate = _number("a positive number", gt=0)
ClipRatio = _number("a number above 0, up to 1", gt=0.0, le=1.0)
Name = _text("a non-empty string")
Names = Annotated[list[Name], Strict(), _expect("a list of strings", items=True)]
Scheme = Annotated[str, Strict(), _expect("null or a scheme such as w4a16 or w2*a8"), AfterValidator(_scheme)]
Pattern = Annotated[str, Strict(), _check(str.strip),
                    _on_error(lambda _: "expected a glob pattern over module names (a non-empty string)")]
Formats = Annotated[list[_choice(FORMATS.names())], Strict(), Field(min_length=1),
                    _expect(f"a non-empty list of: {', '.join(FORMATS.names())}", items=True),
                    AfterValidator(_listed_once)]


# --------------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------------

_SECTION = ConfigDict(extra="forbid", frozen=True)


@dataclass(config=_SECTION)
class ModelSpec:
    """The model to quantize: an HF directory, a cached hub id, a GGUF file or `smollm2-135m`.
    `loading`: `full` loads every weight before calibrating; `blockwise` builds the model without its
    decoder blocks' weights and reads each block from the checkpoint's safetensors when the loop
    reaches it (`abqcli.models.blockwise`: memory bounded by one block, for models bigger than RAM)."""

    path: Name = "smollm2-135m"
    dtype: _choice(DTYPES) = "float32"
    loading: _choice(LOADINGS) = "full"


@dataclass(config=_SECTION)
class WeightSpec:
    """Global weight quantization. `group_size` None = one (s, z) per output row; `balance` = W2*;
    `scale_dtype`: the precision of the scales (float16 is what abq-packed stores in 16 bits; float32
    costs 16 more bits per row and group)."""

    bits: WeightBits = 4
    group_size: GroupSize = None
    balance: Flag = False  # only with bits == 2
    scale_dtype: _choice(SCALE_DTYPES) = "float16"

    def quant_spec(self) -> WeightQuantSpec:
        return WeightQuantSpec(self.bits, self.group_size, self.balance, self.scale_dtype)


@dataclass(config=_SECTION)
class ActivationSpec:
    """Per-token dynamic activation quantization at the input of every quantized linear; `clip` scales
    each token's range (QuaRot's activation clipping: 0.9 keeps 90 % of min and max, the rest saturates)."""

    bits: ActBits = FP_BITS  # FP_BITS = not quantized
    clip: ClipRatio = 1.0


@dataclass(config=_SECTION)
class KVSpec:
    """q, k, v quantization; `bits` None = same as the activations, FP_BITS = off; `clip`: the clip ratio
    of their per-token quantizer (as `activations.clip`)."""

    bits: ActBits | None = None
    clip: ClipRatio = 1.0


class WeightOverride(TypedDict, total=False):
    """The `weights` keys one override sets (a key left out keeps the earlier value)."""

    __pydantic_config__ = _SECTION
    bits: WeightBits
    group_size: GroupSize
    balance: Flag
    scale_dtype: _choice(SCALE_DTYPES)


class ActivationOverride(TypedDict, total=False):
    __pydantic_config__ = _SECTION
    bits: ActBits
    clip: ClipRatio


class LayerOverride(TypedDict, total=False):
    """One `overrides` entry: plain data holding only the keys written, in schema order."""

    __pydantic_config__ = _SECTION
    weights: WeightOverride
    activations: ActivationOverride


@dataclass(config=_SECTION)
class LWCSpec:
    """Learnable weight clipping: two factors per quantization row, sigmoid of a parameter (init)."""

    enabled: Flag = True
    lr: Rate = 1e-2
    init: _number("a finite number") = 4.0


@dataclass(config=_SECTION)
class LETSpec:
    """Learnable equivalent transformation: per-channel scales (and shifts) between linear pairs.

    `shift`: "auto" = shifts only for OPT weight-activation runs; True / False force it.
    """

    enabled: Flag = True
    lr: Rate = 5e-3
    alpha: _number("a number from 0 to 1", ge=0.0, le=1.0) = 0.5
    shift: Annotated[Literal["auto"] | Annotated[bool, Strict()], _expect("auto, true or false")] = "auto"


@dataclass(config=_SECTION)
class CompensationSpec:
    """Low-rank compensation vectors on down_proj / fc2 of the first `first` and last `last` blocks."""

    enabled: Flag = True
    first: _int(0, cap=MAX_BLOCKS) = 3
    last: _int(0, cap=MAX_BLOCKS) = 4
    lr: Rate = 1e-2


@dataclass(config=_SECTION)
class LossSpec:
    """Which distribution-correction loss terms are on (ablations), `token_normalized`: the MSE terms on
    each token's output divided by the root mean square of its target, and `targets`: the MSE and cosine
    terms against both Y_1 and Y_2 (DESIGN §4), or against one of them (`abqcli.quant.loss`)."""

    mse: Flag = True
    cosine: Flag = True
    attention_kl: Flag = True
    token_normalized: Flag = False
    targets: _choice(LOSS_TARGETS) = "both"


@dataclass(config=_SECTION)
class GptqSpec:
    """GPTQ rounding (`rounding: gptq`, `abqcli.quant.gptq`): dampening λ (a fraction of mean diag H),
    act-order (columns by decreasing diag H, with static groups), the columns per lazy-update block, and
    `sequential`: each stage of a block (q/k/v, o, gate/up, down) gets its Hessian with the stages before
    it quantized (one block pass per stage) instead of all from one pass on the float block."""

    damp: _number("a number above 0, up to 1", gt=0.0, le=1.0) = 0.01
    act_order: Flag = True
    block_size: _int(1, cap=MAX_GROUP_SIZE) = 128
    sequential: Flag = False


@dataclass(config=_SECTION)
class LearnedRoundingSpec:
    """Learned rounding (`rounding: learned`): the learning rate of the per-weight offsets in [−½, ½]."""

    lr: Rate = 5e-3


@dataclass(config=_SECTION)
class CalibrationSpec:
    """The calibration run. `epochs` None = the scheme's reference default (see `default_epochs`);
    `rounding` None = the method's own (`abq`, `rtn`: nearest; `gptq`: gptq); `rotation`: the orthogonal
    rotation applied to the model before calibration (`abqcli.quant.rotations`, docs/ROTATION.md)."""

    method: _choice(METHODS.names()) = "abq"  # abqcli.registry.METHODS
    rounding: _choice(ROUNDINGS) | None = None
    rotation: _choice(ROTATIONS) = "none"
    dataset: _text("a dataset name or a text file path") = "wikitext2"  # name or path to a text file
    nsamples: _int(1, cap=MAX_NSAMPLES) = 128
    seqlen: _int(1, cap=MAX_SEQLEN) = 2048
    seed: _int(0, MAX_SEED) = 2
    epochs: _int(1, cap=MAX_EPOCHS) | None = None
    batch_size: _int(1, cap=MAX_BATCH_SIZE) = 1
    lwc: LWCSpec = Field(default_factory=LWCSpec)
    let: LETSpec = Field(default_factory=LETSpec)
    compensation: CompensationSpec = Field(default_factory=CompensationSpec)
    loss: LossSpec = Field(default_factory=LossSpec)
    gptq: GptqSpec = Field(default_factory=GptqSpec)
    learned: LearnedRoundingSpec = Field(default_factory=LearnedRoundingSpec)
    device: Annotated[str, Strict(), _check(DEVICE_RE.fullmatch),
                      _expect(f"one of: {', '.join(DEVICE_CHOICES)}")] = "auto"
    cache: _choice(CACHE_PLACES) = "auto"  # where the activation caches live (abqcli.quant.cache)
    cache_dtype: _choice(CACHE_DTYPES) = "model"
    autocast: _choice(AUTOCASTS) = "none"  # bfloat16: the training passes' products in bf16 (abq method)
    # true: the forward-only passes of the chains (the FP block on both chains, the quantized block on its
    # chain) and the finetune stage's teacher in the dtype of the training passes too (bf16 where
    # `autocast` is or resolves to bfloat16); false: float32. The attention maps of the KL term stay float32.
    autocast_passes: Flag = False


@dataclass(config=_SECTION)
class FinetuneSpec:
    """End-to-end tuning of the weight scales after the block loop (`abqcli.quant.finetune`, docs/ROUNDING.md):
    `steps` Adam steps, each on `calibration.batch_size` calibration windows, at learning rate `lr` (of the
    relative scale steps), on the KL divergence between the FP model's next-token distribution and the
    quantized model's. Codes and zero points stay as the block loop left them. `schedule`: the learning
    rate stays `lr` (constant) or falls from `lr` to 0 along a half cosine over the steps (cosine). `data`:
    the block loop's windows (calibration), or steps x batch_size new windows of the calibration text
    that share no token with them (heldout), so that the stage sees the blocks' error on text they were
    not fitted to."""

    enabled: Flag = False
    steps: _int(1, cap=MAX_FINETUNE_STEPS) = 32
    lr: Rate = 3e-3  # SmolLM2 W4A16 g128, 32 steps of 2 x 512 tokens: 1e-3 22.394, 3e-3 22.164, 1e-2 22.737
    schedule: _choice(FINETUNE_SCHEDULES) = "constant"  # W4A16 g128: cosine 22.299 against 22.224
    data: _choice(FINETUNE_DATA) = "calibration"


@dataclass(config=_SECTION)
class OutputSpec:
    """Where results go and which artefacts are written (`abqcli.registry.FORMATS`)."""

    dir: _text("a directory path") = "out/abq"
    formats: Formats = Field(default_factory=lambda: ["abq-packed"])


@dataclass(config=_SECTION)
class EvalSpec:
    """Perplexity evaluation: dataset names (or text file paths) and window length."""

    datasets: Names = Field(default_factory=lambda: ["wikitext2"])
    seqlen: _int(1, cap=MAX_SEQLEN) = 2048


def default_epochs(weight_bits: int, act_bits: int) -> int:
    """Reference epoch count: 40 for W2A16, W2A8, W2A6, W8A8 (balanced or not), else 20."""
    return EPOCHS_LONG if (weight_bits, act_bits) in LONG_EPOCH_SCHEMES else EPOCHS_SHORT


@dataclass(config=_SECTION)
class Recipe:
    """A validated recipe. Build it with `load_recipe` / `recipe_from_dict`, which fill `epochs` in.

    `overrides` maps a glob pattern over module names to a partial setting, e.g.
    `{"*.down_proj": {"weights": {"bits": 8}}}`; see `layer_quant` for how they combine.
    """

    model: ModelSpec = Field(default_factory=ModelSpec)
    scheme: Scheme | None = None
    weights: WeightSpec = Field(default_factory=WeightSpec)
    activations: ActivationSpec = Field(default_factory=ActivationSpec)
    kv: KVSpec = Field(default_factory=KVSpec)
    ignore: Names = Field(default_factory=lambda: ["lm_head"])
    overrides: Annotated[dict[Pattern, LayerOverride], Strict(),
                         _expect("a mapping of glob pattern -> {weights: ..., activations: ...}", items=True)
                         ] = Field(default_factory=dict)
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    finetune: FinetuneSpec = Field(default_factory=FinetuneSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)

    @property
    def kv_bits(self) -> int:
        """Bits of the q/k/v quantizer: `kv.bits`, or the activation bits when that is null."""
        return self.kv.bits if self.kv.bits is not None else self.activations.bits

    @property
    def kv_clip(self) -> float:
        """The clip ratio of the q/k/v quantizer: `kv.clip`, or 1 when kv is not quantized."""
        return self.kv.clip if self.kv_bits < FP_BITS else 1.0

    @property
    def epochs(self) -> int:
        """Training epochs per block: the written value or the scheme's reference default."""
        if self.calibration.epochs is not None:
            return self.calibration.epochs
        return default_epochs(self.weights.bits, self.activations.bits)

    def matching_overrides(self, module_name: str) -> list[str]:
        """The `overrides` patterns that match `module_name`, in the order written."""
        return [p for p in self.overrides if fnmatch.fnmatchcase(module_name, p)]

    def _merged(self, patterns: Sequence[str]) -> LayerQuant:
        """The global `weights` / `activations` with the `overrides` entries of `patterns` merged over
        them in that order, each setting only the keys it writes."""
        weight, act_bits, clip = self.weights.quant_spec(), self.activations.bits, self.activations.clip
        for p in patterns:
            weight = dataclasses.replace(weight, **self.overrides[p].get("weights", {}))
            act = self.overrides[p].get("activations", {})
            act_bits, clip = act.get("bits", act_bits), act.get("clip", clip)
        clip = clip if act_bits < FP_BITS else 1.0  # a weight-only layer has no quantizer
        return LayerQuant(weight, act_bits, act_clip=clip)

    def layer_quant(self, module_name: str) -> LayerQuant | None:
        """Resolve the quantization of one linear module (full dotted name, e.g.
        `model.layers.3.mlp.down_proj`).

        Returns None when any `ignore` glob matches (the module stays in full precision). Otherwise
        starts from the global `weights` / `activations` and merges every matching `overrides` entry
        over it **in the order the patterns are written: a later pattern wins** over an earlier one
        for the keys both set; keys a pattern does not mention keep their earlier value. Patterns are
        `fnmatch` globs matched case-sensitively against the whole name (`*` also crosses dots).

        Raises InputError if the merged result of several patterns is invalid (each pattern alone is
        checked at load time).
        """
        if any(fnmatch.fnmatchcase(module_name, p) for p in self.ignore):
            return None
        patterns = self.matching_overrides(module_name)
        quant = self._merged(patterns)
        if len(patterns) > 1:
            _, problem = _layer_problem(quant, self.output.formats)
            if problem:
                where = f"overrides (module {module_name!r}, patterns {', '.join(map(show_value, patterns))})"
                raise InputError(f"{where}: {problem}")
        return quant

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form with every default filled in (epochs resolved); `dump_recipe` writes it.

        `kv.bits` and `weights.group_size` stay null when null: there null is a setting, not a gap.
        Pydantic's dump (`model_dump` for a dataclass): keys in schema order, overrides as written.
        """
        data = _RECIPE.dump_python(self)
        data["calibration"]["epochs"] = self.epochs
        return data


_RECIPE = TypeAdapter(Recipe)


def describe(recipe: Recipe) -> str:
    """Short display form, e.g. `W4A4 g128 (kv A4)`, `W2*A16`, `W4A16 (kv A8)`."""
    w, act_bits = recipe.weights, recipe.activations.bits
    return scheme_label(w.bits, w.balance, w.group_size, act_bits) + kv_label(recipe.kv_bits, {act_bits})


# --------------------------------------------------------------------------------------------------
# Schemes
# --------------------------------------------------------------------------------------------------

_SCHEME_RE = re.compile(r"w(\d+)(\*?)a(\d+)", re.IGNORECASE)


def _scheme_problem(text: str) -> tuple[tuple[int, bool, int] | None, str]:
    """(parsed, "") or (None, reason)."""
    m = _SCHEME_RE.fullmatch(text)
    if not m:
        return None, "expected w<bits>a<bits> such as w4a16, w4a4 or w2*a8"
    w, star, a = int(m.group(1)), bool(m.group(2)), int(m.group(3))
    if not W_BITS_MIN <= w <= W_BITS_MAX:
        return None, f"weight bits must be {W_BITS_MIN}..{W_BITS_MAX}, got {w}"
    if not A_BITS_MIN <= a <= A_BITS_MAX:
        return None, f"activation bits must be {A_BITS_MIN}..{A_BITS_MAX}, got {a}"
    if star and w != 2:
        return None, f"'*' (bit balance) exists only for 2-bit weights (w2*a..), not {w}-bit"
    return (w, star, a), ""


def parse_scheme(text: str) -> tuple[int, bool, int]:
    """`"w4a16"` -> (4, False, 16); `"W2*A8"` -> (2, True, 8): (weight bits, balance, activation bits).

    Case-insensitive; weight bits 1..8, activation bits 4..16, `*` only after 2. InputError otherwise.
    """
    if not isinstance(text, str):
        raise InputError(f"invalid scheme {show_value(text)}: expected a string such as w4a16")
    parsed, reason = _scheme_problem(text)
    if parsed is None:
        raise InputError(f"invalid scheme {show_value(text)}: {reason}")
    return parsed


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------

_UNKNOWN_KEY = ("unexpected_keyword_argument", "extra_forbidden", "invalid_key")  # pydantic's error types
_NOT_A_MAPPING = ("dataclass_type", "dict_type")


def _keys_at(path: Sequence[object]) -> tuple[str, ...]:
    """The keys the mapping at `path` (a key path into a recipe) may hold, in schema order."""
    node: Any = Recipe
    for key in path:
        if typing.get_origin(node) is dict:  # `overrides`: any pattern
            node = typing.get_args(node)[1]
        else:
            node = typing.get_type_hints(node)[key]
    return tuple(typing.get_type_hints(node))


def _unknown_key(path: Sequence[object]) -> str:
    keys = _keys_at(path[:-1])
    msg = f"unknown key (expected one of: {', '.join(keys)})"
    key = path[-1]
    if isinstance(key, str) and len(key) <= SHOW_LIMIT:
        close = difflib.get_close_matches(key, keys, n=1)
        if close:
            msg += f"; did you mean {close[0]!r}?"
    return msg


def _first_error(errors: list[dict[str, Any]]) -> dict[str, Any]:
    """The problem reported: pydantic lists a mapping's fields, in schema order, before its unknown
    keys; the message names an unknown key before the values of its mapping, as a reader meets them
    (the outermost one first)."""
    first = errors[0]
    at = first["loc"][:-2] if first["loc"][-1:] == ("[key]",) else first["loc"]  # a bad key, not its value
    unknown = [e for e in errors if e["type"] in _UNKNOWN_KEY and at[: len(e["loc"]) - 1] == e["loc"][:-1]]
    return min(unknown, key=lambda e: len(e["loc"]), default=first)


def _input_error(err: ValidationError, source: str) -> InputError:
    """The first problem of a pydantic ValidationError as one line `source: key.path: problem`."""
    e = _first_error(err.errors(include_url=False))
    path = list(e["loc"])
    if path[-1:] == ["[key]"]:  # the pattern of an `overrides` entry
        path = [*path[:-2], e["input"]]
    elif e["type"] == "invalid_key":  # a key that is not a string, which pydantic's path spells as text
        path[-1] = e["input"]
    if e["type"] == _PROBLEM:
        if e["ctx"]["at"] is not None:
            path.append(e["ctx"]["at"])
        problem = e["ctx"]["problem"]
    elif e["type"] in _UNKNOWN_KEY:
        problem = _unknown_key(path)
    elif e["type"] in _NOT_A_MAPPING:
        problem = f"expected a mapping, got {show_value(e['input'])}"
    else:  # a check without its own wording
        problem = f"{e['msg']}, got {show_value(e['input'])}"
    return InputError(f"{source}: {_fmt_path(path)}: {problem}")


def _with_scheme(data: dict) -> dict:
    """A valid `scheme` written as the weights / activations it stands for, under the keys written
    explicitly (an invalid one is left for the schema to report)."""
    scheme = data.get("scheme")
    if not isinstance(scheme, str) or _scheme_problem(scheme)[0] is None:
        return data
    bits, balance, act_bits = parse_scheme(scheme)
    out, weights, activations = dict(data), data.get("weights", {}), data.get("activations", {})
    if isinstance(weights, Mapping):
        out["weights"] = {"bits": bits, "balance": balance, **weights}
    if isinstance(activations, Mapping):
        out["activations"] = {"bits": act_bits, **activations}
    return out


def _layer_problem(quant: LayerQuant, formats: Sequence[str]) -> tuple[str, str]:
    """(weights key, why) one layer's scheme cannot be used, or ("", ""): bit balance needs 2 bits, and
    each listed output format must be able to hold the layer (its `layer_problem`; reported at
    `weights.group_size`, what abq-packed's rule is about)."""
    w = quant.weight
    if w.balance and w.bits != 2:
        return "balance", (f"bit balance (W2*) needs weights.bits == 2, got balance true with bits {w.bits} "
                           f"(set weights.balance: false)")
    for fmt in formats:
        problem = FORMATS.load(fmt).layer_problem(w, quant.act_bits)
        if problem:
            return "group_size", problem
    return "", ""


def _check_combinations(recipe: Recipe, written_weights: Mapping, source: str, formats: Sequence[str]) -> None:
    """The global scheme, then each override merged over it on its own, must be usable (and each of
    `formats` able to hold it)."""
    key, problem = _layer_problem(recipe._merged([]), formats)
    if problem:
        if key == "balance" and recipe.scheme is not None and "balance" not in written_weights:
            problem += f"; balance came from scheme {show_value(recipe.scheme)}"
        raise InputError(f"{source}: weights.{key}: {problem}")
    for pattern in recipe.overrides:
        _, problem = _layer_problem(recipe._merged([pattern]), formats)
        if problem:
            raise InputError(f"{source}: {_fmt_path(['overrides', pattern])}: merged over the global "
                             f"settings: {problem}")


def recipe_from_dict(data: object, source: str = "recipe", for_export: bool = True) -> Recipe:
    """Validate parsed recipe data and build a `Recipe` with every default filled in.

    `source` prefixes every error message (a file name, a preset name). Raises one InputError for the
    first problem found: unknown key, wrong type or range, or an invalid combination. `for_export=False`
    is for a recipe that only fake-quantizes (`abq eval`): it writes no output, so no format's
    `layer_problem` applies to it.
    """
    if not isinstance(data, Mapping):
        raise InputError(f"{source}: expected a mapping at the top level, got {show_value(data)}")
    data = dict(data)
    try:
        recipe = _RECIPE.validate_python(_with_scheme(data))
    except ValidationError as err:
        raise _input_error(err, source) from None
    _check_combinations(recipe, data.get("weights", {}), source, recipe.output.formats if for_export else ())
    if recipe.calibration.epochs is None:
        calibration = dataclasses.replace(recipe.calibration, epochs=recipe.epochs)
        recipe = dataclasses.replace(recipe, calibration=calibration)
    return recipe


# --------------------------------------------------------------------------------------------------
# YAML, files, --set
# --------------------------------------------------------------------------------------------------

# YAML 1.1 (PyYAML) reads `1e-2` as a string; recipes are full of learning rates, so abq's loader also
# reads exponent floats without a dot, and its dumper quotes strings that would otherwise turn into them.
_EXP_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
_FLOAT_TAG = "tag:yaml.org,2002:float"


class _Loader(yaml.SafeLoader):
    """SafeLoader + exponent floats without a dot + duplicate keys are errors."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: set = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    dup = key in seen
                    seen.add(key)
                except TypeError:  # unhashable key: PyYAML reports it below
                    continue
                if dup:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"found duplicate key {show_value(key)}", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


class _Dumper(yaml.SafeDumper):
    """SafeDumper that quotes strings `_Loader` would read as numbers; no aliases."""

    def ignore_aliases(self, data):
        return True


for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver(_FLOAT_TAG, _EXP_FLOAT, list("-+0123456789."))


def _yaml_error_text(err: yaml.YAMLError) -> str:
    """One line: the problem and where (1-based line and column) when PyYAML knows it."""
    if isinstance(err, yaml.MarkedYAMLError):
        mark = err.problem_mark or err.context_mark
        problem = err.problem or err.context or "invalid YAML"
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        return f"invalid YAML{where}: {problem}"
    return "invalid YAML: " + " ".join(str(err).split())


def _check_expanded_size(data: object, where: str) -> None:
    """Refuse data of more than MAX_YAML_VALUES values counting every alias reference: a few hundred bytes
    of nested aliases expand to billions. The count stops at the bound, so a bomb costs microseconds."""
    count, stack = 1, [data]
    while stack:
        node = stack.pop()
        children = node.values() if isinstance(node, Mapping) else node if isinstance(node, list) else ()
        count += len(children)
        if count > MAX_YAML_VALUES:
            raise InputError(f"{where}: the document expands to more than {MAX_YAML_VALUES} values "
                             "(nested YAML aliases?); a recipe has a few hundred")
        stack.extend(children)


def _parse_yaml(text: str, where: str) -> object:
    """YAML text -> data with abq's loader, or one InputError `where: problem` (syntax with its line,
    nesting too deep for the parser, a value no constructor accepts, a document too large once expanded)."""
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        raise InputError(f"{where}: {_yaml_error_text(err)}") from None
    except RecursionError:
        raise InputError(f"{where}: invalid YAML: nested too deeply") from None
    except ValueError as err:  # a date such as 2024-13-01, an integer of more than 4300 digits
        raise InputError(f"{where}: invalid YAML: {str(err).split(';')[0]}") from None
    _check_expanded_size(data, where)
    return data


def _looks_like_path(spec: str) -> bool:
    return "/" in spec or "\\" in spec or spec.lower().endswith((".yaml", ".yml"))


def load_recipe(spec: str, sets: Sequence[str] = (), for_export: bool = True) -> Recipe:
    """Load a recipe from a preset name (`w4a4`, `W2*A8`; see `PRESETS`) or a YAML file path, apply
    `--set key.path=value` items (`apply_sets`), validate (`recipe_from_dict`, with `for_export`).

    Every problem (missing file, YAML syntax with its line, non-mapping document, invalid field) is one
    InputError whose message starts with the file or preset name.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise InputError(f"recipe: expected a preset name or a YAML file path, got {show_value(spec)}")
    key = spec.strip().lower()
    if key in PRESETS and not _looks_like_path(spec):
        return recipe_from_dict(apply_sets({"scheme": key}, sets), f"preset {key}", for_export)

    path = Path(spec)
    if not path.exists():
        if _SCHEME_RE.fullmatch(key):
            parsed, reason = _scheme_problem(key)
            why = reason if parsed is None else "not a preset"
            raise InputError(f"{spec}: {why} (presets: {', '.join(PRESETS)}; or give a YAML file path)")
        raise InputError(f"{spec}: recipe file not found (and not a preset such as w4a16 or w2*a8)")
    if path.is_dir():
        raise InputError(f"{spec}: is a directory, expected a recipe YAML file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{spec}: not a UTF-8 text file ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise InputError(f"{spec}: cannot read recipe file: {err.strerror or err}") from None
    data = _parse_yaml(text, spec)
    if data is None:
        raise InputError(f"{spec}: the recipe is empty (expected a mapping such as 'scheme: w4a16')")
    if not isinstance(data, dict):
        raise InputError(f"{spec}: expected a mapping at the top level, got {show_value(data)}")
    return recipe_from_dict(apply_sets(data, sets), spec, for_export)


def apply_sets(data: dict, sets: Sequence[str]) -> dict:
    """Apply `--set key.path=value` items to a copy of `data` and return it.

    The value is parsed as YAML (`null`, `8`, `true`, `1e-3`, `[a, b]`, `{bits: 8}` all work); missing
    intermediate mappings are created. Keys are not checked here: `recipe_from_dict` rejects unknown
    ones. A malformed item or a path through a non-mapping raises InputError naming the item.
    """
    if not isinstance(data, dict):
        raise InputError(f"--set: the recipe is not a mapping (got {show_value(data)})")
    out = copy.deepcopy(data)
    for item in sets:
        if not isinstance(item, str) or "=" not in item:
            raise InputError(f"--set {show_value(item)}: expected key.path=value, e.g. weights.bits=3")
        key_text, value_text = item.split("=", 1)
        keys = key_text.strip().split(".")
        if not all(k.strip() for k in keys):
            raise InputError(f"--set {show_value(item)}: empty key in {show_value(key_text.strip())} "
                             f"(expected key.path=value, e.g. calibration.lwc.lr=1e-3)")
        keys = [k.strip() for k in keys]
        where = f"--set {show_value(item)}: cannot parse the value"
        value = _parse_yaml(value_text, where) if value_text.strip() else None
        node = out
        for i, k in enumerate(keys[:-1]):
            nxt = node.get(k)
            if nxt is None:
                nxt = node[k] = {}
            elif not isinstance(nxt, dict):
                raise InputError(f"--set {show_value(item)}: {_fmt_path(keys[: i + 1])} is "
                                 f"{show_value(nxt)}, not a mapping, so it has no key {show_value(keys[i + 1])}")
            node = nxt
        node[keys[-1]] = value
    return out


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe (`Recipe.to_dict`) as YAML, keys in schema order; `load_recipe` reads it back
    to an equal Recipe."""
    return yaml.dump(recipe.to_dict(), Dumper=_Dumper, sort_keys=False, default_flow_style=False,
                     allow_unicode=True, width=110)

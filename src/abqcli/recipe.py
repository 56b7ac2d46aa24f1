"""Recipes: what to quantize and how (DESIGN §3).

A recipe is a YAML mapping, validated on load. Unknown keys are errors, types are checked strictly
(`true` is not an integer, `"4"` is not an integer) and every problem is reported as one `InputError`
whose message names the key path, the bad value and what was expected::

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
"""

from __future__ import annotations

import copy
import difflib
import fnmatch
import json
import math
import re
import reprlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from abqcli.errors import InputError
from abqcli.quant.quantizer import LayerQuant, WeightQuantSpec

__all__ = [
    "DEVICE_CHOICES",
    "DTYPES",
    "FORMATS",
    "METHODS",
    "PRESETS",
    "ActivationSpec",
    "CalibrationSpec",
    "CompensationSpec",
    "EvalSpec",
    "KVSpec",
    "LETSpec",
    "LWCSpec",
    "LayerQuant",
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
METHODS = ("abq", "rtn")
FORMATS = ("abq-packed", "hf-fakequant")
DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")
SHIFT_CHOICES = ("auto", True, False)

W_BITS_MIN, W_BITS_MAX = 1, 8
A_BITS_MIN, A_BITS_MAX = 4, 16
FP_BITS = 16  # activation / kv bits meaning "not quantized"
BTC_GROUP_MULTIPLE = 128  # group sizes the BTC GEMM can run with quantized activations

# Upper bounds far above any real run, so that a typo (or 1e23) is refused here, not deep in torch.
MAX_NSAMPLES = 1_000_000
MAX_SEQLEN = 1 << 20  # tokens per window
MAX_BATCH_SIZE = MAX_NSAMPLES
MAX_EPOCHS = 10_000
MAX_GROUP_SIZE = 1 << 20  # input features of one linear
MAX_BLOCKS = 10_000  # compensation.first / last count decoder blocks
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
# Schema
# --------------------------------------------------------------------------------------------------


@dataclass
class ModelSpec:
    """The model to quantize: an HF directory, a cached hub id, a GGUF file or `smollm2-135m`."""

    path: str = "smollm2-135m"
    dtype: str = "float32"  # float32 | float16 | bfloat16


@dataclass
class WeightSpec:
    """Global weight quantization. `group_size` None = one (s, z) per output row; `balance` = W2*."""

    bits: int = 4  # 1..8
    group_size: int | None = None
    balance: bool = False  # only with bits == 2

    def quant_spec(self) -> WeightQuantSpec:
        return WeightQuantSpec(self.bits, self.group_size, self.balance)


@dataclass
class ActivationSpec:
    """Per-token dynamic activation quantization at the input of every quantized linear."""

    bits: int = 16  # 4..16, 16 = not quantized


@dataclass
class KVSpec:
    """q, k, v quantization; `bits` None = same as the activations, 16 = off."""

    bits: int | None = None


@dataclass
class LWCSpec:
    """Learnable weight clipping: two factors per quantization row, sigmoid of a parameter (init)."""

    enabled: bool = True
    lr: float = 1e-2
    init: float = 4.0


@dataclass
class LETSpec:
    """Learnable equivalent transformation: per-channel scales (and shifts) between linear pairs.

    `shift`: "auto" = shifts only for OPT weight-activation runs; True / False force it.
    """

    enabled: bool = True
    lr: float = 5e-3
    alpha: float = 0.5
    shift: str | bool = "auto"


@dataclass
class CompensationSpec:
    """Low-rank compensation vectors on down_proj / fc2 of the first `first` and last `last` blocks."""

    enabled: bool = True
    first: int = 3
    last: int = 4
    lr: float = 1e-2


@dataclass
class LossSpec:
    """Which distribution-correction loss terms are on (ablations)."""

    mse: bool = True
    cosine: bool = True
    attention_kl: bool = True


@dataclass
class CalibrationSpec:
    """The calibration run. `epochs` None = the scheme's reference default (see `default_epochs`)."""

    method: str = "abq"  # abq | rtn
    dataset: str = "wikitext2"  # name or path to a text file
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 2
    epochs: int | None = None
    batch_size: int = 1
    lwc: LWCSpec = field(default_factory=LWCSpec)
    let: LETSpec = field(default_factory=LETSpec)
    compensation: CompensationSpec = field(default_factory=CompensationSpec)
    loss: LossSpec = field(default_factory=LossSpec)
    device: str = "auto"  # auto | cpu | cuda | cuda:N


@dataclass
class OutputSpec:
    """Where results go and which artefacts are written (`abq-packed`, `hf-fakequant`)."""

    dir: str = "out/abq"
    formats: list[str] = field(default_factory=lambda: ["abq-packed"])


@dataclass
class EvalSpec:
    """Perplexity evaluation: dataset names (or text file paths) and window length."""

    datasets: list[str] = field(default_factory=lambda: ["wikitext2"])
    seqlen: int = 2048


def default_epochs(weight_bits: int, act_bits: int) -> int:
    """Reference epoch count: 40 for W2A16, W2A8, W2A6, W8A8 (balanced or not), else 20."""
    return EPOCHS_LONG if (weight_bits, act_bits) in LONG_EPOCH_SCHEMES else EPOCHS_SHORT


@dataclass
class Recipe:
    """A validated recipe. Build it with `load_recipe` / `recipe_from_dict`, which fill `epochs` in.

    `overrides` maps a glob pattern over module names to a partial setting, e.g.
    `{"*.down_proj": {"weights": {"bits": 8}}}`; see `layer_quant` for how they combine.
    """

    model: ModelSpec = field(default_factory=ModelSpec)
    scheme: str | None = None
    weights: WeightSpec = field(default_factory=WeightSpec)
    activations: ActivationSpec = field(default_factory=ActivationSpec)
    kv: KVSpec = field(default_factory=KVSpec)
    ignore: list[str] = field(default_factory=lambda: ["lm_head"])
    overrides: dict[str, dict] = field(default_factory=dict)
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    output: OutputSpec = field(default_factory=OutputSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)

    @property
    def kv_bits(self) -> int:
        """Bits of the q/k/v quantizer: `kv.bits`, or the activation bits when that is null."""
        return self.kv.bits if self.kv.bits is not None else self.activations.bits

    @property
    def epochs(self) -> int:
        """Training epochs per block: the written value or the scheme's reference default."""
        if self.calibration.epochs is not None:
            return self.calibration.epochs
        return default_epochs(self.weights.bits, self.activations.bits)

    def matching_overrides(self, module_name: str) -> list[str]:
        """The `overrides` patterns that match `module_name`, in the order written."""
        return [p for p in self.overrides if fnmatch.fnmatchcase(module_name, p)]

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
        w = {"bits": self.weights.bits, "group_size": self.weights.group_size,
             "balance": self.weights.balance}
        a_bits = self.activations.bits
        patterns = self.matching_overrides(module_name)
        for p in patterns:
            o = self.overrides[p]
            w.update(o.get("weights", {}))
            a_bits = o.get("activations", {}).get("bits", a_bits)
        if len(patterns) > 1:
            where = f"overrides (module {module_name!r}, patterns {', '.join(map(show_value, patterns))})"
            _, problem = _effective_problem(w, a_bits, self.output.formats)
            if problem:
                raise InputError(f"{where}: {problem}")
        return LayerQuant(WeightQuantSpec(w["bits"], w["group_size"], w["balance"]), a_bits)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form with every default filled in (epochs resolved); `dump_recipe` writes it.

        `kv.bits` and `weights.group_size` stay null when null: there null is a setting, not a gap.
        """
        c = self.calibration
        return {
            "model": {"path": self.model.path, "dtype": self.model.dtype},
            "scheme": self.scheme,
            "weights": {"bits": self.weights.bits, "group_size": self.weights.group_size,
                        "balance": self.weights.balance},
            "activations": {"bits": self.activations.bits},
            "kv": {"bits": self.kv.bits},
            "ignore": list(self.ignore),
            "overrides": copy.deepcopy(self.overrides),
            "calibration": {
                "method": c.method,
                "dataset": c.dataset,
                "nsamples": c.nsamples,
                "seqlen": c.seqlen,
                "seed": c.seed,
                "epochs": self.epochs,
                "batch_size": c.batch_size,
                "lwc": {"enabled": c.lwc.enabled, "lr": c.lwc.lr, "init": c.lwc.init},
                "let": {"enabled": c.let.enabled, "lr": c.let.lr, "alpha": c.let.alpha,
                        "shift": c.let.shift},
                "compensation": {"enabled": c.compensation.enabled, "first": c.compensation.first,
                                 "last": c.compensation.last, "lr": c.compensation.lr},
                "loss": {"mse": c.loss.mse, "cosine": c.loss.cosine,
                         "attention_kl": c.loss.attention_kl},
                "device": c.device,
            },
            "output": {"dir": self.output.dir, "formats": list(self.output.formats)},
            "eval": {"datasets": list(self.eval.datasets), "seqlen": self.eval.seqlen},
        }


def describe(recipe: Recipe) -> str:
    """Short display form, e.g. `W4A4 g128 (kv A4)`, `W2*A16`, `W4A16 (kv A8)`.

    The kv part is shown when q/k/v are quantized or differ from the activations.
    """
    w = recipe.weights
    text = f"W{w.bits}{'*' if w.balance else ''}A{recipe.activations.bits}"
    if w.group_size is not None:
        text += f" g{w.group_size}"
    kv = recipe.kv_bits
    if kv < FP_BITS or kv != recipe.activations.bits:
        text += f" (kv A{kv})"
    return text


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

_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MISSING = object()


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


class _Validator:
    """Strict type checks that raise one InputError `source: key.path: problem`."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, path: Sequence[object], problem: str) -> InputError:
        return InputError(f"{self.source}: {_fmt_path(path)}: {problem}")

    def bad(self, path: Sequence[object], expected: str, value: object) -> InputError:
        return self.fail(path, f"expected {expected}, got {show_value(value)}")

    def mapping(self, value: object, path: Sequence[object], keys: Sequence[str]) -> dict:
        """A mapping whose keys are all in `keys` (returned as a dict)."""
        if not isinstance(value, Mapping):
            raise self.bad(path, "a mapping", value)
        for k in value:
            if not (isinstance(k, str) and k in keys):
                msg = f"unknown key (expected one of: {', '.join(keys)})"
                if isinstance(k, str) and len(k) <= SHOW_LIMIT:
                    close = difflib.get_close_matches(k, keys, n=1)
                    if close:
                        msg += f"; did you mean {close[0]!r}?"
                raise self.fail([*path, k], msg)
        return dict(value)

    def integer(self, value: object, path: Sequence[object], lo: int | None = None,
                hi: int | None = None, cap: int | None = None) -> int:
        """An int (not a bool, not a float such as 1e23 or 1.0) in lo..hi; `cap` is a sanity bound
        (named in the message only when the value is above it)."""
        ok = isinstance(value, int) and not isinstance(value, bool)
        top = hi if hi is not None else cap
        if ok and (lo is None or value >= lo) and (top is None or value <= top):
            return int(value)
        if lo is not None and hi is not None:
            expected = f"an integer from {lo} to {hi}"
        elif lo == 1:
            expected = "a positive integer"
        elif lo == 0:
            expected = "a non-negative integer"
        elif lo is not None:
            expected = f"an integer >= {lo}"
        else:
            expected = "an integer"
        if ok and cap is not None and value > cap:
            expected += f" up to {cap}"
        raise self.bad(path, expected, value)

    def number(self, value: object, path: Sequence[object], positive: bool = False,
               lo: float | None = None, hi: float | None = None) -> float:
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
              and (isinstance(value, int) or math.isfinite(value)) and -1e300 < value < 1e300)
        if ok:
            if positive and value <= 0:
                ok = False
            if lo is not None and value < lo:
                ok = False
            if hi is not None and value > hi:
                ok = False
        if ok:
            return float(value)
        if positive:
            expected = "a positive number"
        elif lo is not None and hi is not None:
            expected = f"a number from {lo:g} to {hi:g}"
        else:
            expected = "a finite number"
        err = self.bad(path, expected, value)
        if isinstance(value, str) and _EXP_FLOAT.match(value.strip()):
            err = InputError(f"{err} (a string, not a number: write it unquoted, e.g. 1.0e-2)")
        raise err

    def boolean(self, value: object, path: Sequence[object]) -> bool:
        if isinstance(value, bool):
            return value
        raise self.bad(path, "true or false", value)

    def string(self, value: object, path: Sequence[object], what: str = "a non-empty string") -> str:
        if isinstance(value, str) and value.strip():
            return value
        raise self.bad(path, what, value)

    def choice(self, value: object, path: Sequence[object], choices: Sequence[str]) -> str:
        if isinstance(value, str) and value in choices:
            return value
        raise self.bad(path, f"one of: {', '.join(choices)}", value)

    def string_list(self, value: object, path: Sequence[object], allow_empty: bool = True) -> list[str]:
        expected = "a list of strings" if allow_empty else "a non-empty list of strings"
        if not isinstance(value, list) or (not allow_empty and not value):
            raise self.bad(path, expected, value)
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item.strip():
                raise self.bad([*path, i], "a non-empty string", item)
        return list(value)


def _effective_problem(w: Mapping[str, Any], act_bits: int, formats: Sequence[str]) -> tuple[str, str]:
    """(weights key, why) a (weights, activation bits) combination cannot be used, or ("", "")."""
    if w["balance"] and w["bits"] != 2:
        return "balance", (f"bit balance (W2*) needs weights.bits == 2, got balance true with bits {w['bits']} "
                f"(set weights.balance: false)")
    gs = w["group_size"]
    if ("abq-packed" in formats and act_bits < FP_BITS and gs is not None
            and gs % BTC_GROUP_MULTIPLE != 0):
        return "group_size", (f"group_size {gs} cannot be packed: with quantized activations (A{act_bits}) the BTC GEMM "
                f"needs per-channel weights (group_size: null) or a group size that is a multiple of "
                f"{BTC_GROUP_MULTIPLE}; change group_size or drop abq-packed from output.formats")
    return "", ""


_TOP_KEYS = ("model", "scheme", "weights", "activations", "kv", "ignore", "overrides", "calibration",
             "output", "eval")
_WEIGHT_KEYS = ("bits", "group_size", "balance")
_OVERRIDE_KEYS = ("weights", "activations")
_CALIB_KEYS = ("method", "dataset", "nsamples", "seqlen", "seed", "epochs", "batch_size", "lwc", "let",
               "compensation", "loss", "device")
DEVICE_RE = re.compile(r"auto|cpu|cuda(:\d+)?")


def _weight_fields(v: _Validator, raw: object, path: list) -> dict[str, Any]:
    """Validate a (possibly partial) `weights` mapping; returns only the keys written."""
    d = v.mapping(raw, path, _WEIGHT_KEYS)
    out: dict[str, Any] = {}
    if "bits" in d:
        out["bits"] = v.integer(d["bits"], [*path, "bits"], W_BITS_MIN, W_BITS_MAX)
    if "group_size" in d:
        gs = d["group_size"]
        if gs is not None:
            ok = isinstance(gs, int) and not isinstance(gs, bool) and 0 < gs <= MAX_GROUP_SIZE
            if not ok:
                expected = f"null (per channel) or a positive integer up to {MAX_GROUP_SIZE}"
                raise v.bad([*path, "group_size"], expected, gs)
        out["group_size"] = gs
    if "balance" in d:
        out["balance"] = v.boolean(d["balance"], [*path, "balance"])
    return out


def _act_fields(v: _Validator, raw: object, path: list) -> dict[str, Any]:
    d = v.mapping(raw, path, ("bits",))
    out: dict[str, Any] = {}
    if "bits" in d:
        out["bits"] = v.integer(d["bits"], [*path, "bits"], A_BITS_MIN, A_BITS_MAX)
    return out


def _section(v: _Validator, data: dict, key: str, keys: Sequence[str]) -> dict:
    if key not in data:
        return {}
    return v.mapping(data[key], [key], keys)


def recipe_from_dict(data: object, source: str = "recipe") -> Recipe:
    """Validate parsed recipe data and build a `Recipe` with every default filled in.

    `source` prefixes every error message (a file name, a preset name). Raises one InputError for the
    first problem found: unknown key, wrong type or range, or an invalid combination.
    """
    v = _Validator(source)
    if not isinstance(data, Mapping):
        raise InputError(f"{source}: expected a mapping at the top level, got {show_value(data)}")
    data = v.mapping(data, [], _TOP_KEYS)

    # model
    m = _section(v, data, "model", ("path", "dtype"))
    model = ModelSpec()
    if "path" in m:
        model.path = v.string(m["path"], ["model", "path"])
    if "dtype" in m:
        model.dtype = v.choice(m["dtype"], ["model", "dtype"], DTYPES)

    # scheme, then explicit weights / activations over it
    scheme = data.get("scheme")
    weights = {"bits": WeightSpec.bits, "group_size": WeightSpec.group_size, "balance": WeightSpec.balance}
    act_bits = ActivationSpec.bits
    if scheme is not None:
        if not isinstance(scheme, str):
            raise v.bad(["scheme"], "null or a scheme such as w4a16 or w2*a8", scheme)
        parsed, reason = _scheme_problem(scheme)
        if parsed is None:
            raise v.fail(["scheme"], f"invalid scheme {show_value(scheme)}: {reason}")
        scheme = scheme.lower()
        weights["bits"], weights["balance"], act_bits = parsed
    if "weights" in data:
        weights.update(_weight_fields(v, data["weights"], ["weights"]))
    if "activations" in data:
        act_bits = _act_fields(v, data["activations"], ["activations"]).get("bits", act_bits)

    kv_raw = _section(v, data, "kv", ("bits",))
    kv_bits = kv_raw.get("bits")
    if kv_bits is not None:
        kv_bits = v.integer(kv_bits, ["kv", "bits"], A_BITS_MIN, A_BITS_MAX)

    ignore = ["lm_head"]
    if "ignore" in data:
        ignore = v.string_list(data["ignore"], ["ignore"])

    overrides: dict[str, dict] = {}
    if "overrides" in data:
        raw = data["overrides"]
        if not isinstance(raw, Mapping):
            raise v.bad(["overrides"], "a mapping of glob pattern -> {weights: ..., activations: ...}", raw)
        for pattern, entry in raw.items():
            path = ["overrides", pattern]
            if not isinstance(pattern, str) or not pattern.strip():
                raise v.fail(path, "expected a glob pattern over module names (a non-empty string)")
            e = v.mapping(entry, path, _OVERRIDE_KEYS)
            norm: dict[str, dict] = {}
            if "weights" in e:
                norm["weights"] = _weight_fields(v, e["weights"], [*path, "weights"])
            if "activations" in e:
                norm["activations"] = _act_fields(v, e["activations"], [*path, "activations"])
            overrides[pattern] = norm

    # calibration
    c = _section(v, data, "calibration", _CALIB_KEYS)
    calib = CalibrationSpec()
    cp = ["calibration"]
    if "method" in c:
        calib.method = v.choice(c["method"], [*cp, "method"], METHODS)
    if "dataset" in c:
        calib.dataset = v.string(c["dataset"], [*cp, "dataset"], "a dataset name or a text file path")
    for key, hi in (("nsamples", MAX_NSAMPLES), ("seqlen", MAX_SEQLEN), ("batch_size", MAX_BATCH_SIZE)):
        if key in c:
            setattr(calib, key, v.integer(c[key], [*cp, key], 1, cap=hi))
    if "seed" in c:
        calib.seed = v.integer(c["seed"], [*cp, "seed"], 0, 2**32 - 1)  # numpy / torch seed range
    if c.get("epochs") is not None:
        calib.epochs = v.integer(c["epochs"], [*cp, "epochs"], 1, cap=MAX_EPOCHS)
    if calib.epochs is None:
        calib.epochs = default_epochs(weights["bits"], act_bits)
    if "device" in c:
        dev = c["device"]
        if not (isinstance(dev, str) and DEVICE_RE.fullmatch(dev)):
            raise v.bad([*cp, "device"], f"one of: {', '.join(DEVICE_CHOICES)}", dev)
        calib.device = dev

    if "lwc" in c:
        p = [*cp, "lwc"]
        d = v.mapping(c["lwc"], p, ("enabled", "lr", "init"))
        if "enabled" in d:
            calib.lwc.enabled = v.boolean(d["enabled"], [*p, "enabled"])
        if "lr" in d:
            calib.lwc.lr = v.number(d["lr"], [*p, "lr"], positive=True)
        if "init" in d:
            calib.lwc.init = v.number(d["init"], [*p, "init"])
    if "let" in c:
        p = [*cp, "let"]
        d = v.mapping(c["let"], p, ("enabled", "lr", "alpha", "shift"))
        if "enabled" in d:
            calib.let.enabled = v.boolean(d["enabled"], [*p, "enabled"])
        if "lr" in d:
            calib.let.lr = v.number(d["lr"], [*p, "lr"], positive=True)
        if "alpha" in d:
            calib.let.alpha = v.number(d["alpha"], [*p, "alpha"], lo=0.0, hi=1.0)
        if "shift" in d:
            shift = d["shift"]
            if not (isinstance(shift, bool) or shift == "auto"):
                raise v.bad([*p, "shift"], "auto, true or false", shift)
            calib.let.shift = shift
    if "compensation" in c:
        p = [*cp, "compensation"]
        d = v.mapping(c["compensation"], p, ("enabled", "first", "last", "lr"))
        if "enabled" in d:
            calib.compensation.enabled = v.boolean(d["enabled"], [*p, "enabled"])
        for key in ("first", "last"):
            if key in d:
                setattr(calib.compensation, key, v.integer(d[key], [*p, key], 0, cap=MAX_BLOCKS))
        if "lr" in d:
            calib.compensation.lr = v.number(d["lr"], [*p, "lr"], positive=True)
    if "loss" in c:
        p = [*cp, "loss"]
        d = v.mapping(c["loss"], p, ("mse", "cosine", "attention_kl"))
        for key in ("mse", "cosine", "attention_kl"):
            if key in d:
                setattr(calib.loss, key, v.boolean(d[key], [*p, key]))

    o = _section(v, data, "output", ("dir", "formats"))
    output = OutputSpec()
    if "dir" in o:
        output.dir = v.string(o["dir"], ["output", "dir"], "a directory path")
    if "formats" in o:
        fmts = o["formats"]
        expected = f"a non-empty list of: {', '.join(FORMATS)}"
        if not isinstance(fmts, list) or not fmts:
            raise v.bad(["output", "formats"], expected, fmts)
        for i, f in enumerate(fmts):
            if not (isinstance(f, str) and f in FORMATS):
                raise v.bad(["output", "formats", i], f"one of: {', '.join(FORMATS)}", f)
            if f in fmts[:i]:
                raise v.fail(["output", "formats", i], f"{f!r} is listed twice")
        output.formats = list(fmts)

    e = _section(v, data, "eval", ("datasets", "seqlen"))
    ev = EvalSpec()
    if "datasets" in e:
        ev.datasets = v.string_list(e["datasets"], ["eval", "datasets"])
    if "seqlen" in e:
        ev.seqlen = v.integer(e["seqlen"], ["eval", "seqlen"], 1, cap=MAX_SEQLEN)

    # cross-field checks: the global spec, then each override merged over it on its own
    key, problem = _effective_problem(weights, act_bits, output.formats)
    if problem:
        if key == "balance" and scheme is not None and "balance" not in data.get("weights", {}):
            problem += f"; balance came from scheme {show_value(scheme)}"
        raise v.fail(["weights", key], problem)
    for pattern, entry in overrides.items():
        w_eff = {**weights, **entry.get("weights", {})}
        a_eff = entry.get("activations", {}).get("bits", act_bits)
        key, problem = _effective_problem(w_eff, a_eff, output.formats)
        if problem:
            raise v.fail(["overrides", pattern], "merged over the global settings: " + problem)

    return Recipe(
        model=model,
        scheme=scheme,
        weights=WeightSpec(**weights),
        activations=ActivationSpec(act_bits),
        kv=KVSpec(kv_bits),
        ignore=ignore,
        overrides=overrides,
        calibration=calib,
        output=output,
        eval=ev,
    )


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


def load_recipe(spec: str, sets: Sequence[str] = ()) -> Recipe:
    """Load a recipe from a preset name (`w4a4`, `W2*A8`; see `PRESETS`) or a YAML file path, apply
    `--set key.path=value` items (`apply_sets`), validate (`recipe_from_dict`).

    Every problem (missing file, YAML syntax with its line, non-mapping document, invalid field) is one
    InputError whose message starts with the file or preset name.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise InputError(f"recipe: expected a preset name or a YAML file path, got {show_value(spec)}")
    key = spec.strip().lower()
    if key in PRESETS and not _looks_like_path(spec):
        return recipe_from_dict(apply_sets({"scheme": key}, sets), source=f"preset {key}")

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
    return recipe_from_dict(apply_sets(data, sets), source=spec)


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

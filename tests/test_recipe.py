"""Recipe schema, presets, validation messages, --set, dump/load (DESIGN §3)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from abqcli.errors import InputError
from abqcli.quant.quantizer import WeightQuantSpec
from abqcli.recipe import (
    PRESETS,
    LayerQuant,
    Recipe,
    apply_sets,
    default_epochs,
    describe,
    dump_recipe,
    load_recipe,
    parse_scheme,
    recipe_from_dict,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def error_of(data: object, source: str = "recipe.yaml") -> str:
    with pytest.raises(InputError) as exc:
        recipe_from_dict(data, source)
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg.startswith(f"{source}: ")
    return msg


# ---------------------------------------------------------------------------------------------- schemes


@pytest.mark.parametrize(
    "text, expected",
    [("w4a16", (4, False, 16)), ("w2*a8", (2, True, 8)), ("W2*A8", (2, True, 8)), ("w8a4", (8, False, 4)),
     ("w1a16", (1, False, 16)), ("W3A6", (3, False, 6))],
)
def test_parse_scheme(text, expected):
    assert parse_scheme(text) == expected


@pytest.mark.parametrize(
    "text, fragment",
    [("w3*a8", "only for 2-bit"), ("w9a8", "weight bits"), ("w0a8", "weight bits"), ("w4a3", "activation bits"),
     ("w4a17", "activation bits"), ("int4", "expected w<bits>a<bits>"), ("w4", "expected"), ("", "expected")],
)
def test_parse_scheme_errors(text, fragment):
    with pytest.raises(InputError, match="invalid scheme") as exc:
        parse_scheme(text)
    assert fragment in str(exc.value)


def test_presets_list():
    assert "w4a16" in PRESETS and "w8a4" in PRESETS and "w2*a16" in PRESETS and "w2*a4" in PRESETS
    assert "w1a16" not in PRESETS and "w3*a8" not in PRESETS and "w4a12" not in PRESETS
    assert len(PRESETS) == 7 * 4 + 4 == len(set(PRESETS))
    for name in PRESETS:
        r = load_recipe(name)
        w, bal, a = parse_scheme(name)
        assert (r.weights.bits, r.weights.balance, r.activations.bits) == (w, bal, a)
        assert r.scheme == name


# ---------------------------------------------------------------------------------------------- defaults


def test_defaults_filled():
    r = recipe_from_dict({})
    assert r.model.path == "smollm2-135m" and r.model.dtype == "float32"
    assert r.scheme is None
    assert (r.weights.bits, r.weights.group_size, r.weights.balance) == (4, None, False)
    assert r.activations.bits == 16 and r.kv.bits is None and r.kv_bits == 16
    assert r.ignore == ["lm_head"] and r.overrides == {}
    c = r.calibration
    assert (c.method, c.dataset, c.nsamples, c.seqlen, c.seed, c.batch_size, c.device) == (
        "abq", "wikitext2", 128, 2048, 2, 1, "auto")
    assert c.epochs == 20
    assert (c.lwc.enabled, c.lwc.lr, c.lwc.init) == (True, 1e-2, 4.0)
    assert (c.let.enabled, c.let.lr, c.let.alpha, c.let.shift) == (True, 5e-3, 0.5, "auto")
    assert (c.compensation.enabled, c.compensation.first, c.compensation.last, c.compensation.lr) == (
        True, 3, 4, 1e-2)
    assert (c.loss.mse, c.loss.cosine, c.loss.attention_kl) == (True, True, True)
    assert (r.finetune.enabled, r.finetune.steps, r.finetune.lr, r.finetune.schedule) == (False, 32, 3e-3, "constant")
    assert r.output.dir == "out/abq" and r.output.formats == ["abq-packed"]
    assert r.eval.datasets == ["wikitext2"] and r.eval.seqlen == 2048
    d = r.to_dict()
    assert d["calibration"]["epochs"] == 20 and list(d) == [
        "model", "scheme", "weights", "activations", "kv", "ignore", "overrides", "calibration", "finetune",
        "output", "eval"]
    assert Recipe().to_dict() == d  # epochs resolved by to_dict even when left None


LONG = {"w2a16", "w2a8", "w2a6", "w8a8", "w2*a16", "w2*a8", "w2*a6"}


@pytest.mark.parametrize("scheme", PRESETS)
def test_epochs_default_table(scheme):
    r = load_recipe(scheme)
    assert r.calibration.epochs == r.epochs == (40 if scheme in LONG else 20)


def test_epochs_follow_explicit_bits_and_explicit_value():
    assert default_epochs(2, 16) == 40 and default_epochs(4, 4) == 20 and default_epochs(2, 4) == 20
    # the scheme says W4A16 (20) but the weights written explicitly make it W2A16 (40)
    assert recipe_from_dict({"scheme": "w4a16", "weights": {"bits": 2}}).calibration.epochs == 40
    assert recipe_from_dict({"scheme": "w2a16", "calibration": {"epochs": 7}}).calibration.epochs == 7
    assert recipe_from_dict({"scheme": "w2a16", "calibration": {"epochs": None}}).calibration.epochs == 40


def test_scheme_then_explicit_fields(tmp_path):
    r = load_recipe(write(tmp_path, "scheme: W4A4\nweights: {bits: 3, group_size: 128}\nkv: {bits: 8}\n"))
    assert r.scheme == "w4a4"
    assert (r.weights.bits, r.weights.group_size, r.activations.bits, r.kv_bits) == (3, 128, 4, 8)
    r = recipe_from_dict({"scheme": "w2*a8", "activations": {"bits": 16}})
    assert r.weights.balance and r.weights.bits == 2 and r.activations.bits == 16
    r = recipe_from_dict({"scheme": "w2*a16", "weights": {"balance": False}})
    assert not r.weights.balance


def test_describe():
    assert describe(recipe_from_dict({"scheme": "w4a4", "weights": {"group_size": 128}})) == "W4A4 g128 (kv A4)"
    assert describe(load_recipe("w2*a16")) == "W2*A16"
    assert describe(recipe_from_dict({"scheme": "w4a16", "kv": {"bits": 8}})) == "W4A16 (kv A8)"


# ---------------------------------------------------------------------------------------------- per layer


def test_ignore_globs():
    r = recipe_from_dict({"scheme": "w4a8", "ignore": ["lm_head", "*.layers.0.*"]})
    assert r.layer_quant("lm_head") is None
    assert r.layer_quant("model.layers.0.self_attn.q_proj") is None
    assert r.layer_quant("model.layers.10.self_attn.q_proj") == LayerQuant(WeightQuantSpec(4), 8)
    assert recipe_from_dict({"ignore": []}).layer_quant("lm_head") is not None


def test_overrides_later_pattern_wins():
    data = {
        "scheme": "w4a8",
        "overrides": {
            "*.mlp.*": {"weights": {"bits": 8}, "activations": {"bits": 16}},
            "*.down_proj": {"weights": {"bits": 6}},
        },
    }
    r = recipe_from_dict(data)
    # both match down_proj: the later pattern's bits win, the earlier's activations are kept
    assert r.layer_quant("model.layers.1.mlp.down_proj") == LayerQuant(WeightQuantSpec(6), 16)
    assert r.layer_quant("model.layers.1.mlp.up_proj") == LayerQuant(WeightQuantSpec(8), 16)
    assert r.layer_quant("model.layers.1.self_attn.o_proj") == LayerQuant(WeightQuantSpec(4), 8)
    assert r.matching_overrides("model.layers.1.mlp.down_proj") == ["*.mlp.*", "*.down_proj"]
    # reversing the order written reverses the winner
    rev = recipe_from_dict({**data, "overrides": dict(reversed(list(data["overrides"].items())))})
    assert rev.layer_quant("model.layers.1.mlp.down_proj").weight.bits == 8


def test_override_group_size_null_and_balance():
    r = recipe_from_dict({"scheme": "w2*a16", "weights": {"group_size": 64},
                          "overrides": {"*.o_proj": {"weights": {"bits": 4, "balance": False,
                                                                 "group_size": None}}}})
    assert r.layer_quant("m.o_proj") == LayerQuant(WeightQuantSpec(4, None, False), 16)
    assert r.layer_quant("m.q_proj") == LayerQuant(WeightQuantSpec(2, 64, True), 16)


def test_overrides_combining_into_invalid_spec():
    r = recipe_from_dict({"scheme": "w2a16", "overrides": {"x.*": {"weights": {"bits": 3}},
                                                            "*.b": {"weights": {"balance": True}}}})
    assert r.layer_quant("x.c").weight.bits == 3 and r.layer_quant("y.b").weight.balance
    with pytest.raises(InputError, match=r"module 'x\.b'.*balance"):
        r.layer_quant("x.b")


# ---------------------------------------------------------------------------------------------- errors

BAD = [
    ({"weights": {"colour": 1}}, "weights.colour: unknown key (expected one of: bits, group_size, balance, scale_dtype)"),
    ({"calibration": {"lwc": {"lr": "abc"}}}, "calibration.lwc.lr: expected a positive number, got 'abc'"),
    ({"calibration": {"lwc": {"lr": 0}}}, "calibration.lwc.lr: expected a positive number, got 0"),
    ({"calibration": {"let": {"lr": -1.0}}}, "calibration.let.lr: expected a positive number, got -1.0"),
    ({"calibration": {"compensation": {"lr": float("nan")}}}, "calibration.compensation.lr: expected a positive"),
    ({"calibration": {"let": {"alpha": 1.5}}}, "calibration.let.alpha: expected a number from 0 to 1, got 1.5"),
    ({"calibration": {"let": {"shift": "yes"}}}, "calibration.let.shift: expected auto, true or false"),
    ({"calibration": {"lwc": {"enabled": 1}}}, "calibration.lwc.enabled: expected true or false, got 1"),
    ({"calibration": {"loss": {"kl": True}}}, "calibration.loss.kl: unknown key"),
    ({"colour": 1}, "colour: unknown key (expected one of: model, scheme,"),
    ({"weights": {"bits": "4"}}, "weights.bits: expected an integer from 1 to 8, got '4'"),
    ({"weights": {"bits": True}}, "weights.bits: expected an integer from 1 to 8, got true"),
    ({"weights": {"bits": 4.0}}, "weights.bits: expected an integer from 1 to 8, got 4.0"),
    ({"weights": {"bits": 9}}, "weights.bits: expected an integer from 1 to 8, got 9"),
    ({"weights": {"group_size": 0}}, "weights.group_size: expected null (per channel) or a positive integer"),
    ({"weights": {"balance": "true"}}, "weights.balance: expected true or false, got 'true'"),
    ({"weights": [4]}, "weights: expected a mapping, got a list [4]"),
    ({"activations": {"bits": 3}}, "activations.bits: expected an integer from 4 to 16, got 3"),
    ({"kv": {"bits": 17}}, "kv.bits: expected an integer from 4 to 16, got 17"),
    ({"model": {"dtype": "fp16"}}, "model.dtype: expected one of: float32, float16, bfloat16, got 'fp16'"),
    ({"model": {"path": ""}}, "model.path: expected a non-empty string, got ''"),
    ({"scheme": "w3*a8"}, "scheme: invalid scheme 'w3*a8': '*' (bit balance) exists only for 2-bit"),
    ({"scheme": 44}, "scheme: expected null or a scheme such as w4a16"),
    ({"ignore": "lm_head"}, "ignore: expected a list of strings, got 'lm_head'"),
    ({"ignore": ["lm_head", 3]}, "ignore.1: expected a non-empty string, got 3"),
    ({"calibration": {"method": "awq"}}, "calibration.method: expected one of: abq, gptq, rtn, got 'awq'"),
    ({"calibration": {"rounding": "stochastic"}},
     "calibration.rounding: expected one of: nearest, gptq, learned, got 'stochastic'"),
    ({"calibration": {"rotation": "quarot"}},
     "calibration.rotation: expected one of: none, hadamard, random-orthogonal, got 'quarot'"),
    ({"calibration": {"gptq": {"damp": 0}}}, "calibration.gptq.damp: expected a number above 0, up to 1, got 0"),
    ({"calibration": {"gptq": {"act_order": "yes"}}}, "calibration.gptq.act_order: expected true or false"),
    ({"calibration": {"learned": {"lr": -1}}}, "calibration.learned.lr: expected a positive number, got -1"),
    ({"calibration": {"nsamples": 0}}, "calibration.nsamples: expected a positive integer, got 0"),
    ({"calibration": {"seqlen": 2048.0}}, "calibration.seqlen: expected a positive integer, got 2048.0"),
    ({"calibration": {"epochs": -3}}, "calibration.epochs: expected a positive integer, got -3"),
    ({"calibration": {"batch_size": False}}, "calibration.batch_size: expected a positive integer, got false"),
    ({"calibration": {"seed": -1}}, "calibration.seed: expected an integer from 0 to 4294967295, got -1"),
    ({"calibration": {"device": "gpu"}}, "calibration.device: expected one of: auto, cpu, cuda, cuda:N, got 'gpu'"),
    ({"calibration": {"compensation": {"first": -1}}}, "calibration.compensation.first: expected a non-negative"),
    ({"output": {"formats": []}}, "output.formats: expected a non-empty list of: abq-packed, hf-fakequant, compressed-tensors"),
    ({"output": {"formats": ["gguf"]}}, "output.formats.0: expected one of: abq-packed, hf-fakequant, compressed-tensors, got 'gguf'"),
    ({"output": {"formats": ["abq-packed", "abq-packed"]}}, "output.formats.1: 'abq-packed' is listed twice"),
    ({"eval": {"seqlen": "2k"}}, "eval.seqlen: expected a positive integer, got '2k'"),
    ({"overrides": {"*.down_proj": {"weights": {"bits": 9}}}},
     'overrides."*.down_proj".weights.bits: expected an integer from 1 to 8, got 9'),
    ({"overrides": {"*.down_proj": {"activations": {"bits": 2}}}},
     'overrides."*.down_proj".activations.bits: expected an integer from 4 to 16, got 2'),
    ({"overrides": {"*.down_proj": {"activations": {"clip": 0}}}},
     'overrides."*.down_proj".activations.clip: expected a number above 0, up to 1, got 0'),
    ({"overrides": {"*.down_proj": {"kv": {"bits": 8}}}},
     'overrides."*.down_proj".kv: unknown key (expected one of: weights, activations)'),
    ({"overrides": {"*.down_proj": 8}}, 'overrides."*.down_proj": expected a mapping, got 8'),
    ({"overrides": ["*.down_proj"]}, "overrides: expected a mapping of glob pattern"),
]


@pytest.mark.parametrize("data, expected", BAD, ids=[e.split(":")[0] for _, e in BAD])
def test_errors_name_key_path_value_and_expectation(data, expected):
    assert expected in error_of(data)


def test_top_level_not_a_mapping():
    assert "expected a mapping at the top level, got a list" in error_of(["scheme"])
    assert "got null" in error_of(None)


def test_balance_needs_two_bits():
    msg = error_of({"weights": {"bits": 3, "balance": True}})
    assert "weights.balance:" in msg and "bits 3" in msg
    msg = error_of({"scheme": "w2*a8", "weights": {"bits": 4}})
    assert "weights.balance:" in msg and "from scheme 'w2*a8'" in msg
    msg = error_of({"scheme": "w2*a16", "overrides": {"*.down_proj": {"weights": {"bits": 4}}}})
    assert 'overrides."*.down_proj":' in msg and "balance" in msg


def test_packed_group_size_rule():
    msg = error_of({"scheme": "w4a8", "weights": {"group_size": 64}})
    assert "weights.group_size:" in msg and "64" in msg and "multiple of 128" in msg
    # fine: weight-only, multiple of 128, per channel, or not packed
    recipe_from_dict({"scheme": "w4a16", "weights": {"group_size": 64}})
    recipe_from_dict({"scheme": "w4a8", "weights": {"group_size": 256}})
    recipe_from_dict({"scheme": "w4a8", "weights": {"group_size": 64}, "output": {"formats": ["hf-fakequant"]}})
    # the same check on each override's effective spec
    msg = error_of({"scheme": "w4a16", "weights": {"group_size": 64},
                    "overrides": {"*.o_proj": {"activations": {"bits": 8}}}})
    assert 'overrides."*.o_proj":' in msg and "group_size 64" in msg
    r = recipe_from_dict({"scheme": "w4a8", "weights": {"group_size": 128},
                          "overrides": {"*.o_proj": {"activations": {"bits": 16}, "weights": {"group_size": 32}}}})
    assert r.layer_quant("m.o_proj") == LayerQuant(WeightQuantSpec(4, 32), 16)


def test_override_sets_the_activation_clip_of_matching_layers():
    r = recipe_from_dict({"scheme": "w4a4", "activations": {"clip": 0.9},
                          "overrides": {"*.down_proj": {"activations": {"clip": 0.95}},
                                        "*.o_proj": {"activations": {"bits": 16}}}})
    assert r.layer_quant("m.q_proj").act_clip == 0.9
    assert r.layer_quant("m.down_proj") == LayerQuant(WeightQuantSpec(4, None), 4, act_clip=0.95)
    assert r.layer_quant("m.o_proj").act_clip == 1.0  # weight-only: no activation quantizer to clip
    assert r.kv_clip == 1.0


# ---------------------------------------------------------------------------------------------- files


def test_load_file(tmp_path):
    p = write(tmp_path, """
model: {path: /models/tiny, dtype: bfloat16}
scheme: w2*a16
weights: {group_size: 128}
overrides: {"*.down_proj": {weights: {bits: 4, balance: false}}}
calibration: {nsamples: 4, seqlen: 64, epochs: 2, lwc: {lr: 1e-3}, device: "cuda:1"}
output: {dir: out/x, formats: [abq-packed, hf-fakequant]}
""")
    r = load_recipe(p)
    assert r.model.dtype == "bfloat16" and r.weights == type(r.weights)(2, 128, True)
    assert r.calibration.lwc.lr == 1e-3  # unquoted exponent without a dot is a number
    assert r.calibration.device == "cuda:1" and r.output.formats == ["abq-packed", "hf-fakequant"]
    assert r.layer_quant("model.layers.0.mlp.down_proj").weight == WeightQuantSpec(4, 128, False)


def test_file_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_recipe(str(tmp_path / "nope.yaml"))
    with pytest.raises(InputError, match="not a preset"):
        load_recipe("w1a8")
    with pytest.raises(InputError, match=r"only for 2-bit"):
        load_recipe("w3*a8")
    with pytest.raises(InputError, match=r"line 3"):
        load_recipe(write(tmp_path, "scheme: w4a4\nweights: {bits: 4\ncalibration: {}\n"))
    with pytest.raises(InputError, match="top level, got a list"):
        load_recipe(write(tmp_path, "- w4a4\n"))
    with pytest.raises(InputError, match="empty"):
        load_recipe(write(tmp_path, "# nothing\n"))
    with pytest.raises(InputError, match=r"line 2.*duplicate key 'scheme'"):
        load_recipe(write(tmp_path, "scheme: w4a4\nscheme: w4a8\n"))
    with pytest.raises(InputError, match="directory"):
        load_recipe(str(tmp_path))
    p = write(tmp_path, "weights: {bits: nine}\n", "bad.yaml")
    with pytest.raises(InputError) as exc:
        load_recipe(p)
    assert str(exc.value) == f"{p}: weights.bits: expected an integer from 1 to 8, got 'nine'"


# ---------------------------------------------------------------------------------------------- --set


def test_sets(tmp_path):
    p = write(tmp_path, "scheme: w4a4\ncalibration: {nsamples: 8}\n")
    r = load_recipe(p, ["weights.group_size=128", "calibration.lwc.lr=1e-3", "calibration.nsamples=16",
                        "kv.bits=null", "eval.datasets=[wikitext2, c4]", "calibration.let.shift=true",
                        "model.path=smollm2-135m"])
    assert r.weights.group_size == 128 and r.calibration.lwc.lr == 1e-3 and r.calibration.nsamples == 16
    assert r.eval.datasets == ["wikitext2", "c4"] and r.calibration.let.shift is True
    r = load_recipe("w2*a8", ["calibration.epochs=3", "overrides={'*.o_proj': {weights: {bits: 8, balance: false}}}"])
    assert r.calibration.epochs == 3 and r.layer_quant("a.o_proj").weight.bits == 8
    data = {"calibration": {"lwc": {"lr": 1.0}}}
    assert apply_sets(data, ["calibration.lwc.init=2.0"]) == {"calibration": {"lwc": {"lr": 1.0, "init": 2.0}}}
    assert data == {"calibration": {"lwc": {"lr": 1.0}}}  # not mutated


@pytest.mark.parametrize(
    "item, fragment",
    [("weights.bits", "expected key.path=value"), ("weights..bits=3", "empty key"), ("=3", "empty key"),
     ("weights.bits=[1,", "cannot parse the value"), ("weights.bits.x=1", "not a mapping")],
)
def test_bad_sets(item, fragment):
    with pytest.raises(InputError) as exc:
        load_recipe("w4a4", ["weights.bits=4", item])
    assert fragment in str(exc.value) and "--set" in str(exc.value)


def test_set_unknown_key_and_bad_value():
    with pytest.raises(InputError, match=r"weights\.colour: unknown key"):
        load_recipe("w4a4", ["weights.colour=red"])
    with pytest.raises(InputError, match=r"calibration\.nsamples: expected a positive integer, got 'many'"):
        load_recipe("w4a4", ["calibration.nsamples=many"])


# ---------------------------------------------------------------------------------------------- dump / load


def test_dump_load_round_trip(tmp_path):
    r = recipe_from_dict({
        "model": {"path": "1e-2", "dtype": "float16"},  # a string that looks like a number stays a string
        "scheme": "w2*a8",
        "weights": {"group_size": 256},
        "kv": {"bits": 16},
        "ignore": ["lm_head", "*.gate_proj"],
        "overrides": {"*.down_proj": {"weights": {"bits": 8, "balance": False}}, "model.layers.0.*": {}},
        "calibration": {"lwc": {"lr": 1e-5}, "let": {"shift": False}, "device": "cuda:0", "dataset": "yes"},
        "output": {"formats": ["hf-fakequant", "abq-packed"]},
    })
    text = dump_recipe(r)
    assert text == dump_recipe(r)
    r2 = load_recipe(write(tmp_path, text))
    assert r2 == r and dump_recipe(r2) == text
    assert list(yaml.safe_load(text)["overrides"]) == ["*.down_proj", "model.layers.0.*"]
    for name in ("w4a16", "w2*a4", "w8a8"):
        assert load_recipe(write(tmp_path, dump_recipe(load_recipe(name)))) == load_recipe(name)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("smollm2-*.yaml")), ids=lambda p: p.name)
def test_smollm2_configs_load(path):
    r = load_recipe(str(path))
    assert r.model.path == "smollm2-135m" and r.calibration.dataset == "wikitext2"
    assert r.output.dir == f"out/{path.stem}" and "abq-packed" in r.output.formats


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("llama-7b-*.yaml")), ids=lambda p: p.name)
def test_configs_load(path):
    r = load_recipe(str(path))
    scheme = path.stem.removeprefix("llama-7b-")
    assert r.scheme == scheme and r.calibration.nsamples == 128 and r.calibration.seqlen == 2048
    w, _, a = parse_scheme(scheme)
    assert r.calibration.epochs == default_epochs(w, a)
    assert r.output.dir == f"out/llama-7b-{scheme}"


def test_configs_cover_reference_schemes():
    names = {p.stem for p in CONFIGS.glob("llama-7b-*.yaml")}
    expected = {"w4a16", "w3a16", "w2a16", "w6a6", "w4a8", "w4a4", "w3a8", "w2a8", "w2a6", "w8a8"}
    assert names == {f"llama-7b-{s}" for s in expected}


# ---------------------------------------------------------------------------------------------- fuzz

_KEYS = ["model", "scheme", "weights", "activations", "kv", "ignore", "overrides", "calibration", "output",
         "eval", "path", "dtype", "bits", "group_size", "balance", "method", "dataset", "nsamples", "seqlen",
         "seed", "epochs", "batch_size", "lwc", "let", "compensation", "loss", "device", "enabled", "lr",
         "init", "alpha", "shift", "first", "last", "mse", "cosine", "attention_kl", "dir", "formats",
         "datasets", "*.down_proj", "lm_head"]
_SCALARS = (st.none() | st.booleans() | st.integers(-3, 300) | st.integers() | st.floats(allow_nan=True, allow_infinity=True)
            | st.sampled_from(["w4a4", "w2*a8", "w3*a8", "auto", "cuda:0", "abq", "float16", "abq-packed", "4", ""])
            | st.text(max_size=8))
_KEY = st.sampled_from(_KEYS) | st.text(max_size=6) | st.integers(0, 3) | st.booleans()
_DOCS = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_KEY, inner, max_size=5),
    max_leaves=25,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(_KEYS[:10]), _DOCS, max_size=6) | _DOCS)
def test_fuzz_only_recipe_or_input_error(data):
    try:
        r = recipe_from_dict(data)
    except InputError as err:
        assert str(err).startswith("recipe: ") and "\n" not in str(err)
        return
    assert isinstance(r, Recipe)
    assert recipe_from_dict(r.to_dict()) == r
    try:
        r.layer_quant("model.layers.0.mlp.down_proj")
    except InputError:  # several overrides can merge into an invalid spec; that is reported, not raised as-is
        pass


def _paths(d: dict, prefix: tuple = ()) -> list[tuple]:
    out = []
    for k, v in d.items():
        out.append((*prefix, k))
        if isinstance(v, dict):
            out += _paths(v, (*prefix, k))
    return out


_BASE = recipe_from_dict({"scheme": "w4a8", "overrides": {"*.down_proj": {"weights": {"bits": 8},
                                                                          "activations": {"bits": 16}}}}).to_dict()
_PATHS = _paths(_BASE)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(_PATHS), _DOCS), min_size=1, max_size=3))
def test_fuzz_real_keys_wrong_values(edits):
    """A valid recipe with a few real keys (leaves or whole sections) replaced by arbitrary values."""
    data = copy.deepcopy(_BASE)
    for path, value in edits:
        node = data
        for k in path[:-1]:
            if not isinstance(node.get(k), dict):
                break
            node = node[k]
        else:
            node[path[-1]] = value
    try:
        r = recipe_from_dict(data)
    except InputError as err:
        assert str(err).startswith("recipe: ") and "\n" not in str(err)
        return
    assert recipe_from_dict(r.to_dict()) == r


# ---------------------------------------------------------------------------------------------- bounds

TOO_BIG = [
    ({"calibration": {"nsamples": 10**23}},
     "calibration.nsamples: expected a positive integer up to 1000000, got 100000000000000000000000"),
    ({"calibration": {"nsamples": 1e23}}, "calibration.nsamples: expected a positive integer, got 1e+23"),
    ({"calibration": {"seqlen": 2**20 + 1}}, "calibration.seqlen: expected a positive integer up to 1048576"),
    ({"calibration": {"batch_size": 10**9}}, "calibration.batch_size: expected a positive integer up to 1000000"),
    ({"calibration": {"epochs": 10_001}}, "calibration.epochs: expected a positive integer up to 10000, got 10001"),
    ({"calibration": {"epochs": 1.0}}, "calibration.epochs: expected a positive integer, got 1.0"),
    ({"calibration": {"compensation": {"first": 10**6}}},
     "calibration.compensation.first: expected a non-negative integer up to 10000"),
    ({"calibration": {"compensation": {"last": 2.0}}},
     "calibration.compensation.last: expected a non-negative integer, got 2.0"),
    ({"weights": {"group_size": 2**21}}, "weights.group_size: expected null (per channel) or a positive integer up to"),
    ({"weights": {"group_size": 128.0}}, "weights.group_size: expected null (per channel) or a positive integer"),
    ({"overrides": {"*.o_proj": {"weights": {"group_size": 10**30}}}},
     'overrides."*.o_proj".weights.group_size: expected null (per channel) or a positive integer up to 1048576'),
    ({"eval": {"seqlen": 10**12}}, "eval.seqlen: expected a positive integer up to 1048576, got 1000000000000"),
]


@pytest.mark.parametrize("data, expected", TOO_BIG, ids=[e.split(":")[0] for _, e in TOO_BIG])
def test_absurd_sizes_and_floats_for_integers_are_refused(data, expected):
    assert expected in error_of(data)


def test_the_largest_allowed_sizes_load():
    r = recipe_from_dict({"calibration": {"nsamples": 1_000_000, "seqlen": 2**20, "epochs": 10_000}})
    assert (r.calibration.nsamples, r.calibration.seqlen, r.epochs) == (1_000_000, 2**20, 10_000)


def test_an_in_memory_bomb_is_shown_short_and_fast():
    """`recipe_from_dict` formats the bad value with a bounded repr: 9^9 shared references, no walk."""
    import time

    bomb: object = ["x"] * 9
    for _ in range(9):
        bomb = [bomb] * 9
    start = time.perf_counter()
    msg = error_of({"ignore": [bomb]})
    assert time.perf_counter() - start < 1.0
    assert "ignore.0: expected a non-empty string, got a list [[[[...], [...]" in msg and len(msg) < 200


@pytest.mark.parametrize("levels", [2, 3])
def test_documents_that_expand_past_the_bound_are_refused(tmp_path, levels):
    """10^levels * 100 values through aliases: 10^4 loads, 10^5 is refused."""
    items = ", ".join(["a"] * 100)
    anchors = [f"&l0 [{items}]"] + [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, levels + 1)]
    path = write(tmp_path, f"eval: {{datasets: [{', '.join(anchors)}]}}\n")
    with pytest.raises(InputError) as exc:
        load_recipe(path)
    expected = "expands to more than 100000 values" if levels == 3 else "eval.datasets.0: expected a non-empty string"
    assert expected in str(exc.value)


@pytest.mark.parametrize("text, expected", [
    ("calibration: {seed: 2024-13-01}\n", "invalid YAML: month must be in 1..12"),
    (f"calibration: {{seed: {'9' * 5000}}}\n", "invalid YAML: Exceeds the limit (4300 digits)"),
    ("ignore: " + "[" * 5000 + "]" * 5000 + "\n", "invalid YAML: nested too deeply"),
])
def test_yaml_values_no_constructor_accepts_are_input_errors(tmp_path, text, expected):
    with pytest.raises(InputError, match=r"recipe\.yaml: ") as exc:
        load_recipe(write(tmp_path, text))
    assert expected in str(exc.value) and "\n" not in str(exc.value)


def test_set_errors_show_long_items_short():
    with pytest.raises(InputError) as exc:
        load_recipe("w4a4", ["weights.bits=4", f"weights.bits.{'x' * 100_000}=1"])
    assert "not a mapping" in str(exc.value) and len(str(exc.value)) < 300
    with pytest.raises(InputError) as exc:
        load_recipe("w4a4", [f"weights.bits=[{'1, ' * 100_000}"])
    assert "cannot parse the value" in str(exc.value) and len(str(exc.value)) < 300


def test_scale_dtype_defaults_to_float16_and_overrides_like_any_weights_key():
    r = recipe_from_dict({"scheme": "w4a16", "weights": {"group_size": 64},
                          "overrides": {"*.down_proj": {"weights": {"scale_dtype": "float32"}}}})
    assert r.layer_quant("model.layers.0.mlp.up_proj").weight == WeightQuantSpec(4, 64, False, "float16")
    assert r.layer_quant("model.layers.0.mlp.down_proj").weight == WeightQuantSpec(4, 64, False, "float32")
    assert "weights.scale_dtype: expected one of: float16, float32, got 'bfloat16'" in error_of(
        {"weights": {"scale_dtype": "bfloat16"}})

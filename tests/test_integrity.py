"""Broken, foreign or edited model inputs and abq exports (issue 9 items 2 and 3): each is opened as what
it is or refused with exit 2 and one `error:` line, before any weight is loaded where the files already
say what is wrong, and nothing on disk changes.

The exports are real ones: `abq quantize` (hf-fakequant) and `abq pack` (abq-packed) on the tiny llama,
made once per module; every test edits a copy.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from test_export_packed import fix_checksum, write_sealed_manifest
from test_quantize_cli import abq, dir_bytes, error_line, flat, write_recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LAYER = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny_llama, tiny_text_file) -> dict[str, Path]:
    """{'fakequant': dir, 'packed': dir}: read-only exports of the tiny llama (W4A4, kv 4)."""
    root = tmp_path_factory.mktemp("integrity")
    work = root / "run"
    assert abq(work, "quantize", write_recipe(work, tiny_llama, tiny_text_file)) == 0
    fakequant = work / "out" / "hf-fakequant"
    assert abq(root, "pack", fakequant, "--output", root / "packed") == 0
    return {"fakequant": fakequant, "packed": root / "packed"}


@pytest.fixture
def weight_loads(monkeypatch) -> list[str]:
    """Records every weight load (transformers' from_pretrained, safetensors' load_file) of the test."""
    import safetensors.torch
    from transformers import AutoModelForCausalLM

    calls: list[str] = []
    real_from_pretrained, real_load_file = AutoModelForCausalLM.from_pretrained, safetensors.torch.load_file

    def from_pretrained(*args, **kwargs):
        calls.append(f"from_pretrained {args[0]}")
        return real_from_pretrained(*args, **kwargs)

    def load(path, *args, **kwargs):
        calls.append(f"load_file {path}")
        return real_load_file(path, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", from_pretrained)
    monkeypatch.setattr(safetensors.torch, "load_file", load)
    return calls


def copy_of(source: Path, tmp_path: Path, name: str = "model") -> Path:
    target = tmp_path / name
    shutil.copytree(source, target)
    return target


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2))


def eval_args(model: Path, text: Path) -> list:
    return ["eval", "--model", model, "--dataset", text, "--seqlen", "32", "--limit", "1", "--device", "cpu"]


@pytest.fixture
def refused(tmp_path, capsys, tiny_text_file):
    """refused(command, model, match): run `abq eval --model MODEL` or `abq quantize` of a recipe naming
    MODEL in `tmp_path` (which also holds a decoy directory); assert exit 2, one `error:` line matching
    `match`, no traceback, no load report and not a byte changed under `tmp_path`. Returns the line."""

    def run(command: str, model: Path, match: str) -> str:
        decoy = tmp_path / "decoy"
        decoy.mkdir(exist_ok=True)
        (decoy / "notes.txt").write_text("keep me\n")
        (decoy / "weights.bin").write_bytes(os.urandom(256))
        if command == "eval":
            args = eval_args(model, tiny_text_file)
        else:
            args = ["quantize", write_recipe(tmp_path / "work", model, tiny_text_file)]
        before = dir_bytes(tmp_path)
        capsys.readouterr()
        rc = abq(tmp_path, *args)
        err = capsys.readouterr().err
        line = flat(error_line(err))
        assert rc == 2, err
        assert re.search(match, line), line
        assert "LOAD REPORT" not in err
        assert dir_bytes(tmp_path) == before
        return line

    return run


# ------------------------------------------------------------------------------- foreign abq artefacts


@pytest.mark.parametrize("command", ["eval", "quantize"])
def test_packed_export_without_manifest(exports, tmp_path, refused, weight_loads, command):
    model = copy_of(exports["packed"], tmp_path)
    (model / "abq.json").unlink()
    refused(command, model, r"abq export without its abq\.json .*quant_method 'abq'")
    assert weight_loads == []


def test_btc_tensors_without_manifest(exports, tmp_path, refused, weight_loads):
    """Only the tensor names (read from the header) tell: no manifest, no abq quantization_config."""
    model = copy_of(exports["packed"], tmp_path)
    (model / "abq.json").unlink()
    edit_json(model / "config.json", lambda config: config.pop("quantization_config"))
    refused("eval", model, r"model\.safetensors holds BTC tensors such as .*\.btc_")
    assert weight_loads == []


@pytest.mark.parametrize("command", ["eval", "quantize"])
def test_fakequant_export_without_manifest(exports, tmp_path, refused, weight_loads, command):
    model = copy_of(exports["fakequant"], tmp_path)
    (model / "abq.json").unlink()
    refused(command, model, r"without its abq\.json .*quant_state\.safetensors")
    assert weight_loads == []


@pytest.mark.parametrize("kind", ["packed", "fakequant", "folder"])
def test_quantize_refuses_an_abq_output(exports, tmp_path, refused, weight_loads, kind):
    model = copy_of(exports["fakequant"].parent if kind == "folder" else exports[kind], tmp_path)
    refused("quantize", model, r"already quantized")
    assert weight_loads == []


@pytest.mark.parametrize("kind", ["packed", "fakequant"])
def test_valid_exports_still_open(exports, tmp_path, capsys, tiny_text_file, kind):
    rc = abq(tmp_path, *eval_args(exports[kind], tiny_text_file))
    assert rc == 0, capsys.readouterr().err


# ------------------------------------------------------------------------------- the manifest's coverage


@pytest.mark.parametrize("kind", ["packed", "fakequant"])
@pytest.mark.parametrize("field", ["act_bits", "kv_bits"])
def test_edited_manifest_refused(exports, tmp_path, refused, weight_loads, kind, field):
    model = copy_of(exports[kind], tmp_path)

    def edit(manifest):
        if field == "kv_bits":
            manifest["kv_bits"] = 8
        else:
            manifest["layers"][LAYER]["act_bits"] = 8

    edit_json(model / "abq.json", edit)
    refused("eval", model, r"abq\.json was modified or is corrupted")
    assert weight_loads == []


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json"])
@pytest.mark.parametrize("sealed", [False, True])
def test_manifest_must_list_what_the_reader_needs(exports, tmp_path, refused, weight_loads, name, sealed):
    """Refused whether or not the manifest's seal was recomputed after the entry was dropped."""
    model = copy_of(exports["packed"], tmp_path)
    manifest = json.loads((model / "abq.json").read_text())
    del manifest["files"][name]
    if sealed:
        write_sealed_manifest(model, manifest)
    else:
        (model / "abq.json").write_text(json.dumps(manifest))
    refused("eval", model, rf"does not list {re.escape(name)}, which the abq-packed")
    assert weight_loads == []


def test_fakequant_manifest_must_list_its_integer_state(exports, tmp_path, refused):
    model = copy_of(exports["fakequant"], tmp_path)
    manifest = json.loads((model / "abq.json").read_text())
    del manifest["files"]["quant_state.safetensors"]
    write_sealed_manifest(model, manifest)
    refused("eval", model, r"does not list quant_state\.safetensors")


MALFORMED = {
    "list": (lambda files: list(files), r"'files' must map relative paths to sha256 digests, got a list"),
    "not-hex": (lambda files: {**files, "config.json": "zz" * 32}, r"'config\.json' is not a sha256 digest"),
    "short": (lambda files: {**files, "config.json": "abc"}, r"'config\.json' is not a sha256 digest"),
    "number": (lambda files: {**files, "config.json": 7}, r"'config\.json' is not a sha256 digest: 7"),
    "parent": (lambda files: {**files, "../x": "0" * 64}, r"'\.\./x' is not a relative path inside"),
    "absolute": (lambda files: {**files, "/etc/passwd": "0" * 64}, r"'/etc/passwd' is not a relative path"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_files_entry_refused(exports, tmp_path, refused, weight_loads, case):
    change, match = MALFORMED[case]
    model = copy_of(exports["fakequant"], tmp_path)
    edit_json(model / "abq.json", lambda manifest: manifest.update(files=change(manifest["files"])))
    refused("eval", model, match)
    assert weight_loads == []


@pytest.mark.parametrize("field,value", [("act_bits", 8), ("bits", 3), ("group_size", 32)])
def test_config_and_manifest_must_agree(exports, tmp_path, refused, weight_loads, field, value):
    """config.json edited and its checksum updated: only the disagreement with abq.json is left."""
    model = copy_of(exports["packed"], tmp_path)
    edit_json(model / "config.json",
              lambda config: config["quantization_config"]["modules"][LAYER].update({field: value}))
    fix_checksum(model, "config.json")
    refused("eval", model,
            rf"config\.json and abq\.json disagree on {re.escape(LAYER)} {field}: {value} in config\.json")
    assert weight_loads == []


def test_config_and_manifest_must_agree_on_kv_bits(exports, tmp_path, refused):
    model = copy_of(exports["packed"], tmp_path)
    edit_json(model / "config.json", lambda config: config["quantization_config"].update(kv_bits=8))
    fix_checksum(model, "config.json")
    refused("eval", model, r"disagree on kv_bits: 8 in config\.json, 4 in abq\.json")


# ------------------------------------------------------------------ weights transformers would invent


def drop_tensor(path: Path, name: str) -> None:
    tensors = load_file(str(path))
    del tensors[name]
    save_file(tensors, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize("command", ["eval", "quantize"])
def test_checkpoint_lacking_a_tensor(tiny_llama, tmp_path, refused, command):
    model = copy_of(tiny_llama, tmp_path)
    drop_tensor(model / "model.safetensors", "model.layers.1.mlp.up_proj.weight")
    refused(command, model, r"lacks weights: model\.layers\.1\.mlp\.up_proj\.weight$")


def test_checkpoint_with_a_tensor_of_the_wrong_shape(tiny_llama, tmp_path, refused):
    model = copy_of(tiny_llama, tmp_path)
    tensors = load_file(str(model / "model.safetensors"))
    tensors["model.norm.weight"] = torch.ones(32)
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    refused("eval", model,
            r"wrong shape: model\.norm\.weight \(\[32\] in the checkpoint, \[64\] in the model\)")


def test_many_missing_tensors_are_counted(tiny_llama, tmp_path, refused):
    model = copy_of(tiny_llama, tmp_path)
    tensors = load_file(str(model / "model.safetensors"))
    save_file({"model.norm.weight": tensors["model.norm.weight"]}, str(model / "model.safetensors"))
    line = refused("eval", model, r"lacks weights: .* and \d+ more$")
    assert line.count(",") == 4


def test_fakequant_checkpoint_lacking_a_tensor(exports, tmp_path, refused):
    model = copy_of(exports["fakequant"], tmp_path)
    drop_tensor(model / "model.safetensors", "model.norm.weight")
    fix_checksum(model, "model.safetensors")
    refused("eval", model, r"lacks weights: model\.norm\.weight$")


# ------------------------------------------------------------------------------- broken model directories


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def random_bytes(path: Path) -> None:
    path.write_bytes(os.urandom(path.stat().st_size))


BROKEN_DIRS = {
    "no-weights": (lambda d: (d / "model.safetensors").unlink(), r"has config\.json but no weight files"),
    "truncated": (lambda d: truncate(d / "model.safetensors"),
                  r"model\.safetensors is not a valid safetensors file \(corrupt or truncated\)"),
    "random-bytes": (lambda d: random_bytes(d / "model.safetensors"), r"not a valid safetensors file"),
    "config-not-json": (lambda d: (d / "config.json").write_text("{model_type: llama"),
                        r"config\.json is not valid JSON"),
    "config-binary": (lambda d: (d / "config.json").write_bytes(b"\xff\xfe\x00"),
                      r"config\.json is not valid JSON: not UTF-8"),
    "config-a-list": (lambda d: (d / "config.json").write_text("[1, 2]"),
                      r"config\.json is not a JSON object"),
    "config-wrong-type": (lambda d: edit_json(d / "config.json", lambda c: c.update(hidden_size="big")),
                          r"cannot read the model config of .*'hidden_size'.* expected int, got str"),
    "model-type-number": (lambda d: edit_json(d / "config.json", lambda c: c.update(model_type=5)),
                          r"model_type must be a string, got 5"),
    "no-tokenizer": (lambda d: [(d / n).unlink() for n in ("tokenizer.json", "tokenizer_config.json")],
                     r"model directory has no tokenizer \(none of tokenizer\.json"),
}


@pytest.mark.parametrize("command", ["eval", "quantize"])
@pytest.mark.parametrize("case", list(BROKEN_DIRS))
def test_broken_model_dir(tiny_llama, tmp_path, refused, weight_loads, case, command):
    damage, match = BROKEN_DIRS[case]
    model = copy_of(tiny_llama, tmp_path)
    damage(model)
    refused(command, model, match)
    assert weight_loads == []


def test_tokenizer_that_cannot_load(tiny_llama, tmp_path, refused):
    """Tokenizer files that transformers cannot use: one line, not its multi-line explanation."""
    model = copy_of(tiny_llama, tmp_path)
    (model / "tokenizer.json").unlink()
    (model / "vocab.txt").write_text("")
    refused("eval", model, r"cannot load the tokenizer of ")


@pytest.mark.parametrize("damage", [truncate, random_bytes], ids=["truncated", "random-bytes"])
def test_packed_export_with_corrupt_weights(exports, tmp_path, refused, damage):
    model = copy_of(exports["packed"], tmp_path)
    damage(model / "model.safetensors")
    fix_checksum(model, "model.safetensors")  # past the checksum: the reader itself refuses
    refused("eval", model, r"cannot read .*model\.safetensors")


@pytest.mark.parametrize("damage", [truncate, random_bytes], ids=["truncated", "random-bytes"])
def test_fakequant_export_with_corrupt_quant_state(exports, tmp_path, refused, weight_loads, damage):
    model = copy_of(exports["fakequant"], tmp_path)
    damage(model / "quant_state.safetensors")
    fix_checksum(model, "quant_state.safetensors")
    refused("eval", model, r"cannot read .*quant_state\.safetensors")
    assert not any(call.startswith("from_pretrained") for call in weight_loads)


def test_tied_embeddings_are_not_missing(tmp_path, capsys, tiny_text_file):
    """A checkpoint that stores a tied lm_head once (as the cached copy of SmolLM2's GGUF does) is not
    reported as lacking it."""
    from conftest import llama_config, save_tiny_model

    config = llama_config()
    config.tie_word_embeddings = True
    model = save_tiny_model(config, tmp_path / "tied")
    assert "lm_head.weight" not in load_file(str(model / "model.safetensors"))
    rc = abq(tmp_path, *eval_args(model, tiny_text_file))
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "LOAD REPORT" not in err


def test_manifest_without_its_seal(exports, tmp_path, refused):
    model = copy_of(exports["fakequant"], tmp_path)
    edit_json(model / "abq.json", lambda manifest: manifest.pop("manifest_sha256"))
    refused("eval", model, r"abq\.json has no manifest_sha256 \(written by an older abq, or edited\)")


def edit_tensor(directory: Path, name: str, edit) -> None:
    """Change one tensor of model.safetensors in place (and re-seal the manifest to reach the reader)."""
    path = directory / "model.safetensors"
    tensors = load_file(path)
    tensors[name] = edit(tensors[name].clone())
    save_file(tensors, str(path), metadata={"format": "pt"})
    fix_checksum(directory, "model.safetensors")


def _set_padding_bit(planes):
    planes.view(torch.int32)[0, 0, -1] |= 1 << 31  # column Kp - 1: K = 64 of the tiny model pads to 128
    return planes


@pytest.mark.parametrize("tensor, edit, match", [
    ("btc_planes", _set_padding_bit, "non-zero padding bits"),
    ("btc_zeros", lambda zeros: zeros[:-1], r"zero points: expected uint8 \[32\]"),
    ("btc_scales", lambda scales: -scales, "scales must be finite and positive"),
    ("btc_scales", lambda scales: scales.bfloat16(), "scales must be float16 or float32"),
])
def test_packed_tensors_whose_content_a_reader_must_refuse(exports, tmp_path, refused, tensor, edit, match):
    model = copy_of(exports["packed"], tmp_path)
    edit_tensor(model, f"{LAYER}.{tensor}", edit)
    refused("eval", model, f"{LAYER}: bad BTC tensors: {match}")

"""The packed runtime: BTCLinear, load_packed and its refusals, open_abq_output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from abqcli.btc.format import FORMAT_VERSION, PackedWeight
from abqcli.btc.gemm import btc_linear
from abqcli.errors import InputError
from abqcli.quant.quantizer import WeightQuantSpec, fake_quantize_activation, quantize_weight
from test_export_packed import SCHEMES, assert_same_logits, export_packed, fix_checksum, rtn_model, sample_ids


@pytest.fixture(scope="module")
def packed_llama(tiny_llama, tmp_path_factory) -> Path:
    """A W4A4 export of the tiny llama (read-only: tests that modify it work on a copy)."""
    out = tmp_path_factory.mktemp("runtime") / "packed"
    export_packed(tiny_llama, out, SCHEMES["w4a4"][0], 4)
    return out


@pytest.fixture
def packed_copy(packed_llama, tmp_path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(packed_llama, out)
    return out


def _one_line_error(directory, match: str, **kwargs) -> str:
    from abqcli.formats.abq_packed import load_packed

    with pytest.raises(InputError, match=match) as info:
        load_packed(directory, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------------------------ BTCLinear


@pytest.mark.parametrize("bits,balance,act_bits,group", [(4, False, 4, None), (2, True, 8, None),
                                                         (3, False, 16, 32), (4, False, 8, 128)])
def test_btc_linear_module(bits, balance, act_bits, group):
    from abqcli.runtime import BTCLinear

    torch.manual_seed(0)
    weight, bias, x = torch.randn(24, 256), torch.randn(24), torch.randn(2, 5, 256)
    state = quantize_weight(weight, WeightQuantSpec(bits, group, balance))
    pw = PackedWeight.from_quantized(state)
    layer = BTCLinear(pw, act_bits, bias)
    layer.prepare()
    y = layer(x)
    assert y.shape == (2, 5, 24) and y.dtype == x.dtype
    assert torch.equal(y, btc_linear(x, pw, act_bits, bias))
    ref = F.linear(fake_quantize_activation(x, act_bits), state.dequantize(), bias)
    assert float((y - ref).abs().max() / ref.abs().max()) <= 1e-5
    assert f"W{bits}{'*' if balance else ''}" in repr(layer) and f"A{act_bits}" in repr(layer)
    assert [n for n, _ in layer.named_parameters()] == ["bias"]


def test_btc_linear_rejects_unknown_backend():
    from abqcli.runtime import BTCLinear

    pw = PackedWeight.from_quantized(quantize_weight(torch.randn(8, 128), WeightQuantSpec(4)))
    with pytest.raises(InputError, match="unknown backend"):
        BTCLinear(pw, 4, backend="tpu")


# ------------------------------------------------------------------------------------------ loading


def test_load_packed_runs_and_reports(packed_llama, tiny_llama):
    from abqcli.formats.abq_packed import load_packed
    from abqcli.runtime import BTCLinear

    model, tokenizer, manifest = load_packed(packed_llama)
    assert manifest["format"] == "abq-packed"
    assert not hasattr(model.config, "quantization_config")  # transformers never saw it
    assert model.abq_quantization_config["quant_method"] == "abq"
    assert model.config._attn_implementation == "abq"
    attn = model.model.layers[0].self_attn
    assert attn.abq_kv_bits == 4
    assert isinstance(attn.q_proj, BTCLinear) and not isinstance(model.lm_head, BTCLinear)
    ids = torch.tensor([tokenizer("the small cat sees a dog .").input_ids])
    assert torch.isfinite(model(ids).logits).all()
    # the unquantized tensors are the original ones
    original = load_file(str(tiny_llama / "model.safetensors"))
    assert torch.equal(model.model.norm.weight, original["model.norm.weight"])
    assert torch.equal(model.lm_head.weight, original["lm_head.weight"])


def test_load_packed_bfloat16(packed_llama):
    """bf16: the packed layers compute in fp32 and return bf16; agreement with the bf16 fake-quant twin
    is bounded by bf16 rounding (weights and activations to 8 significant bits)."""
    from abqcli.formats.abq_packed import load_fakequant_twin, load_packed
    from abqcli.verify import teacher_forced_logits

    model, _, _ = load_packed(packed_llama, dtype="bfloat16")
    twin, _, _ = load_fakequant_twin(packed_llama, dtype="bfloat16")
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    lp, lr, _ = teacher_forced_logits(model, twin, sample_ids())
    assert torch.isfinite(lp).all()
    assert float((lp - lr).abs().max() / lr.abs().max()) < 0.1


def test_truncated_safetensors_refused(packed_copy):
    path = packed_copy / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _one_line_error(packed_copy, "checksum mismatch: .*model.safetensors")
    fix_checksum(packed_copy, "model.safetensors")  # past the checksum: the reader itself refuses
    _one_line_error(packed_copy, "cannot read .*model.safetensors")


def test_bit_flip_refused(packed_copy):
    path = packed_copy / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) - 100] ^= 0x10
    path.write_bytes(bytes(data))
    _one_line_error(packed_copy, "checksum mismatch")


def test_missing_file_refused(packed_copy):
    (packed_copy / "recipe.yaml").unlink()
    _one_line_error(packed_copy, "missing file listed in abq.json")


def test_newer_format_version_in_manifest_refused(packed_copy):
    manifest = json.loads((packed_copy / "abq.json").read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    (packed_copy / "abq.json").write_text(json.dumps(manifest))
    message = _one_line_error(packed_copy, f"format_version {FORMAT_VERSION + 1}")
    assert f"reads up to {FORMAT_VERSION}" in message and "upgrade abq" in message


def _rewrite_as_version(directory: Path, version: int) -> None:
    """Turn a current export into what abq wrote as `version` (1 or 2): float32 scales and zero
    points, int32 code sums beside them; config.json and abq.json say `version`, sealed again."""
    from abqcli.btc.format import packed_weight_from_tensors
    from test_export_packed import write_sealed_manifest

    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    config = json.loads((directory / "config.json").read_text())
    for name, meta in config["quantization_config"]["modules"].items():
        pw = packed_weight_from_tensors(name, tensors, meta)
        tensors.update({f"{name}.btc_scales": pw.scale, f"{name}.btc_zeros": pw.zero,
                        f"{name}.btc_code_sums": pw.code_sums})
    save_file(tensors, str(path), metadata={"format": "pt"})
    config["quantization_config"]["format_version"] = version
    (directory / "config.json").write_text(json.dumps(config))
    fix_checksum(directory, "model.safetensors")
    fix_checksum(directory, "config.json")
    manifest = json.loads((directory / "abq.json").read_text())
    manifest["format_version"] = version
    write_sealed_manifest(directory, manifest)


@pytest.mark.parametrize("version", [1, 2])
def test_older_format_versions_still_open(packed_llama, packed_copy, version):
    """A version-1 or -2 file (float32 scales and zero points, stored code sums; version 1 from before
    online transforms existed: no module has one) opens, reports its version, and runs identically."""
    from abqcli.formats.abq_packed import load_packed
    from abqcli.verify import inspect_export

    config = json.loads((packed_copy / "config.json").read_text())
    assert not any("input_transform" in m for m in config["quantization_config"]["modules"].values())
    _rewrite_as_version(packed_copy, version)
    ids = sample_ids()
    old, _, old_manifest = load_packed(packed_copy)
    new, _, _ = load_packed(packed_llama)
    assert old_manifest["format_version"] == version
    with torch.no_grad():
        assert torch.equal(old(ids).logits, new(ids).logits)
    old_info, new_info = inspect_export(packed_copy)["totals"], inspect_export(packed_llama)["totals"]
    assert old_info["bytes"]["code_sums"] > 0 and "code_sums" not in new_info["bytes"]
    assert old_info["overhead_bits_per_weight"] > 3 * new_info["overhead_bits_per_weight"]


def test_newer_format_version_in_config_refused(packed_copy):
    config = json.loads((packed_copy / "config.json").read_text())
    config["quantization_config"]["format_version"] = 7
    (packed_copy / "config.json").write_text(json.dumps(config))
    _one_line_error(packed_copy, "checksum mismatch")
    fix_checksum(packed_copy, "config.json")
    _one_line_error(packed_copy, "config.json: btc-bitplane format_version 7; .* reads versions 1 to 5: upgrade abq")


def test_wrong_quant_method_refused(packed_copy):
    config = json.loads((packed_copy / "config.json").read_text())
    config["quantization_config"]["quant_method"] = "gptq"
    (packed_copy / "config.json").write_text(json.dumps(config))
    fix_checksum(packed_copy, "config.json")
    _one_line_error(packed_copy, "'gptq'")


@pytest.mark.parametrize("tensor", ["model.layers.1.mlp.up_proj.btc_scales", "model.layers.0.self_attn.k_proj.btc_planes",
                                    "model.norm.weight"])
def test_missing_tensor_refused(packed_copy, tensor):
    path = packed_copy / "model.safetensors"
    tensors = load_file(str(path))
    del tensors[tensor]
    save_file(tensors, str(path))
    fix_checksum(packed_copy, "model.safetensors")
    message = _one_line_error(packed_copy, "missing")
    assert tensor in message


def test_not_an_abq_export_refused(tiny_llama, tmp_path):
    _one_line_error(tiny_llama, "not an abq output directory")
    _one_line_error(tmp_path / "nowhere", "not an abq output directory")


def test_fakequant_dir_refused_by_load_packed(tiny_llama, tmp_path):
    from abqcli.formats import ExportInput
    from abqcli.formats.hf_fakequant import HF_FAKEQUANT

    model, tokenizer, layers, states = rtn_model(tiny_llama, SCHEMES["w4a4"][0], 4)
    HF_FAKEQUANT.write(tmp_path / "fq", ExportInput(model, tokenizer, "", 4, layers, states, {}))
    _one_line_error(tmp_path / "fq", "holds format 'hf-fakequant', expected 'abq-packed'")


def test_cupy_backend_without_gpu_refused(packed_llama):
    from abqcli.btc import cuda as btc_cuda

    if btc_cuda.available()[0]:
        pytest.skip("a CUDA GPU with CuPy is present")
    message = _one_line_error(packed_llama, "needs a CUDA GPU", backend="cupy")
    assert "--backend cpu" in message


def test_unknown_backend_refused(packed_llama):
    _one_line_error(packed_llama, "unknown backend", backend="metal")


# ------------------------------------------------------------------------------------------ open_abq_output


def test_open_abq_output_dispatch(packed_llama, tiny_llama, tmp_path):
    from abqcli.formats import ExportInput
    from abqcli.formats.hf_fakequant import HF_FAKEQUANT
    from abqcli.formats.manifest import open_abq_output
    from abqcli.runtime import BTCLinear

    model, _, mode = open_abq_output(packed_llama, "float32", "cpu", "cpu")
    assert mode == "packed BTC W4A4 (kv A4) (backend cpu)"
    assert isinstance(model.model.layers[0].mlp.up_proj, BTCLinear)

    fq_model, tok, layers, states = rtn_model(tiny_llama, SCHEMES["w2*a8"][0], 8)
    run_dir = tmp_path / "run"  # the layout `abq quantize` writes: one folder per format
    HF_FAKEQUANT.write(run_dir / "hf-fakequant", ExportInput(fq_model, tok, "", 8, layers, states, {"method": "abq"}))
    opened, _, mode = open_abq_output(run_dir, "float32", "cpu", "cpu")
    assert mode == "calibrated fake-quant W2*A8 (kv A8) (abq)"
    ids = sample_ids()
    with torch.no_grad():
        assert torch.allclose(opened(ids).logits, fq_model(ids).logits, rtol=0, atol=1e-5)

    shutil.copytree(packed_llama, run_dir / "abq-packed")
    _, _, mode = open_abq_output(run_dir, "float32", "cpu", "cpu")
    assert mode.startswith("packed BTC")
    with pytest.raises(InputError, match="not an abq output"):
        open_abq_output(tiny_llama)


def test_describe_layers_mixed():
    from abqcli.formats import describe_layers

    meta = {"bits": 4, "balance": False, "group_size": None, "act_bits": 16}
    modules = {"a": meta, "b": meta, "c": {**meta, "bits": 8, "group_size": 128}}
    assert describe_layers(modules, 16) == "W4A16/W8A16 g128"
    assert describe_layers({"a": meta}, 8) == "W4A16 (kv A8)"


def test_round_trip_against_rtn_model_llama_w2star(packed_llama, tiny_llama, tmp_path):
    """load_packed of a W2*A8 export matches the in-memory fake-quant model (teacher-forced)."""
    from abqcli.formats.abq_packed import load_packed

    out = tmp_path / "w2"
    reference = export_packed(tiny_llama, out, SCHEMES["w2*a8"][0], 8)
    model, _, _ = load_packed(out)
    assert_same_logits(model, reference, sample_ids(48, seed=3))


def test_a_version_3_export_still_opens(packed_copy, packed_llama):
    """Version 4 only adds sharding: a version-3 export (one model.safetensors) opens and runs the same."""
    from abqcli.formats.abq_packed import load_packed
    from test_export_packed import write_sealed_manifest

    config = json.loads((packed_copy / "config.json").read_text())
    config["quantization_config"]["format_version"] = 3
    (packed_copy / "config.json").write_text(json.dumps(config))
    fix_checksum(packed_copy, "config.json")
    manifest = json.loads((packed_copy / "abq.json").read_text())
    manifest["format_version"] = 3
    write_sealed_manifest(packed_copy, manifest)
    old, _, old_manifest = load_packed(packed_copy)
    new, _, _ = load_packed(packed_llama)
    assert old_manifest["format_version"] == 3
    ids = sample_ids()
    with torch.no_grad():
        assert torch.equal(old(ids).logits, new(ids).logits)

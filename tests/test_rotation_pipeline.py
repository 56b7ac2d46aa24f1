"""A rotated model through the whole pipeline: calibration, both export formats, abq verify, abq eval,
a plain transformers load, and the refusals."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from test_quantize_cli import abq, error_line, first_window, write_recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROTATED = "rotation: hadamard"
FORMATS = "output: {dir: out, formats: [abq-packed, hf-fakequant]}"


@pytest.fixture(scope="module")
def rotated_runs(tmp_path_factory, tiny_models, tiny_text_file) -> dict[str, Path]:
    """W4A4 with a Hadamard rotation, ABQ-calibrated, on the tiny llama and qwen2: output dir per family."""
    outs = {}
    for family in ("llama", "qwen2"):
        work = tmp_path_factory.mktemp(f"rotated-{family}")
        recipe = write_recipe(work, tiny_models[family], tiny_text_file, calibration=ROTATED)
        recipe.write_text(recipe.read_text().replace("output: {dir: out, formats: [hf-fakequant]}", FORMATS))
        assert abq(work, "quantize", recipe) == 0
        outs[family] = work / "out"
    return outs


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_rotated_export_records_the_online_transforms(rotated_runs, family):
    out = rotated_runs[family]
    for fmt in ("abq-packed", "hf-fakequant"):
        manifest = json.loads((out / fmt / "abq.json").read_text())
        online = {name for name, meta in manifest["layers"].items() if meta.get("input_transform") == "hadamard"}
        assert online == {f"model.layers.{i}.mlp.down_proj" for i in range(2)}
        assert manifest["provenance"]["rotation"] == {"kind": "hadamard", "online": ["hadamard"],
                                                      "untied_embeddings": False, "kv_transform": "hadamard"}
        assert manifest["kv_transform"] == "hadamard"  # W4A4 quantizes kv at 4 bits: R3 on q and k
    config = json.loads((out / "abq-packed" / "config.json").read_text())
    modules = config["quantization_config"]["modules"]
    assert modules["model.layers.0.mlp.down_proj"]["input_transform"] == "hadamard"
    assert "input_transform" not in modules["model.layers.0.mlp.up_proj"]
    assert config["quantization_config"]["kv_transform"] == "hadamard"
    plain = json.loads((out / "hf-fakequant" / "abq.json").read_text())["plain_load"]
    assert plain["w_a_exact"] is False and plain["online_transforms_needed"] == sorted(online)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_verify_passes_on_a_rotated_w4a4_export(rotated_runs, family, no_data_dir_env):
    from abqcli.verify import verify_export

    report = verify_export(rotated_runs[family] / "abq-packed", seqlen=32, windows=2)
    assert report.ok, report.problems
    assert report.layers_integer_exact == report.layers_integer_checked == 14
    down = [r for r in report.layers if r["name"].endswith("down_proj")]
    assert down and all(r["input_transform"] == "hadamard" for r in down)


def test_packed_and_fakequant_exports_compute_the_same_logits(rotated_runs, tiny_text_file):
    from abqcli.formats.abq_packed import load_packed
    from abqcli.formats.hf_fakequant import open_fakequant

    out = rotated_runs["llama"]
    window = first_window(out / "hf-fakequant", tiny_text_file)
    packed, _, _ = load_packed(out / "abq-packed")
    fakequant, _, _ = open_fakequant(out / "hf-fakequant", "float32", "cpu")
    with torch.no_grad():
        torch.testing.assert_close(packed(window).logits, fakequant(window).logits, rtol=1e-4, atol=1e-4)


def test_plain_transformers_load_computes_the_weight_quantized_model(rotated_runs, tiny_text_file):
    """The checkpoint folds the online transform back into the weights (Ŵ·Hᵀ): a plain load equals abq's
    own load with the activation and kv quantizers switched off."""
    from transformers import AutoModelForCausalLM

    from abqcli.formats.hf_fakequant import open_fakequant
    from abqcli.models.adapters import adapter_for
    from abqcli.quant.fakequant import QuantLinear, set_kv_quant

    fq = rotated_runs["llama"] / "hf-fakequant"
    window = first_window(fq, tiny_text_file)
    plain = AutoModelForCausalLM.from_pretrained(fq, local_files_only=True, dtype=torch.float32).eval()
    ours, _, _ = open_fakequant(fq, "float32", "cpu")
    for module in ours.modules():
        if isinstance(module, QuantLinear):
            module.quant = dataclasses.replace(module.quant, act_bits=16)
            module.centred_codes = None
    set_kv_quant(ours, adapter_for(ours), 16)
    with torch.no_grad():
        torch.testing.assert_close(plain(window).logits, ours(window).logits, rtol=1e-4, atol=1e-4)


def test_rtn_eval_with_a_rotation(tiny_llama, tiny_text_file, tmp_path, capsys):
    recipe = write_recipe(tmp_path, tiny_llama, tiny_text_file, calibration=ROTATED)
    result = tmp_path / "eval.json"
    rc = abq(tmp_path, "eval", "--model", tiny_llama, "--recipe", recipe, "--dataset", tiny_text_file,
             "--seqlen", "32", "--limit", "2", "--device", "cpu", "--json", result)
    assert rc == 0, capsys.readouterr().err
    assert json.loads(result.read_text())["mode"] == "fake-quant RTN W4A4 (kv A4), hadamard rotation"


def test_rotating_opt_is_refused_before_calibration(tiny_opt, tiny_text_file, tmp_path, capsys):
    rc = abq(tmp_path, "quantize", write_recipe(tmp_path, tiny_opt, tiny_text_file, calibration=ROTATED))
    line = error_line(capsys.readouterr().err)
    assert rc == 2
    assert "calibration.rotation" in line and "LayerNorm" in line
    assert not (tmp_path / "out").exists()


def test_unknown_rotation_is_a_recipe_error(tiny_llama, tiny_text_file, tmp_path, capsys):
    recipe = write_recipe(tmp_path, tiny_llama, tiny_text_file, calibration="rotation: spin")
    rc = abq(tmp_path, "quantize", recipe)
    line = error_line(capsys.readouterr().err)
    assert rc == 2
    assert "calibration.rotation" in line and "hadamard" in line


# ------------------------------------------------------------------------------- activation clipping


@pytest.fixture(scope="module")
def clipped_run(tmp_path_factory, tiny_llama, tiny_text_file) -> Path:
    """W4A4 rotated, ABQ-calibrated with `activations.clip: 0.9` (0.95 on down_proj through an override)
    and `kv.clip: 0.8`, both formats."""
    work = tmp_path_factory.mktemp("clipped")
    extra = 'activations: {clip: 0.9}\nkv: {clip: 0.8}\noverrides: {"*.down_proj": {activations: {clip: 0.95}}}'
    recipe = write_recipe(work, tiny_llama, tiny_text_file, extra=extra, calibration=ROTATED)
    recipe.write_text(recipe.read_text().replace("output: {dir: out, formats: [hf-fakequant]}", FORMATS))
    assert abq(work, "quantize", recipe) == 0
    return work / "out"


def test_clipped_export_records_the_clip_ratio_and_verifies(clipped_run, no_data_dir_env):
    from abqcli.formats.abq_packed import load_packed
    from abqcli.verify import verify_export

    def expected(name: str) -> float:
        return 0.95 if name.endswith("down_proj") else 0.9

    for fmt in ("abq-packed", "hf-fakequant"):
        manifest = json.loads((clipped_run / fmt / "abq.json").read_text())
        assert all(meta["act_clip"] == expected(name) for name, meta in manifest["layers"].items())
        assert manifest["kv_clip"] == 0.8
    config = json.loads((clipped_run / "abq-packed" / "config.json").read_text())["quantization_config"]
    assert all(meta["act_clip"] == expected(name) for name, meta in config["modules"].items())
    assert config["kv_clip"] == 0.8
    packed, _, _ = load_packed(clipped_run / "abq-packed")
    linears = {name: m for name, m in packed.named_modules() if hasattr(m, "act_clip")}
    assert len(linears) == 14 and all(m.act_clip == expected(name) for name, m in linears.items())
    assert {m.abq_kv_clip for m in packed.modules() if hasattr(m, "abq_kv_bits")} == {0.8}
    report = verify_export(clipped_run / "abq-packed", seqlen=32, windows=2)
    assert report.ok, report.problems
    assert report.layers_integer_exact == report.layers_integer_checked == 14


def test_clipped_packed_and_fakequant_exports_agree_and_differ_from_unclipped(clipped_run, rotated_runs,
                                                                              tiny_text_file):
    from abqcli.formats.abq_packed import load_packed
    from abqcli.formats.hf_fakequant import open_fakequant

    window = first_window(clipped_run / "hf-fakequant", tiny_text_file)
    packed, _, _ = load_packed(clipped_run / "abq-packed")
    fakequant, _, _ = open_fakequant(clipped_run / "hf-fakequant", "float32", "cpu")
    unclipped, _, _ = load_packed(rotated_runs["llama"] / "abq-packed")
    with torch.no_grad():
        logits = packed(window).logits
        torch.testing.assert_close(logits, fakequant(window).logits, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(logits, unclipped(window).logits, rtol=1e-3, atol=1e-3)


def test_a_bad_clip_ratio_in_the_metadata_is_refused(clipped_run):
    from abqcli.errors import InputError
    from abqcli.formats.manifest import kv_clip_of, layer_quant_from_meta

    meta = json.loads((clipped_run / "abq-packed" / "abq.json").read_text())["layers"]["model.layers.0.mlp.up_proj"]
    assert layer_quant_from_meta(meta).act_clip == 0.9
    assert layer_quant_from_meta({k: v for k, v in meta.items() if k != "act_clip"}).act_clip == 1.0
    for bad in (0, 1.5, "0.9", True):
        with pytest.raises(InputError, match="act_clip must be a number above 0, up to 1"):
            layer_quant_from_meta({**meta, "act_clip": bad})
        with pytest.raises(InputError, match="kv_clip must be a number above 0, up to 1"):
            kv_clip_of({"kv_clip": bad})
    assert kv_clip_of({}) == 1.0


@pytest.mark.parametrize("section", ["activations", "kv"])
@pytest.mark.parametrize("clip", ["0", "1.5", "'0.9'"])
def test_a_bad_clip_ratio_in_the_recipe_is_one_line(tiny_llama, tiny_text_file, tmp_path, capsys, section, clip):
    recipe = write_recipe(tmp_path, tiny_llama, tiny_text_file, extra=f"{section}: {{clip: {clip}}}")
    assert abq(tmp_path, "quantize", recipe) == 2
    line = error_line(capsys.readouterr().err)
    assert f"{section}.clip" in line and "a number above 0, up to 1" in line


def test_compressed_tensors_refuses_activation_clipping(tiny_llama, tiny_text_file, tmp_path, capsys):
    recipe = write_recipe(tmp_path, tiny_llama, tiny_text_file, scheme="w8a8",
                          extra="activations: {clip: 0.9}\nkv: {bits: 16}")
    recipe.write_text(recipe.read_text().replace("formats: [hf-fakequant]", "formats: [compressed-tensors]"))
    assert abq(tmp_path, "quantize", recipe) == 2
    assert "compressed-tensors cannot hold abq's activation clipping" in error_line(capsys.readouterr().err)

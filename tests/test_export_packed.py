"""The abq-packed exporter: write_packed -> load_packed round trips, tied embeddings, biases, refusals,
and `abq pack` (pack_fakequant) from an hf-fakequant directory.

Tiny random models are quantized with RTN here (no calibration loop): `apply_rtn` wraps the linears,
sets each weight to `state.dequantize()` of `quantize_weight(original)` and gives the layer that state;
the export is written from the same states, so the fake-quant model and the export agree exactly.

The helpers at the top are shared with test_runtime.py and test_verify.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from abqcli.btc.format import FORMAT_VERSION
from abqcli.errors import InputError
from abqcli.quant.quantizer import LayerQuant, WeightQuantSpec

REL_TOL = 1e-4

SCHEMES = {
    # name: (layer quant, kv bits, planes)
    "w4a4": (LayerQuant(WeightQuantSpec(4, None, False), 4), 4, 4),
    "w2*a8": (LayerQuant(WeightQuantSpec(2, None, True), 8), 8, 3),
    "w3a16-g128": (LayerQuant(WeightQuantSpec(3, 128, False), 16), 16, 3),
}


# ------------------------------------------------------------------------------------------ helpers


def rtn_model(model_dir: Path, layer_quant, kv_bits: int):
    """(model, tokenizer, layers, states): the model fake-quantized with RTN, consistent with `states`.

    `layer_quant` is a LayerQuant for every block linear or a callable name -> LayerQuant | None.
    """
    from abqcli.models.adapters import adapter_for
    from abqcli.models.loading import load_model
    from abqcli.quant.fakequant import apply_rtn
    from abqcli.quant.quantizer import quantize_weight

    select = layer_quant if callable(layer_quant) else (lambda name: layer_quant)
    model, tokenizer, _ = load_model(str(model_dir), "float32", "cpu")
    adapter = adapter_for(model)
    originals = {}
    for index, block in enumerate(adapter.blocks(model)):
        for rel in adapter.linear_names(block):
            originals[f"{adapter.block_prefix(index)}.{rel}"] = block.get_submodule(rel).weight.detach().clone()
    wrapped, states = apply_rtn(model, adapter, select, kv_bits)
    for name, qlinear in wrapped.items():
        expected = quantize_weight(originals[name], qlinear.quant.weight)
        assert torch.equal(states[name].codes, expected.codes)
        assert torch.equal(qlinear.weight, expected.dequantize())
    layers = {name: qlinear.quant for name, qlinear in wrapped.items()}
    return model, tokenizer, layers, states


def export_packed(model_dir: Path, out: Path, layer_quant, kv_bits: int, **kwargs):
    """RTN-quantize `model_dir` and write it as abq-packed into `out`; returns the fake-quant model."""
    from abqcli.formats import ExportInput
    from abqcli.formats.abq_packed import ABQ_PACKED

    model, tokenizer, layers, states = rtn_model(model_dir, layer_quant, kv_bits)
    ABQ_PACKED.write(out, ExportInput(model, tokenizer, "scheme: test\n", kv_bits, layers, states,
                                      {"model": str(model_dir), "method": "rtn"}), **kwargs)
    return model


def sample_ids(n: int = 40, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(4, 200, (1, n), generator=gen)


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits.float()


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def assert_same_logits(packed, reference, ids: torch.Tensor) -> None:
    """Packed logits equal the fake-quant reference's: teacher-forced (the reference's quantized linears
    see the packed model's inputs) to REL_TOL, and free-running bit for bit — the reference's quantized
    linears compute in the integer domain, the packed CPU runtime's arithmetic (see QuantLinear)."""
    from abqcli.verify import teacher_forced_logits

    lp, lr, inputs = teacher_forced_logits(packed, reference, ids)
    assert inputs, "no quantized linear ran"
    assert max_rel(lp, lr) <= REL_TOL
    assert torch.equal(lp, logits(reference, ids))


def fix_checksum(directory: Path, name: str) -> None:
    """Recompute one file's sha256 in abq.json, and the manifest's own seal (to reach the checks behind
    the checksum)."""
    from abqcli.checksums import sha256_file

    manifest_path = directory / "abq.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][name] = sha256_file(directory / name)
    write_sealed_manifest(directory, manifest)


def write_sealed_manifest(directory: Path, manifest: dict) -> None:
    """Write an edited abq.json with its manifest_sha256 recomputed (to reach the checks behind the seal)."""
    from abqcli.formats.manifest import MANIFEST_SHA256, manifest_digest

    manifest[MANIFEST_SHA256] = manifest_digest(manifest)
    (directory / "abq.json").write_text(json.dumps(manifest))


# ------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_round_trip_logits(arch, scheme, tiny_models, tmp_path):
    from abqcli.formats.abq_packed import load_packed
    from abqcli.runtime import BTCLinear

    lq, kv_bits, planes = SCHEMES[scheme]
    out = tmp_path / "packed"
    fq_model = export_packed(tiny_models[arch], out, lq, kv_bits)
    model, tokenizer, manifest = load_packed(out)
    assert_same_logits(model, fq_model, sample_ids())

    btc = {name: m for name, m in model.named_modules() if isinstance(m, BTCLinear)}
    assert len(btc) == len(manifest["layers"]) == (14 if arch == "llama" else 12)
    assert {m.packed.planes.shape[0] for m in btc.values()} == {planes}
    assert {m.act_bits for m in btc.values()} == {lq.act_bits}
    assert manifest["format"] == "abq-packed" and manifest["format_version"] == FORMAT_VERSION == 5
    assert manifest["kv_bits"] == kv_bits
    layer = next(iter(manifest["layers"].values()))
    assert layer["planes"] == planes and layer["bytes"]["total"] > 0
    assert tokenizer("the cat").input_ids  # the tokenizer came along


def test_float32_scales_are_stored_as_float32_and_stay_exact(tiny_llama, tmp_path):
    """`scale_dtype: float32`: the writer keeps every scale in 32 bits (none is a float16 value), and the
    packed model still equals its fake-quant twin bit for bit."""
    from abqcli.formats.abq_packed import load_packed
    from abqcli.verify import inspect_export

    out = tmp_path / "packed"
    fq_model = export_packed(tiny_llama, out, LayerQuant(WeightQuantSpec(4, 32, scale_dtype="float32"), 16), 16)
    model, _, _ = load_packed(out)
    assert_same_logits(model, fq_model, sample_ids())
    info = inspect_export(out)
    assert {layer["scale_dtype"] for layer in info["layers"].values()} == {"float32"}
    half = inspect_export(_exported_half(tiny_llama, tmp_path))
    assert info["totals"]["overhead_bits_per_weight"] > half["totals"]["overhead_bits_per_weight"]


def _exported_half(model_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "half"
    export_packed(model_dir, out, LayerQuant(WeightQuantSpec(4, 32), 16), 16)
    return out


def test_directory_contents(tiny_llama, tmp_path):
    out = tmp_path / "packed"
    export_packed(tiny_llama, out, SCHEMES["w4a4"][0], 4)
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "recipe.yaml", "abq.json", "tokenizer.json"} <= names
    assert not list(tmp_path.glob(".packed.tmp*"))  # written atomically, nothing left behind
    mode = (out / "model.safetensors").stat().st_mode & 0o777
    assert mode == (out / "recipe.yaml").stat().st_mode & 0o777  # not safetensors' 0600
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert (qc["quant_method"], qc["format"], qc["format_version"], qc["kv_bits"]) == ("abq", "btc-bitplane", 5, 4)
    meta = qc["modules"]["model.layers.0.mlp.down_proj"]
    assert meta == {"bits": 4, "balance": False, "group_size": None, "in_features": 128, "out_features": 64,
                    "act_bits": 4}
    manifest = json.loads((out / "abq.json").read_text())
    assert set(manifest["files"]) == names - {"abq.json"}
    assert manifest["provenance"]["method"] == "rtn"
    assert (out / "recipe.yaml").read_text() == "scheme: test\n"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        dtypes = {s: f.get_slice(f"model.layers.0.mlp.down_proj.{s}").get_dtype() for s in ("btc_planes", "btc_scales",
                                                                                          "btc_zeros")}
        assert dtypes == {"btc_planes": "U32", "btc_scales": "F16", "btc_zeros": "U8"}
    for suffix in ("btc_planes", "btc_scales", "btc_zeros"):
        assert f"model.layers.1.self_attn.q_proj.{suffix}" in keys
    assert "model.layers.1.self_attn.q_proj.btc_code_sums" not in keys  # recomputed by the reader
    assert "model.layers.1.self_attn.q_proj.weight" not in keys
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= keys  # untied llama


def test_tied_embeddings_saved_once_and_biases_kept(tiny_opt, tmp_path):
    from abqcli.formats.abq_packed import load_packed

    out = tmp_path / "packed"
    export_packed(tiny_opt, out, SCHEMES["w4a4"][0], 4)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.decoder.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    assert "model.decoder.layers.0.fc1.bias" in keys and "model.decoder.layers.0.fc1.weight" not in keys
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["tied_tensors"] == {"lm_head.weight": "model.decoder.embed_tokens.weight"}
    model, _, _ = load_packed(out)
    assert model.lm_head.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()
    assert model.model.decoder.layers[0].fc1.bias is not None


def test_grouped_and_mixed_layers(tmp_path):
    """A wider llama: g128 BTC layers with two groups in down_proj, and a per-module override."""
    from transformers import LlamaConfig

    from abqcli.formats.abq_packed import load_packed
    from conftest import save_tiny_model

    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=256,
                         tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model_dir = save_tiny_model(config, tmp_path / "wide", seed=5)
    default = LayerQuant(WeightQuantSpec(4, 128, False), 8)
    override = LayerQuant(WeightQuantSpec(8, None, False), 8)

    def select(name: str) -> LayerQuant:
        return override if name.endswith("q_proj") else default

    out = tmp_path / "packed"
    fq_model = export_packed(model_dir, out, select, 8)
    model, _, manifest = load_packed(out)
    assert_same_logits(model, fq_model, sample_ids(64))
    down = model.model.layers[0].mlp.down_proj.packed
    assert down.num_groups == 2 and down.group_size == 128
    assert model.model.layers[0].self_attn.q_proj.packed.bits == 8
    assert manifest["layers"]["model.layers.0.self_attn.q_proj"]["planes"] == 8


def test_btc_layers_refuse_unaligned_groups(tiny_llama, tmp_path):
    lq = LayerQuant(WeightQuantSpec(4, 32, False), 8)
    with pytest.raises(InputError, match=r"model\.layers\.0\..*multiple of 128") as info:
        export_packed(tiny_llama, tmp_path / "packed", lq, 8)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "packed").exists()


def test_weight_only_layers_accept_any_group(tiny_llama, tmp_path):
    from abqcli.formats.abq_packed import load_packed

    lq = LayerQuant(WeightQuantSpec(4, 32, False), 16)
    fq_model = export_packed(tiny_llama, tmp_path / "packed", lq, 16)
    model, _, _ = load_packed(tmp_path / "packed")
    assert_same_logits(model, fq_model, sample_ids())


def test_existing_target_needs_overwrite(tiny_llama, tmp_path):
    out = tmp_path / "packed"
    export_packed(tiny_llama, out, SCHEMES["w4a4"][0], 4)
    with pytest.raises(InputError, match="exists"):
        export_packed(tiny_llama, out, SCHEMES["w4a4"][0], 4, overwrite=False)
    export_packed(tiny_llama, out, SCHEMES["w2*a8"][0], 8, overwrite=True)
    assert json.loads((out / "abq.json").read_text())["kv_bits"] == 8


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_pack_fakequant_same_logits(arch, tiny_models, tmp_path):
    from abqcli.formats import ExportInput
    from abqcli.formats.abq_packed import load_packed, pack_fakequant
    from abqcli.formats.hf_fakequant import HF_FAKEQUANT, open_fakequant

    lq, kv_bits, _ = SCHEMES["w4a4"]
    model, tokenizer, layers, states = rtn_model(tiny_models[arch], lq, kv_bits)
    fq_dir, packed_dir = tmp_path / "fq", tmp_path / "packed"
    HF_FAKEQUANT.write(fq_dir, ExportInput(model, tokenizer, "scheme: w4a4\n", kv_bits, layers, states, {"method": "rtn"}))
    assert pack_fakequant(fq_dir, packed_dir) == packed_dir

    packed, _, manifest = load_packed(packed_dir)
    reopened, _, _ = open_fakequant(fq_dir, "float32", "cpu")
    ids = sample_ids()
    assert_same_logits(packed, model, ids)
    assert_same_logits(packed, reopened, ids)
    assert manifest["provenance"]["packed_from"] == str(fq_dir)
    assert (packed_dir / "recipe.yaml").read_text() == "scheme: w4a4\n"

    with pytest.raises(InputError, match="exists"):
        pack_fakequant(fq_dir, packed_dir)
    with pytest.raises(InputError, match="expected 'hf-fakequant'"):
        pack_fakequant(packed_dir, tmp_path / "again")
    with pytest.raises(InputError, match="not an abq output"):
        pack_fakequant(tiny_models[arch], tmp_path / "again")

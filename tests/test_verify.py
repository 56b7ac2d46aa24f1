"""abq verify / abq inspect on packed exports of tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from abqcli.btc.format import padded_k
from abqcli.errors import InputError
from abqcli.quant.quantizer import LayerQuant, WeightQuantSpec
from test_export_packed import SCHEMES, export_packed

SEQLEN = 64


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory) -> Path:
    """A llama whose linears all have K a multiple of 128 (no padding): hidden 128, ffn 256."""
    from transformers import LlamaConfig

    from conftest import save_tiny_model

    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=256,
                         tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return save_tiny_model(config, tmp_path_factory.mktemp("verify") / "wide", seed=7)


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_verify_passes(arch, scheme, tiny_models, tmp_path, no_data_dir_env):
    from abqcli.verify import verify_export

    lq, kv_bits, planes = SCHEMES[scheme]
    export_packed(tiny_models[arch], tmp_path / "packed", lq, kv_bits)
    report = verify_export(tmp_path / "packed", seqlen=SEQLEN, windows=2)
    assert report.ok, report.problems
    n_layers = 14 if arch == "llama" else 12
    assert len(report.layers) == n_layers
    assert report.layers_integer_checked == (0 if lq.act_bits == 16 else n_layers)
    assert report.layers_integer_exact == report.layers_integer_checked
    assert {r["planes"] for r in report.layers} == {planes}
    assert report.layer_float_max_rel <= 1e-5
    assert report.logits_max_rel <= 1e-4 and report.logits_max_rel_free_running <= 1e-4
    assert report.ppl_rel_diff <= 5e-5 and report.ppl_packed > 1
    # no data directory: the fallback sentence is used, and the report says so
    assert report.text == "fallback sentence" and "fallback" in report.text_note
    assert (report.seqlen, report.windows) == (SEQLEN, 2)
    json.dumps(report.to_dict())


def test_verify_on_text_file_default_seqlen(tiny_opt, tiny_text_file, tmp_path):
    from abqcli.verify import verify_export

    export_packed(tiny_opt, tmp_path / "packed", SCHEMES["w4a4"][0], 4)
    report = verify_export(tmp_path / "packed", dataset=str(tiny_text_file), windows=1)
    assert report.ok, report.problems
    assert report.text_note is None and str(tiny_text_file) in report.text
    assert report.seqlen == 256  # min(512, context of the tiny model)


def test_verify_grouped_btc_layers(wide_llama, tmp_path, no_data_dir_env):
    from abqcli.verify import verify_export

    export_packed(wide_llama, tmp_path / "packed", LayerQuant(WeightQuantSpec(4, 128, False), 8), 8)
    report = verify_export(tmp_path / "packed", seqlen=SEQLEN, windows=1)
    assert report.ok, report.problems
    down = next(r for r in report.layers if r["name"].endswith("down_proj"))
    assert down["group_size"] == 128 and down["integer_exact"]


def test_verify_detects_a_wrong_integer_gemm(tiny_llama, tmp_path, monkeypatch, no_data_dir_env):
    from abqcli.btc import gemm
    from abqcli.verify import verify_export

    export_packed(tiny_llama, tmp_path / "packed", SCHEMES["w4a4"][0], 4)
    real = gemm.popcount_gemm
    monkeypatch.setattr(gemm, "popcount_gemm", lambda a, w, g=None: real(a, w, g) + 1)
    report = verify_export(tmp_path / "packed", seqlen=SEQLEN, windows=1)
    assert not report.ok
    assert report.layers_integer_exact == 0
    assert any("integer GEMM differs" in p for p in report.problems)


def test_verify_command_table_and_json(tiny_llama, tmp_path, capsys, no_data_dir_env):
    from abqcli.cli import main

    export_packed(tiny_llama, tmp_path / "packed", SCHEMES["w4a4"][0], 4)
    code = main(["verify", str(tmp_path / "packed"), "--seqlen", "32", "--windows", "1",
                 "--json", str(tmp_path / "v.json")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "1.000e-05" in out  # the layer tolerance is shown, not rounded to 0.0000
    report = json.loads((tmp_path / "v.json").read_text())
    assert report["ok"] and report["ppl_packed"] == report["ppl_fakequant"]
    assert len(report["layers"]) == 14


def test_verify_refuses_bad_input(tiny_llama, tmp_path):
    from abqcli.btc import cuda as btc_cuda
    from abqcli.verify import verify_export

    with pytest.raises(InputError, match="not an abq output"):
        verify_export(tiny_llama)
    if not btc_cuda.available()[0]:
        # refused before anything is read: the directory does not even exist
        with pytest.raises(InputError, match="needs a CUDA GPU and CuPy.*use --backend cpu") as info:
            verify_export(tmp_path / "nowhere", backend="cupy")
        assert "\n" not in str(info.value)


def _theory_bits(layers: dict) -> dict[str, float]:
    """What version 3 stores, by hand, per real weight: the codes (planes bits), the overhead (a float16
    scale per row and group, the zero points bit-packed at planes bits per layer) and the K padding."""
    weights = code_bits = overhead = padding = 0
    for meta in layers.values():
        n, k, p = meta["out_features"], meta["in_features"], meta["planes"]
        groups = -(-k // (meta["group_size"] or k))
        weights += n * k
        code_bits += n * k * p
        overhead += n * groups * 16 + 8 * -(-n * groups * p // 8)
        padding += n * (padded_k(k) - k) * p
    return {"bits_per_weight": code_bits / weights, "overhead_bits_per_weight": overhead / weights,
            "bits_per_weight_with_overhead": (code_bits + overhead) / weights,
            "padding_bits_per_weight": padding / weights,
            "stored_bits_per_weight": (code_bits + overhead + padding) / weights}


@pytest.mark.parametrize("scheme,planes", [("w4a4", 4), ("w2*a8", 3), ("w3a16-g128", 3)])
def test_inspect_bits_per_weight(scheme, planes, wide_llama, tmp_path):
    from abqcli.verify import inspect_export

    lq, kv_bits, _ = SCHEMES[scheme]
    out = tmp_path / "packed"
    export_packed(wide_llama, out, lq, kv_bits)
    info = inspect_export(out)
    totals = info["totals"]
    assert {layer["planes"] for layer in info["layers"].values()} == {planes}
    assert {layer["scale_dtype"] for layer in info["layers"].values()} == {"float16"}
    theory = _theory_bits(info["layers"])
    assert theory["bits_per_weight"] == planes
    for key, value in theory.items():
        assert totals[key] == pytest.approx(value, rel=1e-9), key
    assert totals["size_vs_fp16"] == pytest.approx(theory["stored_bits_per_weight"] / 16, rel=1e-9)
    assert totals["fp16_bytes_same_layers"] == 2 * totals["quantized_weights"]
    assert totals["model_file_bytes"] == (out / "model.safetensors").stat().st_size
    assert totals["directory_bytes"] > totals["model_file_bytes"] > totals["bytes"]["total"]
    down = info["layers"]["model.layers.0.mlp.down_proj"]
    assert down["bytes"]["total"] == sum(down["bytes"][k] for k in ("planes", "scales", "zeros"))
    json.dumps(info)


def test_inspect_counts_padding(tiny_llama, tmp_path):
    """K = 64 is padded to 128: the padding costs as much as the codes there, on its own line."""
    from abqcli.verify import inspect_export

    export_packed(tiny_llama, tmp_path / "packed", SCHEMES["w2*a8"][0], 8)
    info = inspect_export(tmp_path / "packed")
    for key, value in _theory_bits(info["layers"]).items():
        assert info["totals"][key] == pytest.approx(value, rel=1e-9), key
    q_proj = info["layers"]["model.layers.0.self_attn.q_proj"]
    assert (q_proj["bits_per_weight"], q_proj["padding_bits_per_weight"]) == (3.0, 3.0)  # 3 planes x (128-64)/64
    assert info["scheme"] == "W2*A8 (kv A8)"


def test_inspect_refuses_non_packed(tiny_llama, tmp_path):
    from abqcli.verify import inspect_export

    with pytest.raises(InputError, match="not an abq output"):
        inspect_export(tiny_llama)

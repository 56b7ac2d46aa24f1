"""Mixture-of-experts models (Mixtral, Qwen3-MoE) on tiny random builds: the experts, fused 3-D in
transformers, are quantized as one linear pair each (`abqcli.models.experts`), the router stays in float,
an expert no calibration token is routed to is rounded to nearest and reported, and every export holds
every expert. (The adapter contract, `test_adapter_contract.py`, runs both families through quantize →
verify like every other.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from abqcli.models.experts import ExpertLinears, expert_index, fused_experts
from abqcli.models.loading import load_model
from conftest import mixtral_config, qwen3_moe_config, save_tiny_model
from test_quantize_cli import abq, error_line, write_recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MOE = {"mixtral": mixtral_config, "qwen3_moe": qwen3_moe_config}
W4A16_G64 = "weights: {group_size: 64}"


@pytest.fixture(scope="module")
def moe_builds(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe")
    return {name: save_tiny_model(config(), root / name, seed=3) for name, config in MOE.items()}


@pytest.fixture(scope="module")
def unrouted_build(tmp_path_factory) -> Path:
    """A Mixtral with 5 experts whose router can never pick expert 4: its router rows are v, −v, u, −u
    and 0, so the logits are {a, −a, b, −b, 0} and the top 2 are |a| and |b| (v, u of unit scale: with
    large logits the float32 softmax underflows to ties that top-k may break towards expert 4)."""
    from transformers import AutoModelForCausalLM

    directory = save_tiny_model(mixtral_config(experts=5), tmp_path_factory.mktemp("unrouted") / "mixtral5", seed=4)
    model = AutoModelForCausalLM.from_pretrained(directory)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.model.layers:
            v, u = torch.randn(2, layer.mlp.gate.weight.shape[1], generator=generator)
            layer.mlp.gate.weight.copy_(torch.stack([v, -v, u, -u, 0 * v]) / 4)
    model.save_pretrained(directory)
    return directory


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 200, (2, 32), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("model_type", sorted(MOE))
def test_unfused_experts_compute_what_transformers_does(moe_builds, model_type):
    """Loaded for quantization, every expert is a pair of linears, and the model computes what
    transformers' own fused experts compute."""
    from transformers import AutoModelForCausalLM

    own = AutoModelForCausalLM.from_pretrained(moe_builds[model_type]).eval()
    model, _, _ = load_model(str(moe_builds[model_type]))
    sparse = [layer.mlp.experts for layer in model.model.layers if hasattr(layer.mlp, "experts")]
    assert sparse and all(isinstance(e, ExpertLinears) and len(e) == 4 for e in sparse)
    expert_linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and expert_index(n) is not None]
    assert len(expert_linears) == 2 * 4 * len(sparse)
    with torch.no_grad():
        want, got = own(_ids()).logits, model(_ids()).logits
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-5


def test_fused_experts_puts_transformers_layout_back(moe_builds):
    from transformers import AutoModelForCausalLM

    own = AutoModelForCausalLM.from_pretrained(moe_builds["mixtral"])
    model, _, _ = load_model(str(moe_builds["mixtral"]))
    with fused_experts(model):
        state = model.state_dict()
        assert state.keys() == own.state_dict().keys()
        assert all(torch.equal(state[k], v) for k, v in own.state_dict().items())
    assert isinstance(model.model.layers[0].mlp.experts, ExpertLinears)
    assert model.model.layers[0].mlp.experts._fused[0].gate_up_proj is None


def _quantize(tmp_path: Path, model: Path, text: Path, scheme: str, calibration: str, formats: str,
              extra: str = "") -> dict:
    recipe = write_recipe(tmp_path, model, text, scheme, extra=extra, calibration=f"{calibration}\nepochs: 2")
    recipe.write_text(recipe.read_text().replace("  epochs: 5\n", "").replace("[hf-fakequant]", formats))
    assert abq(tmp_path, "quantize", recipe, "--json", "summary.json") == 0
    return json.loads((tmp_path / "summary.json").read_text())


@pytest.mark.parametrize("method", ["abq", "gptq"])
def test_an_expert_no_token_reaches_is_rtn_and_reported(tmp_path, unrouted_build, tiny_text_file, method,
                                                        monkeypatch):
    from abqcli.formats.abq_packed import load_fakequant_twin
    from abqcli.quant import methods
    from abqcli.quant.gptq import collect_hessians
    from abqcli.quant.quantizer import quantize_weight
    from abqcli.recipe import load_recipe
    from abqcli.verify import inspect_export, verify_export

    passes = []
    monkeypatch.setattr(methods, "collect_hessians", lambda *a: passes.append(1) or collect_hessians(*a))
    calibration = f"method: {method}" + ("\ngptq: {sequential: true}" if method == "gptq" else "")
    summary = _quantize(tmp_path, unrouted_build, tiny_text_file, "w4a8", calibration, "[abq-packed]")
    # sequential GPTQ: q/k/v, o, every expert's gate_up_proj, every expert's down_proj: 4 passes per block
    assert len(passes) == (2 * 4 if method == "gptq" else 0)
    assert summary["quantized_linears"] == 2 * (4 + 2 * 5)  # q, k, v, o and 5 experts' two linears per block
    assert summary["expert_linears"] == 2 * 2 * 5
    assert summary["experts_without_tokens_rtn"] == ["model.layers.0.mlp.experts.4", "model.layers.1.mlp.experts.4"]
    for block in summary["blocks"]:
        tokens = block["expert_tokens"]["mlp.experts"]
        assert tokens[4] == 0 and sum(tokens) == 2 * 4 * 32  # top-2 of every token of 4 windows × 32

    original, _, _ = load_model(str(unrouted_build))
    twin, _, _ = load_fakequant_twin(tmp_path / "out" / "abq-packed")
    spec = load_recipe("w4a8").layer_quant("model.layers.0.mlp.experts.0.down_proj").weight
    differs = []
    for layer in range(2):
        experts = original.model.layers[layer].mlp.experts
        for e in range(5):
            rtn = quantize_weight(experts[e].down_proj.weight, spec).dequantize()
            got = twin.model.layers[layer].mlp.experts[e].down_proj.weight
            if e == 4:  # no LET pair (no statistics), no clipping, no Hessian: plain round to nearest
                assert torch.equal(got, rtn)
            else:
                differs.append(not torch.equal(got, rtn))
    assert any(differs)  # the routed experts were calibrated (the check above can fail)

    report = verify_export(tmp_path / "out" / "abq-packed", dataset=str(tiny_text_file), seqlen=32, windows=2)
    assert report.ok, report.problems
    synthetic = {row["name"] for row in report.layers if row["input"] == "synthetic"}
    assert report.layers_synthetic_input == len(synthetic) and len(report.layers) == summary["quantized_linears"]
    assert {f"model.layers.{i}.mlp.experts.4.{lin}" for i in range(2) for lin in ("gate_up_proj", "down_proj")} \
        <= synthetic  # no token reaches them (nor, in the one window checked per layer, some others)
    assert inspect_export(tmp_path / "out" / "abq-packed")["totals"]["expert_layers"] == 2 * 2 * 5


def test_hf_fakequant_of_a_moe_model_loads_in_plain_transformers(tmp_path, moe_builds, tiny_text_file):
    """The hf-fakequant checkpoint holds the dequantized experts in transformers' own layout: a plain
    load computes what abq's fake-quant model does (weight-only, so exactly the same function)."""
    from transformers import AutoModelForCausalLM

    from abqcli.formats.hf_fakequant import open_fakequant

    _quantize(tmp_path, moe_builds["qwen3_moe"], tiny_text_file, "w4a16", "method: rtn", "[hf-fakequant]",
              W4A16_G64)
    directory = tmp_path / "out" / "hf-fakequant"
    plain = AutoModelForCausalLM.from_pretrained(directory).eval()
    ours, _, _ = open_fakequant(directory, "float32", "cpu")
    with torch.no_grad():
        want, got = ours(_ids(1)).logits, plain(_ids(1)).logits
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-5
    fused = plain.model.layers[0].mlp.experts.gate_up_proj
    assert torch.equal(fused[2], ours.model.layers[0].mlp.experts[2].gate_up_proj.weight)


def test_compressed_tensors_refuses_moe_experts_before_calibrating(tmp_path, moe_builds, tiny_text_file, capsys):
    recipe = write_recipe(tmp_path, moe_builds["mixtral"], tiny_text_file, "w4a16", extra=W4A16_G64)
    recipe.write_text(recipe.read_text().replace("[hf-fakequant]", "[compressed-tensors]"))
    assert abq(tmp_path, "quantize", recipe) == 2
    line = error_line(capsys.readouterr().err)
    assert "compressed-tensors cannot hold quantized MoE experts" in line and "use abq-packed" in line
    assert not (tmp_path / "out" / "checkpoint").exists()

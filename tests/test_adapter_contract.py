"""The adapter contract, over every model type an adapter claims (`supported_model_types()`), so that
adding a model type to an adapter is never a silent one-line change. On a tiny random build of each
(`conftest.adapter_configs`, mixed full/sliding layers where the architecture has them, MoE blocks for
Mixtral and Qwen3-MoE, whose experts count as decoder linears):

0. each block run on its captured inputs with its own keyword arguments (mask, positions) computes what
   it does inside the full model;
1. every LET transform is an identity in FP on every block, with its scales (and shifts) moved:
   ≤ 1e-5 relative to the block's own contribution (output − input);
2. `abq quantize` (ABQ and RTN at W4A8 and W4A16 g64, and rotated ABQ W4A4 with quantized kv on
   every family that can be rotated) wraps every decoder linear — counted against
   the nn.Linear modules inside the blocks — and writes abq-packed and hf-fakequant;
3. `abq verify` passes: every activation-quantized layer integer-exact, and the packed perplexity equals
   the fake-quant one to the last digit.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from abqcli.models.adapters import adapter_for, supported_model_types
from conftest import adapter_configs, save_tiny_model
from test_quantize_cli import abq, write_recipe
from test_transforms import perturb

TOL = 1e-5
SEQLEN = 32
G64 = "weights: {group_size: 64}"
RUNS = [("w4a8", "", "method: abq"), ("w4a8", "", "method: rtn"), ("w4a16", G64, "method: abq"),
        ("w4a16", G64, "method: rtn"), ("w4a4", "", "method: abq\nrotation: hadamard")]
RUN_IDS = ["abq-w4a8", "rtn-w4a8", "abq-w4a16g64", "rtn-w4a16g64", "abq-w4a4-hadamard"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("contract")
    return {model_type: save_tiny_model(config, root / model_type, seed=7)
            for model_type, config in adapter_configs().items()}


def test_every_claimed_model_type_has_a_tiny_build():
    assert sorted(adapter_configs()) == sorted(supported_model_types())


def _decoder_linears(model: nn.Module, adapter) -> int:
    return sum(isinstance(m, nn.Linear) for block in adapter.blocks(model) for m in block.modules())


@pytest.mark.parametrize("model_type", supported_model_types())
def test_abq_attention_at_16_bits_is_the_architectures_own(builds, model_type):
    """Calibration and the fake-quant models run attention through abq's function: with kv unquantized
    it computes what the architecture's own attention does (masks, sliding windows, Gemma-2's
    soft-capping), to float rounding."""
    from abqcli.models.loading import load_model
    from abqcli.quant.fakequant import set_kv_quant

    model, _, _ = load_model(str(builds[model_type]), "float32", "cpu")
    ids = torch.randint(4, 200, (2, SEQLEN), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        own = model(ids).logits
        set_kv_quant(model, adapter_for(model), 16)
        ours = model(ids).logits
    assert float((ours - own).abs().max() / own.abs().max()) <= TOL


@pytest.mark.parametrize("model_type", supported_model_types())
def test_each_block_is_calibrated_with_its_own_inputs(builds, model_type):
    """What calibration runs each block on (captured hidden states, that block's own mask and position
    embeddings) gives what the block computes inside the full model."""
    from test_block_inputs import blocks_match_full_forward

    blocks_match_full_forward(builds[model_type])


@pytest.mark.parametrize("model_type", supported_model_types())
def test_every_transform_is_an_fp_identity_on_every_block(builds, model_type):
    from abqcli.models.loading import load_model
    from abqcli.quant.fakequant import set_kv_quant
    from abqcli.quant.transforms import BlockTransform, collect_activation_stats

    model, _, _ = load_model(str(builds[model_type]), "float32", "cpu")
    adapter = adapter_for(model)
    set_kv_quant(model, adapter, 16)  # as calibration runs the blocks
    windows = torch.randint(4, 200, (2, SEQLEN), generator=torch.Generator().manual_seed(1))
    hidden, block_kwargs = adapter.capture_block_inputs(model, windows)
    for index, block in enumerate(adapter.blocks(model)):
        inputs = [((hidden[w:w + 1],), block_kwargs[index]) for w in range(len(hidden))]
        stats = collect_activation_stats(block, adapter, inputs)
        transform = BlockTransform(block, adapter, stats, let=True, alpha=0.5, shift=adapter.let_shift,
                                   compensation=False)
        assert transform.scales, f"{model_type} block {index}: no LET pair"
        perturb(transform, torch.Generator().manual_seed(index))
        base = dict(block.named_parameters())
        with torch.no_grad():
            moved = {**base, **transform.transformed_params()}
            outputs = []
            for args, kwargs in inputs:
                ref, y = block(*args, **kwargs), functional_call(block, moved, args, kwargs)
                ref, y = (ref[0], y[0]) if isinstance(ref, tuple) else (ref, y)
                err = float((y - ref).abs().max() / (ref - args[0]).abs().max())
                assert err <= TOL, f"{model_type} block {index}: relative error {err:.2e}"
                outputs.append(ref)
        hidden = torch.cat(outputs)


@pytest.mark.parametrize("model_type", supported_model_types())
@pytest.mark.parametrize("scheme, extra, calibration", RUNS, ids=RUN_IDS)
def test_quantize_wraps_every_linear_and_the_export_verifies(builds, tmp_path, tiny_text_file, model_type,
                                                             scheme, extra, calibration):
    import json

    from transformers import AutoConfig

    from abqcli.models.adapters import adapter_for_config
    from abqcli.models.loading import load_model
    from abqcli.verify import verify_export

    rotation_problem = adapter_for_config(AutoConfig.from_pretrained(builds[model_type])).rotation_problem
    if "rotation" in calibration and rotation_problem:
        pytest.skip(f"{model_type} is not rotated: {rotation_problem}")
    recipe = write_recipe(tmp_path, builds[model_type], tiny_text_file, scheme, extra=extra,
                          calibration=f"{calibration}\nepochs: 1")
    text = recipe.read_text().replace("formats: [hf-fakequant]", "formats: [abq-packed, hf-fakequant]")
    recipe.write_text(text.replace("  epochs: 5\n", ""))
    assert abq(tmp_path, "quantize", recipe) == 0
    model, _, _ = load_model(str(builds[model_type]), "float32", "cpu")
    layers = json.loads((tmp_path / "out" / "abq-packed" / "abq.json").read_text())["layers"]
    assert len(layers) == _decoder_linears(model, adapter_for(model))
    report = verify_export(tmp_path / "out" / "abq-packed", dataset=str(tiny_text_file), seqlen=SEQLEN, windows=2)
    assert report.ok, report.problems
    if scheme != "w4a16":
        assert report.layers_integer_checked == report.layers_integer_exact == len(layers)
    assert report.ppl_packed == report.ppl_fakequant

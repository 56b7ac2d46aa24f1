"""Hadamard matrices and model rotations: orthogonality, the online transform, and rotated models that
compute what the original does."""

from __future__ import annotations

import copy

import pytest
import torch

from abqcli.errors import InputError
from abqcli.models.adapters import adapter_for
from abqcli.quant.hadamard import (
    apply_input_transform,
    hadamard_matrix,
    hadamard_transform,
    kronecker_factors,
    orthonormal_hadamard,
    paley,
)
from abqcli.quant.rotations import RANDOM_HADAMARD, RANDOM_ORTHOGONAL, rotate_model, rotation_matrix
from conftest import llama_config, opt_config, qwen2_config, qwen3_config


@pytest.mark.parametrize("order", [12, 20, 28, 36, 44, 60, 76, 108])
def test_paley_matrices_are_hadamard(order):
    h = paley(order)
    assert set(h.unique().tolist()) == {-1, 1}
    assert torch.equal(h @ h.T, order * torch.eye(order, dtype=torch.int64))


@pytest.mark.parametrize(("n", "split"), [(64, (1, 64)), (576, (36, 16)), (1536, (12, 128)), (40, (20, 2)),
                                          (2048, (1, 2048)), (896, (28, 32))])
def test_hadamard_of_llm_sizes(n, split):
    assert kronecker_factors(n) == split
    h = hadamard_matrix(n)
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.int64))


def test_no_hadamard_for_odd_orders():
    assert kronecker_factors(9) is None
    with pytest.raises(ValueError, match="no Hadamard matrix of order 9"):
        hadamard_transform(torch.zeros(1, 9))


@pytest.mark.parametrize("n", [36, 64, 576, 1536])
def test_online_transform_is_x_times_normalised_h(n):
    x = torch.randn(5, 3, n, dtype=torch.float64)
    expected = x @ orthonormal_hadamard(n)
    assert torch.allclose(hadamard_transform(x), expected, atol=1e-12)
    assert torch.allclose(apply_input_transform(x, "hadamard") @ orthonormal_hadamard(n).T, x, atol=1e-12)
    assert torch.allclose(apply_input_transform(x, "hadamard", inverse=True), x @ orthonormal_hadamard(n).T,
                          atol=1e-12)
    assert apply_input_transform(x, None) is x


@pytest.mark.parametrize("kind", [RANDOM_HADAMARD, RANDOM_ORTHOGONAL])
def test_rotation_matrices_are_orthogonal_and_seeded(kind):
    q = rotation_matrix(64, kind, torch.Generator().manual_seed(0))
    assert torch.allclose(q @ q.T, torch.eye(64, dtype=torch.float64), atol=1e-12)
    assert torch.equal(q, rotation_matrix(64, kind, torch.Generator().manual_seed(0)))
    assert not torch.equal(q, rotation_matrix(64, kind, torch.Generator().manual_seed(1)))


def _model(config, seed=0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
            else:  # norms with weights far from 1 and biases: the folds must matter
                p.uniform_(0.5, 1.5) if name.endswith("weight") else p.normal_(0.0, 0.05)
    return model


def _max_rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("make_config", [llama_config, qwen2_config, qwen3_config], ids=["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("kind", [RANDOM_HADAMARD, RANDOM_ORTHOGONAL])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_rotated_model_computes_the_same_logits(make_config, kind, tied):
    config = make_config()
    config.tie_word_embeddings = tied
    model = _model(config)
    ids = torch.randint(0, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    adapter = adapter_for(model)
    result = rotate_model(model, adapter, kind, seed=3, quantized=lambda name: True)
    with torch.no_grad():
        after = model(ids).logits
        block_copy = copy.deepcopy(model.model.layers[1])  # calibration's FP teacher: hooks travel along
        x = torch.randn(1, 8, config.hidden_size)
        assert torch.equal(block_copy.mlp(x), model.model.layers[1].mlp(x))
    assert _max_rel(after, before) < 1e-4
    assert sorted(result.online) == [f"model.layers.{i}.mlp.down_proj" for i in range(config.num_hidden_layers)]
    assert result.untied_embeddings is tied
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert not model.config.tie_word_embeddings
    norms = [m.weight for n, m in model.named_modules() if n.endswith("norm") and not n.endswith(("q_norm", "k_norm"))]
    assert norms and all(torch.equal(w, torch.ones_like(w)) for w in norms)


@pytest.mark.parametrize("make_config", [llama_config, qwen2_config, qwen3_config], ids=["llama", "qwen2", "qwen3"])
def test_q_k_transform_leaves_full_precision_attention_unchanged(make_config):
    """R3: q and k both transformed after RoPE by an orthogonal H: q·kᵀ, and so the model, unchanged."""
    from abqcli.quant.fakequant import set_kv_quant

    model = _model(make_config())
    adapter = adapter_for(model)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    set_kv_quant(model, adapter, 16)
    with torch.no_grad():
        before = model(ids).logits
        set_kv_quant(model, adapter, 16, "hadamard")
        after = model(ids).logits
        set_kv_quant(model, adapter, 4, "hadamard")
        quantized = model(ids).logits
    assert _max_rel(after, before) < 1e-5
    assert _max_rel(quantized, before) > 1e-3  # the transform is applied before a quantizer that matters


def test_rotation_changes_the_weights_it_should():
    model = _model(llama_config())
    q_before = model.model.layers[0].self_attn.q_proj.weight.clone()
    rotate_model(model, adapter_for(model), RANDOM_HADAMARD, seed=0, quantized=lambda name: "layers.1" in name)
    assert not torch.allclose(model.model.layers[0].self_attn.q_proj.weight, q_before)


def test_only_quantized_layers_get_the_online_transform():
    model = _model(llama_config())
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    result = rotate_model(model, adapter_for(model), RANDOM_HADAMARD, seed=0,
                          quantized=lambda name: "layers.1" in name)
    assert list(result.online) == ["model.layers.1.mlp.down_proj"]
    with torch.no_grad():
        assert _max_rel(model(ids).logits, before) < 1e-4


def test_opt_is_refused_with_the_reason():
    model = _model(opt_config())
    with pytest.raises(InputError, match="LayerNorm subtracts each token's mean"):
        rotate_model(model, adapter_for(model), RANDOM_HADAMARD, seed=0, quantized=lambda name: True)


def test_sizes_without_a_hadamard_matrix_are_refused():
    config = llama_config()
    config.intermediate_size = 72 + 9  # 81: no Hadamard matrix
    model = _model(config)
    with pytest.raises(InputError, match="no Hadamard matrix of order 81 .*mlp.down_proj input"):
        rotate_model(model, adapter_for(model), RANDOM_ORTHOGONAL, seed=0, quantized=lambda name: True)

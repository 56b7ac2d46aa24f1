"""Hand checks of the per-block distribution-correction loss (DESIGN §4, `abqcli.quant.loss`)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from abqcli.quant.loss import (
    PROB_EPS,
    batch_means,
    block_loss,
    causal_kl,
    mean_cosine,
    needs_y_2,
    term_values,
    token_normalized_mse,
    window_loss,
    window_terms,
)
from abqcli.recipe import LossSpec


def _causal_probs(b: int, t: int, seed: int) -> torch.Tensor:
    """Random attention probabilities [b, t, t]: zero above the diagonal, rows summing to 1."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(b, t, t, generator=gen)
    mask = torch.ones(t, t, dtype=torch.bool).tril()
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)


def _hidden(seed: int, shape=(2, 5, 8)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


ALL_ON = LossSpec(mse=True, cosine=True, attention_kl=True)


# ------------------------------------------------------------------------------- the total and its terms


def test_zero_when_everything_equal():
    y = _hidden(0)
    p = _causal_probs(2, 5, 1)
    total, terms = block_loss(y, y.clone(), y.clone(), p, p.clone(), ALL_ON)
    assert set(terms) == {"mse_1", "mse_2", "cos_1", "cos_2", "kl_fwd", "kl_rev"}
    assert total.item() == pytest.approx(0.0, abs=1e-6)
    for name, value in terms.items():
        assert value == pytest.approx(0.0, abs=1e-6), name


def test_total_is_the_sum_of_hand_computed_terms():
    y_q = _hidden(0)
    y_1, y_2 = y_q + 0.5 * _hidden(1), y_q + 0.2 * _hidden(2)  # mean cosine well above 0
    p_q, p_1 = _causal_probs(2, 5, 3), _causal_probs(2, 5, 4)
    total, terms = block_loss(y_q, y_1, y_2, p_q, p_1, ALL_ON)

    def mse(a, b):
        return ((a - b) ** 2).mean().item()

    def nlc(a, b):
        cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
        return -math.log(cos.mean().item())

    def kl(p, q):  # rows over causal keys, mean over (batch, query)
        out = 0.0
        for bi in range(p.shape[0]):
            for i in range(p.shape[1]):
                out += sum(p[bi, i, j].item() * math.log(p[bi, i, j].item() / q[bi, i, j].item())
                           for j in range(i + 1))
        return out / (p.shape[0] * p.shape[1])

    expected = {
        "mse_1": mse(y_q, y_1), "mse_2": mse(y_q, y_2),
        "cos_1": nlc(y_q, y_1), "cos_2": nlc(y_q, y_2),
        "kl_fwd": kl(p_1, p_q), "kl_rev": kl(p_q, p_1),
    }
    assert terms == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert total.item() == pytest.approx(sum(expected.values()), rel=1e-5)
    assert terms["kl_fwd"] > 0 and terms["kl_rev"] > 0


@pytest.mark.parametrize(
    "spec, expected_keys",
    [
        (LossSpec(mse=True, cosine=False, attention_kl=False), {"mse_1", "mse_2"}),
        (LossSpec(mse=False, cosine=True, attention_kl=False), {"cos_1", "cos_2"}),
        (LossSpec(mse=False, cosine=False, attention_kl=True), {"kl_fwd", "kl_rev"}),
        (LossSpec(mse=True, cosine=True, attention_kl=False), {"mse_1", "mse_2", "cos_1", "cos_2"}),
        (LossSpec(mse=False, cosine=True, attention_kl=True), {"cos_1", "cos_2", "kl_fwd", "kl_rev"}),
        (LossSpec(targets="fp_chain"), {"mse_1", "cos_1", "kl_fwd", "kl_rev"}),
        (LossSpec(targets="quantized_chain"), {"mse_2", "cos_2", "kl_fwd", "kl_rev"}),
        (LossSpec(cosine=False, attention_kl=False, targets="fp_chain"), {"mse_1"}),
    ],
)
def test_each_term_can_be_switched_off(spec, expected_keys):
    y_q = _hidden(0)
    y_1 = y_q + 0.3 * _hidden(1)
    y_2 = y_q + 0.1 * _hidden(2)
    p_q, p_1 = _causal_probs(2, 5, 3), _causal_probs(2, 5, 4)
    total, terms = block_loss(y_q, y_1, y_2, p_q, p_1, spec)
    _, all_terms = block_loss(y_q, y_1, y_2, p_q, p_1, ALL_ON)
    assert set(terms) == expected_keys
    assert terms == pytest.approx({k: all_terms[k] for k in expected_keys})
    assert total.item() == pytest.approx(sum(all_terms[k] for k in expected_keys), rel=1e-6)


def test_fp_chain_target_needs_no_y_2():
    y_q, y_1 = _hidden(0), _hidden(1)
    p_q, p_1 = _causal_probs(2, 5, 3), _causal_probs(2, 5, 4)
    spec = LossSpec(targets="fp_chain")
    total, terms = block_loss(y_q, y_1, None, p_q, p_1, spec)
    total_with, terms_with = block_loss(y_q, y_1, _hidden(2), p_q, p_1, spec)
    assert terms == terms_with and total.item() == total_with.item()
    assert not needs_y_2(spec)
    assert needs_y_2(LossSpec()) and needs_y_2(LossSpec(targets="quantized_chain"))
    assert not needs_y_2(LossSpec(mse=False, cosine=False, attention_kl=True))


def test_kl_needs_both_probability_maps():
    y_q, y_1 = _hidden(0), _hidden(1)
    p = _causal_probs(2, 5, 3)
    _, terms = block_loss(y_q, y_1, y_1, None, p, ALL_ON)
    assert "kl_fwd" not in terms and "kl_rev" not in terms
    _, terms = block_loss(y_q, y_1, y_1, p, None, ALL_ON)
    assert "kl_fwd" not in terms and "kl_rev" not in terms


def test_every_term_off_is_a_clear_error():
    y = _hidden(0)
    with pytest.raises(ValueError, match="loss"):
        block_loss(y, y, y, None, None, LossSpec(mse=False, cosine=False, attention_kl=False))


def test_gradient_flows_to_y_q_only_through_enabled_terms():
    y_1, y_2 = _hidden(1), _hidden(2)
    y_q = _hidden(0).requires_grad_(True)
    total, _ = block_loss(y_q, y_1, y_2, None, None, LossSpec(mse=True, cosine=False, attention_kl=False))
    total.backward()
    expected = 2 * ((y_q - y_1) + (y_q - y_2)) / y_q.numel()
    torch.testing.assert_close(y_q.grad, expected.detach())


def test_mse_uses_float32_for_half_inputs():
    y_q, y_1 = _hidden(0).half(), _hidden(1).half()
    total, terms = block_loss(y_q, y_1, y_1, None, None, LossSpec(mse=True, cosine=False, attention_kl=False))
    assert total.dtype == torch.float32
    assert terms["mse_1"] == pytest.approx(F.mse_loss(y_q.float(), y_1.float()).item())


# ------------------------------------------------------------------------------- causal KL


def test_causal_kl_ignores_upper_triangle():
    p, q = _causal_probs(2, 6, 0), _causal_probs(2, 6, 1)
    base = causal_kl(p, q).item()
    upper = torch.ones(6, 6, dtype=torch.bool).triu(1)
    garbage = torch.rand(2, 6, 6, generator=torch.Generator().manual_seed(2)) * 5
    p_dirty = torch.where(upper, garbage, p)
    q_dirty = torch.where(upper, garbage.flip(-1) + 1e-3, q)
    assert causal_kl(p_dirty, q_dirty).item() == pytest.approx(base, rel=1e-6)
    # identical on the causal entries: zero, whatever sits above the diagonal
    assert causal_kl(p_dirty, torch.where(upper, torch.zeros_like(p), p)).item() == pytest.approx(0.0, abs=1e-7)


def test_causal_kl_by_hand_two_tokens():
    # row 0 sees key 0 only (KL 0); row 1: KL([.25,.75] || [.5,.5]); mean over the 2 rows
    p = torch.tensor([[[1.0, 0.9], [0.25, 0.75]]])  # 0.9: upper triangle, must be ignored
    q = torch.tensor([[[1.0, 0.0], [0.5, 0.5]]])
    row1 = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert causal_kl(p, q).item() == pytest.approx(row1 / 2, rel=1e-6)


def test_causal_kl_aligns_rows_to_the_last_keys_when_fewer_queries():
    # 1 query over 3 keys (decoding): every key is causal for it
    p = torch.tensor([[[0.2, 0.3, 0.5]]])
    q = torch.tensor([[[0.5, 0.25, 0.25]]])
    expected = sum(a * math.log(a / b) for a, b in zip([0.2, 0.3, 0.5], [0.5, 0.25, 0.25]))
    assert causal_kl(p, q).item() == pytest.approx(expected, rel=1e-6)


def test_causal_kl_is_finite_with_zero_probabilities():
    p = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    q = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    value = causal_kl(p, q)
    assert torch.isfinite(value)
    assert value.item() > 0
    assert causal_kl(q, q).item() == pytest.approx(0.0, abs=1e-7)


# ------------------------------------------------------------------------------- cosine


def _cosine_only() -> LossSpec:
    return LossSpec(mse=False, cosine=True, attention_kl=False)


def test_cosine_term_identical_is_zero():
    a = _hidden(0)
    assert block_loss(a, a.clone(), a.clone(), None, None, _cosine_only())[0].item() == pytest.approx(0.0, abs=1e-6)
    # scale does not matter
    assert block_loss(a, 3.0 * a, 3.0 * a, None, None, _cosine_only())[0].item() == pytest.approx(0.0, abs=1e-6)


def test_mean_cosine_by_hand():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[1.0, 1.0], [1.0, 0.0]])  # cos = 1/sqrt(2) and 1
    assert mean_cosine(a, b).item() == pytest.approx((1 / math.sqrt(2) + 1) / 2, rel=1e-6)
    _, terms = block_loss(a, b, b, None, None, _cosine_only())
    assert terms["cos_1"] == pytest.approx(-math.log((1 / math.sqrt(2) + 1) / 2), rel=1e-6)


def test_cosine_term_of_opposite_outputs_is_clamped_not_nan():
    a = _hidden(0)
    value, _ = block_loss(a, -a, -a, None, None, _cosine_only())
    assert torch.isfinite(value)
    assert value.item() == pytest.approx(-2 * math.log(PROB_EPS), rel=1e-6)


# ------------------------------------------------------------------------------- token-normalized MSE


def test_token_normalized_mse_by_hand():
    y_q, y = _hidden(0), _hidden(1)
    r2 = (y ** 2).mean(dim=-1, keepdim=True) + 1e-6
    expected = (((y_q - y) ** 2) / r2).mean()
    assert token_normalized_mse(y_q, y).item() == pytest.approx(expected.item(), rel=1e-6)
    spec = LossSpec(mse=True, cosine=False, attention_kl=False, token_normalized=True)
    _, terms = block_loss(y_q, y, y, None, None, spec)
    assert terms == pytest.approx({"mse_1": expected.item(), "mse_2": expected.item()}, rel=1e-6)


def test_token_normalized_mse_weighs_a_massive_token_like_any_other():
    """One token 1000x larger with the same relative error: plain MSE is all that token, MSE_n is not."""
    y = _hidden(0, (1, 4, 8))
    y_q = y * 1.01
    massive = torch.ones(1, 4, 1)
    massive[0, 0] = 1000.0
    assert token_normalized_mse(y_q * massive, y * massive).item() == pytest.approx(
        token_normalized_mse(y_q, y).item(), rel=1e-5)
    plain = F.mse_loss(y_q * massive, y * massive).item()
    assert F.mse_loss((y_q * massive)[:, :1], (y * massive)[:, :1]).item() / 4 > 0.99 * plain


def test_token_normalized_mse_passes_no_gradient_through_the_target_norm():
    y_q, y = _hidden(0).requires_grad_(True), _hidden(1).requires_grad_(True)
    token_normalized_mse(y_q, y).backward()
    r2 = (y.detach() ** 2).mean(dim=-1, keepdim=True) + 1e-6
    assert torch.allclose(y.grad, -2 * (y_q.detach() - y.detach()) / r2 / y.numel(), rtol=1e-5)


def test_window_by_window_gives_the_whole_batch_loss_and_gradient():
    """Each window's own forward, the cosine terms through the batch mean: the batch's value and gradient."""
    weight = torch.randn(8, 8, generator=torch.Generator().manual_seed(3), requires_grad=True)
    x, y_1, y_2 = _hidden(1, (3, 5, 8)), _hidden(2, (3, 5, 8)), _hidden(4, (3, 5, 8))
    p_1, p_q = _causal_probs(3, 5, 5), _causal_probs(3, 5, 6)
    spec = LossSpec(mse=True, cosine=True, attention_kl=True)
    total, expected = block_loss(x @ weight, y_1, y_2, p_q, p_1, spec)
    (batch_grad,) = torch.autograd.grad(total, weight)
    terms = [window_terms(x[w:w + 1] @ weight, y_1[w:w + 1], y_2[w:w + 1], p_q[w:w + 1], p_1[w:w + 1], spec)
             for w in range(3)]
    means = batch_means([{k: t.item() for k, t in window.items()} for window in terms])
    for window in terms:
        window_loss(window, means, 3).backward()
    assert term_values(means) == pytest.approx(expected, rel=1e-5)
    assert torch.allclose(weight.grad, batch_grad, rtol=1e-5, atol=1e-7)

"""The uniform affine quantizer of DESIGN §4, checked against hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from abqcli.quant.quantizer import (
    SCALE_MAX,
    SCALE_MIN,
    WeightQuantSpec,
    activation_qparams,
    affine_params,
    fake_quantize_activation,
    fake_quantize_weight,
    qmax_for,
    quantize_activation,
    quantize_weight,
    weight_qparams,
    weight_range,
)


def row(*values: float) -> torch.Tensor:
    return torch.tensor([values], dtype=torch.float32)


# --------------------------------------------------------------------------------------------------
# qmax
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits, qmax", [(1, 1), (2, 3), (3, 7), (4, 15), (8, 255)])
def test_qmax_plain(bits, qmax):
    assert qmax_for(bits) == qmax
    assert WeightQuantSpec(bits).qmax == qmax


def test_qmax_balance_is_four_and_only_for_two_bits():
    assert qmax_for(2, balance=True) == 4
    assert WeightQuantSpec(2, balance=True).qmax == 4
    with pytest.raises(ValueError):
        qmax_for(3, balance=True)


# --------------------------------------------------------------------------------------------------
# hand cases
# --------------------------------------------------------------------------------------------------


def test_four_bit_row_hand_case():
    # s = (2 - (-1)) / 15 = 0.2, z = round(1 / 0.2) = 5
    # codes: -1/0.2+5 = 0; 0+5 = 5; 0.5/0.2 = 2.5 -> 2 (half to even; 2.4999... in float32) -> 7; 2/0.2+5 = 15
    qw = quantize_weight(row(-1, 0, 0.5, 2), WeightQuantSpec(4, scale_dtype="float32"))
    assert qw.scale.shape == (1, 1) and qw.zero.shape == (1, 1)
    assert qw.scale.item() == pytest.approx(0.2, rel=1e-6)
    assert qw.zero.item() == 5
    assert qw.codes.dtype == torch.uint8
    assert qw.codes.tolist() == [[0, 5, 7, 15]]
    torch.testing.assert_close(qw.dequantize(), row(-1, 0, 0.4, 2), rtol=0, atol=1e-6)


def test_four_bit_row_without_tie():
    # 0.6 / 0.2 = 3 -> code 8 -> dequantized exactly back
    qw = quantize_weight(row(-1, 0, 0.6, 2), WeightQuantSpec(4, scale_dtype="float32"))
    assert qw.codes.tolist() == [[0, 5, 8, 15]]
    torch.testing.assert_close(qw.dequantize(), row(-1, 0, 0.6, 2), rtol=0, atol=1e-6)


def test_round_half_to_even_on_codes():
    # s = 15 / 15 = 1 exactly, z = 0: x / s is an exact .5 tie for 0.5, 1.5, 2.5, 3.5, 14.5
    qw = quantize_weight(row(0, 0.5, 1.5, 2.5, 3.5, 14.5, 15), WeightQuantSpec(4))
    assert qw.scale.item() == 1.0 and qw.zero.item() == 0
    assert qw.codes.tolist() == [[0, 0, 2, 2, 4, 14, 15]]


def test_round_half_to_even_on_zero_point():
    # xmin = -2.5, xmax = 12.5: s = 1, z = round(2.5) = 2 (not 3)
    scale, zero = affine_params(torch.tensor(-2.5), torch.tensor(12.5), 15)
    assert scale.item() == 1.0
    assert zero.item() == 2
    # and xmin = -3.5: z = round(3.5) = 4
    _, zero = affine_params(torch.tensor(-3.5), torch.tensor(11.5), 15)
    assert zero.item() == 4


def test_a_one_signed_row_keeps_zero_in_its_range():
    """A constant positive row: the range is [0, 0.3], so z = 0 (in [0, qmax]) and the row is exact."""
    w = torch.full((1, 8), 0.3)
    scale, zero = weight_qparams(w, WeightQuantSpec(4, scale_dtype="float32"))
    assert scale.item() == pytest.approx(0.3 / 15, rel=1e-6)
    assert zero.item() == 0
    qw = quantize_weight(w, WeightQuantSpec(4))
    assert qw.codes.tolist() == [[15] * 8] and qw.zero.item() == 0
    torch.testing.assert_close(fake_quantize_weight(w, WeightQuantSpec(4)), w, rtol=1e-3, atol=0)
    negative = quantize_weight(-torch.rand(3, 40) - 0.5, WeightQuantSpec(3, 16))
    assert int(negative.zero.min()) >= 0 and int(negative.zero.max()) <= 7


def test_float16_scales_are_float16_values_and_the_codes_use_them():
    """The default scale precision: every scale is a float16 value, and codes are round(w/s) + z with
    that very scale (so the packed file, which stores it in 16 bits, dequantizes the same weight)."""
    torch.manual_seed(3)
    w = torch.randn(6, 80)
    spec = WeightQuantSpec(4, 32)
    qw = quantize_weight(w, spec)
    assert torch.equal(qw.scale.half().float(), qw.scale)
    exact = quantize_weight(w, WeightQuantSpec(4, 32, scale_dtype="float32"))
    assert not torch.equal(exact.scale, qw.scale)
    torch.testing.assert_close(qw.scale, exact.scale, rtol=2**-11, atol=0)
    s = qw.scale.repeat_interleave(32, dim=1)[:, :80]
    z = qw.zero.repeat_interleave(32, dim=1)[:, :80]
    assert torch.equal(qw.codes.float(), torch.clamp(torch.round(w / s) + z, 0, 15))
    torch.testing.assert_close(fake_quantize_weight(w, spec), qw.dequantize(), rtol=0, atol=0)


def test_scale_clamped_below_for_a_zero_row():
    w = torch.zeros(2, 5)
    scale, zero = weight_qparams(w, WeightQuantSpec(3))
    torch.testing.assert_close(scale, torch.full((2, 1), SCALE_MIN))
    assert (zero == 0).all()
    assert (fake_quantize_weight(w, WeightQuantSpec(3)) == 0).all()


def test_scale_clamped_above():
    scale, _ = affine_params(torch.tensor(-1e6), torch.tensor(1e6), 15)
    assert scale.item() == SCALE_MAX


def test_dequantization_error_is_at_most_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(16, 96)
    for spec in (WeightQuantSpec(3), WeightQuantSpec(4, 32), WeightQuantSpec(2, balance=True)):
        scale, _ = weight_qparams(w, spec)
        g = spec.group_size or w.shape[1]
        step = scale.repeat_interleave(g, dim=1)[:, : w.shape[1]]
        err = (fake_quantize_weight(w, spec) - w).abs()
        assert (err <= step / 2 + 1e-6).all()


# --------------------------------------------------------------------------------------------------
# W2* bit balance
# --------------------------------------------------------------------------------------------------


def test_balanced_two_bit_symmetric_row_is_centred_and_exact():
    spec = WeightQuantSpec(2, balance=True)
    qw = quantize_weight(row(-2, -1, 0, 1, 2), spec)
    assert qw.scale.item() == 1.0
    assert qw.zero.item() == 2  # the centre code: zero is exactly representable
    assert qw.codes.tolist() == [[0, 1, 2, 3, 4]]
    torch.testing.assert_close(qw.dequantize(), row(-2, -1, 0, 1, 2), rtol=0, atol=0)


def test_balanced_two_bit_has_at_most_five_levels_per_row():
    torch.manual_seed(1)
    w = torch.randn(32, 200)
    spec = WeightQuantSpec(2, balance=True)
    qw = quantize_weight(w, spec)
    assert int(qw.codes.max()) == 4 and int(qw.codes.min()) == 0
    fq = fake_quantize_weight(w, spec)
    for r in range(w.shape[0]):
        assert len(torch.unique(qw.codes[r])) <= 5
        assert len(torch.unique(fq[r])) <= 5
    # centred: for a zero-mean Gaussian row the zero point sits in the middle code (or next to it)
    assert ((qw.zero - 2).abs() <= 1).all()
    # plain 2-bit has only four levels
    plain = quantize_weight(w, WeightQuantSpec(2))
    assert int(plain.codes.max()) == 3
    assert max(len(torch.unique(plain.codes[r])) for r in range(w.shape[0])) <= 4


# --------------------------------------------------------------------------------------------------
# groups
# --------------------------------------------------------------------------------------------------


def test_per_group_with_partial_last_group_equals_quantizing_each_group():
    torch.manual_seed(2)
    w = torch.randn(6, 70) * torch.linspace(0.1, 3.0, 70)  # groups with very different ranges
    spec = WeightQuantSpec(4, group_size=32)
    assert spec.num_groups(70) == 3
    qw = quantize_weight(w, spec)
    fq = fake_quantize_weight(w, spec)
    assert qw.codes.shape == (6, 70)
    assert qw.scale.shape == (6, 3) and qw.zero.shape == (6, 3)
    for g, (lo, hi) in enumerate([(0, 32), (32, 64), (64, 70)]):
        part = w[:, lo:hi]
        ref = quantize_weight(part, WeightQuantSpec(4))
        torch.testing.assert_close(qw.scale[:, g : g + 1], ref.scale, rtol=0, atol=0)
        torch.testing.assert_close(qw.zero[:, g : g + 1], ref.zero, rtol=0, atol=0)
        assert torch.equal(qw.codes[:, lo:hi], ref.codes)
        torch.testing.assert_close(fq[:, lo:hi], fake_quantize_weight(part, WeightQuantSpec(4)),
                                   rtol=0, atol=0)


def test_group_size_of_whole_row_equals_per_channel():
    torch.manual_seed(3)
    w = torch.randn(4, 64)
    torch.testing.assert_close(fake_quantize_weight(w, WeightQuantSpec(3, 64)),
                               fake_quantize_weight(w, WeightQuantSpec(3)), rtol=0, atol=0)


@pytest.mark.parametrize("spec", [
    WeightQuantSpec(4), WeightQuantSpec(3, 16), WeightQuantSpec(4, 32), WeightQuantSpec(2, balance=True),
    WeightQuantSpec(2, 32, balance=True), WeightQuantSpec(8, 128),
])
def test_quantize_weight_dequantize_equals_fake_quantize(spec):
    torch.manual_seed(4)
    w = torch.randn(12, 70)
    qw = quantize_weight(w, spec)
    assert int(qw.codes.max()) <= spec.qmax
    torch.testing.assert_close(qw.dequantize(), fake_quantize_weight(w, spec), rtol=0, atol=1e-6)


def test_quantize_weight_computes_in_float32():
    torch.manual_seed(5)
    w = torch.randn(4, 32)
    qw = quantize_weight(w.to(torch.bfloat16), WeightQuantSpec(4))
    assert qw.scale.dtype == torch.float32 and qw.zero.dtype == torch.float32
    ref = quantize_weight(w.to(torch.bfloat16).float(), WeightQuantSpec(4))
    assert torch.equal(qw.codes, ref.codes)


# --------------------------------------------------------------------------------------------------
# activations
# --------------------------------------------------------------------------------------------------


def test_per_token_activation_hand_case():
    x = torch.tensor([[[-1.0, 0.0, 0.6, 2.0], [0.0, 1.0, 2.0, 3.0], [-3.0, -2.0, -1.0, 0.0]]])  # [1, 3, 4]
    scale, zero = activation_qparams(x, 4)
    assert scale.shape == (1, 3, 1)
    torch.testing.assert_close(scale.flatten(), torch.tensor([0.2, 0.2, 0.2]), rtol=1e-6, atol=0)
    assert zero.flatten().tolist() == [5, 0, 15]
    codes, s2, z2 = quantize_activation(x, 4)
    assert codes.dtype == torch.uint8
    assert codes.tolist() == [[[0, 5, 8, 15], [0, 5, 10, 15], [0, 5, 10, 15]]]
    torch.testing.assert_close(s2, scale)
    torch.testing.assert_close(z2, zero)
    torch.testing.assert_close(fake_quantize_activation(x, 4), x, rtol=0, atol=1e-6)


def test_activation_clip_shrinks_each_tokens_range_and_saturates_beyond_it():
    """clip 0.5 on the hand case's row [-1, 0, 0.6, 2]: range [-0.5, 1], s = 0.1, z = 5; -1 and 2 saturate
    at codes 0 and 15, 0 and 0.6 keep their exact grid points."""
    x = torch.tensor([[-1.0, 0.0, 0.6, 2.0]])
    scale, zero = activation_qparams(x, 4, 0.5)
    torch.testing.assert_close(scale.flatten(), torch.tensor([0.1]), rtol=1e-6, atol=0)
    assert zero.flatten().tolist() == [5]
    codes, s2, z2 = quantize_activation(x, 4, 0.5)
    assert codes.tolist() == [[0, 5, 11, 15]] and torch.equal(s2, scale) and torch.equal(z2, zero)
    torch.testing.assert_close(fake_quantize_activation(x, 4, 0.5), torch.tensor([[-0.5, 0.0, 0.6, 1.0]]),
                               rtol=0, atol=1e-6)
    torch.manual_seed(6)
    y = torch.randn(8, 64)
    assert torch.equal(fake_quantize_activation(y, 4, 1.0), fake_quantize_activation(y, 4))


def test_per_token_tokens_are_independent():
    torch.manual_seed(6)
    x = torch.randn(2, 5, 16)
    x[0, 3] *= 100  # an outlier token must not change the others
    fq = fake_quantize_activation(x, 4)
    for b in range(2):
        for t in range(5):
            torch.testing.assert_close(fq[b, t], fake_quantize_activation(x[b, t : t + 1], 4)[0])


def test_activation_sixteen_bits_is_identity():
    x = torch.randn(3, 7, 11)
    assert fake_quantize_activation(x, 16) is x


def test_activation_eight_bits_is_close_four_bits_is_coarser():
    torch.manual_seed(7)
    x = torch.randn(4, 64)
    e8 = (fake_quantize_activation(x, 8) - x).abs().max()
    e4 = (fake_quantize_activation(x, 4) - x).abs().max()
    assert e8 < e4
    rng = x.amax(-1) - x.amin(-1)
    assert e8 <= (rng.max() / 255) / 2 + 1e-6


# --------------------------------------------------------------------------------------------------
# STE and LWC
# --------------------------------------------------------------------------------------------------


def test_ste_gradient_passes_through_activation_quantizer():
    torch.manual_seed(8)
    x = torch.randn(3, 32, requires_grad=True)
    fake_quantize_activation(x, 4).sum().backward()
    inside = torch.ones_like(x, dtype=torch.bool)
    inside.scatter_(1, x.argmin(1, keepdim=True), False)
    inside.scatter_(1, x.argmax(1, keepdim=True), False)
    torch.testing.assert_close(x.grad[inside], torch.ones(int(inside.sum())))


def test_ste_gradient_passes_through_weight_quantizer():
    torch.manual_seed(9)
    w = torch.randn(4, 64, requires_grad=True)
    fake_quantize_weight(w, WeightQuantSpec(3, 32)).sum().backward()
    assert torch.isfinite(w.grad).all()
    wg = w.detach().reshape(4, 2, 32)
    inside = torch.ones_like(wg, dtype=torch.bool)
    inside.scatter_(2, wg.argmin(2, keepdim=True), False)
    inside.scatter_(2, wg.argmax(2, keepdim=True), False)
    torch.testing.assert_close(w.grad.reshape(4, 2, 32)[inside], torch.ones(int(inside.sum())))


def test_lwc_at_init_shrinks_the_range_by_sigmoid():
    torch.manual_seed(10)
    w = torch.randn(5, 48)
    spec = WeightQuantSpec(4, 16, scale_dtype="float32")
    g = spec.num_groups(48)
    u = torch.full((5, g), 4.0)
    lo = torch.full((5, g), 4.0)
    xmin, xmax = weight_range(w, spec)
    cmin, cmax = weight_range(w, spec, (u, lo))
    factor = 1 / (1 + math.exp(-4.0))
    torch.testing.assert_close(cmax, xmax * factor)
    torch.testing.assert_close(cmin, xmin * factor)
    scale, _ = weight_qparams(w, spec, (u, lo))
    torch.testing.assert_close(scale, (xmax - xmin) * factor / 15)


def test_lwc_clips_extremes_and_gets_gradients():
    torch.manual_seed(11)
    w = torch.randn(3, 32, requires_grad=True)
    spec = WeightQuantSpec(3)
    u = torch.full((3, 1), 4.0, requires_grad=True)
    lo = torch.full((3, 1), 4.0, requires_grad=True)
    fq = fake_quantize_weight(w, spec, (u, lo))
    # the clipped range is smaller: the largest element cannot be reproduced
    assert (fq.detach().amax(1) < w.detach().amax(1)).all()
    (fq - w.detach()).pow(2).sum().backward()
    assert u.grad is not None and lo.grad is not None
    assert torch.isfinite(u.grad).all() and u.grad.abs().sum() > 0
    assert lo.grad.abs().sum() > 0

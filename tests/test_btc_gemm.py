"""Exact CPU reference GEMM (bit-plane popcount and chunked float), the affine epilogue, btc_linear."""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F

import abqcli.btc
from abqcli.btc.contract import check_int32_bound
from abqcli.btc.format import PackedWeight, group_code_sums, pack_planes
from abqcli.btc.gemm import btc_linear, epilogue, group_lengths, int_gemm, popcount_gemm
from abqcli.quant.integer import quantize_activation_f32
from abqcli.quant.quantizer import (
    WeightQuantSpec,
    fake_quantize_activation,
    fake_quantize_weight,
    qmax_for,
    quantize_activation,
    quantize_weight,
)

WEIGHT_BITS = {"2": (2, False), "2*": (2, True), "3": (3, False), "4": (4, False), "8": (8, False)}
ACT_BITS = (4, 6, 8)
KS = (64, 128, 576, 300)


def _reference(a: torch.Tensor, w: torch.Tensor, group: int | None) -> torch.Tensor:
    """int64 [M, N, G]: codes_a.long() @ codes_w.long().T per group of real columns."""
    k = a.shape[1]
    g = group or k
    parts = [a[:, s : s + g].long() @ w[:, s : s + g].long().T for s in range(0, k, g)]
    return torch.stack(parts, dim=-1)


def _random_codes(gen, rows, k, qmax, extreme):
    if extreme:  # every code at qmax: the largest sums, exercises the exact-chunk boundary
        return torch.full((rows, k), qmax, dtype=torch.uint8)
    return torch.randint(0, qmax + 1, (rows, k), generator=gen, dtype=torch.uint8)


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("wname", list(WEIGHT_BITS))
def test_popcount_and_int_gemm_are_exact(wname, k):
    gen = torch.Generator().manual_seed(k * 31 + len(wname))
    qmax_w = qmax_for(*WEIGHT_BITS[wname])
    for act_bits in ACT_BITS:
        qmax_a = qmax_for(act_bits)
        for extreme in (False, True):
            a = _random_codes(gen, 3, k, qmax_a, extreme)
            w = _random_codes(gen, 5, k, qmax_w, extreme)
            a_planes, w_planes = pack_planes(a, qmax_a), pack_planes(w, qmax_w)
            per_channel = _reference(a, w, None)
            per_group = _reference(a, w, 128)

            got = popcount_gemm(a_planes, w_planes)
            assert got.dtype == torch.int64 and got.shape == (3, 5)
            assert torch.equal(got, per_channel[..., 0])
            assert torch.equal(popcount_gemm(a_planes, w_planes, group_words=128 // 32), per_group)

            assert torch.equal(int_gemm(a, w, None), per_channel)
            assert torch.equal(int_gemm(a, w, 128), per_group)


def test_popcount_partial_last_group_and_uint32_view():
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(0, 16, (4, 300), generator=gen, dtype=torch.uint8)
    w = torch.randint(0, 8, (6, 300), generator=gen, dtype=torch.uint8)
    ap, wp = pack_planes(a, 15), pack_planes(w, 7)  # Kp = 384: 12 words
    # groups of 256 columns = 8 words: the second group holds real columns 256..299 and padding
    got = popcount_gemm(ap.view(torch.uint32), wp.view(torch.uint32), group_words=8)
    assert torch.equal(got, _reference(a, w, 256))


def test_int_gemm_any_group_size_and_validation():
    gen = torch.Generator().manual_seed(1)
    a = torch.randint(0, 256, (3, 200), generator=gen, dtype=torch.uint8)
    w = torch.randint(0, 256, (4, 200), generator=gen, dtype=torch.uint8)
    assert torch.equal(int_gemm(a, w, 64), _reference(a, w, 64))
    assert torch.equal(int_gemm(a.long(), w.int(), 7), _reference(a, w, 7))
    with pytest.raises(ValueError, match="K mismatch"):
        int_gemm(a, w[:, :100], None)


def test_int32_bound():
    check_int32_bound(33025, 255, 255)  # 33025 * 255 * 255 = 2_147_450_625 <= 2**31 - 1
    with pytest.raises(ValueError, match="int32"):
        check_int32_bound(33026, 255, 255)
    with pytest.raises(ValueError, match="int32"):
        check_int32_bound(10**7, 15, 15)
    check_int32_bound(11008, 255, 255)


def test_group_lengths():
    assert group_lengths(300, 128).tolist() == [128, 128, 44]
    assert group_lengths(256, 128).tolist() == [128, 128]
    assert group_lengths(576, None).tolist() == [576]


# ------------------------------------------------------------------------------------ float outputs

LINEAR_CASES = [
    # (weight bits, balance, act bits, group, K)
    (4, False, 4, None, 576),
    (4, False, 8, None, 300),
    (3, False, 4, 128, 300),
    (4, False, 6, 128, 576),
    (2, True, 6, None, 300),
    (2, True, 8, 128, 576),
    (8, False, 8, None, 576),  # bracket beyond 2**24: the float64 path
    (8, False, 8, 256, 300),
]


def _layer(bits, balance, group, k, n=48, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    spec = WeightQuantSpec(bits, group, balance)
    return w, spec, PackedWeight.from_quantized(quantize_weight(w, spec))


def _assert_rel(y, ref, rel=1e-5):
    torch.testing.assert_close(y, ref, rtol=rel, atol=rel * float(ref.abs().max()))


@pytest.mark.parametrize(("bits", "balance", "act_bits", "group", "k"), LINEAR_CASES)
def test_btc_linear_matches_fake_quant(bits, balance, act_bits, group, k):
    w, spec, pw = _layer(bits, balance, group, k)
    gen = torch.Generator().manual_seed(k + act_bits)
    x = torch.randn(2, 5, k, generator=gen) * 3 + 0.5
    x[0, 0] = 0.25  # a constant token: scale clamps to 1e-5, huge zero point
    y = btc_linear(x, pw, act_bits)
    ref = F.linear(fake_quantize_activation(x, act_bits), fake_quantize_weight(w, spec))
    assert y.shape == (2, 5, 48) and y.dtype == torch.float32
    _assert_rel(y, ref)

    # the same numbers through the exact integer paths and the stand-alone epilogue
    codes, sa, za = quantize_activation(x.reshape(-1, k), act_bits)
    a_sums = group_code_sums(codes, group)
    via_int = epilogue(int_gemm(codes, pw.codes(), group), sa[:, 0], za[:, 0], a_sums, pw)
    _assert_rel(y.reshape(-1, 48), via_int, rel=1e-6)
    group_words = None if group is None else group // 32
    acc = popcount_gemm(pack_planes(codes, qmax_for(act_bits)), pw.planes, group_words)
    if acc.dim() == 2:
        acc = acc.unsqueeze(-1)
    assert torch.equal(acc, int_gemm(codes, pw.codes(), group))


def test_btc_linear_bias_and_dtype():
    w, spec, pw = _layer(4, False, 128, 256)
    bias = torch.randn(48)
    x = torch.randn(7, 256)
    ref = F.linear(fake_quantize_activation(x, 4), fake_quantize_weight(w, spec), bias)
    _assert_rel(btc_linear(x, pw, 4, bias=bias), ref)
    y16 = btc_linear(x.to(torch.bfloat16), pw, 4, bias=bias)
    assert y16.dtype == torch.bfloat16 and y16.shape == (7, 48)


def test_quantize_activation_f32_matches_quantizer():
    x = torch.randn(6, 100) * 4
    codes, scale, zero = quantize_activation(x, 6)
    codes_f, scale_f, zero_f = quantize_activation_f32(x, 6)
    assert torch.equal(codes_f, codes.float())
    assert torch.equal(scale_f, scale) and torch.equal(zero_f, zero)


def test_weight_only_path_any_group_size():
    w, spec, pw = _layer(3, False, 64, 200)
    x = torch.randn(3, 4, 200)
    bias = torch.randn(48)
    y = btc_linear(x, pw, 16, bias=bias)
    _assert_rel(y, F.linear(x, fake_quantize_weight(w, spec), bias))


def test_group_not_multiple_of_128_with_act_quant_raises():
    _, _, pw = _layer(4, False, 64, 256)
    with pytest.raises(ValueError, match="multiple of 128"):
        btc_linear(torch.randn(2, 256), pw, 8)


def test_btc_linear_refuses_int32_overflow():
    _, _, pw = _layer(8, False, None, 33100, n=2)
    with pytest.raises(ValueError, match="int32"):
        btc_linear(torch.randn(1, 33100), pw, 8)


def test_btc_linear_input_validation():
    _, _, pw = _layer(4, False, None, 128)
    with pytest.raises(ValueError, match="features"):
        btc_linear(torch.randn(2, 100), pw, 4)
    with pytest.raises(ValueError, match="backend"):
        btc_linear(torch.randn(2, 128), pw, 4, backend="tpu")


def test_cupy_backend_dispatches_lazily(monkeypatch):
    calls = []
    fake = types.ModuleType("abqcli.btc.cuda")
    fake.btc_linear = lambda x, w, act_bits, bias=None, act_clip=1.0: calls.append((x, w, act_bits, bias, act_clip)) or "gpu"
    monkeypatch.setitem(sys.modules, "abqcli.btc.cuda", fake)
    monkeypatch.setattr(abqcli.btc, "cuda", fake, raising=False)
    _, _, pw = _layer(4, False, None, 128)
    x = torch.randn(2, 128)
    assert btc_linear(x, pw, 4, backend="cupy", act_clip=0.9) == "gpu"
    assert calls and calls[0][2] == 4 and calls[0][1] is pw and calls[0][4] == 0.9


def test_epilogue_accepts_per_channel_2d_accumulator():
    w, spec, pw = _layer(4, False, None, 300)
    x = torch.randn(4, 300)
    codes, sa, za = quantize_activation(x, 8)
    acc = int_gemm(codes, pw.codes(), None)[..., 0]
    y = epilogue(acc, sa[:, 0], za[:, 0], group_code_sums(codes, None), pw)
    _assert_rel(y, F.linear(fake_quantize_activation(x, 8), fake_quantize_weight(w, spec)))
    with pytest.raises(ValueError, match="does not match"):
        epilogue(acc[:, :3], sa[:, 0], za[:, 0], group_code_sums(codes, None), pw)


@pytest.mark.parametrize(("group", "k"), [(None, 300), (128, 256), (64, 200)])
def test_quant_linear_integer_path_is_the_packed_arithmetic(group, k):
    """A QuantLinear given its integer state computes bit for bit what the packed layer computes, and
    agrees with its own float path (`F.linear` of the fake-quantized input and weight) to 1e-5."""
    from torch import nn

    from abqcli.quant.fakequant import QuantLinear
    from abqcli.quant.quantizer import LayerQuant

    w, spec, pw = _layer(4, False, group, k)
    linear = nn.Linear(k, 48, bias=True)
    with torch.no_grad():
        linear.weight.copy_(pw.dequantized_f32())
    qlinear = QuantLinear(linear, LayerQuant(spec, 6))
    x = torch.randn(3, 5, k) * 2
    y_float = qlinear(x).detach()
    qlinear.use_integer_weight(quantize_weight(w, spec))
    y_int = qlinear(x)
    _assert_rel(y_int, y_float)
    if group is None or group % 128 == 0:  # layers the BTC GEMM runs
        assert torch.equal(y_int, btc_linear(x, pw, 6, bias=linear.bias))
    with pytest.raises(ValueError, match="does not fit"):
        qlinear.use_integer_weight(quantize_weight(w[:, :64], WeightQuantSpec(4)))
    weight_only = QuantLinear(linear, LayerQuant(spec, 16))
    weight_only.use_integer_weight(quantize_weight(w, spec))  # keeps no second copy of the weight
    assert weight_only.centred_codes is None
    assert torch.equal(weight_only(x), F.linear(x, linear.weight, linear.bias))

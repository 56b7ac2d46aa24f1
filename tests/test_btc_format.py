"""BTC bit-plane format: packing, bit layout, padding, code sums, the version-3 scale and zero-point
tensors, tensor naming, version-2 reading."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from abqcli.btc.contract import K_ALIGN, WORD_BITS
from abqcli.btc.format import (
    FORMAT_VERSION,
    PackedWeight,
    group_code_sums,
    num_planes,
    pack_planes,
    pack_zero_points,
    packed_weight_from_tensors,
    packed_weight_meta,
    packed_weight_to_tensors,
    padded_k,
    tensor_names,
    unpack_planes,
    unpack_zero_points,
)
from abqcli.errors import InputError
from abqcli.quant.quantizer import QuantizedWeight, WeightQuantSpec, qmax_for, quantize_weight

# (bits, balance): 1..8 plain and W2* (qmax 4 in 3 planes)
BIT_CHOICES = [(b, False) for b in range(1, 9)] + [(2, True)]


def _as_u32(x: int) -> int:
    return x & 0xFFFFFFFF


def test_constants_and_plane_counts():
    assert (FORMAT_VERSION, K_ALIGN, WORD_BITS) == (5, 128, 32)
    assert [num_planes(qmax_for(b)) for b in range(1, 9)] == list(range(1, 9))
    assert num_planes(qmax_for(2, balance=True)) == 3
    assert [padded_k(k) for k in (1, 127, 128, 129, 300, 576)] == [128, 128, 128, 256, 384, 640]
    with pytest.raises(ValueError):
        num_planes(0)


@settings(max_examples=60, deadline=None)
@given(
    r=st.integers(1, 40),
    k=st.integers(1, 300),
    bits=st.sampled_from(BIT_CHOICES),
    seed=st.integers(0, 2**31 - 1),
)
def test_pack_unpack_round_trip(r, k, bits, seed):
    qmax = qmax_for(*bits)
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, qmax + 1, (r, k), generator=gen, dtype=torch.uint8)
    planes = pack_planes(codes, qmax)
    kp = padded_k(k)
    assert planes.dtype == torch.int32
    assert planes.shape == (num_planes(qmax), r, kp // WORD_BITS)
    assert planes.is_contiguous()
    assert torch.equal(unpack_planes(planes, k), codes)
    # the on-disk view round-trips too
    assert torch.equal(unpack_planes(planes.view(torch.uint32), k), codes)
    # padding columns are code 0: every bit past column k is clear
    bits_all = torch.stack([(planes.long() >> e) & 1 for e in range(WORD_BITS)], dim=-1)
    bits_all = bits_all.reshape(planes.shape[0], r, kp)
    assert int(bits_all[:, :, k:].sum()) == 0


def test_hand_made_bit_layout():
    codes = torch.zeros(2, 130, dtype=torch.uint8)  # K=130 -> padded to 256, 8 words per row
    codes[0, 0] = 1
    codes[0, 33] = 1  # word 1, bit 1
    codes[0, 31] = 3  # word 0, bit 31, in planes 0 and 1
    codes[1, 129] = 2  # last real column: word 4, bit 1, plane 1 only
    planes = pack_planes(codes, 3)
    assert planes.shape == (2, 2, 8)
    words = planes.long() & 0xFFFFFFFF
    expected = torch.zeros(2, 2, 8, dtype=torch.int64)
    expected[0, 0, 0] = (1 << 0) | (1 << 31)
    expected[0, 0, 1] = 1 << 1
    expected[1, 0, 0] = 1 << 31
    expected[1, 1, 4] = 1 << 1
    assert torch.equal(words, expected)
    # the uint32 view on disk holds the same numbers
    assert int(planes[0, 0, 0].view(torch.uint32).item()) == _as_u32(int(planes[0, 0, 0]))
    assert int(planes[0, 0, 0]) == -(2**31) + 1


def test_w2_balanced_uses_three_planes():
    codes = torch.tensor([[0, 1, 2, 3, 4]], dtype=torch.uint8)
    planes = pack_planes(codes, 4)
    assert planes.shape == (3, 1, 4)
    # bit p of code c sits in bit c of plane p's first word
    assert [int(planes[p, 0, 0]) for p in range(3)] == [0b01010, 0b01100, 0b10000]
    assert torch.equal(unpack_planes(planes, 5), codes)


def test_pack_rejects_out_of_range_and_bad_input():
    with pytest.raises(ValueError, match=r"\[0, 4\]"):
        pack_planes(torch.tensor([[0, 5]]), 4)
    with pytest.raises(ValueError):
        pack_planes(torch.tensor([[-1, 0]]), 3)
    with pytest.raises(ValueError):
        pack_planes(torch.zeros(4), 3)
    with pytest.raises(ValueError):
        pack_planes(torch.zeros(1, 4), 3)  # float codes
    with pytest.raises(ValueError):
        unpack_planes(torch.zeros(1, 1, 4, dtype=torch.int32), 129)


def test_pack_accepts_wide_integer_codes():
    codes = torch.tensor([[7, 0, 3]], dtype=torch.int64)
    assert torch.equal(unpack_planes(pack_planes(codes, 7), 3), codes.to(torch.uint8))


@pytest.mark.parametrize(
    ("k", "group", "expected_groups"), [(300, None, 1), (300, 128, 3), (256, 128, 2), (10, 4, 3)]
)
def test_group_code_sums(k, group, expected_groups):
    codes = torch.randint(0, 16, (5, k), dtype=torch.uint8)
    sums = group_code_sums(codes, group)
    assert sums.dtype == torch.int32 and sums.shape == (5, expected_groups)
    g = group or k
    for gi in range(expected_groups):
        assert torch.equal(sums[:, gi], codes[:, gi * g : (gi + 1) * g].int().sum(dim=1, dtype=torch.int32))


@pytest.mark.parametrize(("bits", "balance", "group"), [(4, False, None), (2, True, 128), (3, False, 64)])
def test_packed_weight_round_trip(bits, balance, group):
    w = torch.randn(24, 300)
    qw = quantize_weight(w, WeightQuantSpec(bits, group, balance))
    pw = PackedWeight.from_quantized(qw)
    assert pw.qmax == qw.spec.qmax and pw.num_groups == qw.scale.shape[1]
    assert pw.planes.shape == (num_planes(pw.qmax), 24, padded_k(300) // 32)
    assert torch.equal(pw.code_sums, group_code_sums(qw.codes, group))
    back = pw.to_quantized()
    assert isinstance(back, QuantizedWeight) and back.spec == qw.spec
    assert torch.equal(back.codes, qw.codes)
    assert torch.equal(back.scale, qw.scale) and torch.equal(back.zero, qw.zero)
    assert torch.equal(pw.dequantized_f32(), qw.dequantize())
    col = torch.arange(300) // (group or 300)
    centred = pw.centred_weight()
    assert torch.equal(centred.values, qw.codes.float() - qw.zero[:, col])
    assert torch.equal(centred.scale, qw.scale) and centred.group_size == group
    assert centred.max_abs == float(centred.values.abs().max())


def test_packed_weight_validates_shapes():
    pw = PackedWeight.from_quantized(quantize_weight(torch.randn(8, 64), WeightQuantSpec(4)))
    with pytest.raises(ValueError, match="scale"):
        PackedWeight(pw.planes, pw.scale[:4], pw.zero, pw.code_sums, 64, 8, 4, False, None)
    with pytest.raises(ValueError, match="planes"):
        PackedWeight(pw.planes[:2], pw.scale, pw.zero, pw.code_sums, 64, 8, 4, False, None)


def test_tensor_names():
    base = {
        "planes": "model.layers.0.self_attn.q_proj.btc_planes",
        "scales": "model.layers.0.self_attn.q_proj.btc_scales",
        "zeros": "model.layers.0.self_attn.q_proj.btc_zeros",
    }
    assert tensor_names("model.layers.0.self_attn.q_proj") == base
    assert tensor_names("model.layers.0.self_attn.q_proj", version=2) == {
        **base, "code_sums": "model.layers.0.self_attn.q_proj.btc_code_sums"}


def _packed(name_bits=(3, False, 128), scale_dtype="float16"):
    bits, balance, group = name_bits
    qw = quantize_weight(torch.randn(16, 200), WeightQuantSpec(bits, group, balance, scale_dtype))
    return PackedWeight.from_quantized(qw)


@pytest.mark.parametrize("rows,groups,width", [(1, 1, 1), (3, 5, 4), (16, 2, 3), (7, 13, 8), (0, 4, 2)])
def test_zero_points_round_trip_through_the_bit_stream(rows, groups, width):
    gen = torch.Generator().manual_seed(rows * 100 + groups * 10 + width)
    zero = torch.randint(0, 1 << width, (rows, groups), generator=gen).float()
    stream = pack_zero_points(zero, width)
    assert stream.dtype == torch.uint8 and stream.numel() == -(-rows * groups * width // 8)
    assert torch.equal(unpack_zero_points(stream, rows, groups, width), zero)


def test_zero_point_stream_layout_by_hand():
    """Values 1, 2, 7 at 3 bits, LSB first: bits 100 010 111 -> bytes 0b11010001, 0b00000001."""
    stream = pack_zero_points(torch.tensor([[1.0, 2.0, 7.0]]), 3)
    assert stream.tolist() == [0b11010001, 0b00000001]
    assert unpack_zero_points(stream, 1, 3, 3).tolist() == [[1.0, 2.0, 7.0]]


def test_zero_point_stream_refuses_bad_input():
    with pytest.raises(ValueError, match=r"\[0, 7\]"):
        pack_zero_points(torch.tensor([[8.0]]), 3)
    stream = pack_zero_points(torch.tensor([[1.0, 2.0, 3.0]]), 3)
    with pytest.raises(ValueError, match="padding bits"):
        unpack_zero_points(stream | torch.tensor([0, 0b100], dtype=torch.uint8), 1, 3, 3)
    with pytest.raises(ValueError, match="expected uint8"):
        unpack_zero_points(stream[:1], 1, 3, 3)


@pytest.mark.parametrize("scale_dtype,stored", [("float16", torch.float16), ("float32", torch.float32)])
def test_tensors_round_trip_through_safetensors(scale_dtype, stored):
    from safetensors.torch import load, save

    name = "model.layers.1.mlp.down_proj"
    pw = _packed((2, True, 128), scale_dtype)
    tensors = packed_weight_to_tensors(name, pw)
    names = tensor_names(name)
    assert set(tensors) == set(names.values())
    assert tensors[names["planes"]].dtype == torch.uint32
    assert tensors[names["scales"]].dtype == stored
    zeros = tensors[names["zeros"]]
    assert zeros.dtype == torch.uint8 and zeros.numel() == -(-16 * 2 * 3 // 8)  # W2*: 3-bit zero points
    meta = packed_weight_meta(pw)
    assert meta == {"bits": 2, "balance": True, "group_size": 128, "in_features": 200, "out_features": 16}
    loaded = load(save(tensors))
    back = packed_weight_from_tensors(name, loaded, meta)
    assert back.planes.dtype == torch.int32
    assert torch.equal(back.planes, pw.planes)
    for attr in ("scale", "zero", "code_sums"):
        assert torch.equal(getattr(back, attr), getattr(pw, attr))
    assert (back.bits, back.balance, back.group_size) == (2, True, 128)
    assert torch.equal(back.to_quantized().codes, pw.to_quantized().codes)


def test_version_2_tensors_still_read():
    """A version-2 linear (float32 scales and zero points, int32 code sums) decodes to the same weight."""
    name = "model.layers.0.mlp.up_proj"
    pw = _packed((4, False, 64))
    v2 = {f"{name}.btc_planes": pw.planes.view(torch.uint32), f"{name}.btc_scales": pw.scale,
          f"{name}.btc_zeros": pw.zero, f"{name}.btc_code_sums": pw.code_sums}
    back = packed_weight_from_tensors(name, v2, packed_weight_meta(pw), version=2)
    assert torch.equal(back.dequantized_f32(), pw.dequantized_f32())
    with pytest.raises(InputError, match="code_sums are not the sums"):
        packed_weight_from_tensors(name, {**v2, f"{name}.btc_code_sums": pw.code_sums + 1},
                                   packed_weight_meta(pw), version=2)


def test_bfloat16_scales_are_refused():
    name = "m.q_proj"
    pw = _packed()
    tensors = packed_weight_to_tensors(name, pw)
    tensors[f"{name}.btc_scales"] = pw.scale.bfloat16()
    with pytest.raises(InputError, match="scales must be float16 or float32"):
        packed_weight_from_tensors(name, tensors, packed_weight_meta(pw))


def test_missing_tensor_is_an_input_error_naming_it():
    name = "model.layers.0.self_attn.k_proj"
    pw = _packed()
    tensors = packed_weight_to_tensors(name, pw)
    del tensors[f"{name}.btc_zeros"]
    with pytest.raises(InputError, match=r"k_proj\.btc_zeros"):
        packed_weight_from_tensors(name, tensors, packed_weight_meta(pw))


def test_bad_tensors_or_meta_are_input_errors():
    name = "lin"
    pw = _packed()
    tensors = packed_weight_to_tensors(name, pw)
    meta = packed_weight_meta(pw)
    with pytest.raises(InputError, match="in_features"):
        packed_weight_from_tensors(name, tensors, {k: v for k, v in meta.items() if k != "in_features"})
    with pytest.raises(InputError, match="lin"):
        packed_weight_from_tensors(name, tensors, {**meta, "in_features": 999})
    bad = dict(tensors)
    bad["lin.btc_planes"] = tensors["lin.btc_planes"].view(torch.int32).float()
    with pytest.raises(InputError, match="btc_planes"):
        packed_weight_from_tensors(name, bad, meta)

"""The CuPy backend on a real GPU: bit-exact integer GEMM (tensor-core and popcount kernels) against the
CPU reference, the quantize+pack kernel against the CPU quantizer and packer, and the float output
against the CPU `btc_linear`. Marked `gpu`; skipped cleanly without CuPy or an sm_80+ GPU.

Without a GPU, `test_unavailable_*` checks the one-line refusal instead.
"""

from __future__ import annotations

import functools

import pytest
import torch

from abqcli.btc import cuda as bc
from abqcli.btc import gemm
from abqcli.btc.format import PackedWeight, group_code_sums, pack_planes, padded_k
from abqcli.errors import InputError
from abqcli.quant.quantizer import WeightQuantSpec, qmax_for, quantize_activation, quantize_weight

OK, REASON = bc.available()
gpu = [pytest.mark.gpu, pytest.mark.skipif(not OK, reason=f"needs CuPy and an sm_80+ GPU: {REASON}")]


def _mark(fn):
    for mark in reversed(gpu):
        fn = mark(fn)
    return fn


# (label, weight bits, balance) x activation bits
W_KINDS = [("2", 2, False), ("2*", 2, True), ("3", 3, False), ("4", 4, False), ("8", 8, False)]
A_BITS = [4, 6, 8]
M_SIZES = [1, 3, 8, 16, 100, 300]


@functools.lru_cache(maxsize=64)
def _codes(rows: int, k: int, qmax: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    c = torch.randint(0, qmax + 1, (rows, k), generator=g, dtype=torch.int32).to(torch.uint8)
    c[0, : min(k, 97)] = qmax  # saturate a stretch: every plane bit set
    return c


@functools.lru_cache(maxsize=32)
def _planes(rows: int, k: int, qmax: int, seed: int) -> torch.Tensor:
    return pack_planes(_codes(rows, k, qmax, seed), qmax)


def _group_words(k: int, group_size: int | None) -> int | None:
    return None if group_size is None else group_size // 32


def _check_int(m, n, k, w_qmax, a_qmax, group_size):
    a_codes, w_codes = _codes(m, k, a_qmax, 1000 + m), _codes(n, k, w_qmax, 2000 + n)
    a_planes = _planes(m, k, a_qmax, 1000 + m).cuda()
    w_planes = _planes(n, k, w_qmax, 2000 + n).cuda()
    want = gemm.int_gemm(a_codes, w_codes, group_size)
    assert int(want.max()) <= 2**31 - 1
    for kernel in ("mma", "popc"):
        got = bc.int_gemm_planes(a_planes, w_planes, _group_words(k, group_size), kernel=kernel)
        assert got.is_cuda and got.dtype == torch.int32
        assert got.shape == want.shape, kernel
        mismatch = (got.cpu().long() != want).sum().item()
        assert mismatch == 0, f"{kernel}: {mismatch} of {want.numel()} accumulators differ"


LAYOUTS = [(576, None), (640, 128), (576, 256)]


@_mark
@pytest.mark.parametrize("k,group_size", LAYOUTS, ids=lambda v: str(v))
@pytest.mark.parametrize("m", M_SIZES)
@pytest.mark.parametrize("a_bits", A_BITS)
@pytest.mark.parametrize("w_label,w_bits,balance", W_KINDS, ids=[w[0] for w in W_KINDS])
def test_int_gemm_all_pairs(w_label, w_bits, balance, a_bits, m, k, group_size):
    _check_int(m, 192, k, qmax_for(w_bits, balance), qmax_for(a_bits), group_size)


SHAPES = [(576, 1536), (640, 4096), (4096, 4096), (4096, 192), (11008, 1536), (11008, 4096)]
PAIRS = [  # (w_bits, balance, a_bits, group_size)
    (4, False, 4, 128),
    (2, True, 8, None),
    (8, False, 8, 256),
    (3, False, 6, 128),
]


@_mark
@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: f"w{p[0]}{'*' if p[1] else ''}a{p[2]}g{p[3]}")
@pytest.mark.parametrize("m", M_SIZES)
@pytest.mark.parametrize("k,n", SHAPES, ids=lambda v: str(v))
def test_int_gemm_shapes(k, n, m, pair):
    w_bits, balance, a_bits, group_size = pair
    _check_int(m, n, k, qmax_for(w_bits, balance), qmax_for(a_bits), group_size)


@_mark
@pytest.mark.parametrize("group_size", [None, 128, 256])
@pytest.mark.parametrize("k", [576, 4096, 11008])
@pytest.mark.parametrize("m", [1, 3, 100, 300])
@pytest.mark.parametrize("bits", A_BITS)
def test_quant_pack_matches_cpu(bits, m, k, group_size):
    gen = torch.Generator().manual_seed(bits * 7 + m + k)
    x = torch.randn(m, k, generator=gen) * (torch.rand(m, 1, generator=gen) * 20 + 0.01)
    x[0] += 3.0  # an offset row
    if m > 2:
        x[1] = x[1].abs() + 1.0  # all positive: negative zero point
        x[2] = 0.25  # constant row: scale clamps to 1e-5
    codes, s_ref, z_ref = quantize_activation(x, bits)
    planes, scale, zero, sums = bc.quantize_pack_activations(x.cuda(), bits, group_size)
    assert planes.shape == (qmax_for(bits).bit_length(), m, padded_k(k) // 32)
    assert torch.equal(planes.cpu(), pack_planes(codes, qmax_for(bits)))
    assert torch.equal(scale.cpu(), s_ref.reshape(-1))
    assert torch.equal(zero.cpu(), z_ref.reshape(-1))
    assert torch.equal(sums.cpu(), group_code_sums(codes, group_size))


@_mark
@pytest.mark.parametrize("clip", [0.9, 0.5])
@pytest.mark.parametrize("bits", A_BITS)
def test_quant_pack_with_a_clip_ratio_matches_cpu(bits, clip):
    """`activations.clip`: the kernel's r·min, r·max (__fmul_rn) are the CPU's float32 products, bit for bit,
    and a clipped BTCLinear on the GPU gives the CPU's output."""
    gen = torch.Generator().manual_seed(bits * 11)
    x = torch.randn(64, 1536, generator=gen) * (torch.rand(64, 1, generator=gen) * 20 + 0.01)
    codes, s_ref, z_ref = quantize_activation(x, bits, clip)
    planes, scale, zero, sums = bc.quantize_pack_activations(x.cuda(), bits, 128, clip)
    assert torch.equal(planes.cpu(), pack_planes(codes, qmax_for(bits)))
    assert torch.equal(scale.cpu(), s_ref.reshape(-1)) and torch.equal(zero.cpu(), z_ref.reshape(-1))
    assert torch.equal(sums.cpu(), group_code_sums(codes, 128))
    from abqcli.runtime import BTCLinear

    w = _packed_weight(576, 1536, 4, False, None)
    want = BTCLinear(w, bits, None, "cpu", act_clip=clip)(x)
    _assert_close(BTCLinear(w, bits, None, "cupy", act_clip=clip)(x.cuda()), want, 1e-5)


@_mark
@pytest.mark.parametrize("bits", A_BITS)
def test_quant_pack_fp16_input(bits):
    gen = torch.Generator().manual_seed(bits)
    x = (torch.randn(37, 4096, generator=gen) * 4).half()
    codes, s_ref, z_ref = quantize_activation(x, bits)  # quantizes x.float()
    planes, scale, zero, sums = bc.quantize_pack_activations(x.cuda(), bits, 128)
    assert torch.equal(planes.cpu(), pack_planes(codes, qmax_for(bits)))
    assert torch.equal(scale.cpu(), s_ref.reshape(-1))
    assert torch.equal(zero.cpu(), z_ref.reshape(-1))
    assert torch.equal(sums.cpu(), group_code_sums(codes, 128))


@_mark
def test_quant_pack_round_half_even():
    # s = 1 exactly for A4 on a row spanning [0, 15]: x/s = k + 0.5 ties must round to even
    x = (torch.arange(640, dtype=torch.float32) % 16).reshape(1, -1)
    x[0, 1:9] = torch.tensor([0.5, 1.5, 2.5, 3.5, 4.5, 12.5, 13.5, 14.5])
    codes, _, _ = quantize_activation(x, 4)
    planes, scale, zero, _ = bc.quantize_pack_activations(x.cuda(), 4, None)
    assert float(scale[0]) == 1.0 and float(zero[0]) == 0.0
    assert torch.equal(planes.cpu(), pack_planes(codes, 15))


@functools.lru_cache(maxsize=16)
def _packed_weight(n: int, k: int, w_bits: int, balance: bool, group_size: int | None) -> PackedWeight:
    gen = torch.Generator().manual_seed(n + k + w_bits)
    weight = torch.randn(n, k, generator=gen) * 0.05
    return PackedWeight.from_quantized(quantize_weight(weight, WeightQuantSpec(w_bits, group_size, balance)))


def _assert_close(got: torch.Tensor, want: torch.Tensor, rtol: float):
    got, want = got.float().cpu(), want.float().cpu()
    scale = float(want.abs().max())
    err = (got - want).abs()
    bad = err > rtol * (want.abs() + scale)
    assert not bad.any(), (
        f"{int(bad.sum())} outputs off; max abs err {float(err.max())} (output scale {scale})"
    )


LINEAR_CASES = [  # (k, n, w_bits, balance, a_bits, group_size)
    (576, 192, 4, False, 4, None),
    (576, 1536, 2, True, 8, 128),
    (640, 192, 3, False, 6, 256),
    (4096, 1536, 8, False, 8, 128),
    (4096, 4096, 2, False, 4, None),
    (11008, 4096, 4, False, 8, 128),
]


@_mark
@pytest.mark.parametrize("kernel", ["mma", "popc"])
@pytest.mark.parametrize("m", [1, 16, 100])
@pytest.mark.parametrize(
    "case", LINEAR_CASES, ids=lambda c: f"k{c[0]}n{c[1]}w{c[2]}{'*' if c[3] else ''}a{c[4]}g{c[5]}"
)
def test_btc_linear_matches_cpu(case, m, kernel):
    k, n, w_bits, balance, a_bits, group_size = case
    w = _packed_weight(n, k, w_bits, balance, group_size)
    gen = torch.Generator().manual_seed(m + k)
    x = torch.randn(m, k, generator=gen)
    bias = torch.randn(n, generator=gen)
    want = gemm.btc_linear(x, w, a_bits, bias=bias, backend="cpu")
    got = bc.btc_linear(x.cuda(), w, a_bits, bias=bias.cuda(), kernel=kernel)
    assert got.is_cuda and got.dtype == torch.float32 and got.shape == want.shape
    _assert_close(got, want, 1e-5)


@_mark
def test_btc_linear_with_an_online_hadamard_transform():
    """A rotated model's down_proj (K = 1536 = 12·128): BTCLinear transforms the input on the GPU before
    the quantize-and-pack kernel; fed the CPU's transformed input, the kernel gives the CPU's output."""
    from abqcli.quant.hadamard import apply_input_transform
    from abqcli.runtime import BTCLinear

    w = _packed_weight(576, 1536, 4, False, None)
    x = torch.randn(37, 1536, generator=torch.Generator().manual_seed(5))
    rotated = apply_input_transform(x, "hadamard")
    _assert_close(apply_input_transform(x.cuda(), "hadamard"), rotated, 1e-6)
    want = BTCLinear(w, 4, None, "cpu", "hadamard")(x)
    _assert_close(bc.btc_linear(rotated.cuda(), w, 4), want, 1e-5)
    got = BTCLinear(w, 4, None, "cupy", "hadamard")(x.cuda())
    assert got.is_cuda and got.shape == want.shape
    # the GPU's own transform rounds in its own order: an activation on a rounding tie may take the
    # neighbouring A4 code, so only the mean error is bounded here
    assert float((got.cpu() - want).abs().mean()) <= 1e-2 * float(want.abs().mean())


@_mark
def test_btc_linear_backend_dispatch_shapes_and_dtypes():
    w = _packed_weight(192, 576, 4, False, None)
    x = torch.randn(2, 5, 576)
    want = gemm.btc_linear(x, w, 8, backend="cpu")
    got = gemm.btc_linear(x.cuda(), w, 8, backend="cupy")
    assert got.shape == (2, 5, 192)
    _assert_close(got, want, 1e-5)
    # CPU input: computed on the GPU, returned on the CPU
    got_cpu = bc.btc_linear(x, w, 8)
    assert got_cpu.device.type == "cpu"
    _assert_close(got_cpu, want, 1e-5)
    # fp16 in, fp16 out (rounded once from fp32, like the CPU path)
    xh = x.half()
    want_h = gemm.btc_linear(xh, w, 8, backend="cpu")
    got_h = bc.btc_linear(xh.cuda(), w, 8)
    assert got_h.dtype == torch.float16
    _assert_close(got_h, want_h, 2e-3)
    # weight-only (A16) path
    want16 = gemm.btc_linear(x, w, 16, backend="cpu")
    _assert_close(bc.btc_linear(x.cuda(), w, 16), want16, 1e-5)
    # empty batch
    assert bc.btc_linear(torch.zeros(0, 576, device="cuda"), w, 8).shape == (0, 192)


@_mark
def test_int32_bound_is_checked():
    w = _packed_weight(8, 33280, 8, False, None)
    with pytest.raises(ValueError, match="int32"):
        bc.btc_linear(torch.randn(1, 33280, device="cuda"), w, 8)


# ------------------------------------------------------------------------------------- without a GPU


@pytest.mark.skipif(OK, reason="a GPU and CuPy are available here")
def test_unavailable_here_raises_one_line_input_error():
    ok, reason = bc.available()
    assert ok is False and reason and "\n" not in reason
    w = PackedWeight.from_quantized(quantize_weight(torch.randn(8, 128), WeightQuantSpec(4)))
    x = torch.randn(2, 128)
    for call in (
        lambda: bc.btc_linear(x, w, 4),
        lambda: gemm.btc_linear(x, w, 4, backend="cupy"),
        lambda: bc.int_gemm_planes(pack_planes(_codes(2, 128, 15, 0), 15), w.planes, None),
        lambda: bc.quantize_pack_activations(x, 4, None),
    ):
        with pytest.raises(InputError) as exc:
            call()
        assert str(exc.value) == bc.NEEDS_GPU
        assert "\n" not in str(exc.value) and exc.value.exit_code == 2


def test_cuda_source_dir_points_at_the_kernels():
    d = bc.cuda_source_dir()
    for name in bc.SOURCES:
        assert (d / name).is_file()

"""CPU model of the CUDA kernels' indexing (cuda/btc_gemm.cu, cuda/btc_pack.cu), no GPU needed.

The emulation below repeats the kernels' index expressions line by line (same names: lane, gid, tig,
mc, nc, m0, n0, arow, brow, wo, kin, S, SROW, ...) and uses the launch geometry of abqcli.btc.cuda, the
same function the launcher uses. The mma instruction itself is modelled from the PTX ISA fragment
tables (section 9.7.14.5.13 "Matrix Fragments for mma.m16n8k256", 9.7.14.5.12 for m16n8k128): every
lane's registers are scattered to the hardware's 16x256 A tile and 256x8 B tile element by element
(element i of a .b32 register is bit i), each tile cell must be written exactly once, and
D = C + popc(A AND B) is gathered back per the C/D table. The result must equal the exact CPU reference
`int_gemm` on real packed data (`pack_planes`), which is what proves the kernel's addressing.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from abqcli.btc import cuda as bc
from abqcli.btc.format import PackedWeight, group_code_sums, num_planes, pack_planes, padded_k
from abqcli.btc.gemm import epilogue, int_gemm
from abqcli.quant.quantizer import activation_qparams, qmax_for, quantize_activation

U32 = np.uint64  # hold uint32 patterns in uint64 so shifts/ANDs never sign-extend
BIT = np.arange(32, dtype=U32)


# --------------------------------------------------------------------------- the mma, from the PTX ISA


def _bits(word: int) -> np.ndarray:
    """Elements i = 0..31 of a .b32 register: bit i."""
    return ((np.uint64(word) >> BIT) & np.uint64(1)).astype(np.int64)


def _fragment_maps(k: int):
    """(row, col) of every A element [32 lanes, regs, 32] and B element, from the PTX tables; each tile
    cell must be covered exactly once."""
    n_a, n_b = k // 64, k // 128
    a_row = np.zeros((32, n_a, 32), dtype=np.int64)
    a_col = np.zeros_like(a_row)
    b_row = np.zeros((32, n_b, 32), dtype=np.int64)
    b_col = np.zeros_like(b_row)
    for lane in range(32):
        group_id, tid_in_group = lane >> 2, lane % 4
        for reg in range(n_a):
            for e in range(32):
                i = 32 * reg + e  # element index a_i, low to high
                if k == 256:
                    # row = groupID for 0 <= i < 32 || 64 <= i < 96, groupID + 8 otherwise
                    a_row[lane, reg, e] = group_id if (i < 32 or 64 <= i < 96) else group_id + 8
                    # col = tig*32 + (i & 0x1F) (+128 for i >= 64)
                    a_col[lane, reg, e] = tid_in_group * 32 + (i & 0x1F) + (128 if i >= 64 else 0)
                else:
                    a_row[lane, reg, e] = group_id if i < 32 else group_id + 8
                    a_col[lane, reg, e] = tid_in_group * 32 + (i & 0x1F)
        for reg in range(n_b):
            for e in range(32):
                i = 32 * reg + e
                # row = tig*32 + (i & 0x1F) (+128 for i >= 32, k256 only); col = groupID
                b_row[lane, reg, e] = tid_in_group * 32 + (i & 0x1F) + (128 if i >= 32 else 0)
                b_col[lane, reg, e] = group_id
    cover_a = np.zeros((16, k), dtype=np.int64)
    np.add.at(cover_a, (a_row, a_col), 1)
    cover_b = np.zeros((k, 8), dtype=np.int64)
    np.add.at(cover_b, (b_row, b_col), 1)
    assert (cover_a == 1).all(), "A fragment layout must cover the 16 x k tile exactly once"
    assert (cover_b == 1).all(), "B fragment layout must cover the k x 8 tile exactly once"
    # C/D: c_r at row groupID (+8 for r >= 2), col tig*2 + (r & 1)
    lanes = np.arange(32)
    c_row = np.stack([(lanes >> 2) + (8 if r >= 2 else 0) for r in range(4)], axis=1)
    c_col = np.stack([(lanes % 4) * 2 + (r & 0x1) for r in range(4)], axis=1)
    return a_row, a_col, b_row, b_col, c_row, c_col


_MAPS = {k: _fragment_maps(k) for k in (128, 256)}


def mma_b1(a_regs: np.ndarray, b_regs: np.ndarray, c: np.ndarray, k: int) -> np.ndarray:
    """mma.sync.aligned.m16n8k{k}.row.col.s32.b1.b1.s32.and.popc for one warp.

    a_regs [32, k//64] (4 regs for k256, 2 for k128), b_regs [32, k//128], c [32, 4] -> d [32, 4].
    Element i of a .b32 register is bit i (the same convention for A and B).
    """
    a_row, a_col, b_row, b_col, c_row, c_col = _MAPS[k]
    A = np.zeros((16, k), dtype=np.int64)
    B = np.zeros((k, 8), dtype=np.int64)
    A[a_row, a_col] = (a_regs.astype(np.uint64)[..., None] >> BIT) & np.uint64(1)
    B[b_row, b_col] = (b_regs.astype(np.uint64)[..., None] >> BIT) & np.uint64(1)
    D = A @ B  # AND of 0/1 values summed over k = popc
    return c + D[c_row, c_col]


def test_mma_model_is_a_matrix_product():
    """The register model is self-consistent: gathering a random tile through the fragment tables and
    multiplying gives A_bits @ B_bits."""
    rng = np.random.default_rng(0)
    a_regs = rng.integers(0, 2**32, size=(32, 4), dtype=np.uint64)
    b_regs = rng.integers(0, 2**32, size=(32, 2), dtype=np.uint64)
    d = mma_b1(a_regs, b_regs, np.zeros((32, 4), dtype=np.int64), 256)
    # independent formulation: lane (g, t) a0 holds row g cols 32t.., a2 row g cols 128+32t..
    A = np.zeros((16, 256), dtype=np.int64)
    B = np.zeros((256, 8), dtype=np.int64)
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        for reg, (row, c0) in enumerate(
            [(g, 32 * t), (g + 8, 32 * t), (g, 128 + 32 * t), (g + 8, 128 + 32 * t)]
        ):
            A[row, c0 : c0 + 32] = _bits(a_regs[lane, reg])
        for reg, r0 in enumerate([32 * t, 128 + 32 * t]):
            B[r0 : r0 + 32, g] = _bits(b_regs[lane, reg])
    D = A @ B
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        assert list(d[lane]) == [D[g, 2 * t], D[g, 2 * t + 1], D[g + 8, 2 * t], D[g + 8, 2 * t + 1]]


# ------------------------------------------------------------------------- the GEMM kernel, emulated


def _group_term(acc, za, zw, sw, wsum, asum, gsize):
    """btc_group_term in btc_gemm.cu (double arithmetic)."""
    dza, dzw = float(np.float32(za)), float(np.float32(zw))
    br = float(acc) - dza * float(wsum) - dzw * float(asum) + float(gsize) * dza * dzw
    return float(np.float32(sw)) * br


def emulate_mma_kernel(a_planes, w_planes, gw, groups, tile=None, epi=None):
    """btc_mma_{acc|f32}_*: a_planes [pa, m, kw], w_planes [pw, n, kw] (numpy uint64 words).

    Returns acc int64 [m, n, groups] (each entry must be written exactly once), or with `epi` (dict of
    the epilogue operands) the fp32 output [m, n].
    """
    pa, m, kw = a_planes.shape
    pw, n, _ = w_planes.shape
    float_out = epi is not None
    geo = bc.launch_geometry(pa, m, pw, n, kw, gw, groups, float_out=float_out, tile=tile)
    MT, NT, KWORDS = geo.mt, geo.nt, geo.kwords
    TILE_ROWS, TILE_COLS = bc.MMA_M * MT, bc.MMA_N * NT
    SROW = TILE_COLS + 1
    assert SROW == geo.s_row
    warps = geo.block[0] // 32
    acc_out = np.zeros((m, n, groups), dtype=np.int64)
    writes = np.zeros((m, n, groups), dtype=np.int64)
    y_out = np.full((m, n), np.nan, dtype=np.float32)

    for block_x in range(geo.grid[0]):
        for block_y in range(geo.grid[1]):
            for warp in range(warps):
                mc = TILE_ROWS // pa
                nc = TILE_COLS // pw
                assert (mc, nc) == (geo.mc, geo.nc)
                m0 = block_x * mc
                n0 = (block_y * warps + warp) * nc
                if n0 >= n:
                    continue
                # per-lane row "pointers": (plane, row) or None
                arow = [[[None, None] for _ in range(MT)] for _ in range(32)]
                brow = [[None] * NT for _ in range(32)]
                for lane in range(32):
                    gid = lane >> 2
                    for t in range(MT):
                        for h in range(2):
                            r = bc.MMA_M * t + gid + 8 * h
                            i = r // mc
                            mm = m0 + (r - i * mc)
                            arow[lane][t][h] = (i, mm) if (i < pa and mm < m) else None
                    for u in range(NT):
                        c = bc.MMA_N * u + gid
                        j = c // nc
                        nn = n0 + (c - j * nc)
                        brow[lane][u] = (j, nn) if (j < pw and nn < n) else None

                def ld(plane_arr, ptr, word):
                    return int(plane_arr[ptr[0], ptr[1], word])

                Y = np.zeros(mc * nc, dtype=np.float64)
                for g in range(groups):
                    kbeg = g * gw
                    kend = min(kbeg + gw, kw)  # kernel: (kbeg + gw < kw) ? kbeg + gw : kw
                    d = np.zeros((MT, NT, 32, 4), dtype=np.int64)
                    for k0 in range(kbeg, kend, KWORDS):
                        if KWORDS == bc.K256_WORDS:
                            a_regs = np.zeros((MT, 32, 4), dtype=np.uint64)
                            b_regs = np.zeros((NT, 32, 2), dtype=np.uint64)
                            for lane in range(32):
                                tig = lane & 3
                                wo = k0 + 2 * tig
                                kin = wo < kend
                                for t in range(MT):
                                    af = []
                                    for h in range(2):
                                        p = arow[lane][t][h]
                                        af.append(
                                            (ld(a_planes, p, wo), ld(a_planes, p, wo + 1))
                                            if (kin and p)
                                            else (0, 0)
                                        )
                                    # btc_mma_k256(d, af[0].x, af[1].x, af[0].y, af[1].y, ...)
                                    a_regs[t, lane] = [af[0][0], af[1][0], af[0][1], af[1][1]]
                                for u in range(NT):
                                    p = brow[lane][u]
                                    bf = (
                                        (ld(w_planes, p, wo), ld(w_planes, p, wo + 1))
                                        if (kin and p)
                                        else (0, 0)
                                    )
                                    b_regs[u, lane] = [bf[0], bf[1]]
                            for t in range(MT):
                                for u in range(NT):
                                    d[t, u] = mma_b1(a_regs[t], b_regs[u], d[t, u], 256)
                        else:
                            a_regs = np.zeros((MT, 32, 2), dtype=np.uint64)
                            b_regs = np.zeros((NT, 32, 1), dtype=np.uint64)
                            for lane in range(32):
                                tig = lane & 3
                                wo = k0 + tig
                                assert wo < kend
                                for t in range(MT):
                                    a_regs[t, lane] = [
                                        ld(a_planes, arow[lane][t][h], wo) if arow[lane][t][h] else 0
                                        for h in range(2)
                                    ]
                                for u in range(NT):
                                    b_regs[u, lane, 0] = (
                                        ld(w_planes, brow[lane][u], wo) if brow[lane][u] else 0
                                    )
                            for t in range(MT):
                                for u in range(NT):
                                    d[t, u] = mma_b1(a_regs[t], b_regs[u], d[t, u], 128)
                    # popcount tile -> shared memory
                    S = np.full(TILE_ROWS * SROW, -1, dtype=np.int64)
                    for lane in range(32):
                        gid, tig = lane >> 2, lane & 3
                        for t in range(MT):
                            for u in range(NT):
                                row = bc.MMA_M * t + gid
                                col = bc.MMA_N * u + 2 * tig
                                S[row * SROW + col] = d[t, u, lane, 0]
                                S[row * SROW + col + 1] = d[t, u, lane, 1]
                                S[(row + 8) * SROW + col] = d[t, u, lane, 2]
                                S[(row + 8) * SROW + col + 1] = d[t, u, lane, 3]
                    for o in range(mc * nc):  # lane o % 32 does this in the kernel
                        ml = o // nc
                        nl = o - ml * nc
                        mm = m0 + ml
                        nn = n0 + nl
                        if mm >= m or nn >= n:
                            continue
                        v = 0
                        for i in range(pa):
                            for j in range(pw):
                                s_val = S[(i * mc + ml) * SROW + j * nc + nl]
                                assert s_val >= 0, "combine reads a shared cell no lane wrote"
                                v += int(s_val) << (i + j)
                        assert v <= 2**31 - 1
                        if not float_out:
                            acc_out[mm, nn, g] = v
                            writes[mm, nn, g] += 1
                        else:
                            gsize = min(epi["group_size"], epi["k_real"] - g * epi["group_size"])
                            Y[o] += _group_term(
                                v,
                                epi["a_zero"][mm],
                                epi["w_zero"][nn, g],
                                epi["w_scale"][nn, g],
                                epi["w_sums"][nn, g],
                                epi["a_sums"][mm, g],
                                gsize,
                            )
                            writes[mm, nn, g] += 1
                if float_out:
                    for o in range(mc * nc):
                        ml = o // nc
                        nl = o - ml * nc
                        mm, nn = m0 + ml, n0 + nl
                        if mm >= m or nn >= n:
                            continue
                        y = np.float32(float(np.float32(epi["a_scale"][mm])) * Y[o])
                        y_out[mm, nn] = y
    assert (writes == 1).all(), "some output written never or twice"
    return y_out if float_out else acc_out


def emulate_popc_kernel(a_planes, w_planes, gw, groups):
    """btc_popc_acc: one thread per (token, channel)."""
    pa, m, kw = a_planes.shape
    pw, n, _ = w_planes.shape
    acc = np.zeros((m, n, groups), dtype=np.int64)
    popc = np.vectorize(lambda v: int(v).bit_count())
    for mm in range(m):
        for g in range(groups):
            kbeg = g * gw
            kend = min(kbeg + gw, kw)  # kernel: (kbeg + gw < kw) ? kbeg + gw : kw
            for i in range(pa):
                for j in range(pw):
                    acc[mm, :, g] += popc(a_planes[i, mm, kbeg:kend] & w_planes[j, :, kbeg:kend]).sum(-1) << (
                        i + j
                    )
    return acc


# ------------------------------------------------------------------------------------------- helpers


def _words(planes: torch.Tensor) -> np.ndarray:
    return planes.numpy().view(np.uint32).astype(np.uint64)


def _case(m, n, k, qa, qw, seed):
    g = torch.Generator().manual_seed(seed)
    a_codes = torch.randint(0, qa + 1, (m, k), generator=g, dtype=torch.int64).to(torch.uint8)
    w_codes = torch.randint(0, qw + 1, (n, k), generator=g, dtype=torch.int64).to(torch.uint8)
    # make the extremes appear: a full row of qmax exercises every plane bit
    a_codes[0, : min(k, 70)] = qa
    w_codes[-1, -min(k, 70) :] = qw
    return a_codes, w_codes


def _layout(k, group_size):
    kw = padded_k(k) // 32
    return bc.group_layout(kw, k, group_size)


CASES = [
    # (m, n, k, qmax_a, qmax_w, group_size, tile)
    (1, 40, 576, 15, 15, None, None),  # GEMV, per-channel, kw=20: k256 with a half step at the end
    (3, 37, 576, 255, 4, 128, None),  # W2* (3 planes) A8, g128 -> m16n8k128 variant
    (5, 24, 640, 63, 7, 256, (1, 4)),  # A6W3, g256 -> k256 steps, 6 planes
    (17, 19, 576, 15, 3, 256, (2, 4)),  # several token chunks, partial last group (words 16..19)
    (4, 33, 640, 255, 255, 384, (1, 2)),  # A8W8, odd multiple of 128 (k128), 2 groups
    (2, 16, 128, 15, 1, None, (2, 4)),  # one plane of weights, kw=4: a single half step
    (9, 20, 1152, 63, 15, None, (1, 4)),  # kw=36, pa*m = 54 rows over 4 token chunks
]


@pytest.mark.parametrize("m,n,k,qa,qw,group_size,tile", CASES)
def test_mma_kernel_indexing_matches_int_gemm(m, n, k, qa, qw, group_size, tile):
    a_codes, w_codes = _case(m, n, k, qa, qw, seed=m * 1000 + n)
    a_planes = pack_planes(a_codes, qa)
    w_planes = pack_planes(w_codes, qw)
    assert a_planes.shape[0] == num_planes(qa) and w_planes.shape[0] == num_planes(qw)
    gw, groups = _layout(k, group_size)
    got = emulate_mma_kernel(_words(a_planes), _words(w_planes), gw, groups, tile=tile)
    want = int_gemm(a_codes, w_codes, group_size).numpy()
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("tile", bc.TILE_CONFIGS)
def test_every_tile_config(tile):
    m, n, k, qa, qw = 6, 21, 640, 15, 4
    a_codes, w_codes = _case(m, n, k, qa, qw, seed=7)
    for group_size in (None, 128, 256):
        gw, groups = _layout(k, group_size)
        got = emulate_mma_kernel(
            _words(pack_planes(a_codes, qa)), _words(pack_planes(w_codes, qw)), gw, groups, tile=tile
        )
        np.testing.assert_array_equal(got, int_gemm(a_codes, w_codes, group_size).numpy())


def test_popc_kernel_indexing_matches_int_gemm():
    m, n, k, qa, qw = 3, 11, 576, 63, 4
    a_codes, w_codes = _case(m, n, k, qa, qw, seed=3)
    for group_size in (None, 128, 256):
        gw, groups = _layout(k, group_size)
        got = emulate_popc_kernel(
            _words(pack_planes(a_codes, qa)), _words(pack_planes(w_codes, qw)), gw, groups
        )
        np.testing.assert_array_equal(got, int_gemm(a_codes, w_codes, group_size).numpy())


@pytest.mark.parametrize("group_size", [None, 128])
def test_fused_epilogue_matches_cpu_epilogue(group_size):
    m, n, k, act_bits = 3, 18, 576, 4
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(m, k, generator=gen)
    codes, sa, za = quantize_activation(x, act_bits)
    qw = 15
    w_codes = torch.randint(0, qw + 1, (n, k), generator=gen).to(torch.uint8)
    groups = -(-k // (group_size or k))
    w = PackedWeight(
        planes=pack_planes(w_codes, qw),
        scale=torch.rand(n, groups, generator=gen) * 0.01 + 1e-3,
        zero=torch.randint(0, qw + 1, (n, groups), generator=gen).float(),
        code_sums=group_code_sums(w_codes, group_size),
        in_features=k,
        out_features=n,
        bits=4,
        balance=False,
        group_size=group_size,
    )
    a_sums = group_code_sums(codes, group_size)
    epi = {
        "a_scale": sa.reshape(-1).numpy(),
        "a_zero": za.reshape(-1).numpy(),
        "a_sums": a_sums.numpy(),
        "w_scale": w.scale.numpy(),
        "w_zero": w.zero.numpy(),
        "w_sums": w.code_sums.numpy(),
        "k_real": k,
        "group_size": group_size or k,
    }
    gw, n_groups = _layout(k, group_size)
    y = emulate_mma_kernel(
        _words(pack_planes(codes, qmax_for(act_bits))), _words(w.planes), gw, n_groups, epi=epi
    )
    acc = int_gemm(codes, w_codes, group_size)
    want = epilogue(acc, sa.reshape(-1), za.reshape(-1), a_sums, w).numpy()
    np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


# ---------------------------------------------------------------------- the pack kernel, emulated


def emulate_quant_pack(x: np.ndarray, bits: int, gw: int, groups: int, clip: float = 1.0):
    """btc_quant_pack_f32: fp32 arithmetic in numpy (IEEE division, rint half-to-even, the range times the
    clip ratio in fp32), ballot packing."""
    m, k = x.shape
    qmax = qmax_for(bits)
    pa = num_planes(qmax)
    kw = padded_k(k) // 32
    planes = np.zeros((pa, m, kw), dtype=np.uint64)
    scale = np.zeros(m, dtype=np.float32)
    zero = np.zeros(m, dtype=np.float32)
    sums = np.zeros((m, groups), dtype=np.int64)
    f32 = np.float32
    for row in range(m):
        xmin, xmax = f32(x[row].min() * f32(clip)), f32(x[row].max() * f32(clip))
        qf = f32(qmax)
        s = f32(f32(xmax - xmin) / qf)
        s = np.fmin(np.fmax(s, f32(1e-5)), f32(1e4))
        z = np.rint(f32(-xmin) / s).astype(np.float32)
        for w in range(kw):
            codes = np.zeros(32, dtype=np.uint64)
            for lane in range(32):
                c = 32 * w + lane
                if c < k:
                    q = f32(np.rint(f32(x[row, c] / s)) + z)
                    q = np.fmin(np.fmax(q, f32(0.0)), qf)
                    codes[lane] = np.uint64(q)
            for p in range(pa):  # __ballot_sync: lane e -> bit e
                planes[p, row, w] = int(
                    sum(int((codes[e] >> np.uint64(p)) & np.uint64(1)) << e for e in range(32))
                )
            sums[row, w // gw] += int(codes.sum())
        scale[row], zero[row] = s, z
    return planes, scale, zero, sums


@pytest.mark.parametrize("clip", [1.0, 0.9])
@pytest.mark.parametrize("bits,k,group_size", [(4, 576, None), (8, 640, 128), (6, 300, 256)])
def test_quant_pack_indexing_matches_cpu_quantizer(bits, k, group_size, clip):
    gen = torch.Generator().manual_seed(bits * 100 + k)
    x = torch.randn(4, k, generator=gen) * torch.tensor([[1.0], [30.0], [1e-3], [5.0]])
    x[3] = x[3].abs() + 2.0  # all-positive row: negative zero point
    # a row with exact .5 ties of x/s (s = 1 for A4): rint must round half to even like torch.round
    if bits == 4:
        x[0] = torch.arange(k, dtype=torch.float32) % 16
        x[0, 1:9] = torch.tensor([0.5, 1.5, 2.5, 3.5, 4.5, 12.5, 13.5, 14.5])
    codes, s_ref, z_ref = quantize_activation(x, bits, clip)
    gw, groups = _layout(k, group_size)
    planes, scale, zero, sums = emulate_quant_pack(x.numpy(), bits, gw, groups, clip)
    np.testing.assert_array_equal(planes, _words(pack_planes(codes, qmax_for(bits))))
    np.testing.assert_array_equal(sums, group_code_sums(codes, group_size).numpy())
    np.testing.assert_array_equal(scale, s_ref.reshape(-1).numpy())
    np.testing.assert_array_equal(zero, z_ref.reshape(-1).numpy())
    s2, z2 = activation_qparams(x, bits, clip)
    np.testing.assert_array_equal(scale, s2.reshape(-1).numpy())
    np.testing.assert_array_equal(zero, z2.reshape(-1).numpy())


def test_geometry_limits():
    for pa in range(1, 9):
        for pw in range(1, 9):
            for tile in bc.TILE_CONFIGS:
                geo = bc.launch_geometry(pa, 300, pw, 11008, 344, 4, 86, float_out=True, tile=tile)
                assert (
                    geo.mc >= 1 and geo.nc >= 1 and pa * geo.mc <= 16 * tile[0] and pw * geo.nc <= 8 * tile[1]
                )
                assert geo.smem <= bc.SMEM_LIMIT and geo.grid[1] <= 65535
                assert geo.kwords == bc.K128_WORDS
    assert bc.launch_geometry(4, 1, 4, 4096, 128, 128, 1, float_out=False).kwords == bc.K256_WORDS
    assert bc.launch_geometry(4, 1, 4, 4096, 128, 8, 16, float_out=False).kwords == bc.K256_WORDS
    with pytest.raises(ValueError):
        bc.group_layout(20, 576, 64)


# ------------------------------------------------ the launcher (btc/cuda.py) against emulated kernels
#
# CuPy is replaced by a fake whose kernels are the emulators above. Each launch is checked against the
# entry point's C signature parsed from the .cu source (argument count, order, pointer element types,
# int scalars) and its grid/block/shared memory against the launch geometry, then executed on the CPU.
# This proves the Python launcher's plumbing without a GPU.

_C_TYPES = {"float": torch.float32, "int": torch.int32, "u32": torch.int32, "u16": torch.float16}


def _parse_params(text: str) -> list[tuple[str, str, bool]]:
    params = []
    for raw in text.replace("\\", " ").split(","):
        tokens = raw.replace("*", " * ").split()
        tokens = [t for t in tokens if t not in ("const", "__restrict__")]
        pointer = "*" in tokens
        tokens = [t for t in tokens if t != "*"]
        params.append((tokens[-1], tokens[0], pointer))
    return params


def kernel_signatures() -> dict[str, list[tuple[str, str, bool]]]:
    """{entry point: [(name, base type, is_pointer)]} from cuda/*.cu, BTC_MMA_ENTRIES expanded."""

    sigs = {}
    for src in sorted(bc.cuda_source_dir().glob("*.cu")):
        text = src.read_text()
        for name, params in re.findall(r'extern "C" __global__ void (\w+)\(([^)]*)\)', text):
            if "##" not in name:
                sigs[name] = _parse_params(params)
        macro = re.search(r"#define BTC_MMA_ENTRIES\(KWORDS, MT, NT, SUFFIX\)(.*?)\n\n", text, re.DOTALL)
        if macro:
            body = macro.group(1)
            calls = re.findall(r"^BTC_MMA_ENTRIES\(\w+, (\d), (\d), (\w+)\)", text, re.MULTILINE)
            for _mt, _nt, suffix in calls:
                for name, params in re.findall(r'extern "C" __global__ void (\w+)##SUFFIX\(([^)]*)\)', body):
                    sigs[name + suffix] = _parse_params(params)
    return sigs


class _FakeCupy:
    int32 = np.int32
    float32 = np.float32


class _FakeKernel:
    def __init__(self, name: str, params):
        self.name, self.params = name, params

    def __call__(self, grid, block, args, shared_mem=0):
        assert len(args) == len(self.params), f"{self.name}: {len(args)} args for {len(self.params)} params"
        a = {}
        for (pname, base, pointer), value in zip(self.params, args, strict=True):
            if pointer:
                assert isinstance(value, torch.Tensor), f"{self.name}.{pname}: expected an array"
                assert value.dtype == _C_TYPES[base], f"{self.name}.{pname}: {value.dtype} for {base}*"
                assert value.is_contiguous()
            else:
                scalar = {"int": np.int32, "float": np.float32}[base]
                assert isinstance(value, scalar), f"{self.name}.{pname}: {type(value)} for {base}"
                value = scalar(value)
            a[pname] = value
        assert all(g >= 1 for g in grid) and grid[1] <= 65535 and grid[2] == 1
        assert block[0] % 32 == 0 and block[0] <= 1024 and 0 <= shared_mem <= bc.SMEM_LIMIT
        getattr(self, "_run_" + self.name.split("_")[1])(a, grid, block, shared_mem)

    def _run_quant(self, a, grid, block, smem):  # btc_quant_pack_{f32,f16}
        assert grid[0] == a["m"] and smem == 4 * a["groups"] and block[0] == bc.PACK_THREADS
        qmax = a["qmax"]
        bits = {15: 4, 63: 6, 255: 8, 3: 2, 7: 3, 1: 1, 31: 5, 127: 7}[qmax]
        x = a["x"].float().reshape(a["m"], a["k"]).numpy()
        planes, scale, zero, sums = emulate_quant_pack(x, bits, a["gw"], a["groups"], a["clip"])
        assert planes.shape == (a["pa"], a["m"], a["kw"])
        a["planes"].copy_(
            torch.from_numpy(planes.astype(np.uint32).view(np.int32)).reshape(a["planes"].shape)
        )
        a["scale"].copy_(torch.from_numpy(scale))
        a["zero"].copy_(torch.from_numpy(zero))
        a["sums"].copy_(torch.from_numpy(sums.astype(np.int32)).reshape(a["sums"].shape))

    def _planes(self, a):
        ap = a["a_planes"].reshape(a["pa"], a["m"], a["kw"]).numpy().view(np.uint32).astype(np.uint64)
        wp = a["w_planes"].reshape(a["pw"], a["n"], a["kw"]).numpy().view(np.uint32).astype(np.uint64)
        return ap, wp

    def _check_geometry(self, a, grid, block, smem, float_out):

        kbits, mt, nt = map(int, re.search(r"_k(\d+)_m(\d)n(\d)$", self.name).groups())
        geo = bc.launch_geometry(
            a["pa"],
            a["m"],
            a["pw"],
            a["n"],
            a["kw"],
            a["gw"],
            a["groups"],
            float_out=float_out,
            tile=(mt, nt),
        )
        assert geo.kwords * 32 == kbits, f"{self.name} launched for a {geo.kwords * 32}-bit step"
        assert tuple(grid) == geo.grid and tuple(block) == geo.block and smem == geo.smem
        return (mt, nt)

    def _run_mma(self, a, grid, block, smem):  # btc_mma_{acc,f32,f16}_*
        kind = self.name.split("_")[2]
        tile = self._check_geometry(a, grid, block, smem, float_out=kind != "acc")
        ap, wp = self._planes(a)
        if kind == "acc":
            acc = emulate_mma_kernel(ap, wp, a["gw"], a["groups"], tile=tile)
            a["acc"].copy_(torch.from_numpy(acc).int().reshape(a["acc"].shape))
            return
        epi = self._epi(a)
        y = emulate_mma_kernel(ap, wp, a["gw"], a["groups"], tile=tile, epi=epi)
        self._store_y(a, torch.from_numpy(y))

    def _epi(self, a):
        m, n, groups = a["m"], a["n"], a["groups"]
        return {
            "a_scale": a["a_scale"].numpy(),
            "a_zero": a["a_zero"].numpy(),
            "a_sums": a["a_sums"].reshape(m, groups).numpy(),
            "w_scale": a["w_scale"].reshape(n, groups).numpy(),
            "w_zero": a["w_zero"].reshape(n, groups).numpy(),
            "w_sums": a["w_sums"].reshape(n, groups).numpy(),
            "k_real": a["k_real"],
            "group_size": a["group_size"],
        }

    def _store_y(self, a, y):
        if a["has_bias"]:
            y = y + a["bias"]
        a["y"].copy_(y.to(a["y"].dtype).reshape(a["y"].shape))

    def _run_popc(self, a, grid, block, smem):  # btc_popc_acc
        assert grid[0] == a["m"] and grid[1] * block[0] >= a["n"]
        ap, wp = self._planes(a)
        acc = emulate_popc_kernel(ap, wp, a["gw"], a["groups"])
        a["acc"].copy_(torch.from_numpy(acc).int().reshape(a["acc"].shape))

    def _run_epilogue(self, a, grid, block, smem):  # btc_epilogue_{f32,f16}
        m, n, groups = a["m"], a["n"], a["groups"]
        assert grid[0] * block[0] >= m * n
        epi = self._epi(a)
        acc = a["acc"].reshape(m, n, groups).numpy()
        y = np.zeros((m, n), dtype=np.float32)
        for mm in range(m):
            for nn in range(n):
                s = 0.0
                for g in range(groups):
                    gsize = min(epi["group_size"], epi["k_real"] - g * epi["group_size"])
                    s += _group_term(
                        acc[mm, nn, g],
                        epi["a_zero"][mm],
                        epi["w_zero"][nn, g],
                        epi["w_scale"][nn, g],
                        epi["w_sums"][nn, g],
                        epi["a_sums"][mm, g],
                        gsize,
                    )
                y[mm, nn] = np.float32(float(np.float32(epi["a_scale"][mm])) * s)
        self._store_y(a, torch.from_numpy(y))


@pytest.fixture
def fake_gpu(monkeypatch):
    import contextlib

    sigs = kernel_signatures()
    launched = []

    def function(source, name):
        assert name in sigs, f"{name} is not an entry point of cuda/{source}"
        launched.append(name)
        return _FakeKernel(name, sigs[name])

    class _NoStream:
        def __init__(self, device):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(bc, "_require", lambda: _FakeCupy)
    monkeypatch.setattr(bc, "_import_cupy", lambda: _FakeCupy)
    monkeypatch.setattr(bc, "_function", function)
    monkeypatch.setattr(bc, "_OnTorchStream", _NoStream)
    monkeypatch.setattr(bc, "_cuda_device", lambda *t: torch.device("cpu"))
    monkeypatch.setattr(bc, "_cp", lambda t: t)
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    return launched


def test_signatures_parsed():
    sigs = kernel_signatures()
    assert len([s for s in sigs if s.startswith("btc_mma_")]) == 3 * 2 * len(bc.TILE_CONFIGS)
    assert [p[0] for p in sigs["btc_mma_acc_k256_m1n2"]] == [
        "a_planes",
        "pa",
        "m",
        "w_planes",
        "pw",
        "n",
        "kw",
        "gw",
        "groups",
        "acc",
    ]


@pytest.mark.parametrize("group_size", [None, 128, 256])
def test_launcher_int_gemm_planes(fake_gpu, group_size):
    m, n, k, qa, qw = 3, 20, 576, 63, 4
    a_codes, w_codes = _case(m, n, k, qa, qw, seed=5)
    gw = None if group_size is None else group_size // 32
    want = int_gemm(a_codes, w_codes, group_size)
    for kernel in ("mma", "popc"):
        got = bc.int_gemm_planes(pack_planes(a_codes, qa), pack_planes(w_codes, qw), gw, kernel=kernel)
        assert got.dtype == torch.int32
        assert torch.equal(got.long(), want), kernel
    assert fake_gpu[0].startswith("btc_mma_acc_k") and fake_gpu[-1] == "btc_popc_acc"


def test_launcher_quantize_pack(fake_gpu):
    x = torch.randn(3, 300) * 4
    for bits, group_size in ((4, None), (8, 128)):
        codes, s, z = quantize_activation(x, bits)
        planes, scale, zero, sums = bc.quantize_pack_activations(x, bits, group_size)
        assert torch.equal(planes, pack_planes(codes, qmax_for(bits)))
        assert torch.equal(scale, s.reshape(-1)) and torch.equal(zero, z.reshape(-1))
        assert torch.equal(sums, group_code_sums(codes, group_size))
    codes, s, z = quantize_activation(x, 4, 0.9)
    planes, scale, zero, _ = bc.quantize_pack_activations(x, 4, None, clip=0.9)
    assert torch.equal(planes, pack_planes(codes, qmax_for(4))) and torch.equal(scale, s.reshape(-1))
    bc.quantize_pack_activations(x.half(), 6, None)
    assert fake_gpu == ["btc_quant_pack_f32"] * 3 + ["btc_quant_pack_f16"]


@pytest.mark.parametrize("kernel", ["mma", "popc"])
@pytest.mark.parametrize(
    "w_bits,balance,a_bits,group_size", [(4, False, 4, None), (2, True, 8, 128), (3, False, 6, 256)]
)
def test_launcher_btc_linear(fake_gpu, kernel, w_bits, balance, a_bits, group_size):
    from abqcli.btc import gemm
    from abqcli.quant.quantizer import WeightQuantSpec, quantize_weight

    n, k = 18, 576
    gen = torch.Generator().manual_seed(w_bits + a_bits)
    w = PackedWeight.from_quantized(
        quantize_weight(torch.randn(n, k, generator=gen), WeightQuantSpec(w_bits, group_size, balance))
    )
    x = torch.randn(2, 2, k, generator=gen)
    bias = torch.randn(n, generator=gen)
    want = gemm.btc_linear(x, w, a_bits, bias=bias, backend="cpu")
    got = bc.btc_linear(x, w, a_bits, bias=bias, kernel=kernel)
    assert got.shape == want.shape == (2, 2, n) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    clipped = bc.btc_linear(x, w, a_bits, bias=bias, kernel=kernel, act_clip=0.9)
    want_clipped = gemm.btc_linear(x, w, a_bits, bias=bias, backend="cpu", act_clip=0.9)
    torch.testing.assert_close(clipped, want_clipped, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    assert not torch.allclose(clipped, got)
    got_h = bc.btc_linear(x.half(), w, a_bits, kernel=kernel)
    want_h = gemm.btc_linear(x.half(), w, a_bits, backend="cpu")
    assert got_h.dtype == torch.float16
    torch.testing.assert_close(
        got_h.float(), want_h.float(), rtol=2e-3, atol=2e-3 * float(want_h.abs().max())
    )
    out = "f32" if kernel == "mma" else "acc"
    assert any(name.startswith("btc_quant_pack_f32") for name in fake_gpu)
    assert any(name.startswith("btc_quant_pack_f16") for name in fake_gpu)
    assert any(
        name.startswith(f"btc_mma_{out}") if kernel == "mma" else name == "btc_popc_acc" for name in fake_gpu
    )

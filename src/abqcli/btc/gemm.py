"""Exact CPU reference GEMM and the affine epilogue of the BTC format (DESIGN §5, CPU half of §6).

Two integer paths compute `acc[m, n, g] = Σ_{k∈g} qa[m, k]·qw[n, k]`:

* `popcount_gemm` works on bit planes, `Σ_i Σ_j 2^(i+j) · popcount(A_i AND W_j)` — what the binary
  tensor-core kernel does, written plainly (slow, for tests and cross-checks);
* `int_gemm` works on codes with float32 matmuls over K-chunks small enough to be exact.

`epilogue` turns the integer accumulators into the float output. `btc_linear` is the whole packed layer
on a named GEMM backend (`abqcli.btc.backends`: the `cpu` one runs `abqcli.quant.integer.integer_linear`,
the same arithmetic on codes).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from abqcli.btc.format import PackedWeight
from abqcli.quant.integer import F32_EXACT
from abqcli.registry import BACKENDS

_POPCOUNT_CHUNK = 1 << 21  # elements of the [m, N, Kw] AND-tensor built at once


# --------------------------------------------------------------------------------------------- popcount


def _popcount32(x: torch.Tensor) -> torch.Tensor:
    """Bit count of int64 values holding 32-bit patterns: NumPy's native `bitwise_count` where it
    exists (NumPy >= 2, about 20x faster), else the SWAR bit trick, vectorised."""
    if hasattr(np, "bitwise_count"):
        return torch.from_numpy(np.bitwise_count(x.numpy()).astype(np.int64))
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return ((x * 0x01010101) & 0xFFFFFFFF) >> 24


def _as_words(planes: torch.Tensor) -> torch.Tensor:
    """int32/uint32 planes -> int64 holding the unsigned 32-bit pattern."""
    if planes.dtype == torch.uint32:
        planes = planes.view(torch.int32)
    if planes.dtype != torch.int32:
        raise ValueError(f"planes must be int32 (or uint32), got {planes.dtype}")
    return planes.long() & 0xFFFFFFFF


def popcount_gemm(
    a_planes: torch.Tensor, w_planes: torch.Tensor, group_words: int | None = None
) -> torch.Tensor:
    """Bit-plane integer GEMM: `Σ_i Σ_j 2^(i+j) · popcount(A_i AND W_j)` over the words.

    a_planes [Pa, M, Kw], w_planes [Pw, N, Kw] (int32 holding uint32 patterns). Returns int64 [M, N], or
    [M, N, G] with one sum per group of `group_words` words (the last group may be partial).
    """
    if a_planes.dim() != 3 or w_planes.dim() != 3:
        raise ValueError("planes must be 3-D [P, rows, Kw]")
    pa, m, kw = a_planes.shape
    pw, n, kw_w = w_planes.shape
    if kw != kw_w:
        raise ValueError(f"activation planes have {kw} words per row, weight planes {kw_w}")
    a = _as_words(a_planes)
    w = _as_words(w_planes)
    gw = group_words or kw
    if gw < 1:
        raise ValueError(f"group_words must be >= 1, got {group_words}")
    n_groups = -(-kw // gw)
    pad = n_groups * gw - kw
    if pad:  # zero words contribute nothing
        a = F.pad(a, (0, pad))
        w = F.pad(w, (0, pad))
    out = torch.zeros(m, n, n_groups, dtype=torch.int64)
    rows = max(1, _POPCOUNT_CHUNK // max(1, n * (kw + pad)))
    for m0 in range(0, m, rows):
        m1 = min(m, m0 + rows)
        for i in range(pa):
            ai = a[i, m0:m1, None, :]
            for j in range(pw):
                counts = _popcount32(ai & w[j, None, :, :])
                out[m0:m1] += counts.view(m1 - m0, n, n_groups, gw).sum(dim=-1) << (i + j)
    return out if group_words else out[..., 0]


# ---------------------------------------------------------------------------------------- integer gemm


def _exact_chunk(qmax_a: int, qmax_w: int) -> int:
    """Largest K-chunk whose float32 dot products are exact: chunk · qmax_a · qmax_w <= 2**24."""
    return max(1, F32_EXACT // max(1, qmax_a * qmax_w))


def int_gemm(a_codes: torch.Tensor, w_codes: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """Exact integer GEMM of codes: a [M, K], w [N, K] -> int64 [M, N, G] (G = 1 per-channel).

    Exact because each float32 matmul covers a K-chunk with `chunk · max(qa) · max(qw) <= 2**24`: every
    partial sum is a non-negative integer no larger than that, and float32 represents all integers up
    to 2**24 exactly, whatever the summation order. The chunk results are converted to int64 and added.
    """
    if a_codes.dim() != 2 or w_codes.dim() != 2:
        raise ValueError("int_gemm takes 2-D codes a [M, K] and w [N, K]")
    m, k = a_codes.shape
    n, k_w = w_codes.shape
    if k != k_w:
        raise ValueError(f"K mismatch: activations have {k} columns, weights {k_w}")
    g = group_size or k
    n_groups = -(-k // g)
    qa = int(a_codes.max()) if a_codes.numel() else 0
    qw = int(w_codes.max()) if w_codes.numel() else 0
    if (a_codes.numel() and int(a_codes.min()) < 0) or (w_codes.numel() and int(w_codes.min()) < 0):
        raise ValueError("codes must be non-negative")
    chunk = _exact_chunk(qa, qw)
    a = a_codes.float()
    w = w_codes.float()
    out = torch.zeros(m, n, n_groups, dtype=torch.int64)
    for gi in range(n_groups):
        for s in range(gi * g, min(k, (gi + 1) * g), chunk):
            e = min(k, (gi + 1) * g, s + chunk)
            out[:, :, gi] += (a[:, s:e] @ w[:, s:e].T).to(torch.int64)
    return out


# -------------------------------------------------------------------------------------------- epilogue


def group_lengths(k: int, group_size: int | None) -> torch.Tensor:
    """Real (unpadded) columns per group: [G] int64."""
    g = group_size or k
    n_groups = -(-k // g)
    lengths = torch.full((n_groups,), g, dtype=torch.int64)
    lengths[-1] = k - (n_groups - 1) * g
    return lengths


def epilogue(
    acc: torch.Tensor,
    a_scale: torch.Tensor,
    a_zero: torch.Tensor,
    a_sums: torch.Tensor,
    w: PackedWeight,
) -> torch.Tensor:
    """Affine epilogue of DESIGN §5, exact up to the final float rounding:

        y[m,n] = sa[m] · Σ_g sw[n,g] · ( acc[m,n,g] − za[m]·wsum[n,g] − zw[n,g]·asum[m,g]
                                         + |g|·za[m]·zw[n,g] )

    acc int64 [M, N, G]; a_scale, a_zero [M]; a_sums [M, G] (sums of activation codes per group);
    |g| = real columns of group g. The bracket (an integer) is formed in float64, exact below 2**53.
    Returns float32 [M, N].
    """
    if acc.dim() == 2:
        acc = acc.unsqueeze(-1)
    m, n, n_groups = acc.shape
    if (n, n_groups) != (w.out_features, w.num_groups):
        raise ValueError(
            f"acc shape {list(acc.shape)} does not match the weight: N={w.out_features}, G={w.num_groups}"
        )
    sa = a_scale.reshape(m, 1).double()
    za = a_zero.reshape(m, 1, 1).double()
    asum = a_sums.reshape(m, 1, n_groups).double()
    zw = w.zero.double().unsqueeze(0)
    wsum = w.code_sums.double().unsqueeze(0)
    sizes = group_lengths(w.in_features, w.group_size).double()
    bracket = acc.double() - za * wsum - zw * asum + sizes * za * zw
    y = (bracket * w.scale.double().unsqueeze(0)).sum(dim=-1) * sa
    return y.float()


# ---------------------------------------------------------------------------------------------- linear


def btc_linear(
    x: torch.Tensor,
    w: PackedWeight,
    act_bits: int,
    bias: torch.Tensor | None = None,
    backend: str = "cpu",
    act_clip: float = 1.0,
) -> torch.Tensor:
    """A packed linear layer on the GEMM backend registered as `backend`: x [..., K] -> [..., N] in x's
    dtype (`GemmBackend.linear`). act_bits < 16: per-token activation quantization, exact integer GEMM,
    epilogue (+ bias); the weight must be per-channel or grouped by a multiple of 128. act_bits >= 16
    (weight-only): the dequantized weight in a plain float matmul, any group size."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown BTC backend {backend!r} (expected one of {', '.join(BACKENDS.names())})")
    return BACKENDS.load(backend).linear(x, w, act_bits, bias, act_clip)

// BTC bit-plane GEMM (DESIGN §5, §6).  CUDA C, `extern "C"` entry points only, no host code, no
// headers: compiles with NVRTC (CuPy RawModule) and with `nvcc -cubin -arch=sm_80/86/89/90`.
//
// Operands (BTC format v1, DESIGN §5)
//   a_planes  uint32 [pa, m, kw]   activation bit planes, plane i holds bit i of every code
//   w_planes  uint32 [pw, n, kw]   weight bit planes
//   kw = Kp / 32 words per row, Kp a multiple of 128 (so kw % 4 == 0), padded columns are code 0.
//   Element e of a 32-column chunk is bit e of its word (LSB first).
//   Groups: group g covers words [g*gw, min((g+1)*gw, kw)); gw = group_size/32 (a multiple of 4), or
//   gw = kw and groups = 1 for per-channel weights.
//
// Integer product (per group):  acc[m,n,g] = sum_i sum_j 2^(i+j) * popc(A_i[m] AND W_j[n])  over g's words.
//
// Tensor-core path: mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc  (sm_80+; `.and.popc`
// does not exist on sm_75), or its m16n8k128 sibling when a group is an odd multiple of 128 columns.
//
// ---------------------------------------------------------------------------------------------------
// Fragment layouts relied on.  Source: PTX ISA, section 9.7.14.5.13 "Matrix Fragments for
// mma.m16n8k256" (and 9.7.14.5.12 "Matrix Fragments for mma.m16n8k128").  groupID = laneid >> 2,
// threadID_in_group = laneid % 4 (called gid / tig below).
//
//   m16n8k256, A (16 x 256 bits, .row): four .b32 registers a0..a3, 32 .b1 elements each
//       a0: row gid,     cols tig*32       + (0..31)
//       a1: row gid + 8, cols tig*32       + (0..31)
//       a2: row gid,     cols tig*32 + 128 + (0..31)
//       a3: row gid + 8, cols tig*32 + 128 + (0..31)
//     (the ISA writes the column of elements i < 64 as "tig*32 + i"; with 32 elements per register the
//      only reading that covers the 16x256 tile exactly once is "tig*32 + (i & 31)", the same as the
//      m16n8k128 layout and as the i >= 64 line of the same table.)
//   m16n8k256, B (256 x 8 bits, .col): two .b32 registers
//       b0: rows (k) tig*32       + (0..31), col gid
//       b1: rows (k) tig*32 + 128 + (0..31), col gid
//   m16n8k256, C/D (16 x 8, .s32): four registers
//       c0: row gid,     col 2*tig       c1: row gid,     col 2*tig + 1
//       c2: row gid + 8, col 2*tig       c3: row gid + 8, col 2*tig + 1
//   m16n8k128 (same C/D layout): A a0: row gid, cols tig*32+(0..31); a1: row gid+8, same cols;
//                                B b0: rows tig*32+(0..31), col gid.
//   D[r][c] = C[r][c] + popc over k of (A[r][k] AND B[k][c]).
//
// K-word assignment.  The popcount sums over all k of a step, so any assignment of memory words to the
// k ranges of the fragments is exact as long as the A and B registers that the hardware pairs (same
// tig, same k range) hold the same memory word.  For the k256 step starting at word k0, lane tig loads
// one 8-byte uint2 at word  wo = k0 + 2*tig  from its A rows and its B column:
//       .x (word wo)     -> a0 / a1 and b0   (hardware k = tig*32 + e)
//       .y (word wo + 1) -> a2 / a3 and b1   (hardware k = 128 + tig*32 + e)
// so the 8 words k0..k0+7 are covered once, with one vector load per row.  For the k128 step lane tig
// loads word wo = k0 + tig.  tests/test_cuda_indexing.py emulates exactly these expressions.
//
// Plane stacking (the reference engine's trick).  A warp owns mc = (16*MT)/pa tokens and nc = (8*NT)/pw
// output channels.  Its MT m16 tiles stack the activation planes along M: local A row r holds plane
// i = r / mc of token m0 + r % mc, so a batch-1 GEMV with pa = 4 still fills 4 of 16 rows and pa = 8
// fills 8.  Its NT n8 tiles stack the weight planes along N: local B column c holds plane j = c / nc of
// channel n0 + c % nc.  Rows/columns past pa*mc, pw*nc, m or n load zeros.  At the end of every group
// the warp writes its popcount tile to shared memory and each lane combines
//       acc = sum_i sum_j S[i*mc + ml][j*nc + nl] << (i + j)
// for its (ml, nl) outputs.  K tails are zero padded by the format, so no masking in K except a k256
// step that straddles the end of a group/row (then the lanes whose word is past the end load zeros).
//
// Affine epilogue (DESIGN §5), per group g with |g| real (unpadded) columns:
//   y[m,n] = sa[m] * sum_g sw[n,g] * (acc - za[m]*wsum[n,g] - zw[n,g]*asum[m,g] + |g|*za[m]*zw[n,g])
// evaluated in double (exact for the integer part), rounded to fp32 once, plus bias (fp32 add).
//
// Grid: blockIdx.x = token chunk (m0 = blockIdx.x*mc), blockIdx.y*warps + warp = channel chunk
// (n0 = (blockIdx.y*warps + warp)*nc); blockDim.x = 32*warps.  Dynamic shared memory per warp:
// 4*16*MT*(8*NT+1) bytes of popcount tile, plus 8*mc*nc bytes of double accumulators for float output.
// ---------------------------------------------------------------------------------------------------

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned long long u64;

#define BTC_MMA_M 16
#define BTC_MMA_N 8
#define BTC_K256_WORDS 8
#define BTC_K128_WORDS 4

__device__ __forceinline__ void btc_mma_k256(int (&d)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1)
{
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800)
    asm volatile(
        "mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
    __trap();
#endif
}

__device__ __forceinline__ void btc_mma_k128(int (&d)[4], u32 a0, u32 a1, u32 b0)
{
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800)
    asm volatile(
        "mma.sync.aligned.m16n8k128.row.col.s32.b1.b1.s32.and.popc "
        "{%0, %1, %2, %3}, {%4, %5}, {%6}, {%0, %1, %2, %3};\n"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
        : "r"(a0), "r"(a1), "r"(b0));
#else
    __trap();
#endif
}

__device__ __forceinline__ u16 btc_f32_to_f16(float v)
{
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    return h;
}

// sw * (acc - za*wsum - zw*asum + |g|*za*zw), in double.
__device__ __forceinline__ double btc_group_term(int acc, float za, float zw, float sw, int wsum, int asum,
                                                 int gsize)
{
    const double dza = (double)za;
    const double dzw = (double)zw;
    const double br = (double)acc - dza * (double)wsum - dzw * (double)asum + (double)gsize * dza * dzw;
    return (double)sw * br;
}

__device__ __forceinline__ int btc_group_size(int g, int group_size, int k_real)
{
    const int rest = k_real - g * group_size;
    return rest < group_size ? rest : group_size;
}

// OUT: 0 = int32 accumulators acc[m, n, groups]; 1 = fp32 y[m, n]; 2 = fp16 y[m, n] (as uint16 bits).
template <int KWORDS, int MT, int NT, int OUT>
__device__ __forceinline__ void btc_mma_body(
    const u32* __restrict__ a_planes, const int pa, const int m,
    const u32* __restrict__ w_planes, const int pw, const int n,
    const int kw, const int gw, const int groups,
    int* __restrict__ acc_out,
    const float* __restrict__ a_scale, const float* __restrict__ a_zero, const int* __restrict__ a_sums,
    const float* __restrict__ w_scale, const float* __restrict__ w_zero, const int* __restrict__ w_sums,
    const float* __restrict__ bias, const int has_bias, const int k_real, const int group_size,
    void* __restrict__ y_out)
{
    constexpr int TILE_ROWS = BTC_MMA_M * MT;
    constexpr int TILE_COLS = BTC_MMA_N * NT;
    constexpr int SROW = TILE_COLS + 1;  // shared popcount tile row stride (ints)
    constexpr int S_BYTES = 4 * TILE_ROWS * SROW;

    extern __shared__ __align__(16) unsigned char btc_smem[];

    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int warps = blockDim.x >> 5;
    const int gid = lane >> 2;
    const int tig = lane & 3;

    const int mc = TILE_ROWS / pa;  // tokens per warp
    const int nc = TILE_COLS / pw;  // channels per warp
    const int m0 = blockIdx.x * mc;
    const int n0 = (blockIdx.y * warps + warp) * nc;
    if (n0 >= n) return;  // warp-uniform; no block-level barriers below

    const int warp_bytes = S_BYTES + (OUT > 0 ? 8 * mc * nc : 0);
    int* S = reinterpret_cast<int*>(btc_smem + warp * warp_bytes);
    double* Y = reinterpret_cast<double*>(btc_smem + warp * warp_bytes + S_BYTES);

    // Row pointers of this lane's A fragment rows (h = 0: row gid, h = 1: row gid + 8) and B column.
    const u32* arow[MT][2];
#pragma unroll
    for (int t = 0; t < MT; ++t) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int r = BTC_MMA_M * t + gid + 8 * h;
            const int i = r / mc;
            const int mm = m0 + (r - i * mc);
            arow[t][h] = (i < pa && mm < m) ? a_planes + ((u64)i * m + mm) * kw : nullptr;
        }
    }
    const u32* brow[NT];
#pragma unroll
    for (int u = 0; u < NT; ++u) {
        const int c = BTC_MMA_N * u + gid;
        const int j = c / nc;
        const int nn = n0 + (c - j * nc);
        brow[u] = (j < pw && nn < n) ? w_planes + ((u64)j * n + nn) * kw : nullptr;
    }

    if (OUT > 0) {
        for (int o = lane; o < mc * nc; o += 32) Y[o] = 0.0;
    }

    for (int g = 0; g < groups; ++g) {
        const int kbeg = g * gw;
        const int kend = (kbeg + gw < kw) ? kbeg + gw : kw;

        int d[MT][NT][4];
#pragma unroll
        for (int t = 0; t < MT; ++t)
#pragma unroll
            for (int u = 0; u < NT; ++u)
#pragma unroll
                for (int q = 0; q < 4; ++q) d[t][u][q] = 0;

        // unrolled so that the loads of several steps are in flight before their mma (GEMV is latency bound)
#pragma unroll 4
        for (int k0 = kbeg; k0 < kend; k0 += KWORDS) {
            if constexpr (KWORDS == BTC_K256_WORDS) {
                const int wo = k0 + 2 * tig;
                const bool kin = wo < kend;  // false only in a half step at the end of a group/row
                uint2 af[MT][2];
                uint2 bf[NT];
#pragma unroll
                for (int t = 0; t < MT; ++t)
#pragma unroll
                    for (int h = 0; h < 2; ++h)
                        af[t][h] = (kin && arow[t][h]) ? *reinterpret_cast<const uint2*>(arow[t][h] + wo)
                                                       : make_uint2(0u, 0u);
#pragma unroll
                for (int u = 0; u < NT; ++u)
                    bf[u] = (kin && brow[u]) ? *reinterpret_cast<const uint2*>(brow[u] + wo)
                                             : make_uint2(0u, 0u);
#pragma unroll
                for (int t = 0; t < MT; ++t)
#pragma unroll
                    for (int u = 0; u < NT; ++u)
                        btc_mma_k256(d[t][u], af[t][0].x, af[t][1].x, af[t][0].y, af[t][1].y, bf[u].x, bf[u].y);
            } else {
                const int wo = k0 + tig;  // groups are whole multiples of 4 words: always in range
                u32 af[MT][2];
                u32 bf[NT];
#pragma unroll
                for (int t = 0; t < MT; ++t)
#pragma unroll
                    for (int h = 0; h < 2; ++h) af[t][h] = arow[t][h] ? arow[t][h][wo] : 0u;
#pragma unroll
                for (int u = 0; u < NT; ++u) bf[u] = brow[u] ? brow[u][wo] : 0u;
#pragma unroll
                for (int t = 0; t < MT; ++t)
#pragma unroll
                    for (int u = 0; u < NT; ++u) btc_mma_k128(d[t][u], af[t][0], af[t][1], bf[u]);
            }
        }

        // Popcount tile -> shared memory, C/D layout: c0 (gid, 2tig), c1 (gid, 2tig+1),
        // c2 (gid+8, 2tig), c3 (gid+8, 2tig+1).
        __syncwarp();
#pragma unroll
        for (int t = 0; t < MT; ++t) {
#pragma unroll
            for (int u = 0; u < NT; ++u) {
                const int row = BTC_MMA_M * t + gid;
                const int col = BTC_MMA_N * u + 2 * tig;
                S[row * SROW + col] = d[t][u][0];
                S[row * SROW + col + 1] = d[t][u][1];
                S[(row + 8) * SROW + col] = d[t][u][2];
                S[(row + 8) * SROW + col + 1] = d[t][u][3];
            }
        }
        __syncwarp();

        for (int o = lane; o < mc * nc; o += 32) {
            const int ml = o / nc;
            const int nl = o - ml * nc;
            const int mm = m0 + ml;
            const int nn = n0 + nl;
            if (mm >= m || nn >= n) continue;
            int v = 0;
            for (int i = 0; i < pa; ++i)
                for (int j = 0; j < pw; ++j) v += S[(i * mc + ml) * SROW + j * nc + nl] << (i + j);
            if (OUT == 0) {
                acc_out[((u64)mm * n + nn) * groups + g] = v;
            } else {
                const u64 wg = (u64)nn * groups + g;
                Y[o] += btc_group_term(v, a_zero[mm], w_zero[wg], w_scale[wg], w_sums[wg],
                                       a_sums[(u64)mm * groups + g], btc_group_size(g, group_size, k_real));
            }
        }
    }

    if (OUT > 0) {
        for (int o = lane; o < mc * nc; o += 32) {
            const int ml = o / nc;
            const int nl = o - ml * nc;
            const int mm = m0 + ml;
            const int nn = n0 + nl;
            if (mm >= m || nn >= n) continue;
            float y = (float)((double)a_scale[mm] * Y[o]);
            if (has_bias) y = y + bias[nn];
            if (OUT == 1)
                reinterpret_cast<float*>(y_out)[(u64)mm * n + nn] = y;
            else
                reinterpret_cast<u16*>(y_out)[(u64)mm * n + nn] = btc_f32_to_f16(y);
        }
    }
}

// Entry points.  Name: btc_mma_{acc|f32|f16}_{k256|k128}_m{MT}n{NT}.
//   acc: (a_planes, pa, m, w_planes, pw, n, kw, gw, groups, acc[m, n, groups])
//   f32/f16: (a_planes, pa, m, w_planes, pw, n, kw, gw, groups, a_scale[m], a_zero[m], a_sums[m, groups],
//             w_scale[n, groups], w_zero[n, groups], w_sums[n, groups], bias[n], has_bias, k_real,
//             group_size, y[m, n])
#define BTC_MMA_ENTRIES(KWORDS, MT, NT, SUFFIX)                                                              \
    extern "C" __global__ void btc_mma_acc_##SUFFIX(                                                         \
        const u32* __restrict__ a_planes, int pa, int m, const u32* __restrict__ w_planes, int pw, int n,   \
        int kw, int gw, int groups, int* __restrict__ acc)                                                   \
    {                                                                                                        \
        btc_mma_body<KWORDS, MT, NT, 0>(a_planes, pa, m, w_planes, pw, n, kw, gw, groups, acc, nullptr,     \
                                        nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 0, 0, 0,       \
                                        nullptr);                                                            \
    }                                                                                                        \
    extern "C" __global__ void btc_mma_f32_##SUFFIX(                                                         \
        const u32* __restrict__ a_planes, int pa, int m, const u32* __restrict__ w_planes, int pw, int n,   \
        int kw, int gw, int groups, const float* __restrict__ a_scale, const float* __restrict__ a_zero,    \
        const int* __restrict__ a_sums, const float* __restrict__ w_scale, const float* __restrict__ w_zero, \
        const int* __restrict__ w_sums, const float* __restrict__ bias, int has_bias, int k_real,           \
        int group_size, float* __restrict__ y)                                                               \
    {                                                                                                        \
        btc_mma_body<KWORDS, MT, NT, 1>(a_planes, pa, m, w_planes, pw, n, kw, gw, groups, nullptr, a_scale, \
                                        a_zero, a_sums, w_scale, w_zero, w_sums, bias, has_bias, k_real,     \
                                        group_size, y);                                                      \
    }                                                                                                        \
    extern "C" __global__ void btc_mma_f16_##SUFFIX(                                                         \
        const u32* __restrict__ a_planes, int pa, int m, const u32* __restrict__ w_planes, int pw, int n,   \
        int kw, int gw, int groups, const float* __restrict__ a_scale, const float* __restrict__ a_zero,    \
        const int* __restrict__ a_sums, const float* __restrict__ w_scale, const float* __restrict__ w_zero, \
        const int* __restrict__ w_sums, const float* __restrict__ bias, int has_bias, int k_real,           \
        int group_size, u16* __restrict__ y)                                                                 \
    {                                                                                                        \
        btc_mma_body<KWORDS, MT, NT, 2>(a_planes, pa, m, w_planes, pw, n, kw, gw, groups, nullptr, a_scale, \
                                        a_zero, a_sums, w_scale, w_zero, w_sums, bias, has_bias, k_real,     \
                                        group_size, y);                                                      \
    }

// Tile table (MT m16 tiles x NT n8 tiles per warp); keep in sync with TILE_CONFIGS in btc/cuda.py.
BTC_MMA_ENTRIES(BTC_K256_WORDS, 1, 2, k256_m1n2)
BTC_MMA_ENTRIES(BTC_K256_WORDS, 1, 4, k256_m1n4)
BTC_MMA_ENTRIES(BTC_K256_WORDS, 2, 4, k256_m2n4)
BTC_MMA_ENTRIES(BTC_K128_WORDS, 1, 2, k128_m1n2)
BTC_MMA_ENTRIES(BTC_K128_WORDS, 1, 4, k128_m1n4)
BTC_MMA_ENTRIES(BTC_K128_WORDS, 2, 4, k128_m2n4)

// ---------------------------------------------------------------------------------------------------
// Plain popcount GEMM (no tensor cores), the second opinion.  One thread per (token, channel):
// blockIdx.x = token, blockIdx.y*blockDim.x + threadIdx.x = channel.  Writes acc[m, n, groups].
// ---------------------------------------------------------------------------------------------------
extern "C" __global__ void btc_popc_acc(
    const u32* __restrict__ a_planes, int pa, int m, const u32* __restrict__ w_planes, int pw, int n,
    int kw, int gw, int groups, int* __restrict__ acc)
{
    const int mm = blockIdx.x;
    const int nn = blockIdx.y * blockDim.x + threadIdx.x;
    if (mm >= m || nn >= n) return;
    for (int g = 0; g < groups; ++g) {
        const int kbeg = g * gw;
        const int kend = (kbeg + gw < kw) ? kbeg + gw : kw;
        int v = 0;
        for (int w = kbeg; w < kend; ++w) {
            u32 wv[8];
#pragma unroll
            for (int j = 0; j < 8; ++j) wv[j] = (j < pw) ? w_planes[((u64)j * n + nn) * kw + w] : 0u;
            for (int i = 0; i < pa; ++i) {
                const u32 av = a_planes[((u64)i * m + mm) * kw + w];
#pragma unroll
                for (int j = 0; j < 8; ++j)
                    if (j < pw) v += __popc(av & wv[j]) << (i + j);
            }
        }
        acc[((u64)mm * n + nn) * groups + g] = v;
    }
}

// ---------------------------------------------------------------------------------------------------
// Stand-alone affine epilogue: acc[m, n, groups] -> y[m, n] (fp32 or fp16), same arithmetic as the
// fused epilogue.  One thread per output, flat index = mm * n + nn.
// ---------------------------------------------------------------------------------------------------
template <int OUT>
__device__ __forceinline__ void btc_epilogue_body(
    const int* __restrict__ acc, int m, int n, int groups,
    const float* __restrict__ a_scale, const float* __restrict__ a_zero, const int* __restrict__ a_sums,
    const float* __restrict__ w_scale, const float* __restrict__ w_zero, const int* __restrict__ w_sums,
    const float* __restrict__ bias, int has_bias, int k_real, int group_size, void* __restrict__ y_out)
{
    const u64 idx = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (u64)m * n) return;
    const int mm = (int)(idx / n);
    const int nn = (int)(idx - (u64)mm * n);
    double s = 0.0;
    for (int g = 0; g < groups; ++g) {
        const u64 wg = (u64)nn * groups + g;
        s += btc_group_term(acc[idx * groups + g], a_zero[mm], w_zero[wg], w_scale[wg], w_sums[wg],
                            a_sums[(u64)mm * groups + g], btc_group_size(g, group_size, k_real));
    }
    float y = (float)((double)a_scale[mm] * s);
    if (has_bias) y = y + bias[nn];
    if (OUT == 1)
        reinterpret_cast<float*>(y_out)[idx] = y;
    else
        reinterpret_cast<u16*>(y_out)[idx] = btc_f32_to_f16(y);
}

extern "C" __global__ void btc_epilogue_f32(
    const int* __restrict__ acc, int m, int n, int groups, const float* __restrict__ a_scale,
    const float* __restrict__ a_zero, const int* __restrict__ a_sums, const float* __restrict__ w_scale,
    const float* __restrict__ w_zero, const int* __restrict__ w_sums, const float* __restrict__ bias,
    int has_bias, int k_real, int group_size, float* __restrict__ y)
{
    btc_epilogue_body<1>(acc, m, n, groups, a_scale, a_zero, a_sums, w_scale, w_zero, w_sums, bias, has_bias,
                         k_real, group_size, y);
}

extern "C" __global__ void btc_epilogue_f16(
    const int* __restrict__ acc, int m, int n, int groups, const float* __restrict__ a_scale,
    const float* __restrict__ a_zero, const int* __restrict__ a_sums, const float* __restrict__ w_scale,
    const float* __restrict__ w_zero, const int* __restrict__ w_sums, const float* __restrict__ bias,
    int has_bias, int k_real, int group_size, u16* __restrict__ y)
{
    btc_epilogue_body<2>(acc, m, n, groups, a_scale, a_zero, a_sums, w_scale, w_zero, w_sums, bias, has_bias,
                         k_real, group_size, y);
}

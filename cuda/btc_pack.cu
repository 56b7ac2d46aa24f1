// Per-token activation quantization + BTC bit-plane packing (DESIGN §4, §5).  CUDA C, `extern "C"` entry
// points only, no host code, no headers: compiles with NVRTC (CuPy RawModule) and `nvcc -cubin`.
//
// Input  x [m, k] row-major, fp32 (btc_quant_pack_f32) or fp16 bits (btc_quant_pack_f16, converted to
//        fp32 first, as torch's x.float() does).
// Output planes uint32 [pa, m, kw] (kw = Kp/32, Kp = k rounded up to a multiple of 128, padded columns
//        are code 0), scale f32 [m], zero f32 [m], sums int32 [m, groups] (sum of codes per group of gw
//        words; groups = 1 and gw = kw for per-channel weights).
//
// Quantizer, bit for bit the fp32 arithmetic of abqcli.quant.quantizer on the CPU:
//   xmin, xmax = clip * (min / max over the row's k real columns)   one fp32 multiply each (__fmul_rn:
//                never contracted into an FMA); clip 1 leaves them as they are
//   s = clamp((xmax - xmin) / qmax, 1e-5, 1e4)           true fp32 division
//   z = rint(-xmin / s)                                   round half to even
//   q = clamp(rint(x / s) + z, 0, qmax)                   true fp32 division, fp32 add
// (NaN inputs are not handled: torch's amin/amax propagate NaN, fminf/fmaxf drop it.)
//
// Layout: one block per token row (blockIdx.x), blockDim.x a multiple of 32.  Warp w handles words
// w, w + warps, ...; lane e quantizes column 32*word + e, and __ballot_sync over lanes of bit p of the
// code is exactly the format's word of plane p (element e in bit e, LSB first).  Lane p stores plane p.
// Dynamic shared memory: 4 * groups bytes (per-group code sums).

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned long long u64;

#define BTC_FULL_MASK 0xffffffffu

template <bool HALF>
__device__ __forceinline__ float btc_load_x(const void* __restrict__ x, u64 idx)
{
    if constexpr (HALF) {
        const u16 h = reinterpret_cast<const u16*>(x)[idx];
        float f;
        asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
        return f;
    } else {
        return reinterpret_cast<const float*>(x)[idx];
    }
}

template <bool HALF>
__device__ __forceinline__ void btc_quant_pack_body(
    const void* __restrict__ x, const int m, const int k, const int qmax, const float clip, const int pa,
    const int kw, const int gw, const int groups, u32* __restrict__ planes, float* __restrict__ scale,
    float* __restrict__ zero, int* __restrict__ sums)
{
    __shared__ float red_lo[32];
    __shared__ float red_hi[32];
    extern __shared__ int btc_gsum[];

    const int row = blockIdx.x;
    if (row >= m) return;  // block-uniform
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int warps = blockDim.x >> 5;
    const u64 base = (u64)row * k;

    // 1. Row range.
    float lo = __int_as_float(0x7f800000);   // +inf
    float hi = __int_as_float(0xff800000);   // -inf
    for (int c = threadIdx.x; c < k; c += blockDim.x) {
        const float v = btc_load_x<HALF>(x, base + c);
        lo = fminf(lo, v);
        hi = fmaxf(hi, v);
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        lo = fminf(lo, __shfl_xor_sync(BTC_FULL_MASK, lo, off));
        hi = fmaxf(hi, __shfl_xor_sync(BTC_FULL_MASK, hi, off));
    }
    if (lane == 0) {
        red_lo[warp] = lo;
        red_hi[warp] = hi;
    }
    for (int g = threadIdx.x; g < groups; g += blockDim.x) btc_gsum[g] = 0;
    __syncthreads();
    float xmin = red_lo[0];
    float xmax = red_hi[0];
    for (int w = 1; w < warps; ++w) {
        xmin = fminf(xmin, red_lo[w]);
        xmax = fmaxf(xmax, red_hi[w]);
    }
    xmin = __fmul_rn(xmin, clip);
    xmax = __fmul_rn(xmax, clip);

    // 2. Scale and zero point (same operation order as the torch quantizer).
    const float qf = (float)qmax;
    float s = (xmax - xmin) / qf;
    s = fminf(fmaxf(s, 1e-5f), 1e4f);
    const float z = rintf(-xmin / s);

    // 3. Codes -> planes (ballot), per-group code sums.
    for (int w = warp; w < kw; w += warps) {
        const int c = 32 * w + lane;
        u32 code = 0u;
        if (c < k) {
            const float v = btc_load_x<HALF>(x, base + c);
            float q = rintf(v / s) + z;
            q = fminf(fmaxf(q, 0.0f), qf);
            code = (u32)q;
        }
        u32 mine = 0u;
        for (int p = 0; p < pa; ++p) {
            const u32 word = __ballot_sync(BTC_FULL_MASK, (code >> p) & 1u);
            if (lane == p) mine = word;
        }
        if (lane < pa) planes[((u64)lane * m + row) * kw + w] = mine;
        int csum = (int)code;
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) csum += __shfl_xor_sync(BTC_FULL_MASK, csum, off);
        if (lane == 0) atomicAdd(&btc_gsum[w / gw], csum);
    }
    __syncthreads();
    for (int g = threadIdx.x; g < groups; g += blockDim.x) sums[(u64)row * groups + g] = btc_gsum[g];
    if (threadIdx.x == 0) {
        scale[row] = s;
        zero[row] = z;
    }
}

// (x[m, k], m, k, qmax, clip, pa, kw, gw, groups, planes[pa, m, kw], scale[m], zero[m], sums[m, groups])
extern "C" __global__ void btc_quant_pack_f32(
    const float* __restrict__ x, int m, int k, int qmax, float clip, int pa, int kw, int gw, int groups,
    u32* __restrict__ planes, float* __restrict__ scale, float* __restrict__ zero, int* __restrict__ sums)
{
    btc_quant_pack_body<false>(x, m, k, qmax, clip, pa, kw, gw, groups, planes, scale, zero, sums);
}

extern "C" __global__ void btc_quant_pack_f16(
    const u16* __restrict__ x, int m, int k, int qmax, float clip, int pa, int kw, int gw, int groups,
    u32* __restrict__ planes, float* __restrict__ scale, float* __restrict__ zero, int* __restrict__ sums)
{
    btc_quant_pack_body<true>(x, m, k, qmax, clip, pa, kw, gw, groups, planes, scale, zero, sums);
}

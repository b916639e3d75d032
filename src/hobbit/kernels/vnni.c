// y[M,N] = x[M,K] @ W[N,K].T for decode: W int4 or int2 in quant.py's B64 layout (or int8 per row), x as two
// int8 levels.
//
// W: codes q [N/64, K, 8 bits] bytes (block of 64 rows; per input k, int4: byte j = row j | row j+32 << 4;
// int2: byte j = row j | row j+16 << 2 | row j+32 << 4 | row j+48 << 6) and sz [K/gs, N, 2] bf16 (scale s,
// zero z per group of gs inputs): w = (q - c) * s + z with c = 2^(bits-1); for int4 the layout torch's
// _weight_int4pack_mm_for_cpu takes on AVX-512, so a slot's bytes are used as they are (int2 too: 2 bits read).
// x: each block of 32 inputs is quantized to int8 as llama.cpp's Q8_0 (q1 = round(x / d), d = max|x| / 127),
// and so is what that leaves (q2 = round((x - d q1) / (d / 254))): x = d (q1 + q2 / 254) to ~1/64000 of
// max|x|, finer than bf16, so the result is torch's up to summation order (one level alone is ~0.6% off
// per matmul, and that compounds over a model's layers). VPDPBUSD multiplies 16 rows x 4 inputs of u8
// codes by each level's s8 activations; decode is memory-bound, the second product costs little. Per block b:
//   sum_k w[r,k] x[k] = s_r * (d_b * sum_k q[r,k] (q1[k] + q2[k] / 254) - c g_b) + z_r * g_b,   g_b = sum_k x[k].
// A byte permute (VPERMT2B for int4, VPERMB for int2) gathers each row's 4 codes (4 consecutive inputs)
// into one int32 lane.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define PF_DIST 4096  // bytes of int4 codes prefetched ahead: the hardware alone overlaps little of a 1 MB expert (-12%)
#define PF_SCALES 2   // activation blocks ahead whose scales are prefetched (they lie N * 4 bytes apart)
#define PF8 8192      // bytes ahead in each int8 row's stream (4 rows at a time): 17 -> 34 GB/s on a 151936x1536 LM head
#define QBLOCK 32    // activation block (inputs per int8 scale)
#define LEVEL2 254.f  // the residual's scale is d / LEVEL2: |x - d q1| <= d / 2 maps onto +-127

static inline float bf16_to_f32(uint16_t h) {  // exact
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

// 16 values -> level-1 codes at x1, level-2 codes at x2 (round half to even); returns the sum of the codes
// as d * (sum q1 + sum q2 / 254).
static inline float quantize16(__m512 v, __m512 d, __m512 inv, __m512 inv2, int8_t *x1, int8_t *x2) {
    __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v, inv));
    __m512 r = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(q1), d, v);  // x - d q1
    __m512i q2 = _mm512_cvtps_epi32(_mm512_mul_ps(r, inv2));
    _mm_storeu_si128((__m128i *)x1, _mm512_cvtsepi32_epi8(q1));
    _mm_storeu_si128((__m128i *)x2, _mm512_cvtsepi32_epi8(q2));
    return _mm512_reduce_add_ps(_mm512_fmadd_ps(_mm512_cvtepi32_ps(q2), _mm512_set1_ps(1.f / LEVEL2),
                                                _mm512_cvtepi32_ps(q1)));
}

// 32 values (v0, v1) -> codes at x1[0..32) and x2[0..32); returns d = max|v| / 127, *g = d * (sum of codes).
static inline float quantize_block(__m512 v0, __m512 v1, int8_t *x1, int8_t *x2, float *g) {
    float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    float dd = amax / 127.f;
    __m512 d = _mm512_set1_ps(dd), inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
    __m512 inv2 = _mm512_set1_ps(amax > 0.f ? LEVEL2 * 127.f / amax : 0.f);
    *g = dd * (quantize16(v0, d, inv, inv2, x1, x2) + quantize16(v1, d, inv, inv2, x1 + 16, x2 + 16));
    return dd;
}

static inline __m512 bf16x16(const uint16_t *p) {  // 16 bf16 -> fp32, exact
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

// x [K] bf16 (or fp32) -> xq [2K] int8 (level 1 | level 2), d [K/32] and g [K/32] (the blocks' sums).
static void quantize_row(const uint16_t *x, int64_t K, int8_t *xq, float *d, float *g) {
    for (int64_t b = 0; b < K / QBLOCK; b++)
        d[b] = quantize_block(bf16x16(x + b * QBLOCK), bf16x16(x + b * QBLOCK + 16), xq + b * QBLOCK,
                              xq + K + b * QBLOCK, g + b);
}

static void quantize_f32(const float *x, int64_t K, int8_t *xq, float *d, float *g) {
    for (int64_t b = 0; b < K / QBLOCK; b++)
        d[b] = quantize_block(_mm512_loadu_ps(x + b * QBLOCK), _mm512_loadu_ps(x + b * QBLOCK + 16), xq + b * QBLOCK,
                              xq + K + b * QBLOCK, g + b);
}

// fp32 [16] -> bf16 [16], round to nearest even (NaN-free inputs).
static inline __m256i to_bf16(__m512 v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16));
}

// One 64-row block (rows row0 .. row0+63, codes at q, 8 bits bytes per input) of one token over all K -> y [64]
// fp32. Inlined once per bits, so each inner loop is straight-line code.
static inline __attribute__((always_inline)) void block_row_bits(
        const int bits, const uint8_t *q, const uint16_t *sz, int64_t N, int64_t K, int64_t gs, int64_t row0,
        const int8_t *xq, const float *d, const float *g, float *y) {
    // int4, byte 4r+t of a 16-row lane group: code of row r at input k+t (t < 2 from a = [k | k+1], else b = [k+2 | k+3]);
    // int2, byte 4r+t: byte 16t+r of a plane (one 2-bit field of all four inputs' bytes)
    uint8_t i0[64], i1[64], i2[64];
    for (int r = 0; r < 16; r++)
        for (int t = 0; t < 4; t++) {
            i0[4 * r + t] = (uint8_t)(32 * t + r);
            i1[4 * r + t] = (uint8_t)(32 * t + r + 16);
            i2[4 * r + t] = (uint8_t)(16 * t + r);
        }
    const __m512i idx0 = _mm512_loadu_si512(i0), idx1 = _mm512_loadu_si512(i1), idx2 = _mm512_loadu_si512(i2);
    const __m512i lo4 = _mm512_set1_epi8(0x0F), lo2 = _mm512_set1_epi8(0x03);
    const __m512i zmask = _mm512_set1_epi32((int)0xFFFF0000);
    __m512 f0 = _mm512_setzero_ps(), f1 = f0, f2 = f0, f3 = f0;  // rows 0-15, 16-31, 32-47, 48-63
    const __m512 l2 = _mm512_set1_ps(1.f / LEVEL2);
    for (int64_t b = 0; b < K / QBLOCK; b++) {
        if (b + PF_SCALES < K / QBLOCK) {
            const char *next = (const char *)(sz + (((b + PF_SCALES) * QBLOCK / gs) * N + row0) * 2);
            for (int c = 0; c < 256; c += 64) _mm_prefetch(next + c, _MM_HINT_T0);
        }
        __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0, c0 = a0, c1 = a0, c2 = a0, c3 = a0;
        const uint8_t *p = q + b * QBLOCK * 8 * bits;
        const int32_t *x1 = (const int32_t *)(xq + b * QBLOCK), *x2 = (const int32_t *)(xq + K + b * QBLOCK);
        for (int i = 0; i < QBLOCK / 4; i++, p += 32 * bits) {
            __m512i r0, r1, r2, r3;  // rows 0-15, 16-31, 32-47, 48-63: each lane a row's codes at inputs k..k+3
            if (bits == 4) {
                _mm_prefetch((const char *)p + PF_DIST, _MM_HINT_T0);
                _mm_prefetch((const char *)p + PF_DIST + 64, _MM_HINT_T0);
                __m512i A = _mm512_loadu_si512(p), B = _mm512_loadu_si512(p + 64);  // inputs k, k+1 | k+2, k+3
                __m512i Al = _mm512_and_si512(A, lo4), Bl = _mm512_and_si512(B, lo4);  // rows 0-31
                __m512i Ah = _mm512_and_si512(_mm512_srli_epi16(A, 4), lo4), Bh = _mm512_and_si512(_mm512_srli_epi16(B, 4), lo4);
                r0 = _mm512_permutex2var_epi8(Al, idx0, Bl), r1 = _mm512_permutex2var_epi8(Al, idx1, Bl);
                r2 = _mm512_permutex2var_epi8(Ah, idx0, Bh), r3 = _mm512_permutex2var_epi8(Ah, idx1, Bh);
            } else {
                _mm_prefetch((const char *)p + PF_DIST, _MM_HINT_T0);
                __m512i A = _mm512_loadu_si512(p);  // inputs k .. k+3, 16 bytes each
                r0 = _mm512_permutexvar_epi8(idx2, _mm512_and_si512(A, lo2));
                r1 = _mm512_permutexvar_epi8(idx2, _mm512_and_si512(_mm512_srli_epi16(A, 2), lo2));
                r2 = _mm512_permutexvar_epi8(idx2, _mm512_and_si512(_mm512_srli_epi16(A, 4), lo2));
                r3 = _mm512_permutexvar_epi8(idx2, _mm512_and_si512(_mm512_srli_epi16(A, 6), lo2));
            }
            __m512i u = _mm512_set1_epi32(x1[i]), v = _mm512_set1_epi32(x2[i]);  // x's codes k..k+3, each level
            a0 = _mm512_dpbusd_epi32(a0, r0, u), c0 = _mm512_dpbusd_epi32(c0, r0, v);
            a1 = _mm512_dpbusd_epi32(a1, r1, u), c1 = _mm512_dpbusd_epi32(c1, r1, v);
            a2 = _mm512_dpbusd_epi32(a2, r2, u), c2 = _mm512_dpbusd_epi32(c2, r2, v);
            a3 = _mm512_dpbusd_epi32(a3, r3, u), c3 = _mm512_dpbusd_epi32(c3, r3, v);
        }
        const uint16_t *s = sz + ((b * QBLOCK / gs) * N + row0) * 2;  // (s, z) pairs of these 64 rows
        const __m512 db = _mm512_set1_ps(d[b]), gb = _mm512_set1_ps(g[b]), gc = _mm512_set1_ps((1 << (bits - 1)) * g[b]);
#define EPILOGUE(acc, acc2, f, off)                                                                \
        {                                                                                          \
            __m512i v = _mm512_loadu_si512(s + 2 * (off));                                         \
            __m512 sc = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));                             \
            __m512 zr = _mm512_castsi512_ps(_mm512_and_si512(v, zmask));                           \
            __m512 t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc2), l2, _mm512_cvtepi32_ps(acc));     \
            f = _mm512_fmadd_ps(sc, _mm512_fmsub_ps(t, db, gc), f);                                \
            f = _mm512_fmadd_ps(zr, gb, f);                                                        \
        }
        EPILOGUE(a0, c0, f0, 0) EPILOGUE(a1, c1, f1, 16) EPILOGUE(a2, c2, f2, 32) EPILOGUE(a3, c3, f3, 48)
#undef EPILOGUE
    }
    _mm512_storeu_ps(y, f0);
    _mm512_storeu_ps(y + 16, f1);
    _mm512_storeu_ps(y + 32, f2);
    _mm512_storeu_ps(y + 48, f3);
}

static inline void store_weighted(uint16_t *y, const float *out, float weight) {  // 64 fp32 x weight -> bf16
    const __m512 w = _mm512_set1_ps(weight);
    for (int c = 0; c < 64; c += 16) _mm256_storeu_si256((__m256i *)(y + c), to_bf16(_mm512_mul_ps(w, _mm512_loadu_ps(out + c))));
}

typedef int8_t XCODE;  // x's codes: level 1 [K] then level 2 [K] (2 bytes per input)
#include "expert.h"

// y [M,N] bf16 from the blocks of an int4/int2 matrix (quantized x in xq, d, g); fp32 [64] scratch per block.
static void lowbit_rows(int bits, const uint8_t *q, const uint16_t *sz, int64_t M, int64_t N, int64_t K, int64_t gs,
                        const int8_t *xq, const float *d, const float *g, uint16_t *y, int threads) {
    const int64_t nb = K / QBLOCK;
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (int64_t b = 0; b < N / 64; b++)
        for (int64_t m = 0; m < M; m++) {  // a block's 64 rows x K codes stay in L2 across the M tokens
            float f[64];
            block_row(bits, q + b * K * 8 * bits, sz, N, K, gs, b * 64, xq + 2 * m * K, d + m * nb, g + m * nb, f);
            for (int c = 0; c < 64; c += 16)
                _mm256_storeu_si256((__m256i *)(y + m * N + b * 64 + c), to_bf16(_mm512_loadu_ps(f + c)));
        }
}

// x [M,K] bf16, q [N/64,K,8 bits], sz [K/gs,N,2] bf16 -> y [M,N] bf16. bits 4 or 2, N % 64 == 0, K % 32 == 0,
// gs % 32 == 0. scratch: 2*M*K int8 + 2*M*K/32 floats.
void lowbit_linear(const uint16_t *x, const uint8_t *q, const uint16_t *sz, uint16_t *y, int64_t M, int64_t N,
                   int64_t K, int64_t gs, int64_t bits, int8_t *xq, float *dg, int threads) {
    float *d = dg, *g = dg + M * (K / QBLOCK);
    for (int64_t m = 0; m < M; m++)
        quantize_row(x + m * K, K, xq + 2 * m * K, d + m * (K / QBLOCK), g + m * (K / QBLOCK));
    lowbit_rows((int)bits, q, sz, M, N, K, gs, xq, d, g, y, threads);
}

// x [M,K] bf16, w [N,K] int8 (row-major), scale [N] bf16 -> y [M,N] bf16 (w = q * scale per row). K % 64 == 0.
// 64 inputs a step: VPDPBUSD multiplies |w| (u8) by each level of x's codes with w's sign, 254 x level 1 +
// level 2 summed exactly in int32; lanes 0-7 hold block b, 8-15 block b+1, scaled by dd = each block's
// d / 254 repeated 8 times. Four rows share each activation load.
void int8_linear(const uint16_t *x, const int8_t *w, const uint16_t *scale, uint16_t *y, int64_t M, int64_t N,
                 int64_t K, int8_t *xq, float *dg, int threads) {
    const int64_t nb = K / QBLOCK;
    float *d = dg, *g = dg + M * nb, *dd = dg + 2 * M * nb;  // dd [M, nb, 8]
    for (int64_t m = 0; m < M; m++) {
        quantize_row(x + m * K, K, xq + 2 * m * K, d + m * nb, g + m * nb);
        for (int64_t b = 0; b < nb; b++)
            for (int i = 0; i < 8; i++) dd[(m * nb + b) * 8 + i] = d[m * nb + b] / LEVEL2;
    }
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (int64_t n0 = 0; n0 < N; n0 += 4)
        for (int64_t m = 0; m < M; m++) {
            const int8_t *xm = xq + 2 * m * K;
            const __m512i k254 = _mm512_set1_epi32((int)LEVEL2);
            const float *ddm = dd + m * nb * 8;
            int rows = N - n0 < 4 ? (int)(N - n0) : 4;
            __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
            for (int64_t k = 0; k < K; k += 64) {
                __m512i u = _mm512_loadu_si512(xm + k), v = _mm512_loadu_si512(xm + K + k);
                __m512 sc = _mm512_loadu_ps(ddm + (k / QBLOCK) * 8);
                for (int r = 0; r < rows; r++) {
                    _mm_prefetch((const char *)(w + (n0 + r) * K + k) + PF8, _MM_HINT_T0);
                    __m512i wv = _mm512_loadu_si512(w + (n0 + r) * K + k), aw = _mm512_abs_epi8(wv);
                    __mmask64 neg = _mm512_movepi8_mask(wv);
                    __m512i us = _mm512_mask_sub_epi8(u, neg, _mm512_setzero_si512(), u);
                    __m512i vs = _mm512_mask_sub_epi8(v, neg, _mm512_setzero_si512(), v);
                    __m512i t = _mm512_mullo_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), aw, us), k254);
                    t = _mm512_dpbusd_epi32(t, aw, vs);  // 254 * level 1 + level 2: exact in int32
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), sc, acc[r]);
                }
            }
            for (int r = 0; r < rows; r++) {
                float v = _mm512_reduce_add_ps(acc[r]) * bf16_to_f32(scale[n0 + r]);
                uint32_t u;
                memcpy(&u, &v, 4);
                y[m * N + n0 + r] = (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
            }
        }
}

// The kernels of vnni.c for x86-64 CPUs without AVX-512 (AVX2 + FMA: Haswell and later, most laptops).
//
// Same functions, layouts and results (see vnni.c). x's two int8 levels per 32 inputs are folded into one
// int16 code, x16 = 254 q1 + q2 (|x16| <= 32385), so x = (d / 254) x16 and VPMADDWD (int16 x int16 -> int32,
// pairs summed) multiplies 8 rows x 2 inputs of int4 (or int2) codes by it exactly. Each row's codes for inputs
// k and k+1 are brought into one int32 lane by byte unpacks, which work within 128-bit lanes: a register holds
// rows {4i..4i+3} and {4i+16..4i+19}, and the scales are loaded in the same order. int2 codes are first
// spread into int4's arrangement (an input's 16 bytes in both lanes, each lane shifted to its own 2-bit field).
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define PF_DIST 4096  // bytes of int4 codes prefetched ahead
#define PF8 8192      // bytes ahead in each int8 row's stream
#define QBLOCK 32     // activation block (inputs per scale)
#define LEVEL2 254.f  // x16 = 254 q1 + q2

static inline float bf16_to_f32(uint16_t h) {  // exact
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float hmax8(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

static inline float hsum8(__m256 v) {
    __m128 m = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_add_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_add_ss(m, _mm_movehdup_ps(m)));
}

static inline __m256 bf16x8(const uint16_t *p) {  // 8 bf16 -> fp32, exact
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

// 32 values v[4] -> x16 [32] int16 codes; returns d = max|v| / 127, *g = the block's sum as coded.
static inline float quantize_block(const __m256 *v, int16_t *x16, float *g) {
    const __m256 absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v[0], absm), _mm256_and_ps(v[1], absm)),
                             _mm256_max_ps(_mm256_and_ps(v[2], absm), _mm256_and_ps(v[3], absm)));
    float amax = hmax8(m), dd = amax / 127.f;
    __m256 d = _mm256_set1_ps(dd), inv = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
    __m256 inv2 = _mm256_set1_ps(amax > 0.f ? LEVEL2 * 127.f / amax : 0.f), l2 = _mm256_set1_ps(LEVEL2);
    __m256i c[4];
    __m256 sum = _mm256_setzero_ps();
    for (int i = 0; i < 4; i++) {
        __m256i q1 = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv));  // round half to even
        __m256 r = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(q1), d, v[i]);
        __m256i q2 = _mm256_cvtps_epi32(_mm256_mul_ps(r, inv2));
        __m256 code = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q1), l2, _mm256_cvtepi32_ps(q2));  // exact in fp32
        c[i] = _mm256_cvtps_epi32(code);
        sum = _mm256_add_ps(sum, code);
    }
    __m256i p01 = _mm256_permute4x64_epi64(_mm256_packs_epi32(c[0], c[1]), 0xD8);  // undo the lane interleave
    __m256i p23 = _mm256_permute4x64_epi64(_mm256_packs_epi32(c[2], c[3]), 0xD8);
    _mm256_storeu_si256((__m256i *)x16, p01);
    _mm256_storeu_si256((__m256i *)(x16 + 16), p23);
    *g = dd / LEVEL2 * hsum8(sum);
    return dd;
}

static void quantize_row(const uint16_t *x, int64_t K, int16_t *x16, float *d, float *g) {
    for (int64_t b = 0; b < K / QBLOCK; b++) {
        __m256 v[4] = {bf16x8(x + b * QBLOCK), bf16x8(x + b * QBLOCK + 8), bf16x8(x + b * QBLOCK + 16),
                       bf16x8(x + b * QBLOCK + 24)};
        d[b] = quantize_block(v, x16 + b * QBLOCK, g + b);
    }
}

static void quantize_f32(const float *x, int64_t K, int16_t *x16, float *d, float *g) {
    for (int64_t b = 0; b < K / QBLOCK; b++) {
        __m256 v[4] = {_mm256_loadu_ps(x + b * QBLOCK), _mm256_loadu_ps(x + b * QBLOCK + 8),
                       _mm256_loadu_ps(x + b * QBLOCK + 16), _mm256_loadu_ps(x + b * QBLOCK + 24)};
        d[b] = quantize_block(v, x16 + b * QBLOCK, g + b);
    }
}

static inline uint16_t to_bf16(float v) {  // round to nearest even (NaN-free inputs)
    uint32_t u;
    memcpy(&u, &v, 4);
    return (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

// Register i of a 64-row block holds rows ROW(i, 0..3) in its low lane and ROW(i, 0..3) + 16 in its high lane.
#define ROW(i, j) (((i) / 4) * 32 + ((i) % 4) * 4 + (j))

// One 64-row block (rows row0 .. row0+63, codes at q, 8 bits bytes per input) of one token over all K -> y [64]
// fp32. Inlined once per bits, so each inner loop is straight-line code.
static inline __attribute__((always_inline)) void block_row_bits(
        const int bits, const uint8_t *q, const uint16_t *sz, int64_t N, int64_t K, int64_t gs, int64_t row0,
        const int16_t *x16, const float *d, const float *g, float *y) {
    const __m256i lo2 = _mm256_set1_epi8(0x03);
    const __m256i sh0 = _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2), sh1 = _mm256_setr_epi32(4, 4, 4, 4, 6, 6, 6, 6);
    const __m256i lo4 = _mm256_set1_epi8(0x0F), zero = _mm256_setzero_si256();
    const __m256i zmask = _mm256_set1_epi32((int)0xFFFF0000);
    float f[64] = {0};  // by register order: f[8 i .. 8 i + 7] are register i's rows
    for (int64_t b = 0; b < K / QBLOCK; b++) {
        __m256i acc[8];
        for (int i = 0; i < 8; i++) acc[i] = zero;
        const uint8_t *p = q + b * QBLOCK * 8 * bits;
        const int32_t *xb = (const int32_t *)(x16 + b * QBLOCK);  // x16 pairs (k, k+1)
        for (int t = 0; t < QBLOCK / 2; t++, p += 16 * bits) {
            _mm_prefetch((const char *)p + PF_DIST, _MM_HINT_T0);
            __m256i xv = _mm256_set1_epi32(xb[t]);
            __m256i L[2], M[2];  // inputs k, k+1: [0] rows 0-15 | 16-31 (by lane), [1] rows 32-47 | 48-63
            if (bits == 4) {
                __m256i Y0 = _mm256_loadu_si256((const __m256i *)p), Y1 = _mm256_loadu_si256((const __m256i *)(p + 32));
                L[0] = _mm256_and_si256(Y0, lo4), L[1] = _mm256_and_si256(_mm256_srli_epi16(Y0, 4), lo4);
                M[0] = _mm256_and_si256(Y1, lo4), M[1] = _mm256_and_si256(_mm256_srli_epi16(Y1, 4), lo4);
            } else {
                __m256i Y0 = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p));
                __m256i Y1 = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(p + 16)));
                L[0] = _mm256_and_si256(_mm256_srlv_epi32(Y0, sh0), lo2), L[1] = _mm256_and_si256(_mm256_srlv_epi32(Y0, sh1), lo2);
                M[0] = _mm256_and_si256(_mm256_srlv_epi32(Y1, sh0), lo2), M[1] = _mm256_and_si256(_mm256_srlv_epi32(Y1, sh1), lo2);
            }
            for (int h = 0; h < 2; h++) {  // low nibbles: rows 0-31, high: rows 32-63
                __m256i a = _mm256_unpacklo_epi8(L[h], M[h]), c = _mm256_unpackhi_epi8(L[h], M[h]);  // (k, k+1) per row
                acc[4 * h + 0] = _mm256_add_epi32(acc[4 * h + 0], _mm256_madd_epi16(_mm256_unpacklo_epi8(a, zero), xv));
                acc[4 * h + 1] = _mm256_add_epi32(acc[4 * h + 1], _mm256_madd_epi16(_mm256_unpackhi_epi8(a, zero), xv));
                acc[4 * h + 2] = _mm256_add_epi32(acc[4 * h + 2], _mm256_madd_epi16(_mm256_unpacklo_epi8(c, zero), xv));
                acc[4 * h + 3] = _mm256_add_epi32(acc[4 * h + 3], _mm256_madd_epi16(_mm256_unpackhi_epi8(c, zero), xv));
            }
        }
        const uint16_t *s = sz + ((b * QBLOCK / gs) * N + row0) * 2;  // (s, z) pairs of these 64 rows
        const __m256 db = _mm256_set1_ps(d[b] / LEVEL2), gb = _mm256_set1_ps(g[b]), gc = _mm256_set1_ps((1 << (bits - 1)) * g[b]);
        for (int i = 0; i < 8; i++) {
            __m256i v = _mm256_loadu2_m128i((const __m128i *)(s + 2 * (ROW(i, 0) + 16)), (const __m128i *)(s + 2 * ROW(i, 0)));
            __m256 sc = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), zr = _mm256_castsi256_ps(_mm256_and_si256(v, zmask));
            __m256 fi = _mm256_loadu_ps(f + 8 * i);
            fi = _mm256_fmadd_ps(sc, _mm256_fmsub_ps(_mm256_cvtepi32_ps(acc[i]), db, gc), fi);
            _mm256_storeu_ps(f + 8 * i, _mm256_fmadd_ps(zr, gb, fi));
        }
    }
    for (int i = 0; i < 8; i++)
        for (int j = 0; j < 4; j++) {
            y[ROW(i, j)] = f[8 * i + j];
            y[ROW(i, j) + 16] = f[8 * i + 4 + j];
        }
}

static inline void store_weighted(uint16_t *y, const float *out, float weight) {  // 64 fp32 x weight -> bf16
    for (int c = 0; c < 64; c++) y[c] = to_bf16(weight * out[c]);
}

typedef int16_t XCODE;  // x's codes: one int16 per input
#include "expert.h"

static void lowbit_rows(int bits, const uint8_t *q, const uint16_t *sz, int64_t M, int64_t N, int64_t K, int64_t gs,
                        const int16_t *x16, const float *d, const float *g, uint16_t *y, int threads) {
    const int64_t nb = K / QBLOCK;
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (int64_t b = 0; b < N / 64; b++)
        for (int64_t m = 0; m < M; m++) {
            float f[64];
            block_row(bits, q + b * K * 8 * bits, sz, N, K, gs, b * 64, x16 + m * K, d + m * nb, g + m * nb, f);
            for (int c = 0; c < 64; c++) y[m * N + b * 64 + c] = to_bf16(f[c]);
        }
}

// As vnni.c's lowbit_linear; xq: 2*M*K bytes (M*K int16 codes), dg: 2*M*K/32 floats.
void lowbit_linear(const uint16_t *x, const uint8_t *q, const uint16_t *sz, uint16_t *y, int64_t M, int64_t N,
                   int64_t K, int64_t gs, int64_t bits, int8_t *xq, float *dg, int threads) {
    int16_t *x16 = (int16_t *)xq;
    float *d = dg, *g = dg + M * (K / QBLOCK);
    for (int64_t m = 0; m < M; m++)
        quantize_row(x + m * K, K, x16 + m * K, d + m * (K / QBLOCK), g + m * (K / QBLOCK));
    lowbit_rows((int)bits, q, sz, M, N, K, gs, x16, d, g, y, threads);
}

// As vnni.c's int8_linear (K % 64 == 0); four rows share each activation load.
void int8_linear(const uint16_t *x, const int8_t *w, const uint16_t *scale, uint16_t *y, int64_t M, int64_t N,
                 int64_t K, int8_t *xq, float *dg, int threads) {
    const int64_t nb = K / QBLOCK;
    int16_t *x16 = (int16_t *)xq;
    float *d = dg, *g = dg + M * nb;
    for (int64_t m = 0; m < M; m++) {
        quantize_row(x + m * K, K, x16 + m * K, d + m * nb, g + m * nb);
        for (int64_t b = 0; b < nb; b++) d[m * nb + b] /= LEVEL2;  // x = d / 254 * x16
    }
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (int64_t n0 = 0; n0 < N; n0 += 4)
        for (int64_t m = 0; m < M; m++) {
            const int16_t *xm = x16 + m * K;
            int rows = N - n0 < 4 ? (int)(N - n0) : 4;
            __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
            for (int64_t k = 0; k < K; k += QBLOCK) {
                __m256i u0 = _mm256_loadu_si256((const __m256i *)(xm + k)), u1 = _mm256_loadu_si256((const __m256i *)(xm + k + 16));
                __m256 sc = _mm256_set1_ps(d[m * nb + k / QBLOCK]);
                for (int r = 0; r < rows; r++) {
                    const int8_t *wr = w + (n0 + r) * K + k;
                    _mm_prefetch((const char *)wr + PF8, _MM_HINT_T0);
                    __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)wr));
                    __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(wr + 16)));
                    __m256i s = _mm256_add_epi32(_mm256_madd_epi16(w0, u0), _mm256_madd_epi16(w1, u1));
                    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), sc, acc[r]);
                }
            }
            for (int r = 0; r < rows; r++) y[m * N + n0 + r] = to_bf16(hsum8(acc[r]) * bf16_to_f32(scale[n0 + r]));
        }
}

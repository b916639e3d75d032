// Shared by both builds. block_row: one 64-row block at either code width (block_row_bits inlined once per
// width). lowbit_expert: one SwiGLU expert at one token, y [H] bf16 = weight * W2 (silu(G x) * (U x)), W13 =
// [G; U] [2I,H] and W2 [H,I], both with bits-bit codes as in lowbit_linear (H % 64 == 0, I % 32 == 0, 2I % 64
// == 0); the activation stays fp32 between the two matrices and is quantized like x. Scratch: xq 2 (H + I)
// bytes (x's codes, then h's); f 2I + 4 (H + I) / 32 floats. The including file defines XCODE (its code type,
// 2 bytes per input either way), quantize_row, quantize_f32, block_row_bits (bits, ...) and store_weighted
// (64 fp32 -> bf16 x weight).

static void block_row(int bits, const uint8_t *q, const uint16_t *sz, int64_t N, int64_t K, int64_t gs, int64_t row0,
                      const XCODE *xq, const float *d, const float *g, float *y) {
    if (bits == 2)
        block_row_bits(2, q, sz, N, K, gs, row0, xq, d, g, y);
    else
        block_row_bits(4, q, sz, N, K, gs, row0, xq, d, g, y);
}

void lowbit_expert(const uint16_t *x, const uint8_t *q13, const uint16_t *sz13, const uint8_t *q2, const uint16_t *sz2,
                   uint16_t *y, int64_t H, int64_t I, int64_t gs, int64_t bits, float weight, int8_t *xq, float *f,
                   int threads) {
    XCODE *xc = (XCODE *)xq, *hc = (XCODE *)(xq + 2 * H);
    float *h = f, *d = h + 2 * I, *g = d + H / QBLOCK, *d2 = g + H / QBLOCK, *g2 = d2 + I / QBLOCK;  // h [2I] = [gate; up]
    quantize_row(x, H, xc, d, g);
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (int64_t b = 0; b < 2 * I / 64; b++)
        block_row((int)bits, q13 + b * H * 8 * bits, sz13, 2 * I, H, gs, b * 64, xc, d, g, h + b * 64);
    for (int64_t i = 0; i < I; i++)
        h[i] = h[i] / (1.f + expf(-h[i])) * h[I + i];  // silu(gate) * up
    quantize_f32(h, I, hc, d2, g2);
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (int64_t b = 0; b < H / 64; b++) {
        float out[64];
        block_row((int)bits, q2 + b * I * 8 * bits, sz2, H, I, gs, b * 64, hc, d2, g2, out);
        store_weighted(y + b * 64, out, weight);
    }
}

/* Fused CPU kernels for gptft's training step (compiled and loaded by cpu_kernels.py): bf16 GELU, loss and attention
   passes, and dropout's masks in any precision.

Each replaces several passes of torch's eager operators over a large tensor with one loop that keeps its data in
the core's cache, and computes in fp32 the formula the torch code it replaces computes (-ffast-math may reorder its
sums; the tests hold each result to fp64). bf16 values are held as uint16_t (their bit patterns); loops run on
torch's own OpenMP threads (torch's libgomp is the process's). */

#include <math.h>
#include <stdint.h>

static inline float bf16_to_float(uint16_t v) {
    union { uint32_t u; float f; } c = {.u = (uint32_t)v << 16};
    return c.f;
}

/* round to nearest even, as torch's cast; NaN stays NaN (integer tests: the file is built with -ffast-math) */
static inline uint16_t float_to_bf16(float f) {
    union { float f; uint32_t u; } c = {.f = f};
    if ((c.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((c.u >> 16) | 0x40u);
    return (uint16_t)((c.u + 0x7fffu + ((c.u >> 16) & 1u)) >> 16);
}

#define GELU_BETA 0.7978845608028654f /* sqrt(2 / pi) */
#define GELU_KAPPA 0.044715f
#define BLOCK 4096

/* y = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))): torch's gelu(approximate="tanh") */
void gelu_tanh_bf16(const uint16_t *x, uint16_t *y, int64_t n) {
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < n; b += BLOCK) {
        int64_t end = b + BLOCK < n ? b + BLOCK : n;
        for (int64_t i = b; i < end; i++) {
            float v = bf16_to_float(x[i]);
            float t = tanhf(GELU_BETA * (v + GELU_KAPPA * v * v * v));
            y[i] = float_to_bf16(0.5f * v * (1.0f + t));
        }
    }
}

/* dx = dy * d gelu_tanh(x) / dx, as torch's gelu_backward(approximate="tanh") writes it */
void gelu_tanh_backward_bf16(const uint16_t *dy, const uint16_t *x, uint16_t *dx, int64_t n) {
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < n; b += BLOCK) {
        int64_t end = b + BLOCK < n ? b + BLOCK : n;
        for (int64_t i = b; i < end; i++) {
            float v = bf16_to_float(x[i]), v2 = v * v;
            float t = tanhf(GELU_BETA * (v + GELU_KAPPA * v2 * v));
            float left = 0.5f * v, right = 1.0f + t;
            float derivative = 0.5f * right + left * (1.0f - t * t) * GELU_BETA * (1.0f + 3.0f * GELU_KAPPA * v2);
            dx[i] = float_to_bf16(bf16_to_float(dy[i]) * derivative);
        }
    }
}

/* Cross-entropy of `rows` rows of bf16 logits (row-major, `cols` wide): each row's log-sum-exp and its target's
   logit in fp32. With `grad`, each row is then overwritten, in bf16, with weight * (softmax - one_hot(target)): the
   gradient of weight * loss with respect to the logits. The sum of exponentials runs over blocks of 256 in fp32,
   the blocks summed in fp64. A row is three passes over 100 KB (GPT-2's 50,257 logits): they stay in the cache. */
void cross_entropy_bf16(uint16_t *logits, int64_t rows, int64_t cols, const int64_t *targets, const float *weights,
                        float *lse, float *target_logit, int grad) {
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        uint16_t *x = logits + r * cols;
        float m = bf16_to_float(x[0]);
        for (int64_t j = 1; j < cols; j++) {
            float v = bf16_to_float(x[j]);
            m = v > m ? v : m;
        }
        double total = 0.0;
        for (int64_t b = 0; b < cols; b += 256) {
            int64_t end = b + 256 < cols ? b + 256 : cols;
            float block = 0.0f;
            for (int64_t j = b; j < end; j++) block += expf(bf16_to_float(x[j]) - m);
            total += block;
        }
        int64_t t = targets[r];
        float target_value = bf16_to_float(x[t]);
        lse[r] = m + (float)log(total);
        target_logit[r] = target_value;
        if (!grad) continue;
        float scale = (float)(weights[r] / total);
        for (int64_t j = 0; j < cols; j++) x[j] = float_to_bf16(expf(bf16_to_float(x[j]) - m) * scale);
        x[t] = float_to_bf16(expf(target_value - m) * scale - weights[r]);
    }
}

/* Attention's weights from its scores, for `rows` rows (batch × heads × queries, query i of each q_len at row
   i mod q_len) of `cols` keys, causal: query i sees keys 0 .. i + offset. probs = softmax over the keys it sees
   (fp32 inside, rounded to bf16 once, 0 beyond), dropped = probs where keep is 1, else 0 (dropout's scale is the
   caller's). One pass over each row in the cache, where torch makes six: the mask added, the casts to fp32 and
   back, the softmax's, the mask's product. */
void attention_probs_bf16(const uint16_t *scores, uint16_t *probs, uint16_t *dropped, const uint8_t *keep,
                          int64_t rows, int64_t cols, int64_t q_len, int64_t offset) {
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *s = scores + r * cols;
        uint16_t *p = probs + r * cols, *d = dropped + r * cols;
        const uint8_t *k = keep + r * cols;
        int64_t seen = r % q_len + offset + 1;
        seen = seen < cols ? seen : cols;
        float m = bf16_to_float(s[0]), total = 0.0f;
        for (int64_t j = 1; j < seen; j++) {
            float v = bf16_to_float(s[j]);
            m = v > m ? v : m;
        }
        for (int64_t j = 0; j < seen; j++) total += expf(bf16_to_float(s[j]) - m);
        float inverse = 1.0f / total;
        for (int64_t j = 0; j < seen; j++) {
            uint16_t v = float_to_bf16(expf(bf16_to_float(s[j]) - m) * inverse);
            p[j] = v;
            d[j] = k[j] ? v : 0;
        }
        for (int64_t j = seen; j < cols; j++) p[j] = d[j] = 0;
    }
}

/* The scores' gradient from the dropped weights' gradient: with g = grad_dropped where keep is 1 (else 0),
   grad_scores = probs * (g - sum_j g_j probs_j), in fp32, rounded to bf16 once. */
void attention_probs_backward_bf16(const uint16_t *grad_dropped, const uint16_t *probs, const uint8_t *keep,
                                   uint16_t *grad_scores, int64_t rows, int64_t cols) {
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *g = grad_dropped + r * cols, *p = probs + r * cols;
        const uint8_t *k = keep + r * cols;
        uint16_t *out = grad_scores + r * cols;
        float dot = 0.0f;
        for (int64_t j = 0; j < cols; j++) dot += (k[j] ? bf16_to_float(g[j]) : 0.0f) * bf16_to_float(p[j]);
        for (int64_t j = 0; j < cols; j++)
            out[j] = float_to_bf16(bf16_to_float(p[j]) * ((k[j] ? bf16_to_float(g[j]) : 0.0f) - dot));
    }
}

/* SplitMix64 of a counter: the i-th number of the stream keyed by `key` (Steele, Lea and Flood 2014) */
static inline uint64_t splitmix64(uint64_t key, uint64_t i) {
    uint64_t z = key + (i + 1) * 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* keep[4i + j] = 1 where the j-th 16-bit lane of splitmix64(key, i), read as a signed integer, is at least
   `threshold`, else 0: each element dropped with probability (threshold + 32768) / 65536. A counter-based stream:
   the same mask whatever the thread count. */
void keep_mask(uint8_t *keep, int64_t n, uint64_t key, int32_t threshold) {
    int64_t words = n / 4;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < words; b += BLOCK) {
        int64_t end = b + BLOCK < words ? b + BLOCK : words;
        for (int64_t i = b; i < end; i++) {
            uint64_t z = splitmix64(key, (uint64_t)i);
            for (int j = 0; j < 4; j++) keep[4 * i + j] = (int16_t)(z >> (16 * j)) >= threshold;
        }
    }
    uint64_t z = splitmix64(key, (uint64_t)words); /* the last, partial word */
    for (int64_t k = 4 * words; k < n; k++) keep[k] = (int16_t)(z >> (16 * (k - 4 * words))) >= threshold;
}

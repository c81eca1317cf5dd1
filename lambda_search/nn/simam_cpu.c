/* SimAM on the CPU, forward and closed-form backward, for float32 in NCHW or channels-last
 * layout. Built at first use by lambda_search._kernels (the same compiler torch.compile uses
 * on the CPU); lambda_search falls back to plain PyTorch operations where it cannot be built.
 *
 * Per channel plane of N = H*W neurons, n = N - 1:
 *   mu  = mean(x),  t = x - mu,  d = t^2
 *   inv = 1 / (4 (sum(d) / n + lambda))
 *   s   = sigmoid(d * inv + 1/2),  out = x * s
 * Backward, with g = dL/dout and a = g x s (1 - s):
 *   dL/dx = g s + 2 t (a inv + k1) - k2,
 *   k1 = -4 inv^2 sum(a d) / n,  k2 = 2 inv sum(a t) / N.
 * One image at a time (its planes stay in the core's cache), images in parallel. Only x and
 * the per-plane mu and inv are kept for the backward, which evaluates s again: writing and
 * reading back a tensor of s costs more memory traffic than the exponentials. */
#include <stdint.h>
#include <string.h>
#include <math.h>

#define INLINE static inline __attribute__((always_inline))

/* sigmoid(d * inv + 1/2) = 1 / (1 + 2^a), a = -(d * inv + 1/2) log2(e) <= 0. a = k + f with k
 * an integer and |f| <= 1/2; 2^f by Cephes' exp2f polynomial (1.7e-7 relative), 2^k put in the
 * exponent bits (a is clamped at -126, where 2^a no longer moves 1 + 2^a). Base 2 takes four
 * fewer operations than Cephes' expf (about 15 % of the kernel); branch-free, so that the
 * compiler vectorises the loops using it. */
#define LOG2E 1.44269504088896341f
INLINE float sigmoid_of(float d, float inv) {
    float a = -(d * (inv * LOG2E) + 0.5f * LOG2E);
    a = a > -126.0f ? a : -126.0f;
    float t = a + 12582912.0f; /* round(a) by adding 1.5 * 2^23 */
    float k = t - 12582912.0f;
    int32_t n;
    memcpy(&n, &t, 4);
    n -= 0x4B400000;
    float f = a - k;
    float p = 1.535336188319500e-4f;
    p = p * f + 1.339887440266574e-3f;
    p = p * f + 9.618437357674640e-3f;
    p = p * f + 5.550332471162809e-2f;
    p = p * f + 2.402264791363012e-1f;
    p = p * f + 6.931472028550421e-1f;
    p = p * f + 1.0f;
    int32_t bits = (n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return 1.0f / (1.0f + p * scale);
}

/* ---- one image, channels innermost: x[N][C] */

/* mu and inv = 1 / (4 (var + lambda)) of every channel plane of one image */
INLINE void plane_stats_cl(const float *restrict x, float *restrict mu, float *restrict inv,
                           const float *restrict lam, const int64_t C, int64_t N) {
    float acc[C];
    for (int64_t c = 0; c < C; c++) acc[c] = 0.f;
    for (int64_t p = 0; p < N; p++)
        _Pragma("omp simd") for (int64_t c = 0; c < C; c++) acc[c] += x[p * C + c];
    for (int64_t c = 0; c < C; c++) { mu[c] = acc[c] / (float)N; acc[c] = 0.f; }
    for (int64_t p = 0; p < N; p++)
        _Pragma("omp simd") for (int64_t c = 0; c < C; c++) { float t = x[p * C + c] - mu[c]; acc[c] += t * t; }
    for (int64_t c = 0; c < C; c++) inv[c] = 1.0f / (4.0f * (acc[c] / (float)(N - 1) + lam[c]));
}

INLINE void forward_cl(const float *restrict x, float *restrict out, float *restrict mu, float *restrict inv,
                       const float *restrict lam, const int64_t C, int64_t N) {
    plane_stats_cl(x, mu, inv, lam, C, N);
    for (int64_t p = 0; p < N; p++)
        _Pragma("omp simd") for (int64_t c = 0; c < C; c++) {
            float xv = x[p * C + c], t = xv - mu[c];
            out[p * C + c] = xv * sigmoid_of(t * t, inv[c]);
        }
}

/* SimAM's backward for one image, given go = ka g + kb o + kc at every neuron (o = x s is
 * SimAM's output): go = g alone, or BatchNorm's backward folded in where the two are fused.
 * out holds s between the two passes (the image's planes are in cache). */
INLINE void backward_cl_affine(const float *restrict xb, const float *restrict m, const float *restrict iv,
                               const float *restrict gb, const float *restrict ka, const float *restrict kb,
                               const float *restrict kc, float *restrict out, const int64_t C, int64_t N) {
    float s1[C], s2[C], k1[C], k2[C];
    for (int64_t c = 0; c < C; c++) { s1[c] = 0.f; s2[c] = 0.f; }
    for (int64_t p = 0; p < N; p++)
        _Pragma("omp simd") for (int64_t c = 0; c < C; c++) {
            int64_t i = p * C + c;
            float xv = xb[i], t = xv - m[c], s = sigmoid_of(t * t, iv[c]);
            float go = ka[c] * gb[i] + kb[c] * (xv * s) + kc[c];
            float a = go * xv * s * (1.0f - s);
            out[i] = s;
            s1[c] += a * t * t;
            s2[c] += a * t;
        }
    for (int64_t c = 0; c < C; c++) {
        k1[c] = -4.0f * s1[c] * iv[c] * iv[c] / (float)(N - 1);
        k2[c] = 2.0f * iv[c] * s2[c] / (float)N;
    }
    for (int64_t p = 0; p < N; p++)
        _Pragma("omp simd") for (int64_t c = 0; c < C; c++) {
            int64_t i = p * C + c;
            float xv = xb[i], t = xv - m[c], s = out[i];
            float go = ka[c] * gb[i] + kb[c] * (xv * s) + kc[c];
            float a = go * xv * s * (1.0f - s);
            out[i] = go * s + 2.0f * t * (a * iv[c] + k1[c]) - k2[c];
        }
}

INLINE void backward_cl(const float *restrict x, const float *restrict g, const float *restrict mu,
                        const float *restrict inv, float *restrict gx, const int64_t C, int64_t N) {
    float one[C], zero[C];
    for (int64_t c = 0; c < C; c++) { one[c] = 1.f; zero[c] = 0.f; }
    backward_cl_affine(x, mu, inv, g, one, zero, zero, gx, C, N);
}

/* ---- one image, planes contiguous: x[C][N] */

INLINE void forward_planes(const float *restrict x, float *restrict out, float *restrict mu, float *restrict inv,
                           const float *restrict lam, int64_t C, int64_t N) {
    for (int64_t c = 0; c < C; c++) {
        const float *xp = x + c * N;
        float *op = out + c * N;
        float sum = 0.f, var = 0.f;
        _Pragma("omp simd reduction(+:sum)") for (int64_t p = 0; p < N; p++) sum += xp[p];
        const float m = sum / (float)N;
        _Pragma("omp simd reduction(+:var)") for (int64_t p = 0; p < N; p++) { float t = xp[p] - m; var += t * t; }
        const float iv = 1.0f / (4.0f * (var / (float)(N - 1) + lam[c]));
        _Pragma("omp simd") for (int64_t p = 0; p < N; p++) {
            float t = xp[p] - m;
            op[p] = xp[p] * sigmoid_of(t * t, iv);
        }
        mu[c] = m;
        inv[c] = iv;
    }
}

INLINE void backward_planes(const float *restrict x, const float *restrict g, const float *restrict mu,
                            const float *restrict inv, float *restrict gx, int64_t C, int64_t N) {
    for (int64_t c = 0; c < C; c++) {
        const float *xp = x + c * N, *gp = g + c * N;
        float *op = gx + c * N;
        const float m = mu[c], iv = inv[c];
        float s1 = 0.f, s2 = 0.f;
        _Pragma("omp simd reduction(+:s1,s2)") for (int64_t p = 0; p < N; p++) {
            float t = xp[p] - m, s = sigmoid_of(t * t, iv);
            float a = gp[p] * xp[p] * s * (1.0f - s);
            op[p] = s;
            s1 += a * t * t;
            s2 += a * t;
        }
        const float k1 = -4.0f * s1 * iv * iv / (float)(N - 1), k2 = 2.0f * iv * s2 / (float)N;
        _Pragma("omp simd") for (int64_t p = 0; p < N; p++) {
            float t = xp[p] - m, s = op[p];
            float a = gp[p] * xp[p] * s * (1.0f - s);
            op[p] = gp[p] * s + 2.0f * t * (a * iv + k1) - k2;
        }
    }
}

/* channels-last loops specialised for the networks' widths, so that C is a constant */
#define BY_WIDTH(CALL, C)                                                                         \
    switch (C) {                                                                                  \
    case 16: CALL(16); break;                                                                     \
    case 32: CALL(32); break;                                                                     \
    case 64: CALL(64); break;                                                                     \
    case 128: CALL(128); break;                                                                   \
    case 256: CALL(256); break;                                                                   \
    case 512: CALL(512); break;                                                                   \
    default: CALL(C);                                                                             \
    }

/* x, out: (B, C, N) or (B, N, C); mu, inv: (B, C); lam: (C,) */
void simam_forward(const float *x, float *out, float *mu, float *inv, const float *lam, int64_t B, int64_t C,
                   int64_t N, int channels_last, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < B; b++) {
        int64_t o = b * C * N;
        if (channels_last) {
#define F(CC) forward_cl(x + o, out + o, mu + b * C, inv + b * C, lam, CC, N)
            BY_WIDTH(F, C)
#undef F
        } else {
            forward_planes(x + o, out + o, mu + b * C, inv + b * C, lam, C, N);
        }
    }
}

void simam_backward(const float *x, const float *g, const float *mu, const float *inv, float *gx, int64_t B,
                    int64_t C, int64_t N, int channels_last, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < B; b++) {
        int64_t o = b * C * N;
        if (channels_last) {
#define G(CC) backward_cl(x + o, g + o, mu + b * C, inv + b * C, gx + o, CC, N)
            BY_WIDTH(G, C)
#undef G
        } else {
            backward_planes(x + o, g + o, mu + b * C, inv + b * C, gx + o, C, N);
        }
    }
}

/* ---- SimAM followed by training-mode BatchNorm, fused; channels last, x[B][N][C] ----
 * o = SimAM(x) is never stored: both passes over the batch recompute it from x, with the
 * per-plane mu and inv of the first. Forward: (1) per image, mu and inv, and the channel sums
 * of o and o^2 (double); (2) y = o * scale + shift. Backward: (1) per image, the channel sums
 * of gy and gy * o; (2) go = ka gy + kb o + kc (BatchNorm's backward), then SimAM's. */

INLINE void simbn_stats_img(const float *restrict xb, float *restrict m, float *restrict iv,
                            const float *restrict lam, double *restrict so, double *restrict soo, const int64_t C,
                            int64_t N) {
    float s1[C], s2[C];
    plane_stats_cl(xb, m, iv, lam, C, N);
    for (int64_t c = 0; c < C; c++) { s1[c] = 0.f; s2[c] = 0.f; }
    for (int64_t p = 0; p < N; p++)
        _Pragma("omp simd") for (int64_t c = 0; c < C; c++) {
            float xv = xb[p * C + c], t = xv - m[c];
            float o = xv * sigmoid_of(t * t, iv[c]);
            s1[c] += o;
            s2[c] += o * o;
        }
    for (int64_t c = 0; c < C; c++) { so[c] = s1[c]; soo[c] = s2[c]; }
}

INLINE void simbn_apply_img(const float *restrict xb, const float *restrict m, const float *restrict iv,
                            const float *restrict scale, const float *restrict shift, float *restrict yb,
                            const int64_t C, int64_t N) {
    for (int64_t p = 0; p < N; p++)
        _Pragma("omp simd") for (int64_t c = 0; c < C; c++) {
            float xv = xb[p * C + c], t = xv - m[c];
            yb[p * C + c] = xv * sigmoid_of(t * t, iv[c]) * scale[c] + shift[c];
        }
}

INLINE void simbn_reduce_img(const float *restrict xb, const float *restrict m, const float *restrict iv,
                             const float *restrict gb, double *restrict sg, double *restrict sgo, const int64_t C,
                             int64_t N) {
    float s1[C], s2[C];
    for (int64_t c = 0; c < C; c++) { s1[c] = 0.f; s2[c] = 0.f; }
    for (int64_t p = 0; p < N; p++)
        _Pragma("omp simd") for (int64_t c = 0; c < C; c++) {
            float xv = xb[p * C + c], t = xv - m[c];
            float o = xv * sigmoid_of(t * t, iv[c]), g = gb[p * C + c];
            s1[c] += g;
            s2[c] += g * o;
        }
    for (int64_t c = 0; c < C; c++) { sg[c] = s1[c]; sgo[c] = s2[c]; }
}

/* per-image sums in float (N terms), across images in double */
static void simbn_stats(const float *x, float *mu, float *inv, const float *lam, double *so, double *soo, int64_t B,
                 int64_t C, int64_t N, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < B; b++) {
#define F(CC) simbn_stats_img(x + b * C * N, mu + b * C, inv + b * C, lam, so + b * C, soo + b * C, CC, N)
        BY_WIDTH(F, C)
#undef F
    }
}

static void simbn_apply(const float *x, const float *mu, const float *inv, const float *scale, const float *shift,
                 float *y, int64_t B, int64_t C, int64_t N, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < B; b++) {
#define F(CC) simbn_apply_img(x + b * C * N, mu + b * C, inv + b * C, scale, shift, y + b * C * N, CC, N)
        BY_WIDTH(F, C)
#undef F
    }
}

static void simbn_reduce(const float *x, const float *mu, const float *inv, const float *gy, double *sg, double *sgo,
                  int64_t B, int64_t C, int64_t N, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < B; b++) {
#define F(CC) simbn_reduce_img(x + b * C * N, mu + b * C, inv + b * C, gy + b * C * N, sg + b * C, sgo + b * C, CC, N)
        BY_WIDTH(F, C)
#undef F
    }
}

static void simbn_backward(const float *x, const float *mu, const float *inv, const float *gy, const float *ka,
                    const float *kb, const float *kc, float *gx, int64_t B, int64_t C, int64_t N, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < B; b++) {
#define F(CC) backward_cl_affine(x + b * C * N, mu + b * C, inv + b * C, gy + b * C * N, ka, kb, kc, \
                                 gx + b * C * N, CC, N)
        BY_WIDTH(F, C)
#undef F
    }
}

/* The whole of SimAM then training-mode BatchNorm, one call each way (the per-channel
 * arithmetic between the passes is C's too, so that a layer costs no small tensor ops).
 * Forward: the batch statistics of o = SimAM(x) (mean, biased variance, in double), the
 * running statistics (momentum, unbiased variance), y = o * scale + shift; saved = (mean, r)
 * with r = 1 / sqrt(var + eps). Backward: gweight, gbias and gx. scratch: 2 B C doubles. */
void simbn_forward(const float *x, float *y, float *mu, float *inv, const float *lam, const float *weight,
                   const float *bias, float *running_mean, float *running_var, double momentum, double eps,
                   double *scratch, double *saved, int64_t B, int64_t C, int64_t N, int threads) {
    double *so = scratch, *soo = scratch + B * C;
    float scale[C], shift[C];
    const double count = (double)B * (double)N;
    simbn_stats(x, mu, inv, lam, so, soo, B, C, N, threads);
    for (int64_t c = 0; c < C; c++) {
        double s = 0.0, ss = 0.0;
        for (int64_t b = 0; b < B; b++) { s += so[b * C + c]; ss += soo[b * C + c]; }
        const double mean = s / count, var0 = ss / count - mean * mean, var = var0 > 0.0 ? var0 : 0.0;
        const double r = 1.0 / sqrt(var + eps), w = weight[c];
        scale[c] = (float)(w * r);
        shift[c] = (float)((double)bias[c] - mean * w * r);
        saved[c] = mean;
        saved[C + c] = r;
        const double unbiased = var * (count / (count > 1.0 ? count - 1.0 : 1.0));
        running_mean[c] = (float)((1.0 - momentum) * running_mean[c] + momentum * mean);
        running_var[c] = (float)((1.0 - momentum) * running_var[c] + momentum * unbiased);
    }
    simbn_apply(x, mu, inv, scale, shift, y, B, C, N, threads);
}

void simbn_backward_full(const float *x, const float *mu, const float *inv, const float *gy, const float *weight,
                         const double *saved, double *scratch, float *gx, float *gweight, float *gbias, int64_t B,
                         int64_t C, int64_t N, int threads) {
    double *sg = scratch, *sgo = scratch + B * C;
    float ka[C], kb[C], kc[C];
    const double count = (double)B * (double)N;
    simbn_reduce(x, mu, inv, gy, sg, sgo, B, C, N, threads);
    for (int64_t c = 0; c < C; c++) {
        double gb = 0.0, go = 0.0;
        for (int64_t b = 0; b < B; b++) { gb += sg[b * C + c]; go += sgo[b * C + c]; }
        const double mean = saved[c], r = saved[C + c], w = weight[c];
        const double gw = r * (go - mean * gb); /* sum of gy * xhat */
        ka[c] = (float)(w * r);
        kb[c] = (float)(-w * r * r * gw / count);
        kc[c] = (float)(-w * r * gb / count + w * r * r * gw * mean / count);
        gweight[c] = (float)gw;
        gbias[c] = (float)gb;
    }
    simbn_backward(x, mu, inv, gy, ka, kb, kc, gx, B, C, N, threads);
}

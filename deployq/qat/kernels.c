/* The fake quantizers' forward and backward on the CPU, for deployq.qat.native (compiled at first
 * use with the machine's C compiler, loaded with ctypes, called with the tensors' data pointers).
 *
 * Every tensor is float32 and contiguous; x in the grouped layout (outer, channels, inner). What
 * the quantizer stores (deployq.qat.fake_quant.Rule) has one value per channel: the scale s
 * (already exp'd for LSQ's log scale, by torch, so that it equals what the export reads), an
 * optional floor on it, and the zero point. The work is split into tasks of about CHUNK elements,
 * run on `threads` OpenMP threads: torch's own runtime, since the library that torch loads has the
 * same soname.
 *
 * SERIAL: a single task (a tensor of at most CHUNK elements) runs on the calling thread, without
 * entering a parallel region, whose start and end cost more than such a task's work.
 *
 * Forward: y = (clamp(rint(x / s) + zp, qmin, qmax) - zp) * s in float32 with s = max(s, floor)
 * and, for a learned zero point, zp = clamp(rint(zp), qmin, qmax): the operations and their order
 * of deployq.core.qformula (true division, ties to even), so it equals the eager torch forward bit
 * for bit. Compile without -ffast-math and with -ffp-contract=off: no reciprocal, and no fused
 * multiply-add but the backward's explicit fmaf calls (gradients only).
 *
 * Backward (deployq.qat.fake_quant.FakeQuantize's docstring has the formulas): grad_x per element;
 * the gradients of the stored scale and zero point per channel (LSQ's factor g applied, and s for
 * a log scale), and of DSQ's alpha (dsq != 0; else the straight-through gradient). Partial sums
 * per unit of work are kept in double and added in a fixed order, so the result does not depend
 * on the thread count. It returns 1 where it cannot allocate, else 0.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define CHUNK 16384

static inline float clamp_code(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

/* The scale and zero point the forward uses, per channel, from the stored ones (torch.maximum's
 * and torch.clamp(torch.round(.))'s results for numbers). */
static void used_qparams(const float *scale, const float *floor, const float *zero_point, int learned_zero_point,
                         float qmin, float qmax, int64_t channels, float *s, float *zp) {
    for (int64_t c = 0; c < channels; ++c) {
        s[c] = floor != NULL && floor[c] > scale[c] ? floor[c] : scale[c];
        zp[c] = learned_zero_point ? clamp_code(nearbyintf(zero_point[c]), qmin, qmax) : zero_point[c];
    }
}

/* exp(v) for |v| < ~80, within ~2 float ulp, in operations a compiler vectorizes: 2^n * 2^f with
 * n = round(v / ln 2), f the rest; 2^f by its Taylor series to degree 7 on |f| <= 1/2, in fused
 * multiply-adds (the gradients only: the forward has no multiply-add to fuse). */
static inline float exp_approx(float v) {
    const float n = nearbyintf(v * 1.44269504f);
    const float a = 0.69314718f * (v * 1.44269504f - n);
    float p = 1.9841270e-4f;
    p = fmaf(p, a, 1.3888889e-3f);
    p = fmaf(p, a, 8.3333333e-3f);
    p = fmaf(p, a, 4.1666667e-2f);
    p = fmaf(p, a, 1.6666667e-1f);
    p = fmaf(p, a, 0.5f);
    p = fmaf(p, a, 1.0f);
    p = fmaf(p, a, 1.0f);
    const union { int32_t bits; float value; } two_n = {((int32_t)n + 127) << 23};
    return p * two_n.value;
}

/* The work in units: a unit is CHUNK elements of one row (or the whole row, when shorter); a task
 * is enough consecutive units for about CHUNK elements, so that short rows (a per-channel weight of
 * 4 values per channel) do not each cost a task. */
typedef struct { int64_t per_row, units, per_task, tasks; } split;

static split split_work(int64_t rows, int64_t inner) {
    split w;
    w.per_row = (inner + CHUNK - 1) / CHUNK;
    w.units = rows * w.per_row;
    w.per_task = inner >= CHUNK ? 1 : CHUNK / (inner > 0 ? inner : 1);
    w.tasks = (w.units + w.per_task - 1) / w.per_task;
    return w;
}

/* Unit u: its row, its first element within the row and its length. */
static inline void unit_range(split w, int64_t inner, int64_t u, int64_t *row, int64_t *start, int64_t *n) {
    *row = u / w.per_row;
    *start = (u % w.per_row) * CHUNK;
    *n = (*start + CHUNK < inner ? *start + CHUNK : inner) - *start;
}

/* One task of the forward: its units of x into y. */
static void forward_task(split w, int64_t task, const float *x, const float *s, const float *zp, float qmin,
                         float qmax, float *y, int64_t channels, int64_t inner) {
    const int64_t last = (task + 1) * w.per_task < w.units ? (task + 1) * w.per_task : w.units;
    for (int64_t u = task * w.per_task; u < last; ++u) {
        int64_t row, start, n;
        unit_range(w, inner, u, &row, &start, &n);
        const float sc = s[row % channels], z = zp[row % channels];
        const float *restrict xr = x + row * inner + start;
        float *restrict yr = y + row * inner + start;
        #pragma omp simd
        for (int64_t i = 0; i < n; ++i) {
            const float q = clamp_code(nearbyintf(xr[i] / sc) + z, qmin, qmax);
            yr[i] = (q - z) * sc;
        }
    }
}

int deployq_forward(const float *x, const float *scale, const float *floor, const float *zero_point,
                    int learned_zero_point, float qmin, float qmax, float *y,
                    int64_t outer, int64_t channels, int64_t inner, int threads) {
    float *s = malloc(sizeof(float) * (2 * (size_t)channels + 1)), *zp = s + channels;  /* + 1: never malloc(0) */
    if (s == NULL)
        return 1;
    used_qparams(scale, floor, zero_point, learned_zero_point, qmin, qmax, channels, s, zp);
    const split w = split_work(outer * channels, inner);
    if (w.tasks == 1) {
        forward_task(w, 0, x, s, zp, qmin, qmax, y, channels, inner);  /* see SERIAL */
    } else {
        #pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t task = 0; task < w.tasks; ++task)
            forward_task(w, task, x, s, zp, qmin, qmax, y, channels, inner);
    }
    free(s);
    return 0;
}

/* DSQ's per-quantizer constants: k = log(2/alpha - 1), and the factors of the slope and of
 * d(soft)/d(alpha), computed once in float as the eager torch code does. */
typedef struct { float k2, slope, du, dt; } dsq_factors;

static dsq_factors dsq_setup(float alpha) {
    const float k = logf(2.0f / alpha - 1.0f), half = tanhf(0.5f * k);
    const float dk = -2.0f / (alpha * (2.0f - alpha));
    dsq_factors f = {2.0f * k, 0.5f * k / half, 0.5f * dk / half, 0.25f * dk * (1.0f - half * half) / (half * half)};
    return f;
}

/* One chunk of one row: grad_x, and the sums of the terms of dL/ds, dL/dzp, dL/dalpha into sums[3].
 * `dsq` is a compile-time constant at each call, so each variant is its own vector loop. */
static inline __attribute__((always_inline)) void backward_chunk(const float *restrict grad, const float *restrict x, float *restrict grad_x,
                                  int64_t n, float sc, float z, float qmin, float qmax, int dsq, dsq_factors f,
                                  double *sums) {
    const float below_term = qmin - z, above_term = qmax - z, k2 = f.k2, fs = f.slope, du = f.du, dt = f.dt;
    float sum_s = 0.0f, sum_zp = 0.0f, sum_alpha = 0.0f;
    #pragma omp simd reduction(+ : sum_s, sum_zp, sum_alpha)
    for (int64_t i = 0; i < n; ++i) {
        const float v = x[i] / sc, r = nearbyintf(v), level = r + z, g = grad[i];
        /* selects as arithmetic on 0/1 (exact for finite values): AVX2 vectorizes no other form */
        const float in = (float)((level >= qmin) & (level <= qmax));  /* 1 inside the code range */
        const float clamped = level < qmin ? below_term : above_term;
        float slope = 1.0f, dsoft = 0.0f;
        if (dsq) {
            const float d = v - r, u = d + copysignf(0.5f, -d);  /* v - floor(v) - 1/2, without floorf or a select */
            const float t = 1.0f - 2.0f / (exp_approx(k2 * u) + 1.0f);  /* tanh(k u) */
            const float bell = 1.0f - t * t;
            slope = bell * fs;
            dsoft = u * bell * du - t * dt;
        }
        grad_x[i] = g * slope * in;
        sum_s += (in * (r - slope * v) + (1.0f - in) * clamped) * g;
        sum_zp -= (1.0f - in) * sc * g;
        sum_alpha += in * g * sc * dsoft;
    }
    sums[0] = sum_s;
    sums[1] = sum_zp;
    sums[2] = sum_alpha;
}

/* One task of the backward: grad_x of its units, and each unit's three sums into part. */
static void backward_task(split w, int64_t task, const float *grad, const float *x, const float *s, const float *zp,
                          float qmin, float qmax, int dsq, dsq_factors f, float *grad_x, double *part,
                          int64_t channels, int64_t inner) {
    const int64_t last = (task + 1) * w.per_task < w.units ? (task + 1) * w.per_task : w.units;
    for (int64_t u = task * w.per_task; u < last; ++u) {
        int64_t row, start, n;
        unit_range(w, inner, u, &row, &start, &n);
        const int64_t at = row * inner + start, c = row % channels;
        if (dsq)
            backward_chunk(grad + at, x + at, grad_x + at, n, s[c], zp[c], qmin, qmax, 1, f, part + 3 * u);
        else
            backward_chunk(grad + at, x + at, grad_x + at, n, s[c], zp[c], qmin, qmax, 0, f, part + 3 * u);
    }
}

int deployq_backward(const float *grad, const float *x, const float *scale, const float *floor,
                     const float *zero_point, int learned_zero_point, int dsq, float alpha, float alpha_low,
                     float alpha_high, float qmin, float qmax,
                     float g, int log_scale, float *grad_x, float *grad_scale, float *grad_zero_point,
                     float *grad_alpha, int64_t outer, int64_t channels, int64_t inner, int threads) {
    const float alpha_used = clamp_code(alpha, alpha_low, alpha_high);  /* fake_quant.ALPHA_RANGE */
    const dsq_factors f = dsq ? dsq_setup(alpha_used) : (dsq_factors){0.0f, 1.0f, 0.0f, 0.0f};
    const split w = split_work(outer * channels, inner);
    double *part = malloc(sizeof(double) * 3 * ((size_t)w.units + 1));  /* + 1: never malloc(0) */
    float *s = malloc(sizeof(float) * (2 * (size_t)channels + 1)), *zp = s == NULL ? NULL : s + channels;
    if (part == NULL || s == NULL) {
        free(part);
        free(s);
        return 1;
    }
    used_qparams(scale, floor, zero_point, learned_zero_point, qmin, qmax, channels, s, zp);
    if (w.tasks == 1) {
        backward_task(w, 0, grad, x, s, zp, qmin, qmax, dsq, f, grad_x, part, channels, inner);  /* see SERIAL */
    } else {
        #pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t task = 0; task < w.tasks; ++task)
            backward_task(w, task, grad, x, s, zp, qmin, qmax, dsq, f, grad_x, part, channels, inner);
    }
    double alpha_total = 0.0;
    for (int64_t c = 0; c < channels; ++c) {
        double total_s = 0.0, total_zp = 0.0;
        for (int64_t o = 0; o < outer; ++o)
            for (int64_t k = 0; k < w.per_row; ++k) {
                const int64_t u = (o * channels + c) * w.per_row + k;
                total_s += part[3 * u];
                total_zp += part[3 * u + 1];
                alpha_total += part[3 * u + 2];
            }
        /* through s = max(stored, floor): 1 above the floor, half at a tie, 0 below (torch.maximum) */
        const double passed = floor == NULL || scale[c] > floor[c] ? 1.0 : (scale[c] == floor[c] ? 0.5 : 0.0);
        const float rounded = nearbyintf(zero_point[c]);
        const double zp_passed = !learned_zero_point || (rounded >= qmin && rounded <= qmax) ? 1.0 : 0.0;
        grad_scale[c] = (float)(total_s * passed * g * (log_scale ? scale[c] : 1.0f));
        grad_zero_point[c] = (float)(total_zp * zp_passed * g);
    }
    grad_alpha[0] = alpha >= alpha_low && alpha <= alpha_high ? (float)alpha_total : 0.0f;
    free(part);
    free(s);
    return 0;
}

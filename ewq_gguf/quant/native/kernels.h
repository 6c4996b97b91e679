/* The encoders of the native backend, included once per instruction set by kernels_<isa>.c.

Written from this package's torch codecs (kquants_affine.py, kquants_symmetric.py, legacy.py, iq4.py and the
searches of scale_search.py), which document ggml's float32 semantics: every operation is one IEEE float32 operation
in ggml's order, sums run left to right from ggml's start value, nearest_int is the 1.5*2**23 trick, no multiply-add
is fused (the build passes -ffp-contract=off and no -ffast-math).

Speed comes from running the same per-group arithmetic for LANES groups at once: the searches hold their groups
transposed, element i of every group in one row x[i][0..LANES), so every loop over a group's elements becomes a loop
over lanes that the compiler vectorizes, and the left-to-right sums of different groups run in independent lanes
(ggml's scalar code waits on one addition chain at a time). Per super-block work (the scales of the scales) is scalar.

The including file defines KERNEL(name), the name of the one exported function for its instruction set.
*/
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "types.h"

#define LANES 32              /* groups searched at once */
#define QK_K 256              /* elements of a k-quant super-block */
#define GROUP_MAX_EPS 1e-15f  /* a group whose largest magnitude is below this is stored as zeros */
#define ROUNDING_MAGIC 12582912.f

/* ------------------------------------------------------------------ scalar helpers */

static inline uint32_t float_bits(float value) { uint32_t bits; memcpy(&bits, &value, 4); return bits; }
static inline float bits_float(uint32_t bits) { float value; memcpy(&value, &bits, 4); return value; }

/* ggml's nearest_int: round half to even through the float addition of 1.5*2**23, read back as bits (also for
   values outside its asserted range and for NaN, as ggml computes them) */
static inline int32_t nearest_int(float value) {
    return (int32_t)(float_bits(value + ROUNDING_MAGIC) & 0x007fffff) - 0x00400000;
}

static inline int32_t clamp_int(int32_t value, int32_t low, int32_t high) {
    return value < low ? low : (value > high ? high : value);
}

/* ggml's fp16 of a float: round to nearest even, overflow to infinity, every NaN to 0x7E00 with its sign */
static inline uint16_t fp16_bits(float value) {
    uint32_t bits = float_bits(value);
    uint16_t sign = (uint16_t)((bits >> 16) & 0x8000);
    uint32_t magnitude = bits & 0x7fffffff;
    if (magnitude > 0x7f800000) return sign | 0x7e00;
    if (magnitude >= 0x47800000) return sign | 0x7c00;      /* 65536 and beyond, infinity */
    if (magnitude < 0x38800000) {                          /* below 2**-14: a subnormal half, in units of 2**-24 */
        float units = bits_float(magnitude) * 0x1p24f;     /* exact: a power-of-two scaling below 2**10 */
        return sign | (uint16_t)(float_bits(units + 0x1p23f) - float_bits(0x1p23f));  /* rounded half to even */
    }
    uint32_t rounded = magnitude + 0xfff + ((magnitude >> 13) & 1);  /* to nearest even on the 13 dropped bits */
    return sign | (uint16_t)((rounded - 0x38000000) >> 13);  /* exponent bias 127 -> 15; a carry may reach inf */
}

static inline float fp16_value(uint16_t half) {
    uint32_t sign = (uint32_t)(half & 0x8000) << 16;
    uint32_t exponent = (half >> 10) & 0x1f, mantissa = half & 0x3ff;
    if (exponent == 0) {
        float magnitude = (float)mantissa * 0x1p-24f;
        return sign ? -magnitude : magnitude;
    }
    if (exponent == 31) return bits_float(sign | 0x7f800000 | (mantissa << 13));
    return bits_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

/* Float bits as an int that orders like the float (-inf < ... < -0 < +0 < ... < inf; NaN beyond the infinities). */
static inline int32_t ordered_bits(float value) {
    int32_t bits = (int32_t)float_bits(value);
    return bits ^ (int32_t)((uint32_t)(bits >> 31) >> 1);
}

static inline float ordered_float(int32_t ordered) {
    return bits_float((uint32_t)(ordered ^ (int32_t)((uint32_t)(ordered >> 31) >> 1)));
}

/* the float32 a value takes after the fp16 round trip of a block header */
static inline float fp16_round(float value) { return fp16_value(fp16_bits(value)); }

static inline void put_fp16(uint8_t *out, float value) {
    uint16_t half = fp16_bits(value);
    out[0] = (uint8_t)(half & 0xff);
    out[1] = (uint8_t)(half >> 8);
}

/* ------------------------------------------------------------------ tiles: groups transposed into lanes */

/* Element i of group g at x[i][g], for `groups` groups of n values from src; lanes beyond them hold zeros. */
static void load_lanes(float (*x)[LANES], const float *src, int n, int groups) {
    for (int g = 0; g < LANES; ++g)
        for (int i = 0; i < n; ++i) x[i][g] = g < groups ? src[(int64_t)g * n + i] : 0.f;
}

/* ------------------------------------------------------------------ make_qkx2_quants / make_qkx3_quants */

/* Both searches of scale and minimum for LANES groups of n values (x, weights w transposed). They differ only in
   the flat-group test: `max == min` (qkx2) or `max <= min` (qkx3, flat_if_not_above). Returns per lane the scale,
   ggml's *the_min, and the levels (levels[i][g], 0..nmax).
   An accepted step moves the minimum that later steps start from, so the steps are sequential; the levels of the
   best step are recomputed at the end from the grid (iscale, minimum) that produced them. */
static inline __attribute__((always_inline)) void qkx_search(int n, int nmax, const float (*x)[LANES], const float (*w)[LANES], float rmin, float rdelta,
                       int nstep, int use_mad, int flat_if_not_above, float *scale_out, float *the_min_out,
                       uint8_t (*levels)[LANES]) {
    float low[LANES], high[LANES], sum_w[LANES], sum_x[LANES];
    float best_error[LANES], best_scale[LANES], best_min[LANES], grid_iscale[LANES], grid_min[LANES];
    int32_t flat[LANES];
    float trial[32][LANES];
    for (int g = 0; g < LANES; ++g) {
        low[g] = x[0][g];
        high[g] = x[0][g];
        sum_w[g] = w[0][g];
        sum_x[g] = sum_w[g] * x[0][g];
    }
    for (int i = 1; i < n; ++i)
        for (int g = 0; g < LANES; ++g) {
            float v = x[i][g];
            low[g] = v < low[g] ? v : low[g];
            high[g] = v > high[g] ? v : high[g];
            sum_w[g] += w[i][g];
            sum_x[g] += w[i][g] * v;
        }
    for (int g = 0; g < LANES; ++g) {
        low[g] = low[g] > 0 ? 0.f : low[g];
        flat[g] = flat_if_not_above ? high[g] <= low[g] : high[g] == low[g];
        float iscale = (float)nmax / (high[g] - low[g]);
        grid_iscale[g] = iscale;
        grid_min[g] = low[g];
        best_scale[g] = 1.f / iscale;
        best_min[g] = low[g];
        best_error[g] = 0.f;
    }
    for (int i = 0; i < n; ++i)
        for (int g = 0; g < LANES; ++g) {
            float level = (float)clamp_int(nearest_int(grid_iscale[g] * (x[i][g] - low[g])), 0, nmax);
            float diff = best_scale[g] * level + low[g] - x[i][g];
            diff = use_mad ? fabsf(diff) : diff * diff;
            best_error[g] += w[i][g] * diff;
        }
    for (int step = 0; step <= nstep; ++step) {
        float numerator = rmin + rdelta * (float)step + (float)nmax;
        float iscale[LANES], sum_l[LANES], sum_l2[LANES], sum_xl[LANES], error[LANES], this_scale[LANES],
            this_min[LANES], det[LANES];
        for (int g = 0; g < LANES; ++g) {
            iscale[g] = numerator / (high[g] - best_min[g]);
            sum_l[g] = sum_l2[g] = sum_xl[g] = 0.f;
        }
        for (int i = 0; i < n; ++i)
            for (int g = 0; g < LANES; ++g) {
                float level = (float)clamp_int(nearest_int(iscale[g] * (x[i][g] - best_min[g])), 0, nmax);
                float weighted = w[i][g] * level;
                trial[i][g] = level;
                sum_l[g] += weighted;
                sum_l2[g] += weighted * level;
                sum_xl[g] += weighted * x[i][g];
            }
        for (int g = 0; g < LANES; ++g) {
            det[g] = sum_w[g] * sum_l2[g] - sum_l[g] * sum_l[g];
            float s = (sum_w[g] * sum_xl[g] - sum_x[g] * sum_l[g]) / det[g];
            float m = (sum_l2[g] * sum_x[g] - sum_l[g] * sum_xl[g]) / det[g];
            float s_without_min = sum_xl[g] / sum_l2[g];
            this_scale[g] = m > 0 ? s_without_min : s;
            this_min[g] = m > 0 ? 0.f : m;
            error[g] = 0.f;
        }
        for (int i = 0; i < n; ++i)
            for (int g = 0; g < LANES; ++g) {
                float diff = this_scale[g] * trial[i][g] + this_min[g] - x[i][g];
                diff = use_mad ? fabsf(diff) : diff * diff;
                error[g] += w[i][g] * diff;
            }
        for (int g = 0; g < LANES; ++g) {
            int better = det[g] > 0 && error[g] < best_error[g];
            best_error[g] = better ? error[g] : best_error[g];
            best_scale[g] = better ? this_scale[g] : best_scale[g];
            grid_iscale[g] = better ? iscale[g] : grid_iscale[g];
            grid_min[g] = better ? best_min[g] : grid_min[g];
            best_min[g] = better ? this_min[g] : best_min[g];
        }
    }
    for (int i = 0; i < n; ++i)
        for (int g = 0; g < LANES; ++g) {
            int32_t level = clamp_int(nearest_int(grid_iscale[g] * (x[i][g] - grid_min[g])), 0, nmax);
            levels[i][g] = (uint8_t)(flat[g] ? 0 : level);
        }
    for (int g = 0; g < LANES; ++g) {
        scale_out[g] = flat[g] ? 0.f : best_scale[g];
        the_min_out[g] = -(flat[g] ? low[g] : best_min[g]);
    }
}

/* ------------------------------------------------------------------ make_qx_quants (rmse_type 1) */

/* The signed search for LANES groups of n values: a first scale from the largest magnitude, then 18 trial scales
   -(nmax + 0.1*is)/max, a trial kept where its fit sumlx^2/suml2 beats the best. Levels (0..2*nmax-1) and scale are
   all 0 for a group whose largest magnitude is below GROUP_MAX_EPS. */
static inline __attribute__((always_inline)) void qx_search(int n, int nmax, const float (*x)[LANES], const float (*w)[LANES], float *scale_out,
                      uint8_t (*levels)[LANES]) {
    float amax[LANES], signed_max[LANES], scale[LANES], best[LANES], best_iscale[LANES];
    for (int g = 0; g < LANES; ++g) amax[g] = signed_max[g] = 0.f;
    for (int i = 0; i < n; ++i)
        for (int g = 0; g < LANES; ++g) {
            float magnitude = fabsf(x[i][g]);
            int larger = magnitude > amax[g];
            signed_max[g] = larger ? x[i][g] : signed_max[g];
            amax[g] = larger ? magnitude : amax[g];
        }
    for (int trial = 0; trial < 19; ++trial) {
        /* trial 0: -nmax/max; then is = -9..9 without 0 */
        int is = trial == 0 ? 0 : (trial <= 9 ? trial - 10 : trial - 9);
        float numerator = trial == 0 ? -(float)nmax : -((float)nmax + 0.1f * (float)is);
        float iscale[LANES], sumlx[LANES], suml2[LANES];
        for (int g = 0; g < LANES; ++g) {
            iscale[g] = numerator / signed_max[g];
            sumlx[g] = suml2[g] = 0.f;
        }
        for (int i = 0; i < n; ++i)
            for (int g = 0; g < LANES; ++g) {
                float level = (float)clamp_int(nearest_int(iscale[g] * x[i][g]), -nmax, nmax - 1);
                sumlx[g] += w[i][g] * x[i][g] * level;
                suml2[g] += w[i][g] * level * level;
            }
        for (int g = 0; g < LANES; ++g) {
            float ratio = sumlx[g] / suml2[g];
            if (trial == 0) {
                scale[g] = suml2[g] != 0 ? ratio : 0.f;
                best[g] = scale[g] * sumlx[g];
                best_iscale[g] = iscale[g];
            } else {
                int better = suml2[g] > 0 && sumlx[g] * sumlx[g] > best[g] * suml2[g];
                scale[g] = better ? ratio : scale[g];
                best[g] = better ? ratio * sumlx[g] : best[g];
                best_iscale[g] = better ? iscale[g] : best_iscale[g];
            }
        }
    }
    for (int i = 0; i < n; ++i)
        for (int g = 0; g < LANES; ++g) {
            int32_t level = clamp_int(nearest_int(best_iscale[g] * x[i][g]), -nmax, nmax - 1) + nmax;
            levels[i][g] = (uint8_t)(amax[g] < GROUP_MAX_EPS ? 0 : level);
        }
    for (int g = 0; g < LANES; ++g) scale_out[g] = amax[g] < GROUP_MAX_EPS ? 0.f : scale[g];
}

/* ------------------------------------------------------------------ make_qp_quants (scalar, per super-block) */

/* A scale >= 0 for n non-negative values and their levels 0..nmax (stored as uint8, as ggml does), weighted. */
static float qp_fit(int n, int nmax, const float *x, uint8_t *levels, const float *w) {
    float max = 0.f;
    for (int i = 0; i < n; ++i) max = max > x[i] ? max : x[i];
    if (max < GROUP_MAX_EPS) {
        memset(levels, 0, (size_t)n);
        return 0.f;
    }
    float iscale = (float)nmax / max;
    for (int i = 0; i < n; ++i) levels[i] = (uint8_t)nearest_int(iscale * x[i]);
    float scale = 1.f / iscale;
    float best_mse = 0.f;
    for (int i = 0; i < n; ++i) {
        float diff = x[i] - scale * (float)levels[i];
        best_mse += w[i] * diff * diff;
    }
    for (int is = -4; is <= 4; ++is) {
        if (is == 0) continue;
        float trial_iscale = (0.1f * (float)is + (float)nmax) / max;
        float trial_scale = 1.f / trial_iscale;
        float mse = 0.f;
        for (int i = 0; i < n; ++i) {
            int32_t level = nearest_int(trial_iscale * x[i]);
            level = level < nmax ? level : nmax;
            float diff = x[i] - trial_scale * (float)level;
            mse += w[i] * diff * diff;
        }
        if (mse < best_mse) {
            best_mse = mse;
            iscale = trial_iscale;
        }
    }
    float sumlx = 0.f, suml2 = 0.f;
    for (int i = 0; i < n; ++i) {
        int32_t level = nearest_int(iscale * x[i]);
        level = level < nmax ? level : nmax;
        levels[i] = (uint8_t)level;
        sumlx += w[i] * x[i] * (float)level;
        suml2 += w[i] * (float)level * (float)level;
    }
    for (int pass = 0; pass < 5; ++pass) {
        int changed = 0;
        for (int i = 0; i < n; ++i) {
            float current = (float)levels[i];
            float slx = sumlx - w[i] * x[i] * current;
            float sl2 = suml2 - w[i] * current * current;
            if (slx > 0 && sl2 > 0) {
                int32_t proposed = nearest_int(x[i] * sl2 / slx);
                proposed = proposed < nmax ? proposed : nmax;
                if (proposed != (int32_t)levels[i]) {
                    slx += w[i] * x[i] * (float)proposed;
                    sl2 += w[i] * (float)proposed * (float)proposed;
                    if (slx * slx * suml2 > sumlx * sumlx * sl2) {
                        levels[i] = (uint8_t)proposed;
                        sumlx = slx;
                        suml2 = sl2;
                        ++changed;
                    }
                }
            }
        }
        if (!changed) break;
    }
    return suml2 > 0.f ? sumlx / suml2 : 0.f;
}

/* ------------------------------------------------------------------ Q4_K and Q5_K */

#define K32_SUPERS (LANES / 8) /* super-blocks per tile: 8 sub-blocks of 32 each */

/* The 12-byte scales field from 8 scale codes and 8 minimum codes, as ggml packs them (uint8 arithmetic). */
static void pack_scales_6bit(uint8_t *out, const uint8_t *ls, const uint8_t *lm) {
    for (int j = 0; j < 8; ++j) {
        if (j < 4) {
            out[j] = ls[j];
            out[j + 4] = lm[j];
        } else {
            out[j + 4] = (uint8_t)((ls[j] & 0xF) | ((lm[j] & 0xF) << 4));
            out[j - 4] = (uint8_t)(out[j - 4] | ((ls[j] >> 4) << 6));
            out[j] = (uint8_t)(out[j] | ((lm[j] >> 4) << 6));
        }
    }
}

static void scale_min_k4(int j, const uint8_t *q, uint8_t *scale, uint8_t *minimum) {
    if (j < 4) {
        *scale = q[j] & 63;
        *minimum = q[j + 4] & 63;
    } else {
        *scale = (uint8_t)((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
        *minimum = (uint8_t)((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
    }
}

/* One tile of up to K32_SUPERS super-blocks of Q4_K (nmax 15) or Q5_K (nmax 31) from src; qw: each super-block's
   importance (256 values) or NULL. Writes `supers` blocks of block_bytes at out. */
static void encode_k32_tile(int nmax, const float *src, const float *const *qw, int supers, uint8_t *out,
                            int block_bytes) {
    float x[32][LANES], w[32][LANES], scales[LANES], the_mins[LANES], sub_weight[LANES];
    uint8_t levels[32][LANES];
    int with_importance = qw[0] != NULL;
    load_lanes(x, src, 32, supers * 8);
    if (!with_importance) {
        /* quantize_row_q*_K_ref: weights av_x + |x|, av_x the root mean square of the sub-block */
        float sum_x2[LANES];
        for (int g = 0; g < LANES; ++g) sum_x2[g] = 0.f;
        for (int i = 0; i < 32; ++i)
            for (int g = 0; g < LANES; ++g) sum_x2[g] += x[i][g] * x[i][g];
        for (int g = 0; g < LANES; ++g) sum_x2[g] = sqrtf(sum_x2[g] / 32);
        for (int i = 0; i < 32; ++i)
            for (int g = 0; g < LANES; ++g) w[i][g] = sum_x2[g] + fabsf(x[i][g]);
        if (nmax == 15)
            qkx_search(32, 15, (const float (*)[LANES])x, (const float (*)[LANES])w, -1.f, 0.1f, 20, 0, 0, scales,
                       the_mins, levels);
        else
            qkx_search(32, 31, (const float (*)[LANES])x, (const float (*)[LANES])w, -0.5f, 0.1f, 15, 0, 0, scales,
                       the_mins, levels);
    } else {
        /* quantize_row_q*_K_impl: weights qw * sqrt(sigma2 + x^2), sigma2 = 2 * (sum of x^2 over the super-block)
           / 256, summed left to right over its 256 values */
        float sigma2[K32_SUPERS];
        for (int s = 0; s < K32_SUPERS; ++s) sigma2[s] = 0.f;
        for (int j = 0; j < 8; ++j)
            for (int i = 0; i < 32; ++i)
                for (int s = 0; s < K32_SUPERS; ++s) sigma2[s] += x[i][8 * s + j] * x[i][8 * s + j];
        for (int s = 0; s < K32_SUPERS; ++s) sigma2[s] = 2 * sigma2[s] / QK_K;
        for (int g = 0; g < LANES; ++g) {
            const float *importance = qw[g / 8 < supers ? g / 8 : 0] + 32 * (g % 8);
            for (int i = 0; i < 32; ++i) w[i][g] = importance[i] * sqrtf(sigma2[g / 8] + x[i][g] * x[i][g]);
        }
        for (int g = 0; g < LANES; ++g) sub_weight[g] = 0.f;
        for (int i = 0; i < 32; ++i)
            for (int g = 0; g < LANES; ++g) sub_weight[g] += w[i][g];
        if (nmax == 15) /* a call per nmax, so that each is compiled for its constant */
            qkx_search(32, 15, (const float (*)[LANES])x, (const float (*)[LANES])w, -0.9f, 0.05f, 36, 0, 1, scales,
                       the_mins, levels);
        else
            qkx_search(32, 31, (const float (*)[LANES])x, (const float (*)[LANES])w, -0.9f, 0.05f, 36, 0, 1, scales,
                       the_mins, levels);
    }
    for (int s = 0; s < supers; ++s) {
        const float *values = src + (int64_t)s * QK_K;
        uint8_t *block = out + (int64_t)s * block_bytes;
        const float *sc = scales + 8 * s, *mn = the_mins + 8 * s;
        uint8_t ls[8], lm[8], packed[12], level[QK_K];
        float d, dmin;
        if (!with_importance) {
            float max_scale = 0.f, max_min = 0.f;
            for (int j = 0; j < 8; ++j) {
                if (sc[j] > max_scale) max_scale = sc[j];
                if (mn[j] > max_min) max_min = mn[j];
            }
            float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
            float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
            for (int j = 0; j < 8; ++j) {
                uint8_t a = (uint8_t)nearest_int(inv_scale * sc[j]), b = (uint8_t)nearest_int(inv_min * mn[j]);
                ls[j] = a < 63 ? a : 63;
                lm[j] = b < 63 ? b : 63;
            }
            d = max_scale / 63.f;
            dmin = max_min / 63.f;
        } else {
            d = qp_fit(8, 63, sc, ls, sub_weight + 8 * s);
            dmin = qp_fit(8, 63, mn, lm, sub_weight + 8 * s);
            if (nmax == 31) /* quantize_row_q5_K_impl clamps the codes, q4_K's does not */
                for (int j = 0; j < 8; ++j) {
                    ls[j] = ls[j] < 63 ? ls[j] : 63;
                    lm[j] = lm[j] < 63 ? lm[j] : 63;
                }
        }
        memset(packed, 0, sizeof packed);
        pack_scales_6bit(packed, ls, lm);
        float d_stored = fp16_round(d), dmin_stored = fp16_round(dmin);
        for (int j = 0; j < 8; ++j) {
            uint8_t code_scale, code_min;
            scale_min_k4(j, packed, &code_scale, &code_min);
            float dj = d_stored * (float)code_scale;
            float dmj = dmin_stored * (float)code_min;
            const float *xs = values + 32 * j;
            for (int i = 0; i < 32; ++i) {
                int32_t fresh = clamp_int(nearest_int((xs[i] + dmj) / dj), 0, nmax);
                level[32 * j + i] = dj != 0 ? (uint8_t)fresh : levels[i][8 * s + j];
            }
        }
        put_fp16(block, d);
        put_fp16(block + 2, dmin);
        memcpy(block + 4, packed, 12);
        if (nmax == 15) {
            uint8_t *qs = block + 16;
            for (int c = 0; c < QK_K; c += 64)
                for (int l = 0; l < 32; ++l) *qs++ = (uint8_t)(level[c + l] | (level[c + l + 32] << 4));
        } else {
            uint8_t *qh = block + 16, *qs = block + 48;
            memset(qh, 0, 32);
            for (int c = 0, bit = 0; c < QK_K; c += 64, bit += 2)
                for (int l = 0; l < 32; ++l) {
                    int first = level[c + l], second = level[c + l + 32];
                    qh[l] = (uint8_t)(qh[l] | ((first > 15) << bit) | ((second > 15) << (bit + 1)));
                    *qs++ = (uint8_t)((first > 15 ? first - 16 : first) | ((second > 15 ? second - 16 : second) << 4));
                }
        }
    }
}

/* ------------------------------------------------------------------ Q6_K */

#define K16_SUPERS (LANES / 16) /* super-blocks per tile: 16 groups of 16 each */

static void encode_q6_k_tile(const float *src, const float *const *qw, int supers, uint8_t *out) {
    float x[16][LANES], w[16][LANES], scales[LANES];
    uint8_t levels[16][LANES];
    load_lanes(x, src, 16, supers * 16);
    for (int g = 0; g < LANES; ++g) {
        /* quantize_row_q6_K_impl passes the imatrix slice itself as the weights; without one, ggml uses x*x */
        const float *importance = qw[0] ? qw[g / 16 < supers ? g / 16 : 0] + 16 * (g % 16) : NULL;
        for (int i = 0; i < 16; ++i) w[i][g] = importance ? importance[i] : x[i][g] * x[i][g];
    }
    qx_search(16, 32, (const float (*)[LANES])x, (const float (*)[LANES])w, scales, levels);
    for (int s = 0; s < supers; ++s) {
        const float *values = src + (int64_t)s * QK_K, *sc = scales + 16 * s;
        uint8_t *block = out + (int64_t)s * 210, level[QK_K];
        float max_scale = 0.f, max_abs = 0.f;
        for (int j = 0; j < 16; ++j) {
            float magnitude = fabsf(sc[j]);
            if (magnitude > max_abs) {
                max_abs = magnitude;
                max_scale = sc[j];
            }
        }
        if (max_abs < GROUP_MAX_EPS) {
            memset(block, 0, 210);
            continue;
        }
        float iscale = -128.f / max_scale;
        float d = 1.f / iscale;
        int8_t codes[16];
        for (int j = 0; j < 16; ++j) {
            int32_t code = nearest_int(iscale * sc[j]);
            codes[j] = (int8_t)(code < 127 ? code : 127);
        }
        float d_stored = fp16_round(d);
        for (int j = 0; j < 16; ++j) {
            float dj = d_stored * (float)codes[j];
            const float *xs = values + 16 * j;
            for (int i = 0; i < 16; ++i) {
                int32_t fresh = clamp_int(nearest_int(xs[i] / dj), -32, 31) + 32;
                level[16 * j + i] = dj != 0 ? (uint8_t)fresh : levels[i][16 * s + j];
            }
        }
        uint8_t *ql = block, *qh = block + 128;
        for (int c = 0; c < QK_K; c += 128, ql += 64, qh += 32)
            for (int l = 0; l < 32; ++l) {
                const uint8_t *q = level + c + l;
                ql[l] = (uint8_t)((q[0] & 0xF) | ((q[64] & 0xF) << 4));
                ql[l + 32] = (uint8_t)((q[32] & 0xF) | ((q[96] & 0xF) << 4));
                qh[l] = (uint8_t)((q[0] >> 4) | ((q[32] >> 4) << 2) | ((q[64] >> 4) << 4) | ((q[96] >> 4) << 6));
            }
        memcpy(block + 192, codes, 16);
        put_fp16(block + 208, d);
    }
}

/* ------------------------------------------------------------------ Q3_K */

/* make_q3_quants(16, nmax 4, do_rmse) for LANES groups: levels from the largest magnitude, then up to 5 passes that
   move one level at a time where the weighted fit (weights x^2) improves. A pass that changes nothing in a group
   leaves its state as it was, so running every lane until no lane changes is ggml's per-group early exit. */
static void q3_search(const float (*x)[LANES], float *scale_out, uint8_t (*levels)[LANES]) {
    float amax[LANES], signed_max[LANES], iscale[LANES], sumlx[LANES], suml2[LANES], level[16][LANES];
    for (int g = 0; g < LANES; ++g) amax[g] = signed_max[g] = sumlx[g] = suml2[g] = 0.f;
    for (int i = 0; i < 16; ++i)
        for (int g = 0; g < LANES; ++g) {
            float magnitude = fabsf(x[i][g]);
            int larger = magnitude > amax[g];
            signed_max[g] = larger ? x[i][g] : signed_max[g];
            amax[g] = larger ? magnitude : amax[g];
        }
    for (int g = 0; g < LANES; ++g) iscale[g] = -4.f / signed_max[g];
    for (int i = 0; i < 16; ++i)
        for (int g = 0; g < LANES; ++g) {
            float l = (float)clamp_int(nearest_int(iscale[g] * x[i][g]), -4, 3), w = x[i][g] * x[i][g];
            level[i][g] = l;
            sumlx[g] += w * x[i][g] * l;
            suml2[g] += w * l * l;
        }
    for (int pass = 0; pass < 5; ++pass) {
        int32_t changed = 0;
        for (int i = 0; i < 16; ++i)
            for (int g = 0; g < LANES; ++g) {
                float w = x[i][g] * x[i][g], current = level[i][g];
                float slx = sumlx[g] - w * x[i][g] * current;
                float sl2 = suml2[g] - w * current * current;
                float proposed = (float)clamp_int(nearest_int(x[i][g] * sl2 / slx), -4, 3);
                float new_slx = slx + w * x[i][g] * proposed;
                float new_sl2 = sl2 + w * proposed * proposed;
                int32_t accept = (slx > 0) & (proposed != current) & (new_sl2 > 0) &
                                 (new_slx * new_slx * suml2[g] > sumlx[g] * sumlx[g] * new_sl2);
                level[i][g] = accept ? proposed : current;
                sumlx[g] = accept ? new_slx : sumlx[g];
                suml2[g] = accept ? new_sl2 : suml2[g];
                changed |= accept;
            }
        if (!changed) break;
    }
    for (int i = 0; i < 16; ++i)
        for (int g = 0; g < LANES; ++g) levels[i][g] = (uint8_t)(amax[g] < GROUP_MAX_EPS ? 0 : (int32_t)level[i][g] + 4);
    for (int g = 0; g < LANES; ++g)
        scale_out[g] = amax[g] < GROUP_MAX_EPS ? 0.f : (suml2[g] > 0 ? sumlx[g] / suml2[g] : 0.f);
}

static void encode_q3_k_tile(const float *src, const float *const *qw, int supers, uint8_t *out) {
    float x[16][LANES], scales[LANES], block_scales[LANES];
    uint8_t levels[16][LANES], codes[16][LANES];
    load_lanes(x, src, 16, supers * 16);
    if (qw[0] == NULL) {
        q3_search((const float (*)[LANES])x, scales, levels);
    } else {
        /* quantize_row_q3_K_impl: weights qw * sqrt(sigma2 + x^2), sigma2 = 2 * the super-block's mean square;
           make_qx_quants per group, then again over each super-block's 16 group scales weighted by the groups'
           total weights (one lane per super-block) */
        float w[16][LANES], sigma2[K16_SUPERS], group_scales[16][LANES], group_weights[16][LANES];
        for (int s = 0; s < K16_SUPERS; ++s) sigma2[s] = 0.f;
        for (int j = 0; j < 16; ++j)
            for (int i = 0; i < 16; ++i)
                for (int s = 0; s < K16_SUPERS; ++s) sigma2[s] += x[i][16 * s + j] * x[i][16 * s + j];
        for (int s = 0; s < K16_SUPERS; ++s) sigma2[s] = 2 * sigma2[s] / QK_K;
        for (int g = 0; g < LANES; ++g) {
            const float *importance = qw[g / 16 < supers ? g / 16 : 0] + 16 * (g % 16);
            for (int i = 0; i < 16; ++i) w[i][g] = importance[i] * sqrtf(sigma2[g / 16] + x[i][g] * x[i][g]);
        }
        qx_search(16, 4, (const float (*)[LANES])x, (const float (*)[LANES])w, scales, levels);
        memset(group_scales, 0, sizeof group_scales);
        memset(group_weights, 0, sizeof group_weights);
        for (int g = 0; g < LANES; ++g) {
            float sum_w = 0.f;
            for (int i = 0; i < 16; ++i) sum_w += w[i][g];
            group_scales[g % 16][g / 16] = scales[g];
            group_weights[g % 16][g / 16] = sum_w;
        }
        qx_search(16, 32, (const float (*)[LANES])group_scales, (const float (*)[LANES])group_weights, block_scales,
                  codes);
    }
    for (int s = 0; s < supers; ++s) {
        const float *values = src + (int64_t)s * QK_K, *sc = scales + 16 * s;
        uint8_t *block = out + (int64_t)s * 110, *packed = block + 96, level[QK_K];
        float d;
        memset(packed, 0, 12);
        int32_t stored[16];
        if (qw[0] == NULL) {
            float max_scale = 0.f, amax = 0.f;
            for (int j = 0; j < 16; ++j) {
                float magnitude = fabsf(sc[j]);
                if (magnitude > amax) {
                    amax = magnitude;
                    max_scale = sc[j];
                }
            }
            float iscale = -32.f / max_scale;
            for (int j = 0; j < 16; ++j) {
                int8_t l = (int8_t)nearest_int(iscale * sc[j]);
                stored[j] = max_scale != 0 ? (l < -32 ? -32 : (l > 31 ? 31 : l)) + 32 : 0;
            }
            d = max_scale != 0 ? 1.f / iscale : 0.f;
        } else {
            for (int j = 0; j < 16; ++j) stored[j] = codes[j][s];
            d = block_scales[s];
        }
        for (int j = 0; j < 16; ++j) {
            int32_t l = stored[j];
            packed[j % 8] = (uint8_t)(packed[j % 8] | ((l & 0xF) << (j < 8 ? 0 : 4)));
            packed[8 + j % 4] = (uint8_t)(packed[8 + j % 4] | ((l >> 4) << (2 * (j / 4))));
        }
        float d_stored = fp16_round(d);
        for (int j = 0; j < 16; ++j) {
            int8_t code = (int8_t)(((j < 8 ? packed[j] & 0xF : packed[j - 8] >> 4) |
                                    (((packed[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) - 32);
            float dj = d_stored * (float)code;
            const float *xs = values + 16 * j;
            for (int i = 0; i < 16; ++i) {
                int32_t fresh = clamp_int(nearest_int(xs[i] / dj), -4, 3) + 4;
                level[16 * j + i] = dj != 0 ? (uint8_t)fresh : levels[i][16 * s + j];
            }
        }
        uint8_t *hmask = block, *qs = block + 32;
        memset(hmask, 0, 32);
        for (int j = 0; j < QK_K; ++j)
            if (level[j] > 3) {
                hmask[j % 32] = (uint8_t)(hmask[j % 32] | (1 << (j / 32)));
                level[j] = (uint8_t)(level[j] - 4);
            }
        for (int c = 0; c < QK_K; c += 128)
            for (int l = 0; l < 32; ++l) {
                const uint8_t *q = level + c + l;
                qs[c / 4 + l] = (uint8_t)(q[0] | (q[32] << 2) | (q[64] << 4) | (q[96] << 6));
            }
        put_fp16(block + 108, d);
    }
}

/* ------------------------------------------------------------------ Q2_K */

static void encode_q2_k_tile(const float *src, const float *const *qw, int supers, uint8_t *out) {
    float x[16][LANES], w[16][LANES], scales[LANES], the_mins[LANES], sub_weight[LANES];
    uint8_t levels[16][LANES];
    int with_importance = qw[0] != NULL;
    load_lanes(x, src, 16, supers * 16);
    if (!with_importance) {
        /* quantize_row_q2_K_ref: weights |x|, the search minimizes absolute errors */
        for (int i = 0; i < 16; ++i)
            for (int g = 0; g < LANES; ++g) w[i][g] = fabsf(x[i][g]);
        qkx_search(16, 3, (const float (*)[LANES])x, (const float (*)[LANES])w, -0.5f, 0.1f, 15, 1, 0, scales,
                   the_mins, levels);
    } else {
        /* quantize_row_q2_K_impl: weights qw * sqrt(sigma2 + x^2), sigma2 the super-block's mean square */
        float sigma2[K16_SUPERS];
        for (int s = 0; s < K16_SUPERS; ++s) sigma2[s] = 0.f;
        for (int j = 0; j < 16; ++j)
            for (int i = 0; i < 16; ++i)
                for (int s = 0; s < K16_SUPERS; ++s) sigma2[s] += x[i][16 * s + j] * x[i][16 * s + j];
        for (int s = 0; s < K16_SUPERS; ++s) sigma2[s] = sigma2[s] / QK_K;
        for (int g = 0; g < LANES; ++g) {
            const float *importance = qw[g / 16 < supers ? g / 16 : 0] + 16 * (g % 16);
            for (int i = 0; i < 16; ++i) w[i][g] = importance[i] * sqrtf(sigma2[g / 16] + x[i][g] * x[i][g]);
        }
        for (int g = 0; g < LANES; ++g) sub_weight[g] = 0.f;
        for (int i = 0; i < 16; ++i)
            for (int g = 0; g < LANES; ++g) sub_weight[g] += w[i][g];
        qkx_search(16, 3, (const float (*)[LANES])x, (const float (*)[LANES])w, -0.9f, 0.05f, 36, 0, 1, scales,
                   the_mins, levels);
    }
    for (int s = 0; s < supers; ++s) {
        const float *values = src + (int64_t)s * QK_K, *sc = scales + 16 * s, *mn = the_mins + 16 * s;
        uint8_t *block = out + (int64_t)s * 84, *codes = block, level[QK_K];
        float d, dmin;
        if (!with_importance) {
            float max_scale = 0.f, max_min = 0.f;
            for (int j = 0; j < 16; ++j) {
                if (sc[j] > max_scale) max_scale = sc[j];
                if (mn[j] > max_min) max_min = mn[j];
            }
            for (int j = 0; j < 16; ++j) codes[j] = max_scale > 0 ? (uint8_t)nearest_int(15.f / max_scale * sc[j]) : 0;
            d = max_scale > 0 ? max_scale / 15.f : 0.f;
            if (max_min > 0)
                for (int j = 0; j < 16; ++j)
                    codes[j] = (uint8_t)(codes[j] | (nearest_int(15.f / max_min * mn[j]) << 4));
            dmin = max_min > 0 ? max_min / 15.f : 0.f;
        } else {
            uint8_t ls[16], lm[16];
            d = qp_fit(16, 15, sc, ls, sub_weight + 16 * s);
            dmin = qp_fit(16, 15, mn, lm, sub_weight + 16 * s);
            for (int j = 0; j < 16; ++j) codes[j] = (uint8_t)(ls[j] | (lm[j] << 4));
        }
        float d_stored = fp16_round(d), dmin_stored = fp16_round(dmin);
        for (int j = 0; j < 16; ++j) {
            float dj = d_stored * (float)(codes[j] & 0xF);
            float dmj = dmin_stored * (float)(codes[j] >> 4);
            const float *xs = values + 16 * j;
            for (int i = 0; i < 16; ++i) {
                int32_t fresh = clamp_int(nearest_int((xs[i] + dmj) / dj), 0, 3);
                level[16 * j + i] = dj != 0 ? (uint8_t)fresh : levels[i][16 * s + j];
            }
        }
        uint8_t *qs = block + 16;
        for (int c = 0; c < QK_K; c += 128)
            for (int l = 0; l < 32; ++l) {
                const uint8_t *q = level + c + l;
                qs[c / 4 + l] = (uint8_t)(q[0] | (q[32] << 2) | (q[64] << 4) | (q[96] << 6));
            }
        put_fp16(block + 80, d);
        put_fp16(block + 82, dmin);
    }
}

/* ------------------------------------------------------------------ IQ4_NL and IQ4_XS */

/* ggml's kvalues_iq4nl, the non-linear 4-bit grid */
static const float IQ4_GRID[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

/* ggml's best_index_int8 on the grid: its tie test `x - grid[k] < grid[k+1] - x` flips exactly at the midpoint of
   the neighbours (no rounding in those subtractions reaches the comparison; tests/test_quant_iq4.py checks the
   midpoints and their float neighbours), so the index is the count of the 15 midpoints at or below x; NaN gives 15, as
   ggml's bisection does. Everything is integer arithmetic on the float's bits (ordered_bits; no midpoint is zero,
   so -0 and +0 agree), which gcc vectorizes where float comparisons that may meet NaN stay branches. */
#define IQ4_AT_OR_ABOVE(midpoint, step) (-(int32_t)(ordered >= ordered_bits(midpoint)) & (step))

/* the index (steps of 1) or the grid value (steps between neighbours) */
#define IQ4_SUM(start, s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12, s13, s14)                              \
    ((start) + IQ4_AT_OR_ABOVE(-115.5f, s0) + IQ4_AT_OR_ABOVE(-93.5f, s1) + IQ4_AT_OR_ABOVE(-74.f, s2) +             \
     IQ4_AT_OR_ABOVE(-57.f, s3) + IQ4_AT_OR_ABOVE(-42.f, s4) + IQ4_AT_OR_ABOVE(-28.5f, s5) +                         \
     IQ4_AT_OR_ABOVE(-16.f, s6) + IQ4_AT_OR_ABOVE(-4.5f, s7) + IQ4_AT_OR_ABOVE(7.f, s8) + IQ4_AT_OR_ABOVE(19.f, s9) + \
     IQ4_AT_OR_ABOVE(31.5f, s10) + IQ4_AT_OR_ABOVE(45.5f, s11) + IQ4_AT_OR_ABOVE(61.f, s12) +                        \
     IQ4_AT_OR_ABOVE(79.f, s13) + IQ4_AT_OR_ABOVE(101.f, s14))

/* -1 for NaN, else 0: a mask, since gcc turns a conditional on it into a branch that stops vectorization */
static inline int32_t nan_mask(float x) { return -(int32_t)((float_bits(x) & 0x7fffffff) > 0x7f800000); }

static inline int32_t iq4_index(float x) {
    int32_t ordered = ordered_bits(x), nan = nan_mask(x);
    return (IQ4_SUM(0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1) & ~nan) | (15 & nan);
}

/* IQ4_GRID[iq4_index(x)] without a table lookup (which would not vectorize) */
static inline float iq4_value(float x) {
    int32_t ordered = ordered_bits(x), nan = nan_mask(x);
    return (float)((IQ4_SUM(-127, 23, 21, 18, 16, 14, 13, 12, 11, 12, 12, 13, 15, 16, 20, 24) & ~nan) | (113 & nan));
}

/* quantize_row_iq4_nl_impl's scale of LANES blocks of 32: from the largest magnitude, then 15 trial scales
   (itry - 127)/max, a trial kept where its fit sumqx^2/sumq2 beats the best; 0 for a block below GROUP_MAX_EPS. */
static void iq4_search(const float (*x)[LANES], const float (*w)[LANES], float *scale_out) {
    float amax[LANES], signed_max[LANES], scale[LANES], best[LANES];
    for (int g = 0; g < LANES; ++g) amax[g] = signed_max[g] = 0.f;
    for (int i = 0; i < 32; ++i)
        for (int g = 0; g < LANES; ++g) {
            float magnitude = fabsf(x[i][g]);
            int larger = magnitude > amax[g];
            signed_max[g] = larger ? x[i][g] : signed_max[g];
            amax[g] = larger ? magnitude : amax[g];
        }
    for (int trial = 0; trial <= 15; ++trial) {
        float id[LANES], sumqx[LANES], sumq2[LANES];
        for (int g = 0; g < LANES; ++g) {
            id[g] = trial == 0 ? 1.f / (-signed_max[g] / IQ4_GRID[0]) : (float)(trial - 8 - 127) / signed_max[g];
            sumqx[g] = sumq2[g] = 0.f;
        }
        for (int i = 0; i < 32; ++i)
            for (int g = 0; g < LANES; ++g) {
                float q = iq4_value(id[g] * x[i][g]);
                sumqx[g] += w[i][g] * q * x[i][g];
                sumq2[g] += w[i][g] * q * q;
            }
        for (int g = 0; g < LANES; ++g) {
            float ratio = sumqx[g] / sumq2[g];
            if (trial == 0) {
                scale[g] = sumq2[g] > 0 ? ratio : 0.f;
                best[g] = scale[g] * sumqx[g];
            } else {
                int better = sumq2[g] > 0 && sumqx[g] * sumqx[g] > best[g] * sumq2[g];
                scale[g] = better ? ratio : scale[g];
                best[g] = better ? ratio * sumqx[g] : best[g];
            }
        }
    }
    for (int g = 0; g < LANES; ++g) scale_out[g] = amax[g] < GROUP_MAX_EPS ? 0.f : scale[g];
}

/* 16 bytes of codes: code[j] | code[j+16] << 4 */
static void iq4_pack(uint8_t *qs, const float *x, float inverse) {
    uint8_t code[32];
    for (int j = 0; j < 32; ++j) code[j] = (uint8_t)iq4_index(inverse * x[j]);
    for (int j = 0; j < 16; ++j) qs[j] = (uint8_t)(code[j] | (code[j + 16] << 4));
}

/* IQ4_NL (super_block 32: LANES blocks) or IQ4_XS (256: LANES/8 super-blocks of 8 blocks) */
static void encode_iq4_tile(int super_block, const float *src, const float *const *qw, int supers, uint8_t *out) {
    float x[32][LANES], w[32][LANES], scales[LANES];
    int blocks = supers * super_block / 32, per_super = super_block / 32;
    load_lanes(x, src, 32, blocks);
    /* weights x^2, or qw * sqrt(sigma2 + x^2) with sigma2 = 2/super_block * the super-block's sum of x^2 */
    float sigma2[LANES];
    for (int g = 0; g < LANES; ++g) sigma2[g] = 0.f;
    if (qw[0] != NULL) {
        for (int j = 0; j < per_super; ++j)
            for (int i = 0; i < 32; ++i)
                for (int s = 0; s < LANES / per_super; ++s)
                    sigma2[s] += x[i][per_super * s + j] * x[i][per_super * s + j];
        for (int s = 0; s < LANES / per_super; ++s) sigma2[s] *= 2.f / (float)super_block;
    }
    for (int g = 0; g < LANES; ++g) {
        int s = g / per_super;
        const float *importance = qw[0] ? qw[s < supers ? s : 0] + 32 * (g % per_super) : NULL;
        for (int i = 0; i < 32; ++i)
            w[i][g] = importance ? importance[i] * sqrtf(sigma2[s] + x[i][g] * x[i][g]) : x[i][g] * x[i][g];
    }
    iq4_search((const float (*)[LANES])x, (const float (*)[LANES])w, scales);
    if (super_block == 32) {
        for (int b = 0; b < blocks; ++b) {
            uint8_t *block = out + (int64_t)b * 18;
            put_fp16(block, scales[b]);
            iq4_pack(block + 2, src + 32 * b, scales[b] != 0 ? 1.f / scales[b] : 0.f);
        }
        return;
    }
    for (int s = 0; s < supers; ++s) {
        uint8_t *block = out + (int64_t)s * 136;
        const float *sc = scales + 8 * s;
        float max_scale = 0.f, amax_scale = 0.f;
        for (int b = 0; b < 8; ++b) {
            float magnitude = fabsf(sc[b]);
            if (magnitude > amax_scale) {
                amax_scale = magnitude;
                max_scale = sc[b];
            }
        }
        float d = -max_scale / 32;
        float id = d != 0 ? 1.f / d : 0.f;
        uint16_t scales_high = 0;
        memset(block + 4, 0, 4);
        for (int b = 0; b < 8; ++b) {
            int32_t l = clamp_int(nearest_int(id * sc[b]), -32, 31);
            float dl = d * (float)l;
            iq4_pack(block + 8 + 16 * b, src + (int64_t)s * QK_K + 32 * b, dl != 0 ? 1.f / dl : 0.f);
            l += 32;
            block[4 + b / 2] = (uint8_t)(block[4 + b / 2] | ((l & 0xF) << (4 * (b % 2))));
            scales_high = (uint16_t)(scales_high | ((l >> 4) << (2 * b)));
        }
        put_fp16(block, d);
        block[2] = (uint8_t)(scales_high & 0xFF);
        block[3] = (uint8_t)(scales_high >> 8);
    }
}

/* ------------------------------------------------------------------ Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 */

/* Without importance these are ggml's *_ref encoders, cheap enough that a block's 32 values are vectorized among
   themselves: the scans that decide the scale use order-free integer reductions on the float bits where these
   decide alone (no NaN; for min/max no zero extreme, whose sign the first occurrence picks), else ggml's scan. */

/* C's float-to-int conversion as x86-64 executes it (cvttss2si): toward zero, NaN and overflow give INT_MIN. */
static inline int32_t truncate_int(float value) {
    return value >= -2147483648.f && value < 2147483648.f ? (int32_t)value : INT32_MIN;
}

/* C's (int)roundf(value) on x86-64: halves away from zero; adding the float just below 0.5 with value's sign and
   truncating is exact for every float (0.49999997 + 0.5 would round to 1). */
static inline int32_t round_half_away(float value) {
    return truncate_int(value + copysignf(0.49999997f, value));
}

/* ggml's `if (amax < fabsf(v)) { amax = fabsf(v); max = v; }` from 0: the first value of largest magnitude (NaN
   never wins, a block of zeros gives +0). */
static float first_absmax_32(const float *x) {
    uint32_t largest = 0;
    for (int j = 0; j < 32; ++j) {
        uint32_t magnitude = float_bits(x[j]) & 0x7fffffff;
        magnitude = magnitude > 0x7f800000 ? 0 : magnitude;
        largest = magnitude > largest ? magnitude : largest;
    }
    if (largest == 0) return 0.f;
    int first = 32;
    for (int j = 31; j >= 0; --j) first = (float_bits(x[j]) & 0x7fffffff) == largest ? j : first;
    return x[first];
}

/* ggml's `if (v < min) min = v; if (v > max) max = v;` from FLT_MAX and -FLT_MAX. */
static void min_max_32(const float *x, float *min_out, float *max_out) {
    int32_t low = ordered_bits(3.40282347e38f), high = ordered_bits(-3.40282347e38f), any_nan = 0;
    for (int j = 0; j < 32; ++j) {
        int32_t ordered = ordered_bits(x[j]);
        any_nan |= (float_bits(x[j]) & 0x7fffffff) > 0x7f800000;
        low = ordered < low ? ordered : low;
        high = ordered > high ? ordered : high;
    }
    float min = ordered_float(low), max = ordered_float(high);
    if (any_nan || min == 0 || max == 0) {  /* ggml's scan: NaN skipped, the first of -0 and +0 kept */
        min = 3.40282347e38f;
        max = -3.40282347e38f;
        for (int j = 0; j < 32; ++j) {
            if (x[j] < min) min = x[j];
            if (x[j] > max) max = x[j];
        }
    }
    *min_out = min;
    *max_out = max;
}

static void q8_0_ref(const float *x, uint8_t *block) {
    uint32_t largest = 0;
    int any_nan = 0;
    for (int j = 0; j < 32; ++j) {
        uint32_t magnitude = float_bits(x[j]) & 0x7fffffff;
        any_nan |= magnitude > 0x7f800000;
        largest = magnitude > largest ? magnitude : largest;
    }
    float amax = bits_float(largest);
    if (any_nan) {  /* ggml's `amax = MAX(amax, fabsf(v))`: a NaN is taken when met and dropped by the next value */
        amax = 0.f;
        for (int j = 0; j < 32; ++j) amax = amax > fabsf(x[j]) ? amax : fabsf(x[j]);
    }
    float d = amax / 127;
    float id = d != 0 ? 1.f / d : 0.f;
    put_fp16(block, d);
    for (int j = 0; j < 32; ++j) block[2 + j] = (uint8_t)round_half_away(x[j] * id);
}

/* Q4_0 (levels 8) and Q5_0 (levels 16): d = max/-levels, codes MIN(2*levels-1, (int8_t)(x/d + levels + 0.5)). */
static void symmetric_ref(const float *x, int levels, float *d_out, int32_t *codes) {
    float d = first_absmax_32(x) / (float)-levels;
    float id = d != 0 ? 1.f / d : 0.f;
    float offset = (float)levels + 0.5f;
    for (int j = 0; j < 32; ++j) {
        int32_t code = (int8_t)truncate_int(x[j] * id + offset);
        codes[j] = code < 2 * levels - 1 ? code : 2 * levels - 1;
    }
    *d_out = d;
}

/* Q4_1 (levels 15) and Q5_1 (levels 31): d = (max - min)/levels, codes of (x - min)/d + 0.5 truncated; Q4_1 takes
   MIN(15, (int8_t)code), Q5_1 the (uint8_t) code. */
static void affine_ref(const float *x, int levels, float *d_out, float *min_out, int32_t *codes) {
    float min, max;
    min_max_32(x, &min, &max);
    float d = (max - min) / (float)levels;
    float id = d != 0 ? 1.f / d : 0.f;
    for (int j = 0; j < 32; ++j) {
        int32_t code = truncate_int((x[j] - min) * id + 0.5f);
        codes[j] = levels == 15 ? ((int8_t)code < 15 ? (int8_t)code : 15) : (uint8_t)code;
    }
    *d_out = d;
    *min_out = min;
}

/* qs of 4-bit types: code[j] | code[j+16] << 4, the whole of code[j] ORed in (ggml's *_ref store it unmasked). */
static void pack_nibbles_16(uint8_t *qs, const int32_t *codes) {
    for (int j = 0; j < 16; ++j) qs[j] = (uint8_t)((uint8_t)codes[j] | (codes[j + 16] << 4));
}

/* qh (4 bytes, bit j = bit 4 of code j) and qs (low nibbles) of 5-bit types. */
static void pack_five_bit(uint8_t *qh, uint8_t *qs, const int32_t *codes) {
    uint32_t high = 0;
    for (int j = 0; j < 32; ++j) high |= (((uint32_t)(uint8_t)codes[j] & 0x10u) >> 4) << j;
    for (int k = 0; k < 4; ++k) qh[k] = (uint8_t)(high >> (8 * k));
    for (int j = 0; j < 16; ++j) qs[j] = (uint8_t)(((uint8_t)codes[j] & 0x0F) | (((uint8_t)codes[j + 16] & 0x0F) << 4));
}

/* One legacy block's bytes from its scale (and minimum) and codes. */
static void store_legacy(int type, uint8_t *block, float d, float min, const int32_t *codes) {
    put_fp16(block, d);
    switch (type) {
    case TYPE_Q4_0: pack_nibbles_16(block + 2, codes); break;
    case TYPE_Q5_0: pack_five_bit(block + 2, block + 6, codes); break;
    case TYPE_Q4_1: put_fp16(block + 2, min); pack_nibbles_16(block + 4, codes); break;
    case TYPE_Q5_1: put_fp16(block + 2, min); pack_five_bit(block + 4, block + 8, codes); break;
    }
}

static void legacy_ref(int type, const float *x, uint8_t *block) {
    int32_t codes[32];
    float d, min = 0.f;
    switch (type) {
    case TYPE_Q8_0: q8_0_ref(x, block); return;
    case TYPE_Q4_0: symmetric_ref(x, 8, &d, codes); break;
    case TYPE_Q5_0: symmetric_ref(x, 16, &d, codes); break;
    case TYPE_Q4_1: affine_ref(x, 15, &d, &min, codes); break;
    default: affine_ref(x, 31, &d, &min, codes); break;
    }
    store_legacy(type, block, d, min, codes);
}

/* With importance (quantize_row_q*_impl): weights qw * sqrt(sigma2 + x^2), sigma2 the mean square of the block's
   row; Q4_0/Q5_0 search with make_qx_quants, Q4_1/Q5_1 with make_qkx3_quants, LANES blocks at once. */
static void encode_legacy_tile(int type, const float *src, const float *const *qw, const float *sigma2, int blocks,
                               uint8_t *out, int block_bytes) {
    if (qw[0] == NULL) {
        for (int b = 0; b < blocks; ++b) legacy_ref(type, src + 32 * b, out + (int64_t)b * block_bytes);
        return;
    }
    float x[32][LANES], w[32][LANES], scales[LANES], the_mins[LANES];
    uint8_t levels[32][LANES];
    load_lanes(x, src, 32, blocks);
    for (int g = 0; g < LANES; ++g) {
        int b = g < blocks ? g : 0;
        for (int i = 0; i < 32; ++i) w[i][g] = qw[b][i] * sqrtf(sigma2[b] + x[i][g] * x[i][g]);
    }
    switch (type) {
    case TYPE_Q4_0: qx_search(32, 8, (const float (*)[LANES])x, (const float (*)[LANES])w, scales, levels); break;
    case TYPE_Q5_0: qx_search(32, 16, (const float (*)[LANES])x, (const float (*)[LANES])w, scales, levels); break;
    case TYPE_Q4_1:
        qkx_search(32, 15, (const float (*)[LANES])x, (const float (*)[LANES])w, -0.9f, 0.05f, 36, 0, 1, scales,
                   the_mins, levels);
        break;
    default:
        qkx_search(32, 31, (const float (*)[LANES])x, (const float (*)[LANES])w, -0.9f, 0.05f, 36, 0, 1, scales,
                   the_mins, levels);
    }
    for (int b = 0; b < blocks; ++b) {
        int32_t codes[32];
        for (int i = 0; i < 32; ++i) codes[i] = levels[i][b];
        int affine = type == TYPE_Q4_1 || type == TYPE_Q5_1;
        store_legacy(type, out + (int64_t)b * block_bytes, scales[b], affine ? -the_mins[b] : 0.f, codes);
    }
}

/* ------------------------------------------------------------------ driver */

/* Encode n_rows rows of n_per_row floats into dst, ggml_quantize_chunk's bytes (the row length a multiple of the
   type's block). importance: n_per_row floats or NULL. Returns 0, or -1 for a type this file does not encode.
   Blocks go through in tiles of up to LANES (super-)blocks; a tile may span rows. */
int KERNEL(encode_rows)(int type, const float *src, uint8_t *dst, int64_t n_rows, int64_t n_per_row,
                        const float *importance) {
    int elements, block_bytes, per_tile;
    switch (type) {
    case TYPE_Q4_K: elements = QK_K, block_bytes = 144, per_tile = K32_SUPERS; break;
    case TYPE_Q5_K: elements = QK_K, block_bytes = 176, per_tile = K32_SUPERS; break;
    case TYPE_Q6_K: elements = QK_K, block_bytes = 210, per_tile = K16_SUPERS; break;
    case TYPE_Q2_K: elements = QK_K, block_bytes = 84, per_tile = K16_SUPERS; break;
    case TYPE_Q3_K: elements = QK_K, block_bytes = 110, per_tile = K16_SUPERS; break;
    case TYPE_IQ4_XS: elements = QK_K, block_bytes = 136, per_tile = K32_SUPERS; break;
    case TYPE_IQ4_NL: elements = 32, block_bytes = 18, per_tile = LANES; break;
    case TYPE_Q8_0: elements = 32, block_bytes = 34, per_tile = LANES, importance = NULL; break;  /* ggml ignores it */
    case TYPE_Q4_0: elements = 32, block_bytes = 18, per_tile = LANES; break;
    case TYPE_Q4_1: elements = 32, block_bytes = 20, per_tile = LANES; break;
    case TYPE_Q5_0: elements = 32, block_bytes = 22, per_tile = LANES; break;
    case TYPE_Q5_1: elements = 32, block_bytes = 24, per_tile = LANES; break;
    default: return -1;
    }
    int64_t per_row = n_per_row / elements, total = n_rows * per_row;
    float row_sigma2 = 0.f;
    int64_t sigma2_row = -1;
    for (int64_t first = 0; first < total; first += per_tile) {
        int blocks = (int)(total - first < per_tile ? total - first : per_tile);
        /* each block's slice of the importance vector, by its place in its row, and (Q4_0..Q5_1) the mean square
           of its row, ggml's sigma2: the sum of x*x over the row left to right, over n_per_row */
        const float *qw[LANES] = {NULL};
        float sigma2[LANES];
        for (int b = 0; importance && b < blocks; ++b) {
            int64_t row = (first + b) / per_row;
            qw[b] = importance + ((first + b) % per_row) * elements;
            if (elements == 32 && type != TYPE_IQ4_NL && row != sigma2_row) {
                const float *values = src + row * n_per_row;
                float sum_x2 = 0.f;
                for (int64_t j = 0; j < n_per_row; ++j) sum_x2 += values[j] * values[j];
                row_sigma2 = sum_x2 / (float)n_per_row;
                sigma2_row = row;
            }
            sigma2[b] = row_sigma2;
        }
        const float *src_tile = src + first * elements;
        uint8_t *dst_tile = dst + first * block_bytes;
        switch (type) {
        case TYPE_Q4_K: encode_k32_tile(15, src_tile, qw, blocks, dst_tile, block_bytes); break;
        case TYPE_Q5_K: encode_k32_tile(31, src_tile, qw, blocks, dst_tile, block_bytes); break;
        case TYPE_Q6_K: encode_q6_k_tile(src_tile, qw, blocks, dst_tile); break;
        case TYPE_Q2_K: encode_q2_k_tile(src_tile, qw, blocks, dst_tile); break;
        case TYPE_Q3_K: encode_q3_k_tile(src_tile, qw, blocks, dst_tile); break;
        case TYPE_IQ4_NL: encode_iq4_tile(32, src_tile, qw, blocks, dst_tile); break;
        case TYPE_IQ4_XS: encode_iq4_tile(QK_K, src_tile, qw, blocks, dst_tile); break;
        default: encode_legacy_tile(type, src_tile, qw, sigma2, blocks, dst_tile, block_bytes);
        }
    }
    return 0;
}

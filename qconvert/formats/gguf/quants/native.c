/* llama.cpp's GGUF block quantizers as scalar C, byte-identical to ggml_quantize_chunk.
 *
 * The same routines as the PyTorch modules beside this file (legacy.py, kquants.py, search.py),
 * written one block at a time: the C order of every float32 operation is the order ggml's scalar code
 * uses, so the bytes match as long as nothing re-associates or fuses. Build with -ffp-contract=off
 * and without -ffast-math (native.py does). Each call quantizes whole rows; callers split rows over
 * threads.
 *
 * Block layouts (ggml-common.h): block_q4_0, block_q4_1, block_q5_0, block_q5_1, block_q8_0,
 * block_q2_K, block_q3_K, block_q4_K, block_q5_K, block_q6_K.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define QK 32
#define QK_K 256
#define GROUP_MAX_EPS 1e-15f
#ifndef QFN
#define QFN static inline
#endif
#define MAX(a, b) ((a) > (b) ? (a) : (b))
#define MIN(a, b) ((a) < (b) ? (a) : (b))

/* ---- scalar helpers ------------------------------------------------------------------------ */

QFN uint32_t f_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
QFN float bits_f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

#if defined(__F16C__) && !defined(__CUDACC__)
#include <immintrin.h>
/* the F16C conversions, as ggml uses them on x86: round to nearest even */
QFN uint16_t to_f16(float f) { return _cvtss_sh(f, 0); }
QFN float from_f16(uint16_t h) { return _cvtsh_ss(h); }
#else
/* float32 -> IEEE half, round to nearest even (what F16C's vcvtps2ph and ggml's fallback do) */
QFN uint16_t to_f16(float f) {
    uint32_t x = f_bits(f), sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return (uint16_t)(sign | 0x7e00u | ((ax >> 13) & 0x3ffu));
    if (ax >= 0x47800000u) return (uint16_t)(sign | 0x7c00u);
    if (ax < 0x38800000u) {  /* half subnormal: adding 0.5f rounds to a multiple of 2^-24 */
        float v = bits_f(ax) + 0.5f;
        return (uint16_t)(sign | (f_bits(v) - 0x3f000000u));
    }
    uint32_t m = ax - 0x38000000u;          /* rebias the exponent: 127 -> 15 */
    m += 0xfffu + ((ax >> 13) & 1u);        /* round the 13 dropped bits, ties to even */
    return (uint16_t)(sign | (m >> 13));
}

QFN float from_f16(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0) {
        float v = (float)m * 5.9604644775390625e-8f;  /* m * 2^-24, exact */
        return sign ? -v : v;
    }
    if (e == 31) return bits_f(sign | 0x7f800000u | (m << 13));
    return bits_f(sign | ((e + 112) << 23) | (m << 13));
}
#endif

QFN float f16_round(float f) { return from_f16(to_f16(f)); }

QFN void put_f16(uint8_t *p, float f) { uint16_t h = to_f16(f); memcpy(p, &h, 2); }

/* round half to even through the float adder (valid for |v| <= 4194303, ggml asserts that range) */
QFN int nearest_int(float v) {
    float s = v + 12582912.f;
    int32_t i; memcpy(&i, &s, 4);
    return (i & 0x007fffff) - 0x00400000;
}

/* ---- scale searches (ggml-quants.c: make_qx_quants, make_q3_quants, make_qkx2/3_quants, make_qp_quants) */

/* The searches below compute their per-element terms into small arrays first (loops the compiler can
 * vectorise) and add them up in a separate loop, in C order: the sums must stay sequential. */
#define MAX_N 32

/* sum_i a[i] left to right, starting from 0 */
QFN float seq_sum(const float *a, int n) {
    float s = 0;
    for (int i = 0; i < n; ++i) s += a[i];
    return s;
}

/* l = clamp(nearest_int(iscale*x), -nmax, nmax-1) and the terms w*x*l, w*l*l */
QFN void qx_terms(int n, int nmax, const float *x, const float *wx, const float *w, float iscale,
                  int *l, float *tlx, float *tl2) {
    for (int i = 0; i < n; ++i) {
        int li = nearest_int(iscale * x[i]);
        li = MAX(-nmax, MIN(nmax - 1, li));
        l[i] = li;
        tlx[i] = wx[i] * li;
        tl2[i] = w[i] * li * li;
    }
}

/* the first value of largest magnitude (0 when all are 0); *amax its magnitude */
QFN float first_absmax(const float *x, int n, float *amax) {
    float max = 0;
    *amax = 0;
    for (int i = 0; i < n; ++i) {
        float ax = fabsf(x[i]);
        if (ax > *amax) { *amax = ax; max = x[i]; }
    }
    return max;
}

/* symmetric; candidate inverse scales -(nmax + 0.1*is)/max; weights qw (x^2 when NULL); L in [0, 2*nmax) */
QFN float make_qx_quants(int n, int nmax, const float *x, int8_t *L, const float *qw) {
    float amax, max = first_absmax(x, n, &amax);
    if (amax < GROUP_MAX_EPS) {
        memset(L, 0, n);
        return 0.f;
    }
    float w[MAX_N], wx[MAX_N], tlx[MAX_N], tl2[MAX_N];
    int l[MAX_N];
    for (int i = 0; i < n; ++i) {
        w[i] = qw ? qw[i] : x[i] * x[i];
        wx[i] = w[i] * x[i];
    }
    qx_terms(n, nmax, x, wx, w, -nmax / max, l, tlx, tl2);
    for (int i = 0; i < n; ++i) L[i] = l[i] + nmax;
    float sumlx = seq_sum(tlx, n), suml2 = seq_sum(tl2, n);
    float scale = suml2 ? sumlx / suml2 : 0.0f;
    float best = scale * sumlx;
    for (int is = -9; is <= 9; ++is) {
        if (is == 0) continue;
        qx_terms(n, nmax, x, wx, w, -(nmax + 0.1f * is) / max, l, tlx, tl2);
        sumlx = seq_sum(tlx, n);
        suml2 = seq_sum(tl2, n);
        if (suml2 > 0 && sumlx * sumlx > best * suml2) {
            for (int i = 0; i < n; ++i) L[i] = l[i] + nmax;
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    return scale;
}

/* symmetric with coordinate refinement (weights x^2); L in [0, 2*nmax) */
QFN float make_q3_quants(int n, int nmax, const float *x, int8_t *L) {
    float amax, max = first_absmax(x, n, &amax);
    if (amax < GROUP_MAX_EPS) {
        memset(L, 0, n);
        return 0.f;
    }
    float iscale = -nmax / max;
    float sumlx = 0, suml2 = 0;
    for (int i = 0; i < n; ++i) {
        int l = nearest_int(iscale * x[i]);
        l = MAX(-nmax, MIN(nmax - 1, l));
        L[i] = l;
        float w = x[i] * x[i];
        sumlx += w * x[i] * l;
        suml2 += w * l * l;
    }
    for (int itry = 0; itry < 5; ++itry) {
        int changed = 0;
        for (int i = 0; i < n; ++i) {
            float w = x[i] * x[i];
            float slx = sumlx - w * x[i] * L[i];
            if (slx > 0) {
                float sl2 = suml2 - w * L[i] * L[i];
                int nl = nearest_int(x[i] * sl2 / slx);
                nl = MAX(-nmax, MIN(nmax - 1, nl));
                if (nl != L[i]) {
                    slx += w * x[i] * nl;
                    sl2 += w * nl * nl;
                    if (sl2 > 0 && slx * slx * suml2 > sumlx * sumlx * sl2) {
                        L[i] = nl; sumlx = slx; suml2 = sl2;
                        ++changed;
                    }
                }
            }
        }
        if (!changed) break;
    }
    for (int i = 0; i < n; ++i) L[i] += nmax;
    return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}

/* sum_i w * (scale*L + min - x)^2 (or |.| with use_mad) */
QFN float qkx_error(int n, const float *x, const float *w, const uint8_t *L, float scale, float min, int use_mad,
                    float *t) {
    for (int i = 0; i < n; ++i) {
        float diff = scale * L[i] + min - x[i];
        t[i] = w[i] * (use_mad ? fabsf(diff) : diff * diff);
    }
    return seq_sum(t, n);
}

/* asymmetric scale and min, weighted; each step's inverse scale uses the min found so far.
 * L in [0, nmax]; *the_min = -min >= 0 */
QFN float make_qkx(int n, int nmax, const float *x, const float *w, uint8_t *L, float *the_min,
                      uint8_t *Laux, float rmin, float rdelta, int nstep, int use_mad) {
    float min = x[0], max = x[0];
    float sum_w = w[0], sum_x = sum_w * x[0];
    for (int i = 1; i < n; ++i) {
        if (x[i] < min) min = x[i];
        if (x[i] > max) max = x[i];
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    if (min > 0) min = 0;
    if (max == min) {
        memset(L, 0, n);
        *the_min = -min;
        return 0.f;
    }
    float iscale = nmax / (max - min);
    float scale = 1 / iscale;
    float t[MAX_N], twl[MAX_N], twl2[MAX_N], twlx[MAX_N];
    for (int i = 0; i < n; ++i) {
        int l = nearest_int(iscale * (x[i] - min));
        L[i] = MAX(0, MIN(nmax, l));
    }
    float best_error = qkx_error(n, x, w, L, scale, min, use_mad, t);
    for (int is = 0; is <= nstep; ++is) {
        iscale = (rmin + rdelta * is + nmax) / (max - min);
        for (int i = 0; i < n; ++i) {
            int l = nearest_int(iscale * (x[i] - min));
            l = MAX(0, MIN(nmax, l));
            Laux[i] = l;
            twl[i] = w[i] * l;
            twl2[i] = twl[i] * l;
            twlx[i] = twl[i] * x[i];
        }
        float sum_l = seq_sum(twl, n), sum_l2 = seq_sum(twl2, n), sum_xl = seq_sum(twlx, n);
        float D = sum_w * sum_l2 - sum_l * sum_l;
        if (D > 0) {
            float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
            float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
            if (this_min > 0) {
                this_min = 0;
                this_scale = sum_xl / sum_l2;
            }
            float cur_error = qkx_error(n, x, w, Laux, this_scale, this_min, use_mad, t);
            if (cur_error < best_error) {
                memcpy(L, Laux, n);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    *the_min = -min;
    return scale;
}

/* non-negative values (sub-block scales) with weights; L stored as uint8_t, at most nmax */
QFN float make_qp_quants(int n, int nmax, const float *x, uint8_t *L, const float *qw) {
    float max = 0;
    for (int i = 0; i < n; ++i) max = MAX(max, x[i]);
    if (max < GROUP_MAX_EPS) {
        memset(L, 0, n);
        return 0.f;
    }
    float iscale = nmax / max;
    for (int i = 0; i < n; ++i) L[i] = nearest_int(iscale * x[i]);
    float scale = 1 / iscale;
    float best_mse = 0;
    for (int i = 0; i < n; ++i) {
        float diff = x[i] - scale * L[i];
        best_mse += qw[i] * diff * diff;
    }
    for (int is = -4; is <= 4; ++is) {
        if (is == 0) continue;
        float iscale_is = (0.1f * is + nmax) / max;
        float scale_is = 1 / iscale_is;
        float mse = 0;
        for (int i = 0; i < n; ++i) {
            int l = MIN(nmax, nearest_int(iscale_is * x[i]));
            float diff = x[i] - scale_is * l;
            mse += qw[i] * diff * diff;
        }
        if (mse < best_mse) {
            best_mse = mse;
            iscale = iscale_is;
        }
    }
    float sumlx = 0, suml2 = 0;
    for (int i = 0; i < n; ++i) {
        int l = MIN(nmax, nearest_int(iscale * x[i]));
        L[i] = l;
        sumlx += qw[i] * x[i] * l;
        suml2 += qw[i] * l * l;
    }
    for (int itry = 0; itry < 5; ++itry) {
        int changed = 0;
        for (int i = 0; i < n; ++i) {
            float w = qw[i];
            float slx = sumlx - w * x[i] * L[i];
            float sl2 = suml2 - w * L[i] * L[i];
            if (slx > 0 && sl2 > 0) {
                int nl = MIN(nmax, nearest_int(x[i] * sl2 / slx));
                if (nl != L[i]) {
                    slx += w * x[i] * nl;
                    sl2 += w * nl * nl;
                    if (slx * slx * suml2 > sumlx * sumlx * sl2) {
                        L[i] = nl; sumlx = slx; suml2 = sl2;
                        ++changed;
                    }
                }
            }
        }
        if (!changed) break;
    }
    return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}

/* ---- legacy 32-element blocks ------------------------------------------------------------------ */

QFN void q8_0_block(const float *x, uint8_t *y) {
    float amax = 0;
    for (int j = 0; j < QK; ++j) amax = MAX(amax, fabsf(x[j]));
    float d = amax / 127;
    float id = d ? 1.0f / d : 0.0f;
    put_f16(y, d);
    for (int j = 0; j < QK; ++j) y[2 + j] = (uint8_t)(int8_t)(int32_t)roundf(x[j] * id);
}

QFN void pack_nibbles(const int *q, uint8_t *qs) {
    for (int j = 0; j < 16; ++j) qs[j] = (uint8_t)((q[j] & 0xF) | ((q[j + 16] & 0xF) << 4));
}

QFN void put_high_bits(const int *q, uint8_t *qh) {
    uint32_t h = 0;
    for (int j = 0; j < QK; ++j) h |= (uint32_t)((q[j] >> 4) & 1) << j;
    memcpy(qh, &h, 4);
}

/* Q4_0 (nmax 8) and Q5_0 (nmax 16) without an imatrix */
QFN void sym_ref_block(const float *x, uint8_t *y, int nmax) {
    float amax, max = first_absmax(x, QK, &amax);
    float d = max / -nmax;
    float id = d ? 1.0f / d : 0.0f;
    int q[QK];
    for (int j = 0; j < QK; ++j) q[j] = MIN(2 * nmax - 1, (int8_t)(int32_t)(x[j] * id + (nmax + 0.5f)));
    put_f16(y, d);
    if (nmax == 16) put_high_bits(q, y + 2);
    pack_nibbles(q, y + (nmax == 16 ? 6 : 2));
}

/* Q4_1 (nmax 15) and Q5_1 (nmax 31) without an imatrix */
QFN void affine_ref_block(const float *x, uint8_t *y, int nmax) {
    float min = FLT_MAX, max = -FLT_MAX;
    for (int j = 0; j < QK; ++j) {
        if (x[j] < min) min = x[j];
        if (x[j] > max) max = x[j];
    }
    float d = (max - min) / nmax;
    float id = d ? 1.0f / d : 0.0f;
    int q[QK];
    for (int j = 0; j < QK; ++j) {
        float v = (x[j] - min) * id + 0.5f;
        q[j] = nmax == 15 ? MIN(15, (int8_t)(int32_t)v) : (uint8_t)(int32_t)v;
    }
    put_f16(y, d);
    put_f16(y + 2, min);
    if (nmax == 31) put_high_bits(q, y + 4);
    pack_nibbles(q, y + (nmax == 31 ? 8 : 4));
}

QFN float row_sigma2(const float *x, int64_t n) {
    float s = 0;
    for (int64_t j = 0; j < n; ++j) s += x[j] * x[j];
    return s / n;
}

/* llama.cpp's importance weights qw * sqrt(sigma2 + x^2) into w [n]; returns their sum, left to right */
QFN float importance_weights(const float *x, const float *qw, float sigma2, int n, float *w) {
    float sum = 0;
    for (int j = 0; j < n; ++j) {
        w[j] = qw[j] * sqrtf(sigma2 + x[j] * x[j]);
        sum += w[j];
    }
    return sum;
}

QFN void sym_imatrix_block(const float *x, const float *qw, float sigma2, uint8_t *y, int nmax) {
    float w[QK];
    int8_t L[QK];
    int q[QK];
    importance_weights(x, qw, sigma2, QK, w);
    float d = make_qx_quants(QK, nmax, x, L, w);
    for (int j = 0; j < QK; ++j) q[j] = L[j];
    put_f16(y, d);
    if (nmax == 16) put_high_bits(q, y + 2);
    pack_nibbles(q, y + (nmax == 16 ? 6 : 2));
}

QFN void affine_imatrix_block(const float *x, const float *qw, float sigma2, uint8_t *y, int nmax) {
    float w[QK], the_min;
    uint8_t L[QK], Laux[QK];
    int q[QK];
    importance_weights(x, qw, sigma2, QK, w);
    float d = make_qkx(QK, nmax, x, w, L, &the_min, Laux, -0.9f, 0.05f, 36, 0);
    for (int j = 0; j < QK; ++j) q[j] = L[j];
    put_f16(y, d);
    put_f16(y + 2, -the_min);
    if (nmax == 31) put_high_bits(q, y + 4);
    pack_nibbles(q, y + (nmax == 31 ? 8 : 4));
}

/* ---- k-quants ---------------------------------------------------------------------------------- */

QFN float super_sum_x2(const float *x) {
    float s = 0;
    for (int l = 0; l < QK_K; ++l) s += x[l] * x[l];
    return s;
}

QFN void pack_2bit(const uint8_t *L, uint8_t *qs) {
    for (int j = 0; j < QK_K; j += 128)
        for (int l = 0; l < 32; ++l)
            qs[j / 4 + l] = (uint8_t)(L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) | (L[j + l + 96] << 6));
}

/* GPTQ onto a k-quant grid (`qconvert gguf --method gptq`): the super-block's values are rounded column
 * by column, and each column's error e = (x_c - deq_c) / U_cc goes to the block's later columns
 * (x_k -= e * U_ck) and into scaled[c] for the columns after the block. x: the row's 256 values (the
 * ones the scale search saw, updated here); u: the block's 256 x 256 upper factor, row stride ldu. */
typedef struct {
    float *x;
    const float *u;
    int64_t ldu;
    float *scaled;
} Compensation;

/* The k-quants' last step: codes of the 256 values on the fp16-rounded sub-block scales d[j] (and offsets
 * dm[j], or none), n values per sub-block, L = clamp(nearest_int((x + dm) / d), lo, hi) - lo; a sub-block
 * whose d is 0 keeps the search's codes. With gc, column by column with GPTQ's error feedback. */
QFN void requantize(const float *x, uint8_t *L, const float *d, const float *dm, int n, int lo, int hi,
                    const Compensation *gc) {
    for (int c = 0; c < QK_K; ++c) {
        float dj = d[c / n], shift = dm ? dm[c / n] : 0.f;
        float xc = gc ? gc->x[c] : x[c];
        int q;
        if (dj) {
            q = MAX(lo, MIN(hi, nearest_int(dm ? (xc + shift) / dj : xc / dj)));
            L[c] = (uint8_t)(q - lo);
        } else if (gc) {
            q = L[c] + lo;
        } else {
            continue;
        }
        if (gc) {
            float deq = dm ? dj * q - shift : dj * q;
            float e = (xc - deq) / gc->u[c * gc->ldu + c];
            for (int k = c + 1; k < QK_K; ++k) gc->x[k] -= e * gc->u[c * gc->ldu + k];
            gc->scaled[c] = e;
        }
    }
}

/* block_q2_K {uint8 scales[16]; uint8 qs[64]; half d, dmin} */
QFN void q2_K_block(const float *x, const float *qw, uint8_t *y, const Compensation *gc) {
    uint8_t L[QK_K], Laux[16], *sc = y;
    float w[16], mins[16], scales[16], sw[16];
    if (!qw) {
        float max_scale = 0, max_min = 0;
        for (int j = 0; j < 16; ++j) {
            for (int l = 0; l < 16; ++l) w[l] = fabsf(x[16 * j + l]);
            scales[j] = make_qkx(16, 3, x + 16 * j, w, L + 16 * j, &mins[j], Laux, -0.5f, 0.1f, 15, 1);
            if (scales[j] > max_scale) max_scale = scales[j];
            if (mins[j] > max_min) max_min = mins[j];
        }
        if (max_scale > 0) {
            float iscale = 15.f / max_scale;
            for (int j = 0; j < 16; ++j) sc[j] = (uint8_t)nearest_int(iscale * scales[j]);
            put_f16(y + 80, max_scale / 15.f);
        } else {
            memset(sc, 0, 16);
            put_f16(y + 80, 0.f);
        }
        if (max_min > 0) {
            float iscale = 15.f / max_min;
            for (int j = 0; j < 16; ++j) sc[j] |= (uint8_t)(nearest_int(iscale * mins[j]) << 4);
            put_f16(y + 82, max_min / 15.f);
        } else {
            put_f16(y + 82, 0.f);
        }
    } else {
        float sigma2 = super_sum_x2(x) / QK_K;
        uint8_t Ls[16], Lm[16];
        for (int j = 0; j < 16; ++j) {
            sw[j] = importance_weights(x + 16 * j, qw + 16 * j, sigma2, 16, w);
            scales[j] = make_qkx(16, 3, x + 16 * j, w, L + 16 * j, &mins[j], Laux, -0.9f, 0.05f, 36, 0);
        }
        float dm = make_qp_quants(16, 15, scales, Ls, sw);
        float mm = make_qp_quants(16, 15, mins, Lm, sw);
        put_f16(y + 80, dm);
        put_f16(y + 82, mm);
        for (int j = 0; j < 16; ++j) sc[j] = (uint8_t)(Ls[j] | (Lm[j] << 4));
    }
    uint16_t hd, hm;
    memcpy(&hd, y + 80, 2);
    memcpy(&hm, y + 82, 2);
    float d[16], dm[16];
    for (int j = 0; j < 16; ++j) {
        d[j] = from_f16(hd) * (sc[j] & 0xF);
        dm[j] = from_f16(hm) * (sc[j] >> 4);
    }
    requantize(x, L, d, dm, 16, 0, 3, gc);
    pack_2bit(L, y + 16);
}

/* block_q3_K {uint8 hmask[32]; uint8 qs[64]; uint8 scales[12]; half d} */
QFN void put_q3_scale(uint8_t *s, int j, int l) {
    if (j < 8) s[j] = l & 0xF;
    else s[j - 8] |= (l & 0xF) << 4;
    s[j % 4 + 8] |= (uint8_t)((l >> 4) << (2 * (j / 4)));
}

QFN void q3_K_block(const float *x, const float *qw, uint8_t *y, const Compensation *gc) {
    int8_t L[QK_K];
    float scales[16];
    uint8_t *s = y + 96;
    memset(s, 0, 12);
    float dsc;
    if (!qw) {
        float max_scale = 0, amax = 0;
        for (int j = 0; j < 16; ++j) {
            scales[j] = make_q3_quants(16, 4, x + 16 * j, L + 16 * j);
            float a = fabsf(scales[j]);
            if (a > amax) { amax = a; max_scale = scales[j]; }
        }
        if (max_scale) {
            float iscale = -32.f / max_scale;
            for (int j = 0; j < 16; ++j) {
                int8_t l = (int8_t)nearest_int(iscale * scales[j]);
                l = MAX(-32, MIN(31, l)) + 32;
                put_q3_scale(s, j, l);
            }
            dsc = 1 / iscale;
        } else {
            dsc = 0.f;
        }
    } else {
        float sigma2 = 2 * super_sum_x2(x) / QK_K;
        float w[16], sw[16];
        int8_t Ls[16];
        for (int j = 0; j < 16; ++j) {
            sw[j] = importance_weights(x + 16 * j, qw + 16 * j, sigma2, 16, w);
            scales[j] = make_qx_quants(16, 4, x + 16 * j, L + 16 * j, w);
        }
        dsc = make_qx_quants(16, 32, scales, Ls, sw);
        for (int j = 0; j < 16; ++j) put_q3_scale(s, j, Ls[j]);
    }
    put_f16(y + 108, dsc);
    float d_super = f16_round(dsc), d[16];
    for (int j = 0; j < 16; ++j) {
        int8_t sc = j < 8 ? s[j] & 0xF : s[j - 8] >> 4;
        sc = (int8_t)((sc | (((s[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) - 32);
        d[j] = d_super * sc;
    }
    requantize(x, (uint8_t *)L, d, NULL, 16, -4, 3, gc);
    uint8_t *hmask = y, Lu[QK_K];
    memset(hmask, 0, 32);
    int m = 0;
    uint8_t hm = 1;
    for (int j = 0; j < QK_K; ++j) {
        int l = L[j];
        if (l > 3) { hmask[m] |= hm; l -= 4; }
        Lu[j] = (uint8_t)l;
        if (++m == QK_K / 8) { m = 0; hm <<= 1; }
    }
    pack_2bit(Lu, y + 32);
}

QFN void get_scale_min_k4(int j, const uint8_t *q, uint8_t *d, uint8_t *m) {
    if (j < 4) {
        *d = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *d = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j - 0] >> 6) << 4);
    }
}

/* block_q4_K {half d, dmin; uint8 scales[12]; uint8 qs[128]}
 * block_q5_K {half d, dmin; uint8 scales[12]; uint8 qh[32]; uint8 qs[128]} */
QFN void q45_K_block(const float *x, const float *qw, uint8_t *y, int nmax, const Compensation *gc) {
    uint8_t L[QK_K], Laux[32], ls[8], lm[8];
    float w[32], mins[8], scales[8], dsc, dmn;
    if (!qw) {
        float max_scale = 0, max_min = 0;
        for (int j = 0; j < 8; ++j) {
            float sum_x2 = 0;
            for (int l = 0; l < 32; ++l) sum_x2 += x[32 * j + l] * x[32 * j + l];
            float av_x = sqrtf(sum_x2 / 32);
            for (int l = 0; l < 32; ++l) w[l] = av_x + fabsf(x[32 * j + l]);
            scales[j] = nmax == 15
                ? make_qkx(32, 15, x + 32 * j, w, L + 32 * j, &mins[j], Laux, -1.f, 0.1f, 20, 0)
                : make_qkx(32, 31, x + 32 * j, w, L + 32 * j, &mins[j], Laux, -0.5f, 0.1f, 15, 0);
            if (scales[j] > max_scale) max_scale = scales[j];
            if (mins[j] > max_min) max_min = mins[j];
        }
        float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
        float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
        for (int j = 0; j < 8; ++j) {
            ls[j] = (uint8_t)nearest_int(inv_scale * scales[j]);
            lm[j] = (uint8_t)nearest_int(inv_min * mins[j]);
            ls[j] = MIN(63, ls[j]);
            lm[j] = MIN(63, lm[j]);
        }
        dsc = max_scale / 63.f;
        dmn = max_min / 63.f;
    } else {
        float sigma2 = 2 * super_sum_x2(x) / QK_K, sw[8];
        for (int j = 0; j < 8; ++j) {
            sw[j] = importance_weights(x + 32 * j, qw + 32 * j, sigma2, 32, w);
            scales[j] = make_qkx(32, nmax, x + 32 * j, w, L + 32 * j, &mins[j], Laux, -0.9f, 0.05f, 36, 0);
        }
        dsc = make_qp_quants(8, 63, scales, ls, sw);
        dmn = make_qp_quants(8, 63, mins, lm, sw);
        if (nmax == 31)  /* only the Q5_K importance path clamps here */
            for (int j = 0; j < 8; ++j) { ls[j] = MIN(63, ls[j]); lm[j] = MIN(63, lm[j]); }
    }
    uint8_t *s = y + 4;
    for (int j = 0; j < 8; ++j) {
        if (j < 4) {
            s[j] = ls[j];
            s[j + 4] = lm[j];
        } else {
            s[j + 4] = (uint8_t)((ls[j] & 0xF) | ((lm[j] & 0xF) << 4));
            s[j - 4] |= (uint8_t)((ls[j] >> 4) << 6);
            s[j - 0] |= (uint8_t)((lm[j] >> 4) << 6);
        }
    }
    put_f16(y, dsc);
    put_f16(y + 2, dmn);
    float d_super = f16_round(dsc), m_super = f16_round(dmn), d[8], dm[8];
    for (int j = 0; j < 8; ++j) {
        uint8_t sc, m;
        get_scale_min_k4(j, s, &sc, &m);
        d[j] = d_super * sc;
        dm[j] = m_super * m;
    }
    requantize(x, L, d, dm, 32, 0, nmax, gc);
    if (nmax == 15) {
        uint8_t *q = y + 16;
        for (int j = 0; j < QK_K; j += 64, q += 32)
            for (int l = 0; l < 32; ++l) q[l] = (uint8_t)(L[j + l] | (L[j + l + 32] << 4));
        return;
    }
    uint8_t *qh = y + 16, *ql = y + 48, m1 = 1, m2 = 2;
    memset(qh, 0, 32);
    for (int n = 0; n < QK_K; n += 64, ql += 32, m1 <<= 2, m2 <<= 2) {
        for (int j = 0; j < 32; ++j) {
            int l1 = L[n + j], l2 = L[n + j + 32];
            if (l1 > 15) { l1 -= 16; qh[j] |= m1; }
            if (l2 > 15) { l2 -= 16; qh[j] |= m2; }
            ql[j] = (uint8_t)(l1 | (l2 << 4));
        }
    }
}

/* block_q6_K {uint8 ql[128]; uint8 qh[64]; int8 scales[16]; half d} */
QFN void q6_K_block(const float *x, const float *qw, uint8_t *y, const Compensation *gc) {
    int8_t L[QK_K], *sc = (int8_t *)(y + 192);
    float scales[16], max_scale = 0, max_abs = 0;
    for (int ib = 0; ib < 16; ++ib) {
        scales[ib] = make_qx_quants(16, 32, x + 16 * ib, L + 16 * ib, qw ? qw + 16 * ib : NULL);
        float a = fabsf(scales[ib]);
        if (a > max_abs) { max_abs = a; max_scale = scales[ib]; }
    }
    float d[16];
    if (max_abs < GROUP_MAX_EPS) {  /* an all-zero block; under GPTQ its values' errors still move on */
        memset(d, 0, sizeof d);
        if (gc) requantize(x, (uint8_t *)L, d, NULL, 16, -32, 31, gc);
        memset(y, 0, 210);
        return;
    }
    float iscale = -128.f / max_scale;
    put_f16(y + 208, 1 / iscale);
    float d_super = f16_round(1 / iscale);
    for (int ib = 0; ib < 16; ++ib) sc[ib] = (int8_t)MIN(127, nearest_int(iscale * scales[ib]));
    for (int j = 0; j < 16; ++j) d[j] = d_super * sc[j];
    requantize(x, (uint8_t *)L, d, NULL, 16, -32, 31, gc);
    uint8_t *ql = y, *qh = y + 128;
    for (int j = 0; j < QK_K; j += 128, ql += 64, qh += 32) {
        for (int l = 0; l < 32; ++l) {
            int q1 = L[j + l] & 0xF, q2 = L[j + l + 32] & 0xF, q3 = L[j + l + 64] & 0xF, q4 = L[j + l + 96] & 0xF;
            ql[l] = (uint8_t)(q1 | (q3 << 4));
            ql[l + 32] = (uint8_t)(q2 | (q4 << 4));
            qh[l] = (uint8_t)((L[j + l] >> 4) | ((L[j + l + 32] >> 4) << 2) | ((L[j + l + 64] >> 4) << 4)
                              | ((L[j + l + 96] >> 4) << 6));
        }
    }
}

/* ---- entry points ------------------------------------------------------------------------------ */

/* ggml type ids */
enum { Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13, Q6_K = 14 };

/* values per block and bytes per block of a type; 0 for a type this file does not handle */
QFN int block_size(int type, int *bytes) {
    switch (type) {
    case Q4_0: *bytes = 18; return QK;
    case Q4_1: *bytes = 20; return QK;
    case Q5_0: *bytes = 22; return QK;
    case Q5_1: *bytes = 24; return QK;
    case Q8_0: *bytes = 34; return QK;
    case Q2_K: *bytes = 84; return QK_K;
    case Q3_K: *bytes = 110; return QK_K;
    case Q4_K: *bytes = 144; return QK_K;
    case Q5_K: *bytes = 176; return QK_K;
    case Q6_K: *bytes = 210; return QK_K;
    default: *bytes = 0; return 0;
    }
}

/* whether the type's importance path needs the row's mean square (the 32-value types but Q8_0) */
QFN int uses_sigma2(int type, const float *imatrix) {
    return imatrix && (type == Q4_0 || type == Q4_1 || type == Q5_0 || type == Q5_1);
}

/* one block: xb [block] -> y [bytes]; qw: the block's importance weights or NULL */
QFN void quantize_block(int type, const float *xb, const float *qw, float sigma2, uint8_t *y) {
    switch (type) {
    case Q8_0: q8_0_block(xb, y); break;
    case Q4_0: if (qw) sym_imatrix_block(xb, qw, sigma2, y, 8); else sym_ref_block(xb, y, 8); break;
    case Q5_0: if (qw) sym_imatrix_block(xb, qw, sigma2, y, 16); else sym_ref_block(xb, y, 16); break;
    case Q4_1: if (qw) affine_imatrix_block(xb, qw, sigma2, y, 15); else affine_ref_block(xb, y, 15); break;
    case Q5_1: if (qw) affine_imatrix_block(xb, qw, sigma2, y, 31); else affine_ref_block(xb, y, 31); break;
    case Q2_K: q2_K_block(xb, qw, y, NULL); break;
    case Q3_K: q3_K_block(xb, qw, y, NULL); break;
    case Q4_K: q45_K_block(xb, qw, y, 15, NULL); break;
    case Q5_K: q45_K_block(xb, qw, y, 31, NULL); break;
    case Q6_K: q6_K_block(xb, qw, y, NULL); break;
    }
}

/* one row's super-block under GPTQ (see Compensation); 0 for a type that is not a k-quant */
QFN int gptq_superblock(int type, const float *qw, uint8_t *y, const Compensation *gc) {
    switch (type) {
    case Q2_K: q2_K_block(gc->x, qw, y, gc); return 1;
    case Q3_K: q3_K_block(gc->x, qw, y, gc); return 1;
    case Q4_K: q45_K_block(gc->x, qw, y, 15, gc); return 1;
    case Q5_K: q45_K_block(gc->x, qw, y, 31, gc); return 1;
    case Q6_K: q6_K_block(gc->x, qw, y, gc); return 1;
    default: return 0;
    }
}

#ifndef __CUDACC__
/* x [rows, cols] float32 -> out [rows, cols / block * block bytes]; imatrix [cols] or NULL (ignored by
 * Q8_0, as ggml ignores it); sigma2s: per row, the mean square the 32-value types' importance weights
 * use, or NULL to compute it from the row (GPTQ passes the whole row's when x is one block column).
 * Returns the bytes per row, or -1 for a type this file does not handle. */
int64_t qcv_quantize_rows(int type, const float *x, int64_t rows, int64_t cols, const float *imatrix,
                          const float *sigma2s, uint8_t *out) {
    int size, block = block_size(type, &size);
    if (!block) return -1;
    int64_t nb = cols / block, row_bytes = nb * size;
    /* the type's branch outside the block loop: the reference legacy blocks are a few dozen cycles each */
#define EACH_BLOCK(call)                                                                          \
    for (int64_t b = 0; b < nb; ++b) {                                                            \
        const float *xb = xr + b * block, *qw = imatrix ? imatrix + b * block : NULL;             \
        uint8_t *y = out + r * row_bytes + b * size;                                              \
        (void)qw;                                                                                 \
        call;                                                                                     \
    }
    for (int64_t r = 0; r < rows; ++r) {
        const float *xr = x + r * cols;
        float sigma2 = !uses_sigma2(type, imatrix) ? 0.f : sigma2s ? sigma2s[r] : row_sigma2(xr, cols);
        if (!imatrix && type == Q4_0) EACH_BLOCK(sym_ref_block(xb, y, 8))
        else if (!imatrix && type == Q5_0) EACH_BLOCK(sym_ref_block(xb, y, 16))
        else if (!imatrix && type == Q4_1) EACH_BLOCK(affine_ref_block(xb, y, 15))
        else if (!imatrix && type == Q5_1) EACH_BLOCK(affine_ref_block(xb, y, 31))
        else if (type == Q8_0) EACH_BLOCK(q8_0_block(xb, y))
        else EACH_BLOCK(quantize_block(type, xb, qw, sigma2, y))
    }
#undef EACH_BLOCK
    return row_bytes;
}

/* GPTQ for rows of one super-block column: w [rows, 256] (row stride ldw, updated), u [256, 256] (row stride
 * ldu), qw [256] or NULL -> out [rows, block bytes] (row stride ldo), scaled [rows, 256]. Returns the block
 * bytes, or -1 for a type that is not a k-quant. */
int64_t qcv_gptq_superblocks(int type, float *w, int64_t rows, int64_t ldw, const float *u, int64_t ldu,
                             const float *qw, uint8_t *out, int64_t ldo, float *scaled) {
    int size;
    if (block_size(type, &size) != QK_K) return -1;
    for (int64_t r = 0; r < rows; ++r) {
        Compensation gc = {w + r * ldw, u, ldu, scaled + r * QK_K};
        gptq_superblock(type, qw, out + r * ldo, &gc);
    }
    return size;
}
#endif

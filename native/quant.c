/*
 * agentkv native kernels: KV rows at rest (float16 <-> ggml q8_0 / q4_0 / q4_1 / iq4_nl blocks) and
 * the gather/scatter of cell ranges of transposed-V spans.
 *
 * Every kernel takes raw buffers and returns 0 on success, a negative code on bad arguments.
 * The output is bit-identical to the numpy twins in agentkv/_quant_numpy.py, which follow
 * ggml's reference quantizers (ggml-quants.c quantize_row_*_ref / dequantize_row_*) operation
 * by operation in float32:
 *   - float -> int casts behave as x86's cvttss2si: NaN / out of range -> INT32_MIN, and an
 *     int8_t cast keeps the low byte (written out here, so nothing is undefined behaviour);
 *   - q8_0's MAX(amax, |v|) scan lets a NaN reset the running maximum; the others skip NaN;
 *   - iq4_nl's least-squares sums run in order, in float32, as ggml's loop does;
 *   - scales are stored with ggml's float -> half conversion (RNE, NaN -> sign | 0x7E00),
 *     decoded values are rounded to half the same way.
 * The SIMD paths (x86 AVX2 + F16C, picked at run time) handle blocks of finite values whose
 * result does not depend on scan order; any other block goes through the scalar reference.
 * Build with -ffp-contract=off: a fused multiply-add would change the rounding.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(_WIN32)
#define AKV_API __declspec(dllexport)
#else
#define AKV_API __attribute__((visibility("default")))
#endif

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define AKV_X86 1
#include <immintrin.h>
#endif

enum { FMT_Q8_0 = 0, FMT_Q4_0 = 1, FMT_Q4_1 = 2, FMT_IQ4_NL = 3, N_FMT = 4 };

static const int8_t IQ4NL[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                 1, 13, 25, 38, 53, 69, 89, 113};
enum { QK = 32 };

/* ---- scalar helpers ------------------------------------------------------------------- */

static inline float bits_f32(uint32_t w) { float f; memcpy(&f, &w, 4); return f; }
static inline uint32_t f32_bits(float f) { uint32_t w; memcpy(&w, &f, 4); return w; }

/* Exact half -> float (NaN payloads kept, quieted by no arithmetic). */
static inline float h2f(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1F, man = h & 0x3FF;
    if (exp == 0x1F) return bits_f32(sign | 0x7F800000u | (man << 13));
    if (exp == 0) {
        float v = (float)man * 5.9604644775390625e-08f; /* man * 2^-24, exact */
        return bits_f32(sign | f32_bits(v));
    }
    return bits_f32(sign | ((exp + 112) << 23) | (man << 13));
}

/* ggml_compute_fp32_to_fp16: RNE, overflow -> inf, NaN -> sign | 0x7E00. */
static inline uint16_t f2h(float f) {
    const float scale_to_inf = 0x1.0p+112f, scale_to_zero = 0x1.0p-110f;
    float base = (fabsf(f) * scale_to_inf) * scale_to_zero;
    const uint32_t w = f32_bits(f), shl1_w = w + w, sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    base = bits_f32((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = f32_bits(base);
    const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
    return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

/* (int32_t)x as cvttss2si: NaN and out-of-range -> INT32_MIN. */
static inline int32_t trunc_i32(float x) {
    return (x >= -2147483648.0f && x < 2147483648.0f) ? (int32_t)x : INT32_MIN;
}

static inline float inv(float d) { return d != 0.0f ? 1.0f / d : 0.0f; }

static inline uint8_t nib(float v) {           /* MIN(15, (int8_t)v) as uint8_t */
    int8_t i = (int8_t)(uint8_t)(uint32_t)trunc_i32(v);
    return (uint8_t)(i < 15 ? i : 15);
}

static inline void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
static inline uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }

/* ---- scalar reference, one block ------------------------------------------------------ */

static void enc_q8_0_ref(const uint16_t *src, uint8_t *dst) {
    float x[QK], amax = 0.0f;
    for (int j = 0; j < QK; j++) {
        x[j] = h2f(src[j]);
        float a = fabsf(x[j]);
        amax = amax > a ? amax : a;            /* ggml's MAX(): a NaN a wins */
    }
    const float d = amax / 127.0f, id = inv(d);
    put16(dst, f2h(d));
    for (int j = 0; j < QK; j++) dst[2 + j] = (uint8_t)(uint32_t)trunc_i32(roundf(x[j] * id));
}

static void enc_q4_0_ref(const uint16_t *src, uint8_t *dst) {
    float x[QK], amax = 0.0f, max = 0.0f;
    for (int j = 0; j < QK; j++) {
        x[j] = h2f(src[j]);
        if (amax < fabsf(x[j])) { amax = fabsf(x[j]); max = x[j]; }
    }
    const float d = max / -8.0f, id = inv(d);
    put16(dst, f2h(d));
    for (int j = 0; j < QK / 2; j++)
        dst[2 + j] = (uint8_t)(nib(x[j] * id + 8.5f) | (nib(x[j + QK / 2] * id + 8.5f) << 4));
}

static void enc_q4_1_ref(const uint16_t *src, uint8_t *dst) {
    float x[QK], min = 3.402823466e+38f, max = -3.402823466e+38f;
    for (int j = 0; j < QK; j++) {
        x[j] = h2f(src[j]);
        if (x[j] < min) min = x[j];
        if (x[j] > max) max = x[j];
    }
    const float d = (max - min) / 15.0f, id = inv(d);
    put16(dst, f2h(d));
    put16(dst + 2, f2h(min));
    for (int j = 0; j < QK / 2; j++)
        dst[4 + j] = (uint8_t)(nib((x[j] - min) * id + 0.5f) |
                               (nib((x[j + QK / 2] - min) * id + 0.5f) << 4));
}

static void dec_q8_0_ref(const uint8_t *src, uint16_t *dst) {
    const float d = h2f(get16(src));
    for (int j = 0; j < QK; j++) dst[j] = f2h((float)(int8_t)src[2 + j] * d);
}

static void dec_q4_0_ref(const uint8_t *src, uint16_t *dst) {
    const float d = h2f(get16(src));
    for (int j = 0; j < QK / 2; j++) {
        dst[j] = f2h((float)((src[2 + j] & 0x0F) - 8) * d);
        dst[j + QK / 2] = f2h((float)((src[2 + j] >> 4) - 8) * d);
    }
}

static void dec_q4_1_ref(const uint8_t *src, uint16_t *dst) {
    const float d = h2f(get16(src)), m = h2f(get16(src + 2));
    for (int j = 0; j < QK / 2; j++) {
        dst[j] = f2h((float)(src[4 + j] & 0x0F) * d + m);
        dst[j + QK / 2] = f2h((float)(src[4 + j] >> 4) * d + m);
    }
}

/* ggml's best_index_int8(16, IQ4NL, x). */
static inline int best_index(float x) {
    if (x <= IQ4NL[0]) return 0;
    if (x >= IQ4NL[15]) return 15;
    int ml = 0, mu = 15;
    while (mu - ml > 1) {
        int mav = (ml + mu) / 2;
        if (x < IQ4NL[mav]) mu = mav; else ml = mav;
    }
    return x - IQ4NL[mu - 1] < IQ4NL[mu] - x ? mu - 1 : mu;
}

/* quantize_row_iq4_nl_ref (quantize_row_iq4_nl_impl without weights, ntry = -1). A block
 * below GROUP_MAX_EPS gets scale 0 and nibbles 8 (ggml leaves scratch contents there). */
static void enc_iq4_nl_ref(const uint16_t *src, uint8_t *dst) {
    float x[QK], amax = 0.0f, max = 0.0f;
    uint8_t L[QK];
    for (int j = 0; j < QK; j++) {
        x[j] = h2f(src[j]);
        float ax = fabsf(x[j]);
        if (ax > amax) { amax = ax; max = x[j]; }
    }
    float d = 0.0f;
    if (amax < 1e-15f) {
        memset(L, 8, sizeof L);
    } else {
        const float id = 1.0f / (max / (float)IQ4NL[0]);
        float sumqx = 0.0f, sumq2 = 0.0f;
        for (int j = 0; j < QK; j++) {
            const int l = best_index(id * x[j]);
            L[j] = (uint8_t)l;
            const float q = IQ4NL[l], w = x[j] * x[j];
            sumqx += w * q * x[j];
            sumq2 += w * q * q;
        }
        d = sumq2 > 0 ? sumqx / sumq2 : 0.0f;
    }
    put16(dst, f2h(d));
    for (int j = 0; j < QK / 2; j++) dst[2 + j] = (uint8_t)(L[j] | (L[j + QK / 2] << 4));
}

static void dec_iq4_nl_ref(const uint8_t *src, uint16_t *dst) {
    const float d = h2f(get16(src));
    for (int j = 0; j < QK / 2; j++) {
        dst[j] = f2h(d * IQ4NL[src[2 + j] & 0x0F]);
        dst[j + QK / 2] = f2h(d * IQ4NL[src[2 + j] >> 4]);
    }
}

typedef void (*enc_fn)(const uint16_t *, uint8_t *);
typedef void (*dec_fn)(const uint8_t *, uint16_t *);

static const int BLOCK_BYTES[N_FMT] = {34, 18, 20, 18};
static const enc_fn ENC_REF[N_FMT] = {enc_q8_0_ref, enc_q4_0_ref, enc_q4_1_ref, enc_iq4_nl_ref};
static const dec_fn DEC_REF[N_FMT] = {dec_q8_0_ref, dec_q4_0_ref, dec_q4_1_ref, dec_iq4_nl_ref};

static inline int half_finite(uint16_t h) { return (h & 0x7C00) != 0x7C00; }

/* ---- x86 AVX2 + F16C ------------------------------------------------------------------ */
#ifdef AKV_X86
#define AVX2 __attribute__((target("avx2,f16c")))

AVX2 static inline int block_finite(const uint16_t *src) {
    const __m256i e = _mm256_set1_epi16(0x7C00);
    __m256i a = _mm256_loadu_si256((const __m256i *)src);
    __m256i b = _mm256_loadu_si256((const __m256i *)(src + 16));
    __m256i bad = _mm256_or_si256(_mm256_cmpeq_epi16(_mm256_and_si256(a, e), e),
                                  _mm256_cmpeq_epi16(_mm256_and_si256(b, e), e));
    return _mm256_testz_si256(bad, bad);
}

AVX2 static inline void load32(const uint16_t *src, __m256 v[4]) {
    for (int k = 0; k < 4; k++) v[k] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + 8 * k)));
}

AVX2 static inline float hmax(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
}

AVX2 static inline float hmin(__m256 v) {
    __m128 m = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_min_ps(m, _mm_movehl_ps(m, m));
    m = _mm_min_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
}

/* 32 int32 in [0, 15] (j = 0..31 across four vectors) -> 16 bytes q[j] | q[j+16] << 4. */
AVX2 static inline void store_nibbles(__m256i q[4], uint8_t *dst) {
    __m256i lo = _mm256_permute4x64_epi64(_mm256_packs_epi32(q[0], q[1]), 0xD8);
    __m256i hi = _mm256_permute4x64_epi64(_mm256_packs_epi32(q[2], q[3]), 0xD8);
    __m256i w = _mm256_or_si256(lo, _mm256_slli_epi16(hi, 4));
    _mm_storeu_si128((__m128i *)dst,
                     _mm_packus_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1)));
}

AVX2 static void enc_q8_0_avx2(const uint16_t *src, uint8_t *dst) {
    if (!block_finite(src)) { enc_q8_0_ref(src, dst); return; }
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    __m256 x[4];
    load32(src, x);
    __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(x[0], absmask), _mm256_and_ps(x[1], absmask)),
                             _mm256_max_ps(_mm256_and_ps(x[2], absmask), _mm256_and_ps(x[3], absmask)));
    const float d = hmax(m) / 127.0f;
    const __m256 id = _mm256_set1_ps(inv(d)), half = _mm256_set1_ps(0.5f);
    const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
    put16(dst, f2h(d));
    __m256i q[4];
    for (int k = 0; k < 4; k++) {             /* roundf: trunc, then away from zero at .5 */
        __m256 v = _mm256_mul_ps(x[k], id);
        __m256 t = _mm256_round_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
        __m256 up = _mm256_cmp_ps(_mm256_and_ps(_mm256_sub_ps(v, t), absmask), half, _CMP_GE_OQ);
        __m256 step = _mm256_and_ps(up, _mm256_or_ps(one, _mm256_and_ps(v, sign)));
        q[k] = _mm256_cvttps_epi32(_mm256_add_ps(t, step));
    }
    __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256((__m256i *)(dst + 2), p);
}

AVX2 static void enc_q4_0_avx2(const uint16_t *src, uint8_t *dst) {
    if (!block_finite(src)) { enc_q4_0_ref(src, dst); return; }
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    __m256 x[4], a[4];
    load32(src, x);
    for (int k = 0; k < 4; k++) a[k] = _mm256_and_ps(x[k], absmask);
    const float amax = hmax(_mm256_max_ps(_mm256_max_ps(a[0], a[1]), _mm256_max_ps(a[2], a[3])));
    float max = 0.0f;
    if (amax > 0.0f) {                         /* the first value of largest magnitude */
        const __m256 am = _mm256_set1_ps(amax);
        uint32_t hit = 0;
        for (int k = 0; k < 4; k++)
            hit |= (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(a[k], am, _CMP_EQ_OQ)) << (8 * k);
        max = h2f(src[__builtin_ctz(hit)]);
    }
    const float d = max / -8.0f;
    const __m256 id = _mm256_set1_ps(inv(d)), off = _mm256_set1_ps(8.5f);
    const __m256i fifteen = _mm256_set1_epi32(15);
    put16(dst, f2h(d));
    __m256i q[4];
    for (int k = 0; k < 4; k++)
        q[k] = _mm256_min_epi32(_mm256_cvttps_epi32(_mm256_add_ps(_mm256_mul_ps(x[k], id), off)), fifteen);
    store_nibbles(q, dst + 2);
}

AVX2 static void enc_q4_1_avx2(const uint16_t *src, uint8_t *dst) {
    if (!block_finite(src)) { enc_q4_1_ref(src, dst); return; }
    __m256 x[4];
    load32(src, x);
    const float min = hmin(_mm256_min_ps(_mm256_min_ps(x[0], x[1]), _mm256_min_ps(x[2], x[3])));
    const float max = hmax(_mm256_max_ps(_mm256_max_ps(x[0], x[1]), _mm256_max_ps(x[2], x[3])));
    if (min == 0.0f || max == 0.0f) { enc_q4_1_ref(src, dst); return; }  /* which signed zero */
    const float d = (max - min) / 15.0f;
    const __m256 id = _mm256_set1_ps(inv(d)), vmin = _mm256_set1_ps(min), off = _mm256_set1_ps(0.5f);
    const __m256i fifteen = _mm256_set1_epi32(15);
    put16(dst, f2h(d));
    put16(dst + 2, f2h(min));
    __m256i q[4];
    for (int k = 0; k < 4; k++)
        q[k] = _mm256_min_epi32(
            _mm256_cvttps_epi32(_mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(x[k], vmin), id), off)), fifteen);
    store_nibbles(q, dst + 4);
}

AVX2 static inline void store_h(uint16_t *dst, __m256 v) {
    _mm_storeu_si128((__m128i *)dst, _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

AVX2 static void dec_q8_0_avx2(const uint8_t *src, uint16_t *dst) {
    const uint16_t dh = get16(src);
    if (!half_finite(dh)) { dec_q8_0_ref(src, dst); return; }
    const __m256 d = _mm256_set1_ps(h2f(dh));
    __m256i q = _mm256_loadu_si256((const __m256i *)(src + 2));
    for (int k = 0; k < 4; k++) {
        __m128i b = k < 2 ? _mm256_castsi256_si128(q) : _mm256_extracti128_si256(q, 1);
        if (k & 1) b = _mm_srli_si128(b, 8);
        store_h(dst + 8 * k, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), d));
    }
}

AVX2 static inline void nibbles_to_i32(const uint8_t *qs, __m256i n[4]) {
    __m128i b = _mm_loadu_si128((const __m128i *)qs);
    __m128i lo = _mm_and_si128(b, _mm_set1_epi8(0x0F));
    __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), _mm_set1_epi8(0x0F));
    n[0] = _mm256_cvtepu8_epi32(lo);
    n[1] = _mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8));
    n[2] = _mm256_cvtepu8_epi32(hi);
    n[3] = _mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8));
}

AVX2 static void dec_q4_0_avx2(const uint8_t *src, uint16_t *dst) {
    const uint16_t dh = get16(src);
    if (!half_finite(dh)) { dec_q4_0_ref(src, dst); return; }
    const __m256 d = _mm256_set1_ps(h2f(dh));
    const __m256i eight = _mm256_set1_epi32(8);
    __m256i n[4];
    nibbles_to_i32(src + 2, n);
    for (int k = 0; k < 4; k++)
        store_h(dst + 8 * k, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(n[k], eight)), d));
}

AVX2 static void dec_q4_1_avx2(const uint8_t *src, uint16_t *dst) {
    const uint16_t dh = get16(src), mh = get16(src + 2);
    if (!half_finite(dh) || !half_finite(mh)) { dec_q4_1_ref(src, dst); return; }
    const __m256 d = _mm256_set1_ps(h2f(dh)), m = _mm256_set1_ps(h2f(mh));
    __m256i n[4];
    nibbles_to_i32(src + 4, n);
    for (int k = 0; k < 4; k++)
        store_h(dst + 8 * k, _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(n[k]), d), m));
}

AVX2 static void dec_iq4_nl_avx2(const uint8_t *src, uint16_t *dst) {
    const uint16_t dh = get16(src);
    if (!half_finite(dh)) { dec_iq4_nl_ref(src, dst); return; }
    const __m256 d = _mm256_set1_ps(h2f(dh));
    const __m128i lut = _mm_loadu_si128((const __m128i *)IQ4NL);
    __m128i b = _mm_loadu_si128((const __m128i *)(src + 2));
    __m128i lo = _mm_shuffle_epi8(lut, _mm_and_si128(b, _mm_set1_epi8(0x0F)));
    __m128i hi = _mm_shuffle_epi8(lut, _mm_and_si128(_mm_srli_epi16(b, 4), _mm_set1_epi8(0x0F)));
    __m128i v[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
    for (int k = 0; k < 4; k++)
        store_h(dst + 8 * k, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v[k]))));
}

static const float IQ4NL_F[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                  1, 13, 25, 38, 53, 69, 89, 113};

AVX2 static inline __m256 iq4nl_lookup(__m256i i) {
    const __m256 lo = _mm256_loadu_ps(IQ4NL_F), hi = _mm256_loadu_ps(IQ4NL_F + 8);
    __m256 upper = _mm256_castsi256_ps(_mm256_cmpgt_epi32(i, _mm256_set1_epi32(7)));
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, i), _mm256_permutevar8x32_ps(hi, i), upper);
}

/* Finite blocks above GROUP_MAX_EPS: best_index in SIMD (count of values <= al, then the
 * same float distance test), products in SIMD, the two sums in order, as ggml adds them. */
AVX2 static void enc_iq4_nl_avx2(const uint16_t *src, uint8_t *dst) {
    if (!block_finite(src)) { enc_iq4_nl_ref(src, dst); return; }
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    __m256 x[4], a[4];
    load32(src, x);
    for (int k = 0; k < 4; k++) a[k] = _mm256_and_ps(x[k], absmask);
    const float amax = hmax(_mm256_max_ps(_mm256_max_ps(a[0], a[1]), _mm256_max_ps(a[2], a[3])));
    if (!(amax >= 1e-15f)) { enc_iq4_nl_ref(src, dst); return; }
    const __m256 am = _mm256_set1_ps(amax);
    uint32_t hit = 0;
    for (int k = 0; k < 4; k++)
        hit |= (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(a[k], am, _CMP_EQ_OQ)) << (8 * k);
    const float max = h2f(src[__builtin_ctz(hit)]);
    const __m256 id = _mm256_set1_ps(1.0f / (max / (float)IQ4NL[0]));
    const __m256i one = _mm256_set1_epi32(1), fifteen = _mm256_set1_epi32(15);
    float tqx[QK], tq2[QK];
    __m256i L[4];
    for (int k = 0; k < 4; k++) {
        const __m256 al = _mm256_mul_ps(id, x[k]);
        __m256i cnt = _mm256_setzero_si256();
        for (int i = 0; i < 16; i++)   /* minus the all-ones masks: the count of values <= al */
            cnt = _mm256_sub_epi32(cnt, _mm256_castps_si256(
                _mm256_cmp_ps(al, _mm256_set1_ps(IQ4NL_F[i]), _CMP_GE_OQ)));
        __m256i mu = _mm256_min_epi32(_mm256_max_epi32(cnt, one), fifteen);
        __m256i mu1 = _mm256_sub_epi32(mu, one);
        __m256 lower = _mm256_cmp_ps(_mm256_sub_ps(al, iq4nl_lookup(mu1)),
                                     _mm256_sub_ps(iq4nl_lookup(mu), al), _CMP_LT_OQ);
        __m256i l = _mm256_add_epi32(mu, _mm256_castps_si256(lower));   /* mu - 1 where lower */
        l = _mm256_blendv_epi8(l, fifteen, _mm256_castps_si256(
            _mm256_cmp_ps(al, _mm256_set1_ps(IQ4NL_F[15]), _CMP_GE_OQ)));
        l = _mm256_andnot_si256(_mm256_castps_si256(
            _mm256_cmp_ps(al, _mm256_set1_ps(IQ4NL_F[0]), _CMP_LE_OQ)), l);
        L[k] = l;
        const __m256 q = iq4nl_lookup(l);
        const __m256 wq = _mm256_mul_ps(_mm256_mul_ps(x[k], x[k]), q);
        _mm256_storeu_ps(tqx + 8 * k, _mm256_mul_ps(wq, x[k]));
        _mm256_storeu_ps(tq2 + 8 * k, _mm256_mul_ps(wq, q));
    }
    float sumqx = 0.0f, sumq2 = 0.0f;
    for (int j = 0; j < QK; j++) { sumqx += tqx[j]; sumq2 += tq2[j]; }
    put16(dst, f2h(sumq2 > 0 ? sumqx / sumq2 : 0.0f));
    store_nibbles(L, dst + 2);
}

static const enc_fn ENC_AVX2[N_FMT] = {enc_q8_0_avx2, enc_q4_0_avx2, enc_q4_1_avx2, enc_iq4_nl_avx2};
static const dec_fn DEC_AVX2[N_FMT] = {dec_q8_0_avx2, dec_q4_0_avx2, dec_q4_1_avx2, dec_iq4_nl_avx2};
#endif

/* ---- dispatch and the exported API ---------------------------------------------------- */

static int use_simd(void) {
#ifdef AKV_X86
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        cached = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
    }
    return cached;
#else
    return 0;
#endif
}

/* Which code path runs: "avx2+f16c" or "scalar". */
AKV_API const char *akv_isa(void) { return use_simd() ? "avx2+f16c" : "scalar"; }

/* force_scalar != 0 makes the kernels below skip SIMD (tests compare both paths). */
static int g_force_scalar = 0;
AKV_API void akv_force_scalar(int on) { g_force_scalar = on; }

AKV_API int akv_block_bytes(int fmt) { return fmt >= 0 && fmt < N_FMT ? BLOCK_BYTES[fmt] : -1; }

/* n half values (a multiple of 32) from src -> n/32 blocks in dst. */
AKV_API int akv_encode(int fmt, const uint16_t *src, size_t n, uint8_t *dst) {
    if (fmt < 0 || fmt >= N_FMT || n % QK) return -1;
    enc_fn f = ENC_REF[fmt];
#ifdef AKV_X86
    if (use_simd() && !g_force_scalar) f = ENC_AVX2[fmt];
#endif
    const size_t bb = (size_t)BLOCK_BYTES[fmt];
    for (size_t i = 0; i < n / QK; i++) f(src + i * QK, dst + i * bb);
    return 0;
}

/* n/32 blocks from src -> n half values in dst. */
AKV_API int akv_decode(int fmt, const uint8_t *src, size_t n, uint16_t *dst) {
    if (fmt < 0 || fmt >= N_FMT || n % QK) return -1;
    dec_fn f = DEC_REF[fmt];
#ifdef AKV_X86
    if (use_simd() && !g_force_scalar) f = DEC_AVX2[fmt];
#endif
    const size_t bb = (size_t)BLOCK_BYTES[fmt];
    for (size_t i = 0; i < n / QK; i++) f(src + i * bb, dst + i * QK);
    return 0;
}

/* Transposed V: n_rows rows of n_cells elements of el bytes. Cells [a, b) of every row,
 * rows concatenated, go to out (gather) or come from in (scatter). */
AKV_API int akv_gather(const uint8_t *span, size_t n_rows, size_t n_cells, size_t el,
                       size_t a, size_t b, uint8_t *out) {
    if (a > b || b > n_cells) return -1;
    const size_t row = n_cells * el, w = (b - a) * el;
    for (size_t r = 0; r < n_rows; r++) memcpy(out + r * w, span + r * row + a * el, w);
    return 0;
}

AKV_API int akv_scatter(const uint8_t *in, size_t n_rows, size_t n_cells, size_t el,
                        size_t a, size_t b, uint8_t *span) {
    if (a > b || b > n_cells) return -1;
    const size_t row = n_cells * el, w = (b - a) * el;
    for (size_t r = 0; r < n_rows; r++) memcpy(span + r * row + a * el, in + r * w, w);
    return 0;
}

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
 * The SIMD paths (x86 AVX2 + F16C, aarch64 NEON; picked at run time) handle blocks of finite
 * values whose result does not depend on scan order; any other block goes through the scalar
 * reference. These conventions are the stored format on every platform: a block's bytes (and
 * so its content address) do not depend on the CPU that wrote it, although ggml's own
 * reference, compiled on aarch64, converts an out-of-range float as that CPU does (saturating,
 * NaN -> 0), so for such blocks it differs from these bytes there.
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

#if defined(__aarch64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(AKV_NO_NEON)
#define AKV_NEON 1
#include <arm_neon.h>
#if defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMD
#define HWCAP_ASIMD (1 << 1)
#endif
#endif
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

#if defined(AKV_X86) || defined(AKV_NEON)
static const float IQ4NL_F[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                  1, 13, 25, 38, 53, 69, 89, 113};
#endif

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

/* ---- aarch64 Advanced SIMD (NEON) ------------------------------------------------------
 * Mandatory in AArch64, with the half <-> float conversions (fcvtl / fcvtn) these use; still
 * confirmed at run time (HWCAP_ASIMD) and left out of a build with -DAKV_NO_NEON. The same
 * structure as the AVX2 paths: finite blocks in SIMD, any other block through the reference.
 * vrndaq_f32 (frinta) is C's roundf exactly; vcvtq_s32_f32 truncates as (int32_t) does for the
 * in-range values a finite block gives; the half stores round to nearest even, as f2h does
 * for every non-NaN value. */
#ifdef AKV_NEON

static inline int block_finite_neon(const uint16_t *src) {
    const uint16x8_t e = vdupq_n_u16(0x7C00);
    uint16x8_t bad = vdupq_n_u16(0);
    for (int k = 0; k < 4; k++) {
        const uint16x8_t v = vld1q_u16(src + 8 * k);
        bad = vorrq_u16(bad, vceqq_u16(vandq_u16(v, e), e));
    }
    return vmaxvq_u16(bad) == 0;
}

static inline void load32_neon(const uint16_t *src, float32x4_t v[8]) {
    for (int k = 0; k < 8; k++) v[k] = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(src + 4 * k)));
}

static inline float amax_neon(const float32x4_t x[8], float32x4_t a[8]) {
    float32x4_t m = vdupq_n_f32(0.0f);
    for (int k = 0; k < 8; k++) { a[k] = vabsq_f32(x[k]); m = vmaxq_f32(m, a[k]); }
    return vmaxvq_f32(m);
}

/* The index of the first lane of a[] equal to amax (there is one: amax came from a[]). */
static inline int first_equal(const float32x4_t a[8], float amax) {
    const float32x4_t am = vdupq_n_f32(amax);
    for (int k = 0; k < 8; k++) {
        const uint32x4_t eq = vceqq_f32(a[k], am);
        if (vmaxvq_u32(eq)) {
            uint32_t lanes[4];
            vst1q_u32(lanes, eq);
            for (int i = 0; i < 4; i++)
                if (lanes[i]) return 4 * k + i;
        }
    }
    return 0;
}

/* 32 int32 in [0, 15] (j = 0..31 across eight vectors) -> 16 bytes q[j] | q[j+16] << 4. */
static inline void store_nibbles_neon(const int32x4_t q[8], uint8_t *dst) {
    uint8x16_t half[2];
    for (int h = 0; h < 2; h++) {
        const int32x4_t *p = q + 4 * h;
        const uint16x8_t a = vcombine_u16(vmovn_u32(vreinterpretq_u32_s32(p[0])),
                                          vmovn_u32(vreinterpretq_u32_s32(p[1])));
        const uint16x8_t b = vcombine_u16(vmovn_u32(vreinterpretq_u32_s32(p[2])),
                                          vmovn_u32(vreinterpretq_u32_s32(p[3])));
        half[h] = vcombine_u8(vmovn_u16(a), vmovn_u16(b));
    }
    vst1q_u8(dst, vorrq_u8(half[0], vshlq_n_u8(half[1], 4)));
}

static void enc_q8_0_neon(const uint16_t *src, uint8_t *dst) {
    if (!block_finite_neon(src)) { enc_q8_0_ref(src, dst); return; }
    float32x4_t x[8], a[8];
    load32_neon(src, x);
    const float d = amax_neon(x, a) / 127.0f;
    const float32x4_t id = vdupq_n_f32(inv(d));
    put16(dst, f2h(d));
    int16x8_t w[4];
    for (int k = 0; k < 4; k++)
        w[k] = vcombine_s16(vmovn_s32(vcvtq_s32_f32(vrndaq_f32(vmulq_f32(x[2 * k], id)))),
                            vmovn_s32(vcvtq_s32_f32(vrndaq_f32(vmulq_f32(x[2 * k + 1], id)))));
    vst1q_s8((int8_t *)(dst + 2), vcombine_s8(vmovn_s16(w[0]), vmovn_s16(w[1])));
    vst1q_s8((int8_t *)(dst + 18), vcombine_s8(vmovn_s16(w[2]), vmovn_s16(w[3])));
}

static void enc_q4_0_neon(const uint16_t *src, uint8_t *dst) {
    if (!block_finite_neon(src)) { enc_q4_0_ref(src, dst); return; }
    float32x4_t x[8], a[8];
    load32_neon(src, x);
    const float amax = amax_neon(x, a);
    const float max = amax > 0.0f ? h2f(src[first_equal(a, amax)]) : 0.0f;
    const float d = max / -8.0f;
    const float32x4_t id = vdupq_n_f32(inv(d)), off = vdupq_n_f32(8.5f);
    const int32x4_t fifteen = vdupq_n_s32(15);
    put16(dst, f2h(d));
    int32x4_t q[8];
    for (int k = 0; k < 8; k++)
        q[k] = vminq_s32(vcvtq_s32_f32(vaddq_f32(vmulq_f32(x[k], id), off)), fifteen);
    store_nibbles_neon(q, dst + 2);
}

static void enc_q4_1_neon(const uint16_t *src, uint8_t *dst) {
    if (!block_finite_neon(src)) { enc_q4_1_ref(src, dst); return; }
    float32x4_t x[8];
    load32_neon(src, x);
    float32x4_t lo = x[0], hi = x[0];
    for (int k = 1; k < 8; k++) { lo = vminq_f32(lo, x[k]); hi = vmaxq_f32(hi, x[k]); }
    const float min = vminvq_f32(lo), max = vmaxvq_f32(hi);
    if (min == 0.0f || max == 0.0f) { enc_q4_1_ref(src, dst); return; }  /* which signed zero */
    const float d = (max - min) / 15.0f;
    const float32x4_t id = vdupq_n_f32(inv(d)), vmin = vdupq_n_f32(min), off = vdupq_n_f32(0.5f);
    const int32x4_t fifteen = vdupq_n_s32(15);
    put16(dst, f2h(d));
    put16(dst + 2, f2h(min));
    int32x4_t q[8];
    for (int k = 0; k < 8; k++)
        q[k] = vminq_s32(vcvtq_s32_f32(vaddq_f32(vmulq_f32(vsubq_f32(x[k], vmin), id), off)), fifteen);
    store_nibbles_neon(q, dst + 4);
}

static inline void store_h_neon(uint16_t *dst, float32x4_t v) {
    vst1_u16(dst, vreinterpret_u16_f16(vcvt_f16_f32(v)));
}

static inline void widen_i8(int8x16_t b, float32x4_t out[4]) {  /* 16 int8 -> 16 floats */
    const int16x8_t lo = vmovl_s8(vget_low_s8(b)), hi = vmovl_s8(vget_high_s8(b));
    out[0] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(lo)));
    out[1] = vcvtq_f32_s32(vmovl_s16(vget_high_s16(lo)));
    out[2] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(hi)));
    out[3] = vcvtq_f32_s32(vmovl_s16(vget_high_s16(hi)));
}

static void dec_q8_0_neon(const uint8_t *src, uint16_t *dst) {
    const uint16_t dh = get16(src);
    if (!half_finite(dh)) { dec_q8_0_ref(src, dst); return; }
    const float32x4_t d = vdupq_n_f32(h2f(dh));
    for (int h = 0; h < 2; h++) {
        float32x4_t v[4];
        widen_i8(vld1q_s8((const int8_t *)(src + 2 + 16 * h)), v);
        for (int k = 0; k < 4; k++) store_h_neon(dst + 16 * h + 4 * k, vmulq_f32(v[k], d));
    }
}

/* The 16 bytes of nibbles -> j = 0..15 (low nibbles) and j = 16..31 (high), as int8. */
static inline void nibbles_neon(const uint8_t *qs, int8x16_t n[2]) {
    const uint8x16_t b = vld1q_u8(qs);
    n[0] = vreinterpretq_s8_u8(vandq_u8(b, vdupq_n_u8(0x0F)));
    n[1] = vreinterpretq_s8_u8(vshrq_n_u8(b, 4));
}

static void dec_q4_0_neon(const uint8_t *src, uint16_t *dst) {
    const uint16_t dh = get16(src);
    if (!half_finite(dh)) { dec_q4_0_ref(src, dst); return; }
    const float32x4_t d = vdupq_n_f32(h2f(dh));
    int8x16_t n[2];
    nibbles_neon(src + 2, n);
    for (int h = 0; h < 2; h++) {
        float32x4_t v[4];
        widen_i8(vsubq_s8(n[h], vdupq_n_s8(8)), v);
        for (int k = 0; k < 4; k++) store_h_neon(dst + 16 * h + 4 * k, vmulq_f32(v[k], d));
    }
}

static void dec_q4_1_neon(const uint8_t *src, uint16_t *dst) {
    const uint16_t dh = get16(src), mh = get16(src + 2);
    if (!half_finite(dh) || !half_finite(mh)) { dec_q4_1_ref(src, dst); return; }
    const float32x4_t d = vdupq_n_f32(h2f(dh)), m = vdupq_n_f32(h2f(mh));
    int8x16_t n[2];
    nibbles_neon(src + 4, n);
    for (int h = 0; h < 2; h++) {
        float32x4_t v[4];
        widen_i8(n[h], v);
        for (int k = 0; k < 4; k++) store_h_neon(dst + 16 * h + 4 * k, vaddq_f32(vmulq_f32(v[k], d), m));
    }
}

static void dec_iq4_nl_neon(const uint8_t *src, uint16_t *dst) {
    const uint16_t dh = get16(src);
    if (!half_finite(dh)) { dec_iq4_nl_ref(src, dst); return; }
    const float32x4_t d = vdupq_n_f32(h2f(dh));
    const int8x16_t lut = vld1q_s8(IQ4NL);
    int8x16_t n[2];
    nibbles_neon(src + 2, n);
    for (int h = 0; h < 2; h++) {
        float32x4_t v[4];
        widen_i8(vqtbl1q_s8(lut, vreinterpretq_u8_s8(n[h])), v);
        for (int k = 0; k < 4; k++) store_h_neon(dst + 16 * h + 4 * k, vmulq_f32(d, v[k]));
    }
}

/* Finite blocks above GROUP_MAX_EPS: best_index in SIMD (the count of values <= al, then the
 * same float distance test), the products and the two sums in order, as ggml computes them. */
static void enc_iq4_nl_neon(const uint16_t *src, uint8_t *dst) {
    if (!block_finite_neon(src)) { enc_iq4_nl_ref(src, dst); return; }
    float32x4_t x[8], a[8];
    load32_neon(src, x);
    const float amax = amax_neon(x, a);
    if (!(amax >= 1e-15f)) { enc_iq4_nl_ref(src, dst); return; }
    const float max = h2f(src[first_equal(a, amax)]);
    const float32x4_t id = vdupq_n_f32(1.0f / (max / (float)IQ4NL[0]));
    const float32x4_t first = vdupq_n_f32(IQ4NL_F[0]), last = vdupq_n_f32(IQ4NL_F[15]);
    const int32x4_t one = vdupq_n_s32(1), fifteen = vdupq_n_s32(15);
    float xs[QK];
    int32_t L[QK];
    for (int k = 0; k < 8; k++) {
        const float32x4_t al = vmulq_f32(id, x[k]);
        int32x4_t cnt = vdupq_n_s32(0);
        for (int i = 0; i < 16; i++)  /* minus the all-ones masks: the count of values <= al */
            cnt = vsubq_s32(cnt, vreinterpretq_s32_u32(vcgeq_f32(al, vdupq_n_f32(IQ4NL_F[i]))));
        const int32x4_t mu = vminq_s32(vmaxq_s32(cnt, one), fifteen);
        int32_t m[4];
        vst1q_s32(m, mu);
        const float lo[4] = {IQ4NL_F[m[0] - 1], IQ4NL_F[m[1] - 1], IQ4NL_F[m[2] - 1], IQ4NL_F[m[3] - 1]};
        const float up[4] = {IQ4NL_F[m[0]], IQ4NL_F[m[1]], IQ4NL_F[m[2]], IQ4NL_F[m[3]]};
        const uint32x4_t lower = vcltq_f32(vsubq_f32(al, vld1q_f32(lo)), vsubq_f32(vld1q_f32(up), al));
        int32x4_t l = vaddq_s32(mu, vreinterpretq_s32_u32(lower));      /* mu - 1 where lower */
        l = vbslq_s32(vcgeq_f32(al, last), fifteen, l);
        l = vbslq_s32(vcleq_f32(al, first), vdupq_n_s32(0), l);
        vst1q_s32(L + 4 * k, l);
        vst1q_f32(xs + 4 * k, x[k]);
    }
    float sumqx = 0.0f, sumq2 = 0.0f;
    for (int j = 0; j < QK; j++) {
        const float q = IQ4NL_F[L[j]], wq = (xs[j] * xs[j]) * q;
        sumqx += wq * xs[j];
        sumq2 += wq * q;
    }
    put16(dst, f2h(sumq2 > 0 ? sumqx / sumq2 : 0.0f));
    for (int j = 0; j < QK / 2; j++) dst[2 + j] = (uint8_t)(L[j] | (L[j + QK / 2] << 4));
}

static const enc_fn ENC_NEON[N_FMT] = {enc_q8_0_neon, enc_q4_0_neon, enc_q4_1_neon, enc_iq4_nl_neon};
static const dec_fn DEC_NEON[N_FMT] = {dec_q8_0_neon, dec_q4_0_neon, dec_q4_1_neon, dec_iq4_nl_neon};
#endif

/* ---- dispatch and the exported API ---------------------------------------------------- */

static int use_simd(void) {
    static int cached = -1;
    if (cached < 0) {
#if defined(AKV_X86)
        __builtin_cpu_init();
        cached = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
#elif defined(AKV_NEON) && defined(__linux__)
        cached = (getauxval(AT_HWCAP) & HWCAP_ASIMD) != 0;
#elif defined(AKV_NEON)
        cached = 1;
#else
        cached = 0;
#endif
    }
    return cached;
}

#if defined(AKV_X86)
#define SIMD_NAME "avx2+f16c"
static const enc_fn *const ENC_SIMD = ENC_AVX2;
static const dec_fn *const DEC_SIMD = DEC_AVX2;
#elif defined(AKV_NEON)
#define SIMD_NAME "neon"
static const enc_fn *const ENC_SIMD = ENC_NEON;
static const dec_fn *const DEC_SIMD = DEC_NEON;
#else
#define SIMD_NAME "scalar"
static const enc_fn *const ENC_SIMD = ENC_REF;
static const dec_fn *const DEC_SIMD = DEC_REF;
#endif

/* Which code path runs: "avx2+f16c", "neon" or "scalar". */
AKV_API const char *akv_isa(void) { return use_simd() ? SIMD_NAME : "scalar"; }

/* force_scalar != 0 makes the kernels below skip SIMD (tests compare both paths). */
static int g_force_scalar = 0;
AKV_API void akv_force_scalar(int on) { g_force_scalar = on; }

AKV_API int akv_block_bytes(int fmt) { return fmt >= 0 && fmt < N_FMT ? BLOCK_BYTES[fmt] : -1; }

/* n half values (a multiple of 32) from src -> n/32 blocks in dst. */
AKV_API int akv_encode(int fmt, const uint16_t *src, size_t n, uint8_t *dst) {
    if (fmt < 0 || fmt >= N_FMT || n % QK) return -1;
    const enc_fn f = use_simd() && !g_force_scalar ? ENC_SIMD[fmt] : ENC_REF[fmt];
    const size_t bb = (size_t)BLOCK_BYTES[fmt];
    for (size_t i = 0; i < n / QK; i++) f(src + i * QK, dst + i * bb);
    return 0;
}

/* n/32 blocks from src -> n half values in dst. */
AKV_API int akv_decode(int fmt, const uint8_t *src, size_t n, uint16_t *dst) {
    if (fmt < 0 || fmt >= N_FMT || n % QK) return -1;
    const dec_fn f = use_simd() && !g_force_scalar ? DEC_SIMD[fmt] : DEC_REF[fmt];
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

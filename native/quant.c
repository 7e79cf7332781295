/*
 * agentkv native kernels: KV rows at rest (float16 <-> ggml q8_0 / q4_0 / q4_1 / iq4_nl blocks).
 *
 * Every kernel takes raw buffers and returns 0 on success, a negative code on bad arguments.
 * The output is bit-identical to the numpy twins in agentkv/_quant/reference.py, which follow
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

/* ---- SIMD paths (each file guarded by its own #ifdef) ------------------------------- */
#include "quant_avx2.h"
#include "quant_neon.h"

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

/*
 * agentkv native kernels, the aarch64 NEON paths: included by quant.c (one translation unit;
 * these use its scalar reference, helpers and tables).
 */
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

/*
 * agentkv native kernels, the x86 AVX2 + F16C paths: included by quant.c (one translation unit;
 * these use its scalar reference, helpers and tables). Compiled per function with a target
 * attribute, chosen at run time (quant.c's use_simd), so the library runs on any x86-64 CPU.
 */
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

/*
 * The SIMD paths of native/quant.c against its scalar reference, every format, encode and
 * decode, over every float16 bit pattern, random bits, finite values of many scales and the
 * special blocks (zeros, signed zeros, constants). Exit status 0: bit-identical.
 * tests/test_quant.py builds it for aarch64 and runs it under qemu-user (the NEON paths on an
 * x86_64 machine), or natively on aarch64:
 *   aarch64-linux-gnu-gcc -O3 -ffp-contract=off -static -Inative tests/neon_check.c -lm
 */
#include "quant.c"
#include <stdio.h>

static uint32_t rs = 12345;
static uint32_t rnd(void) { rs ^= rs << 13; rs ^= rs >> 17; rs ^= rs << 5; return rs; }

enum { N = 65536 * 5 };
static uint16_t src[N], back1[N], back2[N];
static uint8_t e1[N * 2], e2[N * 2];

int main(void) {
    for (int i = 0; i < 65536; i++) src[i] = (uint16_t)i;                /* every pattern */
    for (int i = 65536; i < 2 * 65536; i++) src[i] = (uint16_t)rnd();    /* random bits */
    for (int i = 2 * 65536; i < 4 * 65536; i++) {                         /* finite, many scales */
        const float v = ((int)(rnd() % 20001) - 10000) / 1000.0f;
        const int e = (i / 32) % 40 - 24;
        src[i] = f2h(ldexpf(v, e));
    }
    for (int i = 4 * 65536; i < N; i++) {                                 /* special blocks */
        const int b = (i / 32) % 6;
        const uint16_t vals[6] = {0x0000, 0x8000, 0x3C00, 0xBC00, 0x0001, 0x7BFF};
        src[i] = (b < 5 || i % 2) ? vals[b] : 0x8000;
    }
    printf("isa %s\n", akv_isa());
    if (!use_simd()) { printf("no SIMD path on this CPU\n"); return 2; }
    int bad = 0;
    for (int f = 0; f < N_FMT; f++) {
        const size_t nb = (size_t)N / 32 * (size_t)BLOCK_BYTES[f];
        akv_force_scalar(0); akv_encode(f, src, N, e1);
        akv_force_scalar(1); akv_encode(f, src, N, e2);
        for (size_t i = 0; i < nb; i++)
            if (e1[i] != e2[i]) { printf("encode fmt %d: block %zu differs\n", f, i / BLOCK_BYTES[f]); bad++; break; }
        for (size_t i = 0; i < nb; i++) e2[i] = (uint8_t)rnd();            /* arbitrary blocks */
        for (int pass = 0; pass < 2; pass++) {
            const uint8_t *q = pass ? e2 : e1;
            akv_force_scalar(0); akv_decode(f, q, N, back1);
            akv_force_scalar(1); akv_decode(f, q, N, back2);
            for (int i = 0; i < N; i++)
                if (back1[i] != back2[i]) {
                    printf("decode fmt %d (%s blocks): value %d differs: %04x != %04x\n", f,
                           pass ? "arbitrary" : "encoded", i, back1[i], back2[i]);
                    bad++;
                    break;
                }
        }
    }
    printf(bad ? "FAIL: %d paths differ\n" : "OK: %d formats bit-identical\n", bad ? bad : N_FMT);
    return bad != 0;
}

/* Data-dependent libm costs inside llama.cpp's CPU decode (bench/NOTES.md §11), timed in isolation.
   libggml-cpu.so calls glibc's scalar sincosf and tanhf (nm -D), whose cost depends on the argument:
   1. RoPE: ggml_rope_cache_init (ggml-cpu/ops.cpp) builds cos/sin of position * base^(-2i/n_dims) per rope op;
      sincosf takes a slower argument reduction for |theta| >= 120, so the cache gets dearer with depth.
   2. Final logit softcapping (Gemma): tanhf over every vocab entry; its cost depends on the logits' scale,
      which on a random-weight twin is not a real model's.
   gcc -O3 bench/libm_cost.c -o /tmp/libm_cost -lm && /tmp/libm_cost */
#define _GNU_SOURCE
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec * 1e9 + t.tv_nsec; }

/* ggml_rope_cache_init for one position: ne0/2 pairs, theta = p * base^(-2i/n_dims) */
__attribute__((noinline)) static void cache_init(float p, float theta_scale, int ne0, float *cache) {
    float theta = p;
    for (int i0 = 0; i0 < ne0; i0 += 2) {
        float s, c;
        sincosf(theta, &s, &c);
        cache[i0] = c;
        cache[i0 + 1] = s;
        theta *= theta_scale;
    }
}

static float gauss(void) {
    float u = (rand() + 1.0f) / (RAND_MAX + 2.0f), v = (rand() + 1.0f) / (RAND_MAX + 2.0f);
    return sqrtf(-2 * logf(u)) * cosf(6.2831853f * v);
}

int main(void) {
    int ne0 = 256, reps = 20000;
    float cache[256], bases[2] = {10000.f, 1000000.f};
    int pos[] = {13, 172, 658, 1024, 2048, 4096, 8192, 32768};
    printf("RoPE cache (256 dims), best of 7 x %d:\n", reps);
    for (int b = 0; b < 2; b++) {
        float ts = powf(bases[b], -2.0f / ne0);
        for (unsigned k = 0; k < sizeof pos / sizeof *pos; k++) {
            double best = 1e30;
            for (int t = 0; t < 7; t++) {
                double t0 = now();
                for (int r = 0; r < reps; r++) {
                    cache_init((float)pos[k], ts, ne0, cache);
                    __asm__ volatile("" ::"r"(cache) : "memory");
                }
                double dt = (now() - t0) / reps;
                if (dt < best) best = dt;
            }
            int slow = 0;
            float th = pos[k];
            for (int i = 0; i < ne0 / 2; i++, th *= ts) slow += fabsf(th) >= 120.f;
            printf("  base %.0e position %5d: %4.0f ns per cache (%3d of %d angles >= 120)\n", bases[b], pos[k], best, slow,
                   ne0 / 2);
        }
    }
    int n = 262144;
    float *x = malloc(n * sizeof *x), *y = malloc(n * sizeof *y);
    float sig[] = {0.01f, 0.03f, 0.1f, 0.3f, 1.f, 2.f, 3.f, 10.f};
    printf("tanhf over %d values x ~ N(0, s) (the softcap's input: logits / cap), best of 15:\n", n);
    for (unsigned k = 0; k < sizeof sig / sizeof *sig; k++) {
        srand(1);
        for (int i = 0; i < n; i++) x[i] = sig[k] * gauss();
        double best = 1e30;
        for (int t = 0; t < 15; t++) {
            double t0 = now();
            for (int i = 0; i < n; i++) y[i] = tanhf(x[i]);
            __asm__ volatile("" ::"r"(y) : "memory");
            if (now() - t0 < best) best = now() - t0;
        }
        printf("  s = %5.2f: %5.0f us (%.1f ns each)\n", sig[k], best / 1e3, best / n);
    }
    free(x);
    free(y);
    return 0;
}

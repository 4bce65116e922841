/*
 * The CPU check of a mechwatch binary built for more than baseline x86-64 (see build.rs):
 * compiled for baseline x86-64, it runs from .init_array before any Rust code, and on a CPU
 * that lacks a feature this build uses it says which and exits 2, instead of letting the
 * first AVX instruction kill the process with SIGILL. build.rs defines MECHWATCH_NEEDS_<X>
 * for each feature the Rust code is compiled with.
 */
#include <cpuid.h>
#include <string.h>
#include <unistd.h>

/* CPUID bits (Intel SDM vol. 2A, CPUID): leaf 1 ECX, leaf 7 EBX, leaf 0x80000001 ECX. */
#define L1C_SSE3 (1u << 0)
#define L1C_SSSE3 (1u << 9)
#define L1C_FMA (1u << 12)
#define L1C_CMPXCHG16B (1u << 13)
#define L1C_SSE4_1 (1u << 19)
#define L1C_SSE4_2 (1u << 20)
#define L1C_MOVBE (1u << 22)
#define L1C_POPCNT (1u << 23)
#define L1C_XSAVE (1u << 26)
#define L1C_OSXSAVE (1u << 27)
#define L1C_AVX (1u << 28)
#define L1C_F16C (1u << 29)
#define L7B_BMI1 (1u << 3)
#define L7B_AVX2 (1u << 5)
#define L7B_BMI2 (1u << 8)
#define LX1C_LZCNT (1u << 5)

/* XCR0: the OS saves the SSE (bit 1) and AVX (bit 2) register state. */
static unsigned long long xcr0(void) {
    unsigned int lo, hi;
    __asm__ volatile(".byte 0x0f, 0x01, 0xd0" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((unsigned long long)hi << 32) | lo;
}

static char lacks[200];
static size_t lacks_len;

static void lack(const char *name) {
    size_t n = strlen(name);
    if (lacks_len + n + 3 >= sizeof lacks) return;
    if (lacks_len > 0) {
        memcpy(lacks + lacks_len, ", ", 2);
        lacks_len += 2;
    }
    memcpy(lacks + lacks_len, name, n);
    lacks_len += n;
}

static void say(const char *s) {
    size_t n = strlen(s);
    while (n > 0) {
        ssize_t w = write(2, s, n);
        if (w <= 0) return;
        s += w;
        n -= (size_t)w;
    }
}

__attribute__((constructor(101))) static void mechwatch_cpu_check(void) {
    unsigned int a, b, c, d;
    unsigned int l1c = 0, l7b = 0, lx1c = 0;
    if (__get_cpuid(1, &a, &b, &c, &d)) l1c = c;
    if (__get_cpuid_max(0, 0) >= 7) {
        __cpuid_count(7, 0, a, b, c, d);
        l7b = b;
    }
    if (__get_cpuid(0x80000001u, &a, &b, &c, &d)) lx1c = c;
    /* AVX registers are usable only when the OS saves them. */
    int ymm = (l1c & L1C_OSXSAVE) && (xcr0() & 6) == 6;
    (void)ymm;
    (void)l7b;
    (void)lx1c;

#ifdef MECHWATCH_NEEDS_SSE3
    if (!(l1c & L1C_SSE3)) lack("sse3");
#endif
#ifdef MECHWATCH_NEEDS_SSSE3
    if (!(l1c & L1C_SSSE3)) lack("ssse3");
#endif
#ifdef MECHWATCH_NEEDS_SSE4_1
    if (!(l1c & L1C_SSE4_1)) lack("sse4.1");
#endif
#ifdef MECHWATCH_NEEDS_SSE4_2
    if (!(l1c & L1C_SSE4_2)) lack("sse4.2");
#endif
#ifdef MECHWATCH_NEEDS_POPCNT
    if (!(l1c & L1C_POPCNT)) lack("popcnt");
#endif
#ifdef MECHWATCH_NEEDS_CMPXCHG16B
    if (!(l1c & L1C_CMPXCHG16B)) lack("cmpxchg16b");
#endif
#ifdef MECHWATCH_NEEDS_AVX
    if (!(l1c & L1C_AVX) || !ymm) lack("avx");
#endif
#ifdef MECHWATCH_NEEDS_AVX2
    if (!(l7b & L7B_AVX2) || !ymm) lack("avx2");
#endif
#ifdef MECHWATCH_NEEDS_BMI1
    if (!(l7b & L7B_BMI1)) lack("bmi1");
#endif
#ifdef MECHWATCH_NEEDS_BMI2
    if (!(l7b & L7B_BMI2)) lack("bmi2");
#endif
#ifdef MECHWATCH_NEEDS_FMA
    if (!(l1c & L1C_FMA) || !ymm) lack("fma");
#endif
#ifdef MECHWATCH_NEEDS_F16C
    if (!(l1c & L1C_F16C) || !ymm) lack("f16c");
#endif
#ifdef MECHWATCH_NEEDS_LZCNT
    if (!(lx1c & LX1C_LZCNT)) lack("lzcnt");
#endif
#ifdef MECHWATCH_NEEDS_MOVBE
    if (!(l1c & L1C_MOVBE)) lack("movbe");
#endif
#ifdef MECHWATCH_NEEDS_XSAVE
    if (!(l1c & L1C_XSAVE)) lack("xsave");
#endif

    if (lacks_len == 0) return;
    lacks[lacks_len] = '\0';
    say("mechwatch: this build needs an x86-64-v3 CPU (AVX2, BMI2, FMA...); this CPU lacks: ");
    say(lacks);
    say("\nBuild one for this CPU with RUSTFLAGS=\"-C target-cpu=x86-64\" cargo build --release"
        " (see docs/daemon.md).\n");
    _exit(2);
}

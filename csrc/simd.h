// The SIMD layer of moegen's CPU kernels (decode_attention.cpp, elementwise.cpp).
//
// One `Simd` struct per build, picked at compile time from what -march=native enables:
// AVX-512 (F+BW+VL, with bf16 dot products where the CPU has them), AVX2+FMA+F16C, or portable
// scalar code. -DMOEGEN_SIMD_AVX2 / -DMOEGEN_SIMD_SCALAR force a narrower one (tests use them).
// The kernels are written once against it: W fp32 lanes per Reg, loads that widen fp32/bf16/fp16
// storage to fp32, stores that round fp32 to the storage type to nearest even (as c10's casts,
// and so PyTorch's, do) and one exp.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace moegen_simd {

// kAccRegs is how many accumulator registers a micro-kernel may keep live (half the register
// file, leaving room for the operands).

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    !defined(MOEGEN_SIMD_AVX2) && !defined(MOEGEN_SIMD_SCALAR)

struct Simd {
  using Reg = __m512;
  static constexpr int W = 16;
  static constexpr int kAccRegs = 16;
  static constexpr const char* kName = "native-avx512";
#ifdef __AVX512BF16__
#define MOEGEN_BF16_DOT 1
  // bf16 x bf16 dot products in one instruction (exact products, fp32 sums), used for scores.
  static constexpr bool kBf16Dot = true;
  static Reg dot_bf16(Reg acc, __m512i a, __m512i b) {
    return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
  }
#else
  static constexpr bool kBf16Dot = false;
#endif

  static Reg zero() { return _mm512_setzero_ps(); }
  static Reg set1(float x) { return _mm512_set1_ps(x); }
  static Reg load(const float* p) { return _mm512_loadu_ps(p); }
  static Reg load(const c10::BFloat16* p) {
    // bf16 is the top half of an fp32: widen and shift.
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static Reg load(const c10::Half* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static void store(float* p, Reg r) { _mm512_storeu_ps(p, r); }
  static void store(c10::BFloat16* p, Reg r) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), bf16_halves(r));
  }
  static void store(c10::Half* p, Reg r) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(r, _MM_FROUND_TO_NEAREST_INT));
  }
  // r rounded to T and widened back, in registers: what storing it as T and loading would give.
  template <class T>
  static Reg round_to(Reg r) {
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16_halves(r)), 16));
    } else {
      return _mm512_cvtph_ps(_mm512_cvtps_ph(r, _MM_FROUND_TO_NEAREST_INT));
    }
  }

  static Reg fma(Reg a, Reg b, Reg c) { return _mm512_fmadd_ps(a, b, c); }
  static Reg add(Reg a, Reg b) { return _mm512_add_ps(a, b); }
  static Reg sub(Reg a, Reg b) { return _mm512_sub_ps(a, b); }
  static Reg mul(Reg a, Reg b) { return _mm512_mul_ps(a, b); }
  static Reg div(Reg a, Reg b) { return _mm512_div_ps(a, b); }
  // min/max return b when either is NaN (x86 semantics; the scalar build copies them).
  static Reg min(Reg a, Reg b) { return _mm512_min_ps(a, b); }
  static Reg max(Reg a, Reg b) { return _mm512_max_ps(a, b); }
  static float reduce_add(Reg r) { return _mm512_reduce_add_ps(r); }
  static float reduce_max(Reg r) { return _mm512_reduce_max_ps(r); }
  static Reg exp(Reg x);

  // Returns lane j = horizontal sum of acc[j], for 16 accumulators, in 30 shuffles/adds
  // instead of 16 separate reductions.
  static Reg reduce_lanes(const Reg* acc) {
    Reg x[8], y[4], z[2];
    for (int i = 0; i < 8; ++i) {  // lanes now hold (a, b, a, b) partial sums per 128 bits
      x[i] = _mm512_add_ps(_mm512_unpacklo_ps(acc[2 * i], acc[2 * i + 1]),
                           _mm512_unpackhi_ps(acc[2 * i], acc[2 * i + 1]));
    }
    for (int i = 0; i < 4; ++i) {  // (a, b, c, d) per 128 bits
      const __m512d a = _mm512_castps_pd(x[2 * i]), b = _mm512_castps_pd(x[2 * i + 1]);
      y[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                           _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    for (int i = 0; i < 2; ++i) {  // fold 128-bit lanes pairwise
      z[i] = _mm512_add_ps(_mm512_shuffle_f32x4(y[2 * i], y[2 * i + 1], 0x88),
                           _mm512_shuffle_f32x4(y[2 * i], y[2 * i + 1], 0xDD));
    }
    return _mm512_add_ps(_mm512_shuffle_f32x4(z[0], z[1], 0x88),
                         _mm512_shuffle_f32x4(z[0], z[1], 0xDD));
  }

  // exp's building blocks.
  static Reg round_even(Reg x) {
    return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  static Reg pow2(Reg n) {  // 2^n for integral n in [-126, 127], built in the exponent field
    const __m512i biased = _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127));
    return _mm512_castsi512_ps(_mm512_slli_epi32(biased, 23));
  }
  static Reg zero_where_below(Reg x, Reg bound, Reg v) {  // a NaN x keeps v
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, bound, _CMP_NLT_UQ), v);
  }

 private:
  // r rounded to bf16, 16 halves. With AVX512-BF16 one VCVTNEPS2BF16 (round to nearest even, NaN
  // stays NaN) instead of the 8-instruction sequence below; it reads fp32 subnormals as zero where
  // c10's cast rounds them, so a vector holding one (VFPCLASSPS, rare) takes the sequence. Measured
  // on the AMX Xeon: the fused experts kernel +1 to +4% (kernel A/B, both shapes, 4,096 and 512
  // tokens; outputs identical); RMSNorm of [65536, 128] 1.57 -> 1.40 ms, of [4096, 1024] 0.62 ->
  // 0.54; RoPE of [4096, 16, 128] 1.36 -> 1.13. (Without the check for subnormals: 1.1, 0.49, 1.0.)
  static __m256i bf16_halves(Reg r) {
#if defined(__AVX512BF16__) && defined(__AVX512DQ__)
    if (__builtin_expect(_mm512_fpclass_ps_mask(r, 0x20) == 0, 1)) return (__m256i)_mm512_cvtneps_pbh(r);
#endif
    return _mm512_cvtepi32_epi16(bf16_bits(r));
  }
  // bf16 bits of r rounded to nearest even, one per 32-bit lane; NaN -> quiet NaN (0x7fc0), as
  // c10::BFloat16 does.
  static __m512i bf16_bits(Reg r) {
    const __m512i bits = _mm512_castps_si512(r);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    const __m512i rounded =
        _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    return _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(r, r, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
  }
};

#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && !defined(MOEGEN_SIMD_SCALAR)

struct Simd {
  using Reg = __m256;
  static constexpr int W = 8;
  static constexpr int kAccRegs = 8;
  static constexpr const char* kName = "native-avx2";
  static constexpr bool kBf16Dot = false;

  static Reg zero() { return _mm256_setzero_ps(); }
  static Reg set1(float x) { return _mm256_set1_ps(x); }
  static Reg load(const float* p) { return _mm256_loadu_ps(p); }
  static Reg load(const c10::BFloat16* p) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static Reg load(const c10::Half* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static void store(float* p, Reg r) { _mm256_storeu_ps(p, r); }
  static void store(c10::BFloat16* p, Reg r) {
    // No 32 -> 16 bit narrowing in AVX2: pack (values fit, so no saturation), which works per
    // 128-bit half, then gather the two halves' results into the low 128 bits.
    const __m256i b = bf16_bits(r);
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(b, b), 0xD8);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
  }
  static void store(c10::Half* p, Reg r) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(r, _MM_FROUND_TO_NEAREST_INT));
  }
  template <class T>
  static Reg round_to(Reg r) {
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      return _mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits(r), 16));
    } else {
      return _mm256_cvtph_ps(_mm256_cvtps_ph(r, _MM_FROUND_TO_NEAREST_INT));
    }
  }

  static Reg fma(Reg a, Reg b, Reg c) { return _mm256_fmadd_ps(a, b, c); }
  static Reg add(Reg a, Reg b) { return _mm256_add_ps(a, b); }
  static Reg sub(Reg a, Reg b) { return _mm256_sub_ps(a, b); }
  static Reg mul(Reg a, Reg b) { return _mm256_mul_ps(a, b); }
  static Reg div(Reg a, Reg b) { return _mm256_div_ps(a, b); }
  static Reg min(Reg a, Reg b) { return _mm256_min_ps(a, b); }
  static Reg max(Reg a, Reg b) { return _mm256_max_ps(a, b); }
  static float reduce_add(Reg r) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(r), _mm256_extractf128_ps(r, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
  static float reduce_max(Reg r) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(r), _mm256_extractf128_ps(r, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
  }
  static Reg exp(Reg x);

  static Reg reduce_lanes(const Reg* acc) {  // lane j = sum(acc[j]), 8 accumulators
    Reg x[4], y[2];
    for (int i = 0; i < 4; ++i) {
      x[i] = _mm256_add_ps(_mm256_unpacklo_ps(acc[2 * i], acc[2 * i + 1]),
                           _mm256_unpackhi_ps(acc[2 * i], acc[2 * i + 1]));
    }
    for (int i = 0; i < 2; ++i) {
      const __m256d a = _mm256_castps_pd(x[2 * i]), b = _mm256_castps_pd(x[2 * i + 1]);
      y[i] = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(a, b)),
                           _mm256_castpd_ps(_mm256_unpackhi_pd(a, b)));
    }
    return _mm256_add_ps(_mm256_permute2f128_ps(y[0], y[1], 0x20),
                         _mm256_permute2f128_ps(y[0], y[1], 0x31));
  }

  static Reg round_even(Reg x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static Reg pow2(Reg n) {
    const __m256i biased = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
    return _mm256_castsi256_ps(_mm256_slli_epi32(biased, 23));
  }
  static Reg zero_where_below(Reg x, Reg bound, Reg v) {
    return _mm256_and_ps(_mm256_cmp_ps(x, bound, _CMP_NLT_UQ), v);
  }

 private:
  static __m256i bf16_bits(Reg r) {  // as the AVX-512 version
    const __m256i bits = _mm256_castps_si256(r);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    const __m256i rounded =
        _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(r, r, _CMP_UNORD_Q));
    return _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7fc0), nan);
  }
};

#else

struct Simd {  // portable: one lane, the compiler may still auto-vectorise around it
  using Reg = float;
  static constexpr int W = 1;
  static constexpr int kAccRegs = 8;
  static constexpr const char* kName = "native";
  static constexpr bool kBf16Dot = false;

  static Reg zero() { return 0.f; }
  static Reg set1(float x) { return x; }
  template <class T>
  static Reg load(const T* p) { return static_cast<float>(*p); }
  template <class T>
  static void store(T* p, Reg r) { *p = static_cast<T>(r); }
  template <class T>
  static Reg round_to(Reg r) { return static_cast<float>(static_cast<T>(r)); }
  static Reg fma(Reg a, Reg b, Reg c) { return a * b + c; }
  static Reg add(Reg a, Reg b) { return a + b; }
  static Reg sub(Reg a, Reg b) { return a - b; }
  static Reg mul(Reg a, Reg b) { return a * b; }
  static Reg div(Reg a, Reg b) { return a / b; }
  static Reg min(Reg a, Reg b) { return a < b ? a : b; }
  static Reg max(Reg a, Reg b) { return a > b ? a : b; }
  static float reduce_add(Reg r) { return r; }
  static float reduce_max(Reg r) { return r; }
  static Reg exp(Reg x);
  static Reg reduce_lanes(const Reg* acc) { return acc[0]; }

  static Reg round_even(Reg x) { return std::nearbyint(x); }
  static Reg pow2(Reg n) {
    if (n != n) return n;  // NaN: the int conversion below would be undefined
    const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
  }
  static Reg zero_where_below(Reg x, Reg bound, Reg v) { return x < bound ? 0.f : v; }
};

#endif

using Reg = Simd::Reg;
constexpr int W = Simd::W;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// exp(x) in fp32, the same arithmetic in every build: 2^n * e^r with n = round(x / ln2),
// |r| <= ln2 / 2, and e^r by Cephes' expf polynomial (within ~1 ulp).
//
// One range serves both kernels:
//  * x < -125 ln2 (about -86.64) gives exactly 0, so every nonzero result is a normal float.
//    Denormal results would cost microcode assists in the products that use them (softmax
//    weights multiply every V row) and carry nothing: both kernels add exp to a number >= 1
//    (softmax's running sum holds e^0 = 1 from the max logit; SiLU's 1 + e^-g), next to which
//    anything below 2^-125 vanishes.
//  * x > ln(FLT_MAX) (about 88.72) gives +inf, like std::exp. SiLU needs it: g / (1 + e^-g) is
//    then -0 for g < -88.72, as in PyTorch, where a finite cap gives a tiny nonzero (the 88.3 cap
//    decode attention had was also wrong by up to 1.5x on (88.3, 88.72]). Softmax passes x <= 0.
//  * NaN stays NaN: the constant goes first in min/max, which return their second operand on NaN.
// The input is clamped to [-125 ln2, 89], so n is in [-125, 128], and the result is formed as
// (2 e^r) * 2^(n-1): 2^(n-1) is then a normal float for every n (2^128 is not), and overflow to
// inf happens in that last product, exactly where the true value passes FLT_MAX. (The old
// elementwise range, [-104, 89] with AVX-512's scalef, returned denormals and has no AVX2 form.)
constexpr float kExpLn2Hi = 0.693359375f, kExpLn2Lo = -2.12194440e-4f;  // ln2 = hi + lo; n * hi is exact
constexpr float kExpPoly[] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                              4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};  // e^r = 1 + r + r^2 p(r)

inline Reg Simd::exp(Reg x) {
  constexpr float kMinX = -125 * 0.693147181f, kMaxX = 89.f;
  const Reg xc = max(set1(kMinX), min(set1(kMaxX), x));
  const Reg n = round_even(mul(xc, set1(1.44269504088896341f)));
  const Reg r = fma(n, set1(-kExpLn2Lo), fma(n, set1(-kExpLn2Hi), xc));  // x - n ln2, Cody-Waite
  Reg p = set1(kExpPoly[0]);
  for (int i = 1; i < 6; ++i) p = fma(p, r, set1(kExpPoly[i]));
  const Reg exp_r = fma(p, mul(r, r), add(r, set1(1.f)));
  return zero_where_below(x, set1(kMinX), mul(add(exp_r, exp_r), pow2(sub(n, set1(1.f)))));
}

// silu(g) = g / (1 + e^-g), with the exp above: the one SiLU of the elementwise and experts kernels.
inline Reg silu(Reg g) { return Simd::div(g, Simd::add(Simd::set1(1.0f), Simd::exp(Simd::sub(Simd::zero(), g)))); }

// Loads n < W elements, zero-filling the other lanes, without touching memory past p + n.
template <class T>
inline Reg load_partial(const T* p, int n) {
  T buf[W];
  std::memset(static_cast<void*>(buf), 0, sizeof(buf));
  std::memcpy(static_cast<void*>(buf), p, n * sizeof(T));
  return Simd::load(buf);
}

// Stores the first n < W lanes of r.
template <class T>
inline void store_partial(T* p, Reg r, int n) {
  T buf[W];
  Simd::store(buf, r);
  std::memcpy(static_cast<void*>(p), buf, n * sizeof(T));
}

#if defined(__AVX512F__) && defined(__AVX512BF16__)
// The VDPBF16PS micro-kernel of the experts kernel and prefill attention (whatever SIMD layer a
// build forces for the rest): C[R rows][32] (fp32, ldc elements apart) = the sum over `steps` k
// steps of A[R rows] (lda elements apart, a_step elements on each step) x (B0 | B1), two tiles of
// 16 k-pair rows x 16 columns (b_step elements on each step). R x 2 accumulators of 16 columns; a
// tile row is one register, each row's k-pair one 32-bit broadcast. after_step() runs after each
// k step (the experts kernel's prefetches).
template <int R, class AfterStep>
inline void dpbf16_rows(const c10::BFloat16* a, int64_t lda, int64_t a_step, const c10::BFloat16* b0,
                        const c10::BFloat16* b1, int64_t b_step, int64_t steps, float* c, int64_t ldc,
                        AfterStep&& after_step) {
  __m512 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t t = 0; t < steps; ++t) {
    for (int p = 0; p < 16; ++p) {
      const __m512bh x0 = (__m512bh)_mm512_loadu_si512(b0 + t * b_step + p * 32);
      const __m512bh x1 = (__m512bh)_mm512_loadu_si512(b1 + t * b_step + p * 32);
      for (int r = 0; r < R; ++r) {
        int32_t pair;
        std::memcpy(&pair, a + r * lda + t * a_step + 2 * p, sizeof(pair));
        const __m512bh y = (__m512bh)_mm512_set1_epi32(pair);
        acc[r][0] = _mm512_dpbf16_ps(acc[r][0], y, x0);
        acc[r][1] = _mm512_dpbf16_ps(acc[r][1], y, x1);
      }
    }
    after_step();
  }
  for (int r = 0; r < R; ++r) {
    _mm512_storeu_ps(c + r * ldc, acc[r][0]);
    _mm512_storeu_ps(c + r * ldc + 16, acc[r][1]);
  }
}
#endif

}  // namespace moegen_simd

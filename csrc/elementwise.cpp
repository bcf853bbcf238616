// Fused elementwise ops for the engine's CPU hot path: RMSNorm, SwiGLU's silu(gate) * up, and
// rotate-half RoPE.
//
// In PyTorch each of these is 3-7 passes over the activations (casts, squares, means, products,
// concatenations), each a separate OpenMP region; fused, each is one pass. They keep PyTorch's
// rounding points: values are computed in fp32 and rounded to the storage type (bf16/fp16)
// exactly where the eager sequence in moegen/layers rounds, so results equal eager's bit for bit
// except where fp32 summation order (RMSNorm's mean) or exp's last ulp (SiLU) differ.
//
// SIMD: AVX-512 where the build has it (16 fp32 lanes; row tails go through a 16-lane buffer so
// every element sees the same arithmetic), else portable scalar code.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    !defined(MOEGEN_SIMD_AVX2) && !defined(MOEGEN_SIMD_SCALAR)
#define MOEGEN_EW_AVX512 1
#include <immintrin.h>
#endif

#ifndef MOEGEN_OPS_NS
#define MOEGEN_OPS_NS moegen_ops
#endif

namespace moegen_ew {
namespace {

// Storage (bf16/fp16) <-> fp32, scalar: c10's conversions round to nearest even, as PyTorch's casts do.
template <typename T> inline float to_f(T v) { return static_cast<float>(v); }
template <typename T> inline T from_f(float v) { return static_cast<T>(v); }
// Round an fp32 value the way storing it as T and reading it back would.
template <typename T> inline float round_f(float v) { return to_f<T>(from_f<T>(v)); }

#ifdef MOEGEN_EW_AVX512
constexpr int W = 16;
using V = __m512;

template <typename T> inline V load(const T* p);
template <> inline V load<c10::BFloat16>(const c10::BFloat16* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
template <> inline V load<c10::Half>(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// bf16 bits of v rounded to nearest even, one per 32-bit lane; NaN -> quiet NaN (0x7fc0), as
// c10::BFloat16 does.
inline __m512i bf16_bits(V v) {
  __m512i bits = _mm512_castps_si512(v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  return _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
}

template <typename T> inline void store(T* p, V v);
template <> inline void store<c10::BFloat16>(c10::BFloat16* p, V v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(bf16_bits(v)));
}
template <> inline void store<c10::Half>(c10::Half* p, V v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}
// v rounded to T and read back as fp32, in registers.
template <typename T> inline V round_v(V v) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(bf16_bits(v), 16));
  } else {
    return _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }
}

// exp(x) in fp32 to ~1 ulp: 2^n * p(r), x = n ln2 + r, |r| <= ln2/2 (Cephes' expf polynomial).
inline V exp_v(V x) {
  const V log2e = _mm512_set1_ps(1.44269504088896341f);
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(89.0f)), _mm512_set1_ps(-104.0f));
  V n = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  V r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  V p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  V r2 = _mm512_mul_ps(r, r);
  p = _mm512_fmadd_ps(p, r2, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);  // exact scaling by 2^n, with overflow to inf / gradual underflow
}

// Apply `f(lanes...) -> V` over [0, n) in W-lane steps; the tail is padded through a buffer.
template <typename T, int NIN, typename F>
inline void map_lanes(int64_t n, const T* const (&in)[NIN], T* out, F f) {
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    V a[NIN];
    for (int k = 0; k < NIN; ++k) a[k] = load<T>(in[k] + i);
    store<T>(out + i, f(a));
  }
  if (i < n) {
    alignas(64) T buf[NIN][W];
    alignas(64) T res[W];
    std::memset(buf, 0, sizeof(buf));
    for (int k = 0; k < NIN; ++k) std::memcpy(buf[k], in[k] + i, (n - i) * sizeof(T));
    V a[NIN];
    for (int k = 0; k < NIN; ++k) a[k] = load<T>(buf[k]);
    store<T>(res, f(a));
    std::memcpy(out + i, res, (n - i) * sizeof(T));
  }
}
#endif

// ---- RMSNorm: out = w * round(x * rsqrt(mean(x^2) + eps)) -------------------------------------
template <typename T>
void rms_norm_row(const T* x, const T* w, T* out, int64_t h, float eps) {
#ifdef MOEGEN_EW_AVX512
  V acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + W <= h; i += W) {
    V v = load<T>(x + i);
    acc = _mm512_fmadd_ps(v, v, acc);
  }
  float sum = _mm512_reduce_add_ps(acc);
  for (; i < h; ++i) sum += to_f(x[i]) * to_f(x[i]);
  const V r = _mm512_set1_ps(1.0f / std::sqrt(sum / static_cast<float>(h) + eps));
  const T* in2[2] = {x, w};
  map_lanes<T, 2>(h, in2, out, [&](V* a) { return _mm512_mul_ps(a[1], round_v<T>(_mm512_mul_ps(a[0], r))); });
#else
  float sum = 0.f;
  for (int64_t i = 0; i < h; ++i) sum += to_f(x[i]) * to_f(x[i]);
  const float r = 1.0f / std::sqrt(sum / static_cast<float>(h) + eps);
  for (int64_t i = 0; i < h; ++i) out[i] = from_f<T>(to_f(w[i]) * round_f<T>(to_f(x[i]) * r));
#endif
}

// ---- silu(gate) * up, gate_up = [gate | up] per row -------------------------------------------
template <typename T>
void silu_mul_row(const T* gate, const T* up, T* out, int64_t n) {
#ifdef MOEGEN_EW_AVX512
  const T* in[2] = {gate, up};
  const V one = _mm512_set1_ps(1.0f);
  map_lanes<T, 2>(n, in, out, [&](V* a) {
    V s = _mm512_div_ps(a[0], _mm512_add_ps(one, exp_v(_mm512_sub_ps(_mm512_setzero_ps(), a[0]))));
    return _mm512_mul_ps(round_v<T>(s), a[1]);
  });
#else
  for (int64_t i = 0; i < n; ++i) {
    const float g = to_f(gate[i]);
    out[i] = from_f<T>(round_f<T>(g / (1.0f + std::exp(-g))) * to_f(up[i]));
  }
#endif
}

// ---- rotate-half RoPE: out = round(round(x * cos) + round(rotate_half(x) * sin)) ---------------
template <typename T>
void rope_row(const T* x, const T* cos, const T* sin, T* out, int64_t d) {
  const int64_t half = d / 2;
#ifdef MOEGEN_EW_AVX512
  // first half: x1 * cos1 - x2 * sin1 ; second half: x2 * cos2 + x1 * sin2 (neg is exact)
  const T* lo[4] = {x, x + half, cos, sin};
  map_lanes<T, 4>(half, lo, out, [&](V* a) {
    return _mm512_add_ps(round_v<T>(_mm512_mul_ps(a[0], a[2])),
                         round_v<T>(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), a[1]), a[3])));
  });
  const T* hi[4] = {x + half, x, cos + half, sin + half};
  map_lanes<T, 4>(half, hi, out + half, [&](V* a) {
    return _mm512_add_ps(round_v<T>(_mm512_mul_ps(a[0], a[2])), round_v<T>(_mm512_mul_ps(a[1], a[3])));
  });
#else
  for (int64_t j = 0; j < half; ++j) {
    const float x1 = to_f(x[j]), x2 = to_f(x[j + half]);
    out[j] = from_f<T>(round_f<T>(x1 * to_f(cos[j])) + round_f<T>(-x2 * to_f(sin[j])));
    out[j + half] = from_f<T>(round_f<T>(x2 * to_f(cos[j + half])) + round_f<T>(x1 * to_f(sin[j + half])));
  }
#endif
}

template <typename F>
void dispatch(c10::ScalarType st, const char* op, F f) {
  switch (st) {
    // float32 stays on PyTorch's path: there the compiler may contract a*b+c into one FMA,
    // which would break the equal-rounding promise.
    case c10::ScalarType::BFloat16: f(c10::BFloat16{}); break;
    case c10::ScalarType::Half: f(c10::Half{}); break;
    default: TORCH_CHECK_TYPE(false, op, ": dtype must be bfloat16 or float16, got ", st);
  }
}

// Rows of `width` elements per parallel chunk: about 16K elements, so small batches stay on one thread.
inline int64_t grain(int64_t width) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(width, 1)); }

void check_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor");
}

at::Tensor rms_norm(const at::Tensor& x_in, const at::Tensor& weight_in, double eps) {
  const char* op = "rms_norm";
  check_cpu(x_in, op, "x");
  TORCH_CHECK_VALUE(x_in.dim() >= 1, op, ": x must have at least one dimension");
  const int64_t h = x_in.size(-1);
  TORCH_CHECK_VALUE(weight_in.dim() == 1 && weight_in.size(0) == h, op, ": weight must be [", h, "], got ",
                    weight_in.sizes());
  TORCH_CHECK_TYPE(weight_in.scalar_type() == x_in.scalar_type(), op, ": weight dtype ", weight_in.scalar_type(),
                   " != x dtype ", x_in.scalar_type());
  const at::Tensor x = x_in.contiguous(), w = weight_in.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  const int64_t rows = h ? x.numel() / h : 0;
  dispatch(x.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.data_ptr<T>();
    const T* wp = w.data_ptr<T>();
    T* op_ = out.data_ptr<T>();
    at::parallel_for(0, rows, grain(h), [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) rms_norm_row<T>(xp + r * h, wp, op_ + r * h, h, static_cast<float>(eps));
    });
  });
  return out;
}

at::Tensor silu_mul(const at::Tensor& gate_up_in) {
  const char* op = "silu_mul";
  check_cpu(gate_up_in, op, "gate_up");
  TORCH_CHECK_VALUE(gate_up_in.dim() == 2 && gate_up_in.size(1) % 2 == 0, op,
                    ": gate_up must be [rows, 2 * intermediate], got ", gate_up_in.sizes());
  const at::Tensor gu = gate_up_in.contiguous();
  const int64_t rows = gu.size(0), n = gu.size(1) / 2;
  at::Tensor out = at::empty({rows, n}, gu.options());
  dispatch(gu.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    const T* g = gu.data_ptr<T>();
    T* o = out.data_ptr<T>();
    at::parallel_for(0, rows, grain(2 * n), [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) silu_mul_row<T>(g + r * 2 * n, g + r * 2 * n + n, o + r * n, n);
    });
  });
  return out;
}

at::Tensor rope(const at::Tensor& x_in, const at::Tensor& cos_in, const at::Tensor& sin_in) {
  const char* op = "rope";
  check_cpu(x_in, op, "x");
  TORCH_CHECK_VALUE(x_in.dim() == 3, op, ": x must be [tokens, heads, dim], got ", x_in.sizes());
  const int64_t t = x_in.size(0), heads = x_in.size(1), d = x_in.size(2);
  TORCH_CHECK_VALUE(d % 2 == 0, op, ": head dim must be even, got ", d);
  for (const at::Tensor* c : {&cos_in, &sin_in}) {
    TORCH_CHECK_VALUE(c->dim() == 2 && c->size(0) == t && c->size(1) == d, op, ": cos/sin must be [", t, ", ", d,
                      "], got ", c->sizes());
    TORCH_CHECK_TYPE(c->scalar_type() == x_in.scalar_type(), op, ": cos/sin dtype must match x");
  }
  const at::Tensor x = x_in.contiguous(), cs = cos_in.contiguous(), sn = sin_in.contiguous();
  at::Tensor out = at::empty({t, heads, d}, x.options());
  dispatch(x.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.data_ptr<T>();
    const T* cp = cs.data_ptr<T>();
    const T* sp = sn.data_ptr<T>();
    T* o = out.data_ptr<T>();
    at::parallel_for(0, t * heads, grain(d), [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        const int64_t tok = r / heads;
        rope_row<T>(xp + r * d, cp + tok * d, sp + tok * d, o + r * d, d);
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace moegen_ew

#define MOEGEN_DEFINE_FRAGMENT(ns, m) TORCH_LIBRARY_FRAGMENT(ns, m)

MOEGEN_DEFINE_FRAGMENT(MOEGEN_OPS_NS, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor", &moegen_ew::rms_norm);
  m.def("silu_mul(Tensor gate_up) -> Tensor", &moegen_ew::silu_mul);
  m.def("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor", &moegen_ew::rope);
}

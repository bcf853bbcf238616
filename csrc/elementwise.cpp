// Fused elementwise ops for the engine's CPU hot path: RMSNorm, SwiGLU's silu(gate) * up,
// rotate-half RoPE, and the greedy choice (each row's first maximum of bf16 logits).
//
// In PyTorch each of these is 3-7 passes over the activations (casts, squares, means, products,
// concatenations), each a separate OpenMP region; fused, each is one pass. They keep PyTorch's
// rounding points: values are computed in fp32 and rounded to the storage type (bf16/fp16)
// exactly where the eager sequence in moegen/layers rounds, so results equal eager's bit for bit
// except where fp32 summation order (RMSNorm's mean) or exp's last ulp (SiLU) differ.
//
// SIMD: written once against csrc/simd.h (AVX-512, AVX2 or scalar). A row's tail is loaded
// zero-padded into a full vector, so every element sees the same arithmetic.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <utility>

#include "simd.h"

#ifndef MOEGEN_OPS_NS
#define MOEGEN_OPS_NS moegen_ops
#endif

namespace moegen_ew {
namespace {

using moegen_simd::Reg;
using moegen_simd::Simd;
using moegen_simd::W;

// Apply `f(lanes...) -> Reg` over [0, n) in W-lane steps.
template <typename T, int NIN, typename F>
inline void map_lanes(int64_t n, const T* const (&in)[NIN], T* out, F f) {
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    Reg a[NIN];
    for (int k = 0; k < NIN; ++k) a[k] = Simd::load(in[k] + i);
    Simd::store(out + i, f(a));
  }
  if (i < n) {
    const int tail = static_cast<int>(n - i);
    Reg a[NIN];
    for (int k = 0; k < NIN; ++k) a[k] = moegen_simd::load_partial(in[k] + i, tail);
    moegen_simd::store_partial(out + i, f(a), tail);
  }
}

// ---- RMSNorm: out = w * round(x * rsqrt(mean(x^2) + eps)) -------------------------------------
template <typename T>
void rms_norm_row(const T* x, const T* w, T* out, int64_t h, float eps) {
  Reg acc = Simd::zero();
  int64_t i = 0;
  for (; i + W <= h; i += W) {
    const Reg v = Simd::load(x + i);
    acc = Simd::fma(v, v, acc);
  }
  float sum = Simd::reduce_add(acc);
  for (; i < h; ++i) sum += static_cast<float>(x[i]) * static_cast<float>(x[i]);
  const Reg r = Simd::set1(1.0f / std::sqrt(sum / static_cast<float>(h) + eps));
  const T* in[2] = {x, w};
  map_lanes<T, 2>(h, in, out, [&](Reg* a) { return Simd::mul(a[1], Simd::round_to<T>(Simd::mul(a[0], r))); });
}

// ---- silu(gate) * up, gate_up = [gate | up] per row -------------------------------------------
template <typename T>
void silu_mul_row(const T* gate, const T* up, T* out, int64_t n) {
  const T* in[2] = {gate, up};
  map_lanes<T, 2>(n, in, out, [&](Reg* a) { return Simd::mul(Simd::round_to<T>(moegen_simd::silu(a[0])), a[1]); });
}

// ---- rotate-half RoPE: out = round(round(x * cos) + round(rotate_half(x) * sin)) ---------------
template <typename T>
void rope_row(const T* x, const T* cos, const T* sin, T* out, int64_t d) {
  const int64_t half = d / 2;
  // first half: x1 * cos1 - x2 * sin1 ; second half: x2 * cos2 + x1 * sin2 (neg is exact)
  const T* lo[4] = {x, x + half, cos, sin};
  map_lanes<T, 4>(half, lo, out, [&](Reg* a) {
    return Simd::add(Simd::round_to<T>(Simd::mul(a[0], a[2])),
                     Simd::round_to<T>(Simd::mul(Simd::sub(Simd::zero(), a[1]), a[3])));
  });
  const T* hi[4] = {x + half, x, cos + half, sin + half};
  map_lanes<T, 4>(half, hi, out + half, [&](Reg* a) {
    return Simd::add(Simd::round_to<T>(Simd::mul(a[0], a[2])), Simd::round_to<T>(Simd::mul(a[1], a[3])));
  });
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

// ---- greedy choice: each row's first maximum (bf16 logits) -----------------------------------
// torch's max(dim) over bf16 logits runs at ~2.7 G elements/s on the AMX Xeon (6 ms for 512 rows of
// 32,000, every decode step). Here each bf16 is compared as a 16-bit integer key with the order of
// its value -- the magnitude's bits, negated for negative values (so -0 and +0 tie, as they compare
// equal) -- 32 at a time (AVX-512 BW): the row's first maximum, as max(dim) finds it. A row with a
// NaN reports NaN as its maximum (max propagates NaN; the sampler refuses such rows).
inline int32_t order_key(uint16_t bits) {
  const int32_t mag = bits & 0x7fff;
  return (bits & 0x8000) ? -mag : mag;
}
inline bool is_nan_bits(uint16_t bits) { return (bits & 0x7fff) > 0x7f80; }

// The first maximum of row[0, n) as (index, any NaN).
std::pair<int64_t, bool> first_max_row(const uint16_t* row, int64_t n) {
  int64_t best_at = 0, i = 0;
  int32_t best = INT32_MIN;
  bool nan = false;
#if defined(__AVX512BW__) && !defined(MOEGEN_SIMD_AVX2) && !defined(MOEGEN_SIMD_SCALAR)
  // lanes: 32 keys, each lane's best key and the step it came from (16-bit: rows up to 2^20)
  if (n >= 32 && n / 32 <= INT16_MAX) {
    const __m512i magmask = _mm512_set1_epi16(0x7fff), inf = _mm512_set1_epi16(0x7f80), one = _mm512_set1_epi16(1);
    __m512i lane_best = _mm512_set1_epi16(INT16_MIN), lane_step = _mm512_setzero_si512(), step = lane_step;
    __mmask32 nans = 0;
    for (; i + 32 <= n; i += 32, step = _mm512_add_epi16(step, one)) {
      const __m512i x = _mm512_loadu_si512(row + i);
      const __m512i mag = _mm512_and_si512(x, magmask);
      nans |= _mm512_cmpgt_epi16_mask(mag, inf);
      const __m512i key = _mm512_mask_sub_epi16(mag, _mm512_movepi16_mask(x), _mm512_setzero_si512(), mag);
      const __mmask32 gt = _mm512_cmpgt_epi16_mask(key, lane_best);   // strictly: a lane keeps its first
      lane_best = _mm512_mask_mov_epi16(lane_best, gt, key);
      lane_step = _mm512_mask_mov_epi16(lane_step, gt, step);
    }
    alignas(64) int16_t keys[32], steps[32];
    _mm512_store_si512(keys, lane_best);
    _mm512_store_si512(steps, lane_step);
    for (int l = 0; l < 32; ++l) {  // the largest key, at the smallest index among lanes holding it
      const int64_t at = static_cast<int64_t>(steps[l]) * 32 + l;
      if (keys[l] > best || (keys[l] == best && at < best_at)) best = keys[l], best_at = at;
    }
    nan = nans != 0;
  }
#endif
  for (; i < n; ++i) {
    nan |= is_nan_bits(row[i]);
    const int32_t key = order_key(row[i]);
    if (key > best) best = key, best_at = i;
  }
  return {best_at, nan};
}

std::tuple<at::Tensor, at::Tensor> first_max(const at::Tensor& logits_in) {
  const char* op = "first_max";
  check_cpu(logits_in, op, "logits");
  TORCH_CHECK_VALUE(logits_in.dim() == 2 && logits_in.size(1) > 0, op, ": logits must be [rows, V > 0], got ",
                    logits_in.sizes());
  TORCH_CHECK_TYPE(logits_in.scalar_type() == c10::ScalarType::BFloat16, op, ": logits must be bfloat16, got ",
                   logits_in.scalar_type());
  const at::Tensor x = logits_in.contiguous();
  const int64_t rows = x.size(0), n = x.size(1);
  at::Tensor values = at::empty({rows}, x.options().dtype(at::kFloat));
  at::Tensor indices = at::empty({rows}, x.options().dtype(at::kLong));
  const uint16_t* p = reinterpret_cast<const uint16_t*>(x.data_ptr<c10::BFloat16>());
  float* v = values.data_ptr<float>();
  int64_t* idx = indices.data_ptr<int64_t>();
  at::parallel_for(0, rows, grain(n), [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const auto [at, nan] = first_max_row(p + r * n, n);
      idx[r] = at;
      const c10::BFloat16 best(p[r * n + at], c10::BFloat16::from_bits());
      v[r] = nan ? std::numeric_limits<float>::quiet_NaN() : static_cast<float>(best);
    }
  });
  return {values, indices};
}

}  // namespace
}  // namespace moegen_ew

#define MOEGEN_DEFINE_FRAGMENT(ns, m) TORCH_LIBRARY_FRAGMENT(ns, m)

MOEGEN_DEFINE_FRAGMENT(MOEGEN_OPS_NS, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor", &moegen_ew::rms_norm);
  m.def("silu_mul(Tensor gate_up) -> Tensor", &moegen_ew::silu_mul);
  m.def("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor", &moegen_ew::rope);
  m.def("first_max(Tensor logits) -> (Tensor, Tensor)", &moegen_ew::first_max);
}

// Dequantization of quantized linear weights into bf16 chunks, for the CPU GEMM path
// (moegen/layers/quantized.py documents the two layouts and calls these).
//
// PyTorch spends 6-10 passes over a chunk (unpack, permute, gather zero points and scales,
// subtract, convert, multiply, round); here each output element is made in one pass from the
// packed words, 16 or 32 at a time with AVX-512 (BF16) where the groups allow. The arithmetic is
// the torch path's, element for element: the code minus its zero point is an exact integer,
// converted to float32, times the float32 scale (one rounding), then rounded to bf16 (nearest
// even), so both paths give identical bf16 weights.
//
//   dequant_gptq(qweight [K/p, N] i32, qzeros [G, N/p] i32, scales [G, N] f16, g_idx [K] i32,
//                bits, zero_offset, lo, hi, out [hi-lo, K] bf16)
//   dequant_fp8(data [N, K] float8_e4m3fn, scales [ceil(N/bn), ceil(K/bk)] f32, bn, bk,
//               lo, hi, out [hi-lo, K] bf16)

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__) && !defined(MOEGEN_SIMD_AVX2) && \
    !defined(MOEGEN_SIMD_SCALAR)
#include <immintrin.h>
#define MOEGEN_DQ_AVX512 1
#endif

#ifndef MOEGEN_OPS_NS
#define MOEGEN_OPS_NS moegen_ops
#endif

namespace moegen_dq {
namespace {

// Output rows made together: their packed words are adjacent in qweight. Few, because their
// rows (K apart) tend to fall in the same cache sets and must all stay in L1 while written.
#ifndef MOEGEN_DQ_TILE
#define MOEGEN_DQ_TILE 8
#endif
constexpr int64_t kTile = MOEGEN_DQ_TILE;

void check(bool ok, const char* what) { TORCH_CHECK_VALUE(ok, "dequant: ", what); }

void check_out(const at::Tensor& out, int64_t rows, int64_t k) {
  check(out.device().is_cpu() && out.is_contiguous(), "out must be a contiguous CPU tensor");
  check(out.scalar_type() == c10::ScalarType::BFloat16, "out must be bfloat16");
  check(out.dim() == 2 && out.size(0) == rows && out.size(1) == k, "out must be [hi - lo, K]");
}

// The zero points and scales of group g for the tile's columns lo + [c0, c1). v1 checkpoints
// store zero - 1 mod 2^bits: read back as (stored + 1) mod 2^bits.
void load_group(const int32_t* qz, const c10::Half* sc, int64_t g, int bits, int zero_offset, int64_t n_total,
                int64_t lo, int64_t c0, int64_t c1, int32_t* zero, float* scale) {
  const int p = 32 / bits;
  const uint32_t mask = (1u << bits) - 1u;
  const int64_t zero_words = (n_total + p - 1) / p;
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t col = lo + c;
    const uint32_t word = static_cast<uint32_t>(qz[g * zero_words + col / p]);
    zero[c - c0] = static_cast<int32_t>(((word >> (bits * (col % p))) + zero_offset) & mask);
    scale[c - c0] = static_cast<float>(sc[g * n_total + col]);
  }
}

// One tile of output rows [c0, c1) (weight columns lo + c0 ...): for every input feature k, the
// tile's zero points and scales of k's group (reloaded when the group changes), then the codes.
void gptq_tile(const int32_t* qw, const int32_t* qz, const c10::Half* sc, const int32_t* gidx, int bits,
               int zero_offset, int64_t n_total, int64_t k_total, int64_t lo, int64_t c0, int64_t c1,
               c10::BFloat16* out) {
  const int p = 32 / bits;
  const uint32_t mask = (1u << bits) - 1u;
  std::array<int32_t, kTile> zero{};
  std::array<float, kTile> scale{};
  int64_t group = -1;
  for (int64_t k = 0; k < k_total; ++k) {
    const int64_t g = gidx[k];
    if (g != group) {
      group = g;
      load_group(qz, sc, g, bits, zero_offset, n_total, lo, c0, c1, zero.data(), scale.data());
    }
    const int32_t* row = qw + (k / p) * n_total + lo;
    const int shift = bits * static_cast<int>(k % p);
    for (int64_t c = c0; c < c1; ++c) {
      const int32_t code = static_cast<int32_t>((static_cast<uint32_t>(row[c]) >> shift) & mask);
      out[c * k_total + k] = c10::BFloat16(static_cast<float>(code - zero[c - c0]) * scale[c - c0]);
    }
  }
}

// A word's 32 / BITS codes (low bits first) less their zero point, times the scale, as bf16.
template <int BITS>
inline void expand_word(uint32_t word, int32_t zero, float scale, c10::BFloat16* out) {
  for (int i = 0; i < 32 / BITS; ++i)
    out[i] = c10::BFloat16(static_cast<float>(static_cast<int32_t>((word >> (BITS * i)) & ((1u << BITS) - 1u)) - zero) *
                           scale);
}

// The common case: every word's p features share one group (g_idx = k / g with g a multiple of
// p). Row by row of the tile, a word's p codes land next to each other in the output row, and
// the tile's words for one k-word share a cache line of qweight.
template <int BITS>
void gptq_tile_words(const int32_t* qw, const int32_t* qz, const c10::Half* sc, const int32_t* gidx,
                     int zero_offset, int64_t n_total, int64_t k_total, int64_t lo, int64_t c0, int64_t c1,
                     c10::BFloat16* out) {
  constexpr int P = 32 / BITS;
  std::array<int32_t, kTile> zero{};
  std::array<float, kTile> scale{};
  int64_t group = -1;
  for (int64_t r = 0; r < k_total / P; ++r) {
    const int64_t g = gidx[r * P];
    if (g != group) {
      group = g;
      load_group(qz, sc, g, BITS, zero_offset, n_total, lo, c0, c1, zero.data(), scale.data());
    }
    const int32_t* words = qw + r * n_total + lo;
    for (int64_t c = c0; c < c1; ++c)
      expand_word<BITS>(static_cast<uint32_t>(words[c]), zero[c - c0], scale[c - c0], out + c * k_total + r * P);
  }
}

bool groups_follow_words(const int32_t* gidx, int64_t k, int64_t p) {
  for (int64_t i = 0; i < k; ++i)
    if (gidx[i] != gidx[i - i % p]) return false;
  return true;
}

#ifdef MOEGEN_DQ_AVX512
// The vector form of gptq_tile_words, for groups that hold whole runs of kRun input features (16
// codes of 8 bits, 32 of 4: what one register of float32 takes). Output row by output row: 16
// words of the row's column are gathered (qweight's column stride), which puts 64 (8-bit) or 128
// (4-bit) codes in input order in one register; each run of codes is widened to int32, less its
// zero point, converted (exact), times the scale (one rounding) and rounded to bf16 (nearest even:
// VCVTNE(2)PS2BF16, as c10::BFloat16). The same arithmetic as the scalar loop, element for element
// (the products are never float32 subnormals, which VCVTNE treats as zero: a float16 scale times a
// code difference of at least 1 is a normal float32). Measured on the AMX Xeon, a [2048, 1024]
// weight on 2 threads: int8 (groups of 128) 0.29 ms vs the scalar loop's 0.72, int4 0.18 vs 0.55,
// int8 asymmetric in groups of 32 0.35 vs 0.78; fp8 below 0.24 vs 0.41.
template <int BITS>
constexpr int64_t kRun = BITS == 8 ? 16 : 32;

template <int BITS>
void gptq_tile_words_avx512(const int32_t* qw, const int32_t* qz, const c10::Half* sc, const int32_t* gidx,
                            int zero_offset, int64_t n_total, int64_t k_total, int64_t lo, int64_t c0, int64_t c1,
                            c10::BFloat16* out) {
  constexpr int P = 32 / BITS;
  const int64_t words = k_total / P, whole = words / 16 * 16;
  const __m512i stride = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32(static_cast<int>(n_total)));
  // 4-bit: a run's even and odd codes come out in two registers; this puts them back in turn
  const __m512i interleave = _mm512_setr_epi32(0x00100000, 0x00110001, 0x00120002, 0x00130003, 0x00140004,
                                               0x00150005, 0x00160006, 0x00170007, 0x00180008, 0x00190009,
                                               0x001a000a, 0x001b000b, 0x001c000c, 0x001d000d, 0x001e000e,
                                               0x001f000f);
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t col = lo + c;
    c10::BFloat16* row = out + c * k_total;
    int32_t zero = 0;
    float scale = 0.f;
    int64_t group = -1;
    auto group_of = [&](int64_t k) {
      const int64_t g = gidx[k];
      if (g != group) {
        group = g;
        load_group(qz, sc, g, BITS, zero_offset, n_total, lo, c, c + 1, &zero, &scale);
      }
    };
    for (int64_t r = 0; r < whole; r += 16) {
      // 16 words of column col from word row r on: codes k = r * P ... in order, the low bits first
      const __m512i w = _mm512_i32gather_epi32(stride, qw + r * n_total + col, 4);
      alignas(64) int32_t lanes[16];
      _mm512_store_si512(lanes, w);
      const uint8_t* bytes = reinterpret_cast<const uint8_t*>(lanes);
      group_of(r * P);
      __m512i z = _mm512_set1_epi32(zero);
      __m512 s = _mm512_set1_ps(scale);
      bool one_group = true;  // every run of the block in the first one's group (each run is one group)
      for (int64_t k = r * P; k < (r + 16) * P; k += kRun<BITS>) one_group &= gidx[k] == gidx[r * P];
      for (int64_t run = 0; run < 64 / (kRun<BITS> * BITS / 8); ++run) {
        const int64_t k = r * P + run * kRun<BITS>;
        if (!one_group) {
          group_of(k);
          z = _mm512_set1_epi32(zero);
          s = _mm512_set1_ps(scale);
        }
        const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + run * 16)));
        if constexpr (BITS == 8) {
          const __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(d, z)), s);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(row + k), (__m256i)_mm512_cvtneps_pbh(v));
        } else {
          const __m512i mask = _mm512_set1_epi32(0xf);
          const __m512 even = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(d, mask), z)), s);
          const __m512 odd = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(d, 4), z)), s);
          const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(odd, even);  // even codes, then odd ones
          _mm512_storeu_si512(row + k, _mm512_permutexvar_epi16(interleave, both));
        }
      }
    }
    for (int64_t r = whole; r < words; ++r) {  // the last words of a row, one at a time
      group_of(r * P);
      expand_word<BITS>(static_cast<uint32_t>(qw[r * n_total + col]), zero, scale, row + r * P);
    }
  }
}
#endif

void dequant_gptq(const at::Tensor& qweight, const at::Tensor& qzeros, const at::Tensor& scales,
                  const at::Tensor& g_idx, int64_t bits, int64_t zero_offset, int64_t lo, int64_t hi, at::Tensor out) {
  check(bits == 4 || bits == 8, "bits must be 4 or 8");
  const int64_t p = 32 / bits, n = qweight.size(1), k = qweight.size(0) * p;
  check(qweight.scalar_type() == c10::ScalarType::Int && qzeros.scalar_type() == c10::ScalarType::Int,
        "qweight and qzeros must be int32");
  check(scales.scalar_type() == c10::ScalarType::Half, "scales must be float16");
  check(g_idx.scalar_type() == c10::ScalarType::Int && g_idx.numel() == k, "g_idx must be int32 [K]");
  check(0 <= lo && lo < hi && hi <= n, "need 0 <= lo < hi <= N");
  for (const at::Tensor* t : {&qweight, &qzeros, &scales, &g_idx})
    check(t->device().is_cpu() && t->is_contiguous(), "inputs must be contiguous CPU tensors");
  check_out(out, hi - lo, k);
  const int32_t* qw = qweight.data_ptr<int32_t>();
  const int32_t* qz = qzeros.data_ptr<int32_t>();
  const c10::Half* sc = scales.data_ptr<c10::Half>();
  const int32_t* gi = g_idx.data_ptr<int32_t>();
  c10::BFloat16* o = out.data_ptr<c10::BFloat16>();
  const int64_t tiles = (hi - lo + kTile - 1) / kTile;
  const bool by_words = groups_follow_words(gi, k, p);
#ifdef MOEGEN_DQ_AVX512
  const bool by_runs = groups_follow_words(gi, k, bits == 8 ? kRun<8> : kRun<4>);
#endif
  const int off = static_cast<int>(zero_offset);
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t c0 = t * kTile, c1 = std::min(hi - lo, c0 + kTile);
#ifdef MOEGEN_DQ_AVX512
      if (by_runs && bits == 4) {
        gptq_tile_words_avx512<4>(qw, qz, sc, gi, off, n, k, lo, c0, c1, o);
        continue;
      }
      if (by_runs) {
        gptq_tile_words_avx512<8>(qw, qz, sc, gi, off, n, k, lo, c0, c1, o);
        continue;
      }
#endif
      if (by_words && bits == 4) {
        gptq_tile_words<4>(qw, qz, sc, gi, off, n, k, lo, c0, c1, o);
      } else if (by_words) {
        gptq_tile_words<8>(qw, qz, sc, gi, off, n, k, lo, c0, c1, o);
      } else {   // act-order: each feature's own group
        gptq_tile(qw, qz, sc, gi, static_cast<int>(bits), off, n, k, lo, c0, c1, o);
      }
    }
  });
}

// Every e4m3 byte's value (exact in float32).
const std::array<float, 256>& fp8_table() {
  static const std::array<float, 256> table = [] {
    std::array<float, 256> t{};
    for (int b = 0; b < 256; ++b) t[b] = static_cast<float>(c10::Float8_e4m3fn(static_cast<uint8_t>(b), c10::Float8_e4m3fn::from_bits()));
    return t;
  }();
  return table;
}

void dequant_fp8(const at::Tensor& data, const at::Tensor& scales, int64_t bn, int64_t bk, int64_t lo, int64_t hi,
                 at::Tensor out) {
  check(data.scalar_type() == c10::ScalarType::Float8_e4m3fn, "data must be float8_e4m3fn");
  check(scales.scalar_type() == c10::ScalarType::Float, "scales must be float32");
  check(data.device().is_cpu() && data.is_contiguous() && scales.is_contiguous(), "inputs must be contiguous CPU tensors");
  const int64_t n = data.size(0), k = data.size(1), kb = scales.size(1);
  check(bn > 0 && bk > 0 && 0 <= lo && lo < hi && hi <= n, "need positive blocks and 0 <= lo < hi <= N");
  check_out(out, hi - lo, k);
  const uint8_t* d = reinterpret_cast<const uint8_t*>(data.data_ptr());
  const float* s = scales.data_ptr<float>();
  c10::BFloat16* o = out.data_ptr<c10::BFloat16>();
  const std::array<float, 256>& table = fp8_table();
  at::parallel_for(lo, hi, std::max<int64_t>(1, 16384 / k), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* row = d + r * k;
      const float* srow = s + (r / bn) * kb;
      c10::BFloat16* orow = o + (r - lo) * k;
      for (int64_t j0 = 0; j0 < k; j0 += bk) {
        const float scale = srow[j0 / bk];
        const int64_t j1 = std::min(k, j0 + bk);
        int64_t j = j0;
#ifdef MOEGEN_DQ_AVX512
        // 16 at a time: the table's values gathered, times the scale, rounded to bf16 (nearest even,
        // as c10::BFloat16) -- where no product can be a float32 subnormal, which VCVTNEPS2BF16
        // would flush to zero: the smallest nonzero e4m3 value is 2^-9, so scales of 2^-117 and up
        // (and zero); a block with a smaller scale stays on the scalar loop
        const __m512 s = _mm512_set1_ps(scale);
        const bool normal = scale == 0.f || std::fabs(scale) >= 0x1p-117f;
        for (; normal && j + 16 <= j1; j += 16) {
          const __m512i codes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + j)));
          const __m512 v = _mm512_mul_ps(_mm512_i32gather_ps(codes, table.data(), 4), s);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(orow + j), (__m256i)_mm512_cvtneps_pbh(v));
        }
#endif
        for (; j < j1; ++j) orow[j] = c10::BFloat16(table[row[j]] * scale);
      }
    }
  });
}

}  // namespace
}  // namespace moegen_dq

#define MOEGEN_DQ_FRAGMENT(ns, m) TORCH_LIBRARY_FRAGMENT(ns, m)

MOEGEN_DQ_FRAGMENT(MOEGEN_OPS_NS, m) {
  m.def("dequant_gptq(Tensor qweight, Tensor qzeros, Tensor scales, Tensor g_idx, int bits, int zero_offset, "
        "int lo, int hi, Tensor(a!) out) -> ()", &moegen_dq::dequant_gptq);
  m.def("dequant_fp8(Tensor data, Tensor scales, int bn, int bk, int lo, int hi, Tensor(a!) out) -> ()",
        &moegen_dq::dequant_fp8);
}

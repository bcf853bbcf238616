// The routed experts of one MoE layer multiplied in int8 (experts_kernel=int8): an explicitly lossy
// option beside experts.cpp's exact bf16 kernel.
//
// Why: on a CPU without a matrix unit the exact kernel runs at the vector units' bf16 rate
// (VDPBF16PS: 32 multiply-adds an instruction), and moegen's experts there are already within
// ~10% of it. VPDPBUSD (AVX-512 VNNI) does 64 int8 multiply-adds an instruction at the same
// instruction rate (measured on an AMD EPYC, Zen 4: one zmm instruction a cycle for both, 0.28 ns), so
// int8 operands double the ceiling; quantized weights need no dequantization either.
//
// Numbers: each weight column n is W[n, :] ~= q[n, :] * s[n] (q in [-127, 127], s = max|W[n]| /
// 127, moegen/ops/experts.py `pack_int8`); each activation row (a token's x, then its h) is
// a[r] * xq[r, :] the same way, per row. VPDPBUSD multiplies unsigned by signed bytes, so rows are
// stored as xq + 128 and the packer stores offset[n] = 128 * sum_k q[n, k]: sum_k (xq + 128) q -
// offset = sum_k xq q exactly in int32 (|K| <= 65536 keeps it in range). Then
//   gate/up = a[r] * s[n] * dot, h = silu(gate) * up (float32), h rows quantized per row,
//   out = round_bf16(round_bf16(a_h[r] * s_down[n] * dot) * router weight[r]),
// the down output rounded as F.linear's and the weighted rows as experts.cpp rounds them, so the
// combine (experts.h) sums them exactly as it sums the exact kernel's.
//
// Weight layout ("VNNI-4 tiles"): W [N, K] padded to [Np, Kp] (multiples of 64) and stored as
// [Np/16][Kp/64][16 groups][16 n][4]: one 1 KiB tile per (16 output columns, 64 inputs), row g of
// it one 512-bit register holding, for each column n, its inputs 4g..4g+3 -- the B operand of
// VPDPBUSD and, as stored (16 rows of 64 bytes), of AMX's TDPBUSD. A column block's rows follow
// each other tile after tile, so its whole K is one stream of 64-byte rows.
//
// ISAs: "amx-int8" (AMX tiles: 2 x 2 blocks of 16 x 16 int32 accumulators, 32 rows a call),
// "avx512-vnni" (8 rows x 2 column blocks of int32 accumulators) and "generic" (the same integer
// arithmetic in portable C++; for CPUs without VNNI and for tests). All three compute the same
// integer dot products and share every float step: identical results. The AMX path is tested on
// CPUs without AMX through amx.h's software tiles (-DMOEGEN_AMX_EMULATE).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "amx.h"
#include "experts.h"
#include "simd.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#ifndef MOEGEN_OPS_NS
#define MOEGEN_OPS_NS moegen_ops
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__) && \
    !defined(MOEGEN_SIMD_AVX2) && !defined(MOEGEN_SIMD_SCALAR)
#define MOEGEN_HAVE_AVX512_VNNI 1
#endif

namespace moegen_experts_int8 {
namespace {

using bf16 = c10::BFloat16;

constexpr int kTileN = 16;                // output columns per tile
constexpr int kGroup = 4;                 // inputs per 32-bit lane
constexpr int kTileK = 64;                // inputs per tile (16 groups)
constexpr int64_t kGroupBytes = kTileN * kGroup;   // one group row of a tile: 64 bytes
constexpr int kRowBlock = 8;              // rows per micro-kernel call (AVX-512 VNNI, portable)
constexpr int kAmxRowBlock = 32;          // rows per micro-kernel call on AMX: two row tiles
constexpr int kTileRows = 16;             // rows one AMX tile load reads
constexpr int64_t kTileBytes = kTileK * kTileN;   // one weight tile: 1 KiB
constexpr int kZeroCode = 128;            // the stored activation byte of 0
// h (float32) a thread keeps for one item: an expert whose h fits stays one item (its weights read
// once); a bigger one is cut into row chunks that fit L2, each reading the weights again (cheap
// beside its multiplies at these sizes: 64 rows x K per weight byte).
constexpr int64_t kItemHBytes = 1 << 20;

enum Isa : int64_t { kGeneric = 0, kAvx512Vnni = 1, kAmxInt8 = 2 };

const char* isa_name(int64_t isa) {
  return isa == kAmxInt8 ? "amx-int8" : isa == kAvx512Vnni ? "avx512-vnni" : "generic";
}

bool isa_available(int64_t isa) {
#ifdef MOEGEN_HAVE_AMX_INT8
  if (isa == kAmxInt8) return moegen_amx::int8_usable();
#endif
#ifdef MOEGEN_HAVE_AVX512_VNNI
  if (isa == kAvx512Vnni) return true;  // -march=native: the build machine's ISA is the running one
#endif
  return isa == kGeneric;
}

int rows_per_call(int64_t isa) { return isa == kAmxInt8 ? kAmxRowBlock : kRowBlock; }

// Activation rows an item's buffers hold for `rows` rows: AMX tile loads read 16 rows at a time.
int64_t buffer_rows(int64_t isa, int64_t rows) {
  return isa == kAmxInt8 ? (rows + kTileRows - 1) / kTileRows * kTileRows : rows;
}

// ---- activation rows ------------------------------------------------------------------------
// One row of n values (float32, or bf16 widened) as bytes xq + 128 with xq = round(v / scale) in
// [-127, 127], scale = max|v| / 127 (1 for a row of zeros, or of values so small that the scale
// would not be a normal float: they all round to 0), padded to `padded` bytes with the code of 0;
// returns the scale. Divided, not multiplied by 1 / scale, and rounded half to even: as torch
// computes it (the tests' reference).
template <typename T>
float quantize_row(const T* v, int64_t n, int64_t padded, uint8_t* out) {
  using moegen_simd::Reg;
  using moegen_simd::Simd;
  constexpr int W = moegen_simd::W;
  Reg mx = Simd::zero();
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    const Reg x = Simd::load(v + i);
    mx = Simd::max(mx, Simd::max(x, Simd::sub(Simd::zero(), x)));
  }
  float amax = Simd::reduce_max(mx);
  for (; i < n; ++i) amax = std::max(amax, std::fabs(static_cast<float>(v[i])));
  const float scale = amax >= 127.0f * FLT_MIN ? amax / 127.0f : 1.0f;
  i = 0;
#ifdef MOEGEN_HAVE_AVX512_VNNI
  const __m512 sv = _mm512_set1_ps(scale);
  const __m512i zc = _mm512_set1_epi32(kZeroCode), lo = _mm512_set1_epi32(1), hi = _mm512_set1_epi32(255);
  for (; i + 16 <= n; i += 16) {
    // cvtps_epi32 rounds half to even (MXCSR's default), as std::nearbyint below
    __m512i q = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_div_ps(Simd::load(v + i), sv)), zc);
    q = _mm512_min_epi32(_mm512_max_epi32(q, lo), hi);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), _mm512_cvtepi32_epi8(q));
  }
#endif
  for (; i < n; ++i) {
    const float q = std::nearbyint(static_cast<float>(v[i]) / scale);
    out[i] = static_cast<uint8_t>(std::clamp(q, -127.0f, 127.0f) + kZeroCode);
  }
  std::memset(out + n, kZeroCode, padded - n);
  return scale;
}

// ---- micro-kernels: C[R][32] = (A[R rows] . B column blocks 0, 1 - offset) * s ---------------
// A: activation bytes, rows lda apart; B[c]: column block c's stream of `groups` 64-byte group
// rows; off[c], s[c]: its 16 columns' offsets and scales. C rows 32 floats apart.
struct Blocks {
  const int8_t* B[2];
  const int32_t* off[2];
  const float* s[2];
};

#ifdef MOEGEN_HAVE_AVX512_VNNI
template <int R>
void vnni_rows(const uint8_t* A, int64_t lda, const Blocks& b, int64_t groups, float* C) {
  __m512i acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_si512();
  for (int64_t g = 0; g < groups; ++g) {
    const __m512i b0 = _mm512_loadu_si512(b.B[0] + g * kGroupBytes);
    const __m512i b1 = _mm512_loadu_si512(b.B[1] + g * kGroupBytes);
    for (int r = 0; r < R; ++r) {
      int32_t quad;
      std::memcpy(&quad, A + r * lda + g * kGroup, sizeof(quad));
      const __m512i a = _mm512_set1_epi32(quad);
      acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], a, b0);
      acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], a, b1);
    }
  }
  for (int c = 0; c < 2; ++c) {
    const __m512i off = _mm512_loadu_si512(b.off[c]);
    const __m512 s = _mm512_loadu_ps(b.s[c]);
    for (int r = 0; r < R; ++r)
      _mm512_storeu_ps(C + r * 2 * kTileN + c * kTileN,
                       _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][c], off)), s));
  }
}

void vnni_gemm(const uint8_t* A, int64_t lda, int rows, const Blocks& b, int64_t groups, float* C) {
  int r0 = 0;
  for (; r0 + kRowBlock <= rows; r0 += kRowBlock) vnni_rows<kRowBlock>(A + r0 * lda, lda, b, groups, C + r0 * 2 * kTileN);
  A += r0 * lda, C += r0 * 2 * kTileN;
  switch (rows - r0) {
    case 1: vnni_rows<1>(A, lda, b, groups, C); break;
    case 2: vnni_rows<2>(A, lda, b, groups, C); break;
    case 3: vnni_rows<3>(A, lda, b, groups, C); break;
    case 4: vnni_rows<4>(A, lda, b, groups, C); break;
    case 5: vnni_rows<5>(A, lda, b, groups, C); break;
    case 6: vnni_rows<6>(A, lda, b, groups, C); break;
    case 7: vnni_rows<7>(A, lda, b, groups, C); break;
    default: break;
  }
}
#endif

#ifdef MOEGEN_HAVE_AMX_INT8
// C[rows <= 32][32] on the tile unit: tiles 0-3 the int32 accumulators (row tile r, column block c:
// 2r + c), 4-5 A's two row tiles, 6-7 the column blocks' weight tiles (each 1 KiB tile of the
// layout is one TDPBUSD B operand). A must hold 16 (or, for rows > 16, 32) readable rows.
void amx_gemm(const uint8_t* A, int64_t lda, int rows, const Blocks& b, int64_t groups, float* C) {
  alignas(64) int32_t acc[kAmxRowBlock][2 * kTileN];
  constexpr int64_t ldc = 2 * kTileN * sizeof(int32_t);
  const int64_t ktiles = groups * kGroup / kTileK;
  const bool two = rows > kTileRows;
  MOEGEN_TILE_ZERO(0);
  MOEGEN_TILE_ZERO(1);
  if (two) {
    MOEGEN_TILE_ZERO(2);
    MOEGEN_TILE_ZERO(3);
  }
  for (int64_t kt = 0; kt < ktiles; ++kt) {
    MOEGEN_TILE_LOAD(4, A + kt * kTileK, lda);
    MOEGEN_TILE_LOAD(6, b.B[0] + kt * kTileBytes, kGroupBytes);
    MOEGEN_TILE_LOAD(7, b.B[1] + kt * kTileBytes, kGroupBytes);
    MOEGEN_TILE_DPBUSD(0, 4, 6);
    MOEGEN_TILE_DPBUSD(1, 4, 7);
    if (two) {
      MOEGEN_TILE_LOAD(5, A + kTileRows * lda + kt * kTileK, lda);
      MOEGEN_TILE_DPBUSD(2, 5, 6);
      MOEGEN_TILE_DPBUSD(3, 5, 7);
    }
  }
  MOEGEN_TILE_STORE(0, acc[0], ldc);
  MOEGEN_TILE_STORE(1, acc[0] + kTileN, ldc);
  if (two) {
    MOEGEN_TILE_STORE(2, acc[kTileRows], ldc);
    MOEGEN_TILE_STORE(3, acc[kTileRows] + kTileN, ldc);
  }
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < 2; ++c)
      for (int n = 0; n < kTileN; ++n)
        C[r * 2 * kTileN + c * kTileN + n] = static_cast<float>(acc[r][c * kTileN + n] - b.off[c][n]) * b.s[c][n];
}
#endif

// The same arithmetic in portable C++: integer dot products, then (float)(dot - offset) * s.
void generic_gemm(const uint8_t* A, int64_t lda, int rows, const Blocks& b, int64_t groups, float* C) {
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < 2; ++c) {
      int32_t acc[kTileN] = {};
      for (int64_t g = 0; g < groups; ++g) {
        const int8_t* w = b.B[c] + g * kGroupBytes;
        const uint8_t* a = A + r * lda + g * kGroup;
        for (int n = 0; n < kTileN; ++n)
          for (int j = 0; j < kGroup; ++j) acc[n] += static_cast<int32_t>(a[j]) * w[n * kGroup + j];
      }
      for (int n = 0; n < kTileN; ++n)
        C[r * 2 * kTileN + c * kTileN + n] = static_cast<float>(acc[n] - b.off[c][n]) * b.s[c][n];
    }
}

void gemm(int64_t isa, const uint8_t* A, int64_t lda, int rows, const Blocks& b, int64_t groups, float* C) {
#ifdef MOEGEN_HAVE_AMX_INT8
  if (isa == kAmxInt8) return amx_gemm(A, lda, rows, b, groups, C);
#endif
#ifdef MOEGEN_HAVE_AVX512_VNNI
  if (isa == kAvx512Vnni) return vnni_gemm(A, lda, rows, b, groups, C);
#endif
  generic_gemm(A, lda, rows, b, groups, C);
}

// ---- the layer ----------------------------------------------------------------------------
// One matrix of every expert: codes [E][Np/16][Kp/64][1 KiB], scales and offsets [E][Np].
struct Matrix {
  const int8_t* codes;
  const float* scales;
  const int32_t* offsets;
  int64_t np, kp;
  const int8_t* block(int64_t e, int64_t nb) const { return codes + (e * np + nb * kTileN) * kp; }
  const float* s(int64_t e, int64_t n) const { return scales + e * np + n; }
  const int32_t* off(int64_t e, int64_t n) const { return offsets + e * np + n; }
};

struct Layer {
  int64_t hidden, hp, ip;         // H, and H and I padded to multiples of 64
  Matrix gate_up;                 // [E][2 ip (gate rows, then up rows)][hp]
  Matrix down;                    // [E][hp][ip]
  int64_t isa;
};

struct Item {
  int64_t expert, row0, rows;
};

// A thread's buffers for the item at hand, grown, never shrunk.
struct Scratch {
  std::vector<uint8_t> xq, hq;
  std::vector<float> xs, hs, h, c;
};
thread_local Scratch tl_scratch;

template <typename T>
T* grown(std::vector<T>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(n);
  return v.data();
}

// x's rows quantized once per token (`xq` hp bytes a row, scales `xs`): each feeds its k experts' items.
struct QuantizedX {
  const uint8_t* xq;
  const float* xs;
};

// One item: its tokens' quantized rows of x gathered, gate_up with SiLU into float32 h, h quantized
// per row, down times the router weight into out (bf16 rows, `hidden` apart).
void run_item(const Layer& L, const Item& it, const QuantizedX& x, const int64_t* tok, const float* weights,
              bf16* out) {
  using moegen_simd::Reg;
  using moegen_simd::Simd;
  constexpr int W = moegen_simd::W;
  Scratch& s = tl_scratch;
  const int64_t rows = it.rows, held = buffer_rows(L.isa, rows);
  const int block = rows_per_call(L.isa);
  uint8_t* xq = grown(s.xq, held * L.hp);
  float* xs = grown(s.xs, rows);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t = tok[it.row0 + r];
    std::memcpy(xq + r * L.hp, x.xq + t * L.hp, L.hp);
    xs[r] = x.xs[t];
  }
  std::memset(xq + rows * L.hp, kZeroCode, (held - rows) * L.hp);   // rows only tile loads read

  float* h = grown(s.h, rows * L.ip);
  float* C = grown(s.c, block * 2 * kTileN);
  for (int64_t nb = 0; nb < L.ip / kTileN; ++nb) {
    const int64_t n0 = nb * kTileN, up0 = L.ip + n0;
    const Blocks b{{L.gate_up.block(it.expert, nb), L.gate_up.block(it.expert, L.ip / kTileN + nb)},
                   {L.gate_up.off(it.expert, n0), L.gate_up.off(it.expert, up0)},
                   {L.gate_up.s(it.expert, n0), L.gate_up.s(it.expert, up0)}};
    for (int64_t r0 = 0; r0 < rows; r0 += block) {
      const int n = static_cast<int>(std::min<int64_t>(block, rows - r0));
      gemm(L.isa, xq + r0 * L.hp, L.hp, n, b, L.hp / kGroup, C);
      for (int r = 0; r < n; ++r) {
        const Reg a = Simd::set1(xs[r0 + r]);
        for (int j = 0; j < kTileN; j += W) {
          const Reg g = Simd::mul(a, Simd::load(C + r * 2 * kTileN + j));
          const Reg u = Simd::mul(a, Simd::load(C + r * 2 * kTileN + kTileN + j));
          const Reg v = Simd::mul(moegen_simd::silu(g), u);
          Simd::store(h + (r0 + r) * L.ip + n0 + j, v);
        }
      }
    }
  }
  uint8_t* hq = grown(s.hq, held * L.ip);
  float* hs = grown(s.hs, rows);
  for (int64_t r = 0; r < rows; ++r) hs[r] = quantize_row(h + r * L.ip, L.ip, L.ip, hq + r * L.ip);
  std::memset(hq + rows * L.ip, kZeroCode, (held - rows) * L.ip);

  for (int64_t nb = 0; nb < L.hp / kTileN; nb += 2) {
    const int64_t n0 = nb * kTileN, cols = std::min<int64_t>(2 * kTileN, L.hidden - n0);
    if (cols <= 0) break;
    const Blocks b{{L.down.block(it.expert, nb), L.down.block(it.expert, nb + 1)},
                   {L.down.off(it.expert, n0), L.down.off(it.expert, n0 + kTileN)},
                   {L.down.s(it.expert, n0), L.down.s(it.expert, n0 + kTileN)}};
    for (int64_t r0 = 0; r0 < rows; r0 += block) {
      const int n = static_cast<int>(std::min<int64_t>(block, rows - r0));
      gemm(L.isa, hq + r0 * L.ip, L.ip, n, b, L.ip / kGroup, C);
      for (int r = 0; r < n; ++r) {
        const int64_t row = it.row0 + r0 + r;
        const Reg a = Simd::set1(hs[r0 + r]), w = Simd::set1(weights[row]);
        bf16* dst = out + row * L.hidden + n0;
        for (int j = 0; j < cols; j += W) {
          const Reg y = Simd::mul(Simd::round_to<bf16>(Simd::mul(a, Simd::load(C + r * 2 * kTileN + j))), w);
          if (j + W <= cols)
            Simd::store(dst + j, y);
          else
            moegen_simd::store_partial(dst + j, y, static_cast<int>(cols - j));
        }
      }
    }
  }
}

// Items: each busy expert's rows in even chunks whose h fits kItemHBytes; where fewer experts are
// busy than twice the threads, each cut into that many over the busy ones (chunks of at least a
// micro-kernel call's rows where it has the rows), so every thread has work. Chunks are whole
// calls' rows (8, or 32 on AMX tiles, which pad a call to 16-row tiles) but for each expert's last.
// Sorted by rows, largest first.
std::vector<Item> make_items(const std::vector<int64_t>& counts, const Layer& L, int64_t threads) {
  const int64_t block = rows_per_call(L.isa);
  const int64_t fit =
      std::max<int64_t>(block, kItemHBytes / (L.ip * static_cast<int64_t>(sizeof(float))) / block * block);
  int64_t busy = 0;
  for (int64_t c : counts) busy += c > 0;
  const int64_t want = std::max<int64_t>(1, 2 * threads);
  std::vector<Item> items;
  int64_t row = 0;
  for (size_t e = 0; e < counts.size(); ++e) {
    const int64_t n = counts[e];
    int64_t chunks = (n + fit - 1) / fit;
    if (n > 0 && busy < want)
      chunks = std::max(chunks, std::min((want + busy - 1) / busy, std::max<int64_t>(1, n / block)));
    for (int64_t c = 0, r = 0; c < chunks; ++c) {
      const int64_t m = std::min(n - r, ((n - r) / (chunks - c) + block - 1) / block * block);
      if (m > 0) items.push_back({static_cast<int64_t>(e), row + r, m});
      r += m;
    }
    row += n;
  }
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.rows > b.rows; });
  return items;
}

void check(const at::Tensor& t, const char* name, at::ScalarType dtype) {
  moegen_experts::check_tensor(t, name, dtype, "moe_experts_int8");
}

// [codes, scales, offsets] of one matrix of `experts` experts, n x k before padding.
Matrix matrix(const std::vector<at::Tensor>& parts, int64_t experts, int64_t np, int64_t kp, const char* name) {
  TORCH_CHECK_VALUE(parts.size() == 3, "moe_experts_int8: ", name, " needs [codes, scales, offsets]");
  check(parts[0], name, at::kChar);
  check(parts[1], name, at::kFloat);
  check(parts[2], name, at::kInt);
  TORCH_CHECK_VALUE(parts[0].numel() == experts * np * kp && parts[1].numel() == experts * np &&
                        parts[2].numel() == experts * np,
                    "moe_experts_int8: ", name, " is not ", experts, " experts of [", np, ", ", kp, "] padded");
  return {parts[0].data_ptr<int8_t>(), parts[1].data_ptr<float>(), parts[2].data_ptr<int32_t>(), np, kp};
}

// x [T, H] bf16; token_idx [R] int64 (the token of each expert-ordered row); weights [R] fp32;
// counts: rows per expert (sum R); gate_up / down: the layer's [codes, scales, offsets] (see the
// layout above). Returns [T, H] bf16: per token its k experts' weighted outputs, summed in
// ascending expert order as the exact kernel sums them.
at::Tensor moe_experts_int8(const at::Tensor& x, const at::Tensor& token_idx, const at::Tensor& weights,
                            std::vector<int64_t> counts, std::vector<at::Tensor> gate_up,
                            std::vector<at::Tensor> down, int64_t inter, int64_t top_k, int64_t isa) {
  check(x, "x", at::kBFloat16);
  TORCH_CHECK_VALUE(x.dim() == 2, "moe_experts_int8: x must be [tokens, hidden]");
  TORCH_CHECK_VALUE(isa_available(isa), "moe_experts_int8: ISA ", isa_name(isa), " is not available on this CPU/build");
  Layer L;
  TORCH_CHECK_VALUE(inter >= 1, "moe_experts_int8: inter must be >= 1, got ", inter);
  L.hidden = x.size(1), L.isa = isa;
  L.hp = (L.hidden + kTileK - 1) / kTileK * kTileK;
  L.ip = (inter + kTileK - 1) / kTileK * kTileK;
  TORCH_CHECK_VALUE(L.hp <= 65536 && L.ip <= 65536, "moe_experts_int8: more than 65536 inputs overflow int32 sums");
  const int64_t experts = static_cast<int64_t>(counts.size());
  L.gate_up = matrix(gate_up, experts, 2 * L.ip, L.hp, "gate_up");
  L.down = matrix(down, experts, L.hp, L.ip, "down");
  const int64_t rows = moegen_experts::checked_routing(x, token_idx, weights, counts, "moe_experts_int8");
  const int64_t tokens = x.size(0);
  TORCH_CHECK_VALUE(top_k >= 1 && rows == tokens * top_k, "moe_experts_int8: ", rows, " routed rows for ", tokens,
                    " tokens and top_k ", top_k);
  const int64_t* tok = token_idx.data_ptr<int64_t>();
  at::Tensor combined = at::empty({tokens, L.hidden}, x.options());
  if (rows == 0) return combined;
  at::Tensor weighted = at::empty({rows, L.hidden}, x.options());
  const bf16* xp = x.data_ptr<bf16>();
  const float* wp = weights.data_ptr<float>();
  bf16* op = weighted.data_ptr<bf16>();
  // Each token's row quantized once, not once per expert it is routed to (k times): on qwen3_moe's
  // shape (top-8) the quantization was ~4% of the kernel's time (AVX-512 VNNI, an AMD EPYC), and
  // more beside AMX tiles.
  at::Tensor xq_all = at::empty({tokens, L.hp}, x.options().dtype(at::kByte));
  std::vector<float> xs_all(tokens);
  uint8_t* xqp = xq_all.data_ptr<uint8_t>();
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) xs_all[t] = quantize_row(xp + t * L.hidden, L.hidden, L.hp, xqp + t * L.hp);
  });
  const QuantizedX xq{xqp, xs_all.data()};
  const std::vector<Item> items = make_items(counts, L, at::get_num_threads());
  std::atomic<int64_t> next{0};
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), static_cast<int64_t>(items.size()));
  at::parallel_for(0, std::max<int64_t>(threads, 1), 1, [&](int64_t, int64_t) {
#ifdef MOEGEN_HAVE_AMX_INT8
    const moegen_amx::ThreadTiles tiles(L.isa == kAmxInt8);
#endif
    for (int64_t i; (i = next.fetch_add(1)) < static_cast<int64_t>(items.size());) run_item(L, items[i], xq, tok, wp, op);
  });
  moegen_experts::combine_rows(op, L.hidden, tok, tokens, top_k, L.hidden, combined.data_ptr<bf16>());
  return combined;
}

std::vector<std::string> experts_int8_isas() {
  std::vector<std::string> names;
  for (int64_t isa : {kAmxInt8, kAvx512Vnni, kGeneric})
    if (isa_available(isa)) names.push_back(isa_name(isa));
  return names;
}

}  // namespace
}  // namespace moegen_experts_int8

TORCH_LIBRARY_FRAGMENT(MOEGEN_OPS_NS, m) {
  m.def("moe_experts_int8(Tensor x, Tensor token_idx, Tensor weights, int[] counts, Tensor[] gate_up, "
        "Tensor[] down, int inter, int top_k, int isa) -> Tensor",
        &moegen_experts_int8::moe_experts_int8);
  m.def("experts_int8_isas() -> str[]", &moegen_experts_int8::experts_int8_isas);
}

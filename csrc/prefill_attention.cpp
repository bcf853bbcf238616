// Causal self-attention of a flat batch of prompts (prefill without a cache), bf16: the products
// on AMX tiles where the CPU has them, else AVX-512 BF16 (VDPBF16PS over the same tile layouts).
//
// Why: PyTorch's SDPA on the CPU ran prompts of 128 tokens at 0.4-0.8 TFLOP/s on the AMX Xeon
// (counting the full, unmasked products; 5 ms for 32 prompts with Mixtral's heads), 7-10% of the
// engine's prefill; on an AMD EPYC (Zen 4, no AMX) 11% of qwen3_moe's prefill. The softmax is
// AVX-512 between the products. Measured on the AMX Xeon, 32 prompts x 128 tokens, 16 heads over
// 4 kv heads: head size 64 2.5 vs 4.5 ms, 128 4.0 vs 6.5 ms. Under AMX the vector units run at
// about half their lone rate, so the softmax's instruction count is what is left to win (it took
// 2.3 of 4.4 ms before the one-instruction bf16 rounding and the shorter exp below). On the AMD
// EPYC, the products as VDPBF16PS, same shapes: head size 128 10.8 vs 37.4 ms, 64 6.5 vs 30.1 ms.
//
// q [tokens, N, D], k [tokens, Kh, D], v [tokens, Kh, Dv] (any strides but a contiguous last
// dim), the sequences back to back (seq_lens); out [tokens, N, Dv]. N a multiple of Kh (GQA);
// D and Dv multiples of 32. Query i of a sequence sees its keys j <= i, and with a sliding
// window W only those with i - j < W.
//
// Work item: (sequence, kv head), longest sequences first, taken from a shared counter. The
// item's K and V are packed once into the tile layouts below (thread-local buffers), then for
// each of its query heads and each block of 32 query rows:
//   S = Q K^T over the key blocks the rows can see (fp32 accumulators), scaled and masked;
//   P = exp(S - row max) in fp32, summed in fp32, rounded to bf16;
//   O = P V (fp32 accumulators), divided by the row sum and rounded to bf16.
// That is a flash-attention kernel's rounding (fp32 scores and sums, bf16 probabilities into
// the second product) with whole rows of scores at once (32 x keys fp32: 512 KiB at 4,096
// keys). Not bit-identical to SDPA; bf16 only -- float32 keeps SDPA, exact against transformers.
//
// Tile layouts (every tile 16 rows of 64 bytes, see amx.h):
//   Kt: per block of 16 keys and chunk of 32 dims, row p holds for each key n (K[n][2p], K[n][2p+1])
//       -- the B operand of S = Q K^T;
//   Vt: per chunk of 32 keys and block of 16 dims, row p holds for each dim n (V[2p][n], V[2p+1][n])
//       -- the B operand of O = P V.
// Keys past the sequence's end are zero in both (masked scores; zero rows so 0 * V stays 0).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "amx.h"
#include "simd.h"

#ifndef MOEGEN_OPS_NS
#define MOEGEN_OPS_NS moegen_ops
#endif

// AVX-512 (F, BF16) for the softmax, the layouts and, without AMX, the products; forced narrower
// SIMD builds (tests) leave the op unavailable.
#if defined(__AVX512F__) && defined(__AVX512BF16__) && !defined(MOEGEN_SIMD_AVX2) && !defined(MOEGEN_SIMD_SCALAR)
#define MOEGEN_PREFILL_KERNEL 1
#endif

namespace moegen_prefill {
namespace {

using bf16 = c10::BFloat16;

enum Isa : int { kAvx512Bf16 = 1, kAmx = 2 };

// The ISAs the products can run on here, fastest first (none: the op is unavailable).
std::vector<Isa> isas() {
  std::vector<Isa> out;
#ifdef MOEGEN_PREFILL_KERNEL
#ifdef MOEGEN_HAVE_AMX
  if (moegen_amx::usable()) out.push_back(kAmx);
#endif
  out.push_back(kAvx512Bf16);  // -march=native: the build machine's ISA is the running one
#endif
  return out;
}

bool available() { return !isas().empty(); }

#ifdef MOEGEN_PREFILL_KERNEL


constexpr int kRows = 32;   // query rows per block: two row tiles
constexpr int kKeys = 32;   // keys per step of either product: two 16-key tiles / one 32-key k chunk
constexpr int kTile = 512;  // bf16 elements in a tile
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

using moegen_simd::round_up;

struct Shapes {
  int64_t heads, kv_heads, d, dv;
  int64_t q_tok, q_head, k_tok, k_head, v_tok, v_head, o_tok, o_head;  // element strides
  float scale;
  int64_t window;
};

// A thread's buffers, grown as needed.
struct Buffers {
  std::vector<bf16> kt, vt, q, p;
  std::vector<float> s, o, inv_sum;
};

void pack_keys(const bf16* k, int64_t stride, int64_t len, int64_t padded, int64_t d, bf16* kt) {
  const int64_t chunks = d / 32;
  std::memset(static_cast<void*>(kt), 0, padded * d * sizeof(bf16));
  auto* dst = reinterpret_cast<uint32_t*>(kt);
  for (int64_t j = 0; j < len; ++j) {
    const bf16* src = k + j * stride;  // a view's rows may start at any bf16: pairs copied, not cast
    uint32_t* block = dst + (j / 16) * chunks * (kTile / 2) + (j % 16);
    for (int64_t w = 0; w < d / 2; ++w) std::memcpy(block + (w / 16) * (kTile / 2) + (w % 16) * 16, src + 2 * w, 4);
  }
}

// A pair of keys' V rows (a, b) becomes row p of each 16-dim tile: 32-bit words a[n] | b[n] << 16.
void pack_values(const bf16* v, int64_t stride, int64_t len, int64_t padded, int64_t dv, bf16* vt) {
  const int64_t blocks = dv / 16;
  const __m256i zero = _mm256_setzero_si256();
  for (int64_t j = 0; j < padded; j += 2) {
    bf16* row = vt + (j / kKeys) * blocks * kTile + ((j % kKeys) / 2) * 32;
    for (int64_t db = 0; db < blocks; ++db) {
      const auto load = [&](int64_t key) {
        return key < len ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + key * stride + db * 16)) : zero;
      };
      const __m512i a = _mm512_cvtepu16_epi32(load(j)), b = _mm512_cvtepu16_epi32(load(j + 1));
      _mm512_storeu_si512(row + db * kTile, _mm512_or_si512(a, _mm512_slli_epi32(b, 16)));
    }
  }
}

// C[32][32] (fp32, ldc elements apart) = the sum over `steps` k steps of A[32 rows] (lda elements
// apart, a_step elements on each step) x (B0 | B1) (one tile each, b_step elements on each step):
// the 2x2 block of 16x16 accumulators both products are made of.
template <Isa isa>
void tile_block(const bf16* a, int64_t lda, int64_t a_step, const bf16* b0, const bf16* b1, int64_t b_step,
                int64_t steps, float* c, int64_t ldc);

// AVX-512 BF16: 8 rows at a time (simd.h's dpbf16_rows).
template <>
void tile_block<kAvx512Bf16>(const bf16* a, int64_t lda, int64_t a_step, const bf16* b0, const bf16* b1,
                             int64_t b_step, int64_t steps, float* c, int64_t ldc) {
  for (int r0 = 0; r0 < kRows; r0 += 8)
    moegen_simd::dpbf16_rows<8>(a + r0 * lda, lda, a_step, b0, b1, b_step, steps, c + r0 * ldc, ldc, [] {});
}

#ifdef MOEGEN_HAVE_AMX
// AMX: tiles 0-3 the accumulators, 4-5 A's two row tiles, 6-7 the B tiles.
template <>
void tile_block<kAmx>(const bf16* a, int64_t lda, int64_t a_step, const bf16* b0, const bf16* b1, int64_t b_step,
                      int64_t steps, float* c, int64_t ldc) {
  MOEGEN_TILE_ZERO(0);
  MOEGEN_TILE_ZERO(1);
  MOEGEN_TILE_ZERO(2);
  MOEGEN_TILE_ZERO(3);
  for (int64_t t = 0; t < steps; ++t) {
    MOEGEN_TILE_LOAD(4, a + t * a_step, lda * sizeof(bf16));
    MOEGEN_TILE_LOAD(5, a + 16 * lda + t * a_step, lda * sizeof(bf16));
    MOEGEN_TILE_LOAD(6, b0 + t * b_step, 64);
    MOEGEN_TILE_LOAD(7, b1 + t * b_step, 64);
    MOEGEN_TILE_DPBF16PS(0, 4, 6);
    MOEGEN_TILE_DPBF16PS(1, 4, 7);
    MOEGEN_TILE_DPBF16PS(2, 5, 6);
    MOEGEN_TILE_DPBF16PS(3, 5, 7);
  }
  MOEGEN_TILE_STORE(0, c, ldc * sizeof(float));
  MOEGEN_TILE_STORE(1, c + 16, ldc * sizeof(float));
  MOEGEN_TILE_STORE(2, c + 16 * ldc, ldc * sizeof(float));
  MOEGEN_TILE_STORE(3, c + 16 * ldc + 16, ldc * sizeof(float));
}
#endif

// S[32 rows][keys k0..k1) = Q[32 rows] K^T, k0 and k1 multiples of 32; q: the block's 32 query
// rows, ldq elements apart. A step is 32 dims: Q's next 32 columns, each key block's next Kt tile.
template <Isa isa>
void scores(const bf16* q, int64_t ldq, int64_t d, const bf16* kt, int64_t k0, int64_t k1, float* s, int64_t lds) {
  const int64_t chunks = d / 32;
  for (int64_t kb = k0; kb < k1; kb += kKeys) {
    const bf16* b0 = kt + (kb / 16) * chunks * kTile;
    tile_block<isa>(q, ldq, 32, b0, b0 + chunks * kTile, kTile, chunks, s + kb, lds);
  }
}

// O[32 rows][dv] = P[32 rows][keys k0..k1) V. A step is 32 keys: P's next 32 columns, the next
// key chunk's Vt tiles.
template <Isa isa>
void weighted_values(const bf16* p, int64_t ldp, const bf16* vt, int64_t dv, int64_t k0, int64_t k1, float* o) {
  const int64_t blocks = dv / 16;
  for (int64_t n0 = 0; n0 < dv; n0 += 32) {
    const bf16* b0 = vt + (k0 / kKeys) * blocks * kTile + (n0 / 16) * kTile;
    tile_block<isa>(p + k0, ldp, kKeys, b0, b0 + kTile, blocks * kTile, (k1 - k0) / kKeys, o + n0, dv);
  }
}

// e^x for x <= 0 (softmax's shifted scores): 2^n e^r with n = round(x / ln2), |r| <= ln2 / 2, e^r by
// Cephes' expf polynomial (simd.h's constants); x is first raised to -87.3, so every result is a normal float (e^-87.3,
// ~1e-38, stands for what underflows: nothing next to the row's e^0 = 1 in the sum, and a bf16
// weight of ~1e-38 in the product). A NaN stays NaN (the constant goes first: max returns its
// second operand on NaN), so a NaN score makes its row NaN, as in SDPA. 13 instructions, against
// simd.h's 21 for every x.
inline __m512 exp_nonpositive(__m512 x) {
  using moegen_simd::kExpLn2Hi, moegen_simd::kExpLn2Lo, moegen_simd::kExpPoly;
  x = _mm512_max_ps(_mm512_set1_ps(-87.3f), x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(-kExpLn2Lo), _mm512_fmadd_ps(n, _mm512_set1_ps(-kExpLn2Hi), x));
  __m512 p = _mm512_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpPoly[i]));
  const __m512 er = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(er, n);
}

// Lanes of the 16 keys from j that lie in [lo, hi).
inline __mmask16 visible(int64_t j, int64_t lo, int64_t hi) {
  const int64_t first = std::clamp<int64_t>(lo - j, 0, 16), last = std::clamp<int64_t>(hi - j, 0, 16);
  return first >= last ? 0 : static_cast<__mmask16>(((1u << last) - 1) & ~((1u << first) - 1));
}

// Row i of the block: P[j] = e^((S[j] - max) * scale) over its visible keys [lo, hi), rounded to
// bf16, zero for the other keys of [k0, k1); returns 1 / (the fp32 sum).
float softmax_row(const float* s, bf16* p, int64_t k0, int64_t k1, int64_t lo, int64_t hi, float scale) {
  __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j = k0; j < k1; j += 16)
    vmax = _mm512_mask_max_ps(vmax, visible(j, lo, hi), vmax, _mm512_loadu_ps(s + j));
  const __m512 vscale = _mm512_set1_ps(scale), shift = _mm512_set1_ps(-_mm512_reduce_max_ps(vmax) * scale);
  __m512 vsum = _mm512_setzero_ps();
  for (int64_t j = k0; j < k1; j += 16) {
    const __mmask16 m = visible(j, lo, hi);
    __m512 e = _mm512_setzero_ps();
    if (m) e = _mm512_maskz_mov_ps(m, exp_nonpositive(_mm512_fmadd_ps(_mm512_loadu_ps(s + j), vscale, shift)));
    vsum = _mm512_add_ps(vsum, e);
    // VCVTNEPS2BF16 rounds to nearest even, as c10's cast; its flush of denormals cannot apply here
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + j), (__m256i)_mm512_cvtneps_pbh(e));
  }
  return 1.f / _mm512_reduce_add_ps(vsum);
}

template <Isa isa>
void attend_item(const Shapes& sh, const bf16* q, const bf16* k, const bf16* v, bf16* out, int64_t len,
                 int64_t g, Buffers& buf) {
  const int64_t padded = round_up(len, kKeys), group = sh.heads / sh.kv_heads;
  buf.kt.resize(padded * sh.d);
  buf.vt.resize(padded * sh.dv);
  buf.q.resize(kRows * sh.d);
  buf.s.resize(kRows * padded);
  buf.p.resize(kRows * padded);
  buf.o.resize(kRows * sh.dv);
  buf.inv_sum.resize(kRows);
  pack_keys(k + g * sh.k_head, sh.k_tok, len, padded, sh.d, buf.kt.data());
  pack_values(v + g * sh.v_head, sh.v_tok, len, padded, sh.dv, buf.vt.data());
  for (int64_t h = g * group; h < (g + 1) * group; ++h) {
    for (int64_t r0 = 0; r0 < len; r0 += kRows) {
      const int64_t rows = std::min<int64_t>(kRows, len - r0);
      // a full block's rows are read in place; a last, short one is copied and zero-padded (the
      // tile would read past the sequence, and for the last sequence past the tensor)
      const bf16* qb = q + r0 * sh.q_tok + h * sh.q_head;
      int64_t ldq = sh.q_tok;
      if (rows < kRows) {
        for (int64_t i = 0; i < kRows; ++i) {
          bf16* dst = buf.q.data() + i * sh.d;
          if (i < rows)
            std::memcpy(static_cast<void*>(dst), qb + i * sh.q_tok, sh.d * sizeof(bf16));
          else
            std::memset(static_cast<void*>(dst), 0, sh.d * sizeof(bf16));
        }
        qb = buf.q.data();
        ldq = sh.d;
      }
      // the keys any row of the block sees: from the window's start for its first row to its last row
      const int64_t k0 = sh.window > 0 ? std::max<int64_t>(0, r0 - sh.window + 1) / kKeys * kKeys : 0;
      const int64_t k1 = round_up(r0 + rows, kKeys);
      scores<isa>(qb, ldq, sh.d, buf.kt.data(), k0, k1, buf.s.data(), padded);
      for (int64_t i = 0; i < kRows; ++i) {
        const float* s = buf.s.data() + i * padded;
        bf16* p = buf.p.data() + i * padded;
        if (i >= rows) {  // padding rows: zero weights keep their (unstored) outputs finite
          std::memset(static_cast<void*>(p + k0), 0, (k1 - k0) * sizeof(bf16));
          continue;
        }
        const int64_t qi = r0 + i;
        const int64_t lo = sh.window > 0 ? std::max<int64_t>(0, qi - sh.window + 1) : 0;
        buf.inv_sum[i] = softmax_row(s, p, k0, k1, lo, qi + 1, sh.scale);
      }
      weighted_values<isa>(buf.p.data(), padded, buf.vt.data(), sh.dv, k0, k1, buf.o.data());
      for (int64_t i = 0; i < rows; ++i) {
        const float* o = buf.o.data() + i * sh.dv;
        bf16* dst = out + (r0 + i) * sh.o_tok + h * sh.o_head;
        const __m512 inv = _mm512_set1_ps(buf.inv_sum[i]);
        for (int64_t n = 0; n < sh.dv; n += 16)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + n),
                              (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(o + n), inv)));
      }
    }
  }
}

#endif  // MOEGEN_PREFILL_KERNEL

void check(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kBFloat16 && t.dim() == 3,
              "prefill_attention: ", name, " must be a 3-D bfloat16 CPU tensor [tokens, heads, dim]");
  TORCH_CHECK(t.stride(2) == 1, "prefill_attention: ", name, "'s last dimension must be contiguous");
}

const char* isa_name(Isa isa) { return isa == kAmx ? "amx" : "avx512-bf16"; }

// isa: "" for the fastest this CPU runs, or one of prefill_attention_isas() (tests force each).
at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             std::vector<int64_t> seq_lens, double scale, int64_t window, c10::string_view isa) {
  const std::vector<Isa> here = isas();
  TORCH_CHECK(!here.empty(), "prefill_attention: needs AVX-512 BF16 (see prefill_attention_available)");
  Isa use = here.front();
  if (!isa.empty()) {
    const auto found = std::find_if(here.begin(), here.end(), [&](Isa i) { return isa == isa_name(i); });
    TORCH_CHECK_VALUE(found != here.end(), "prefill_attention: ISA '", std::string(isa),
                      "' is not available on this CPU/build");
    use = *found;
  }
  (void)use;  // a build without AMX has one ISA
  check(q, "q");
  check(k, "k");
  check(v, "v");
  const int64_t tokens = q.size(0), heads = q.size(1), kv_heads = k.size(1), d = q.size(2), dv = v.size(2);
  TORCH_CHECK(k.size(0) == tokens && v.size(0) == tokens && v.size(1) == kv_heads && k.size(2) == d,
              "prefill_attention: q, k and v disagree in tokens, kv heads or head size");
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0, "prefill_attention: heads (", heads,
              ") must be a multiple of kv heads (", kv_heads, ")");
  TORCH_CHECK(d % 32 == 0 && dv % 32 == 0 && d > 0 && dv > 0,
              "prefill_attention: head sizes must be multiples of 32, got ", d, " and ", dv);
  TORCH_CHECK(window >= 0, "prefill_attention: window must be >= 0");
  // the row maximum is taken over unscaled scores (the scaled ones' maximum only for a positive scale)
  TORCH_CHECK(scale > 0, "prefill_attention: scale must be positive, got ", scale);
  int64_t total = 0;
  for (int64_t n : seq_lens) {
    TORCH_CHECK(n > 0, "prefill_attention: sequence lengths must be positive");
    total += n;
  }
  TORCH_CHECK(total == tokens, "prefill_attention: seq_lens sum to ", total, ", q has ", tokens, " tokens");
  at::Tensor out = at::empty({tokens, heads, dv}, q.options());
#ifdef MOEGEN_PREFILL_KERNEL
  const Shapes sh{heads, kv_heads, d, dv, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0),
                  v.stride(1), out.stride(0), out.stride(1), static_cast<float>(scale), window};
  std::vector<int64_t> starts(seq_lens.size());
  std::exclusive_scan(seq_lens.begin(), seq_lens.end(), starts.begin(), int64_t{0});
  // items (sequence, kv head), longest first so the threads finish together
  std::vector<int64_t> order(seq_lens.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return seq_lens[a] > seq_lens[b]; });
  const int64_t items = static_cast<int64_t>(order.size()) * kv_heads;
  const auto* qp = q.const_data_ptr<at::BFloat16>();
  const auto* kp = k.const_data_ptr<at::BFloat16>();
  const auto* vp = v.const_data_ptr<at::BFloat16>();
  auto* op = out.mutable_data_ptr<at::BFloat16>();
  std::atomic<int64_t> next{0};
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), items));
  const auto run_items = [&](auto attend) {
    Buffers buf;
    for (int64_t i; (i = next.fetch_add(1)) < items;) {
      const int64_t s = order[i / kv_heads], g = i % kv_heads, t0 = starts[s];
      attend(sh, reinterpret_cast<const bf16*>(qp) + t0 * sh.q_tok, reinterpret_cast<const bf16*>(kp) + t0 * sh.k_tok,
             reinterpret_cast<const bf16*>(vp) + t0 * sh.v_tok, reinterpret_cast<bf16*>(op) + t0 * sh.o_tok,
             seq_lens[s], g, buf);
    }
  };
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
#ifdef MOEGEN_HAVE_AMX
    if (use == kAmx) {
      const moegen_amx::ThreadTiles tiles(true);
      run_items(attend_item<kAmx>);
      return;
    }
#endif
    run_items(attend_item<kAvx512Bf16>);
  });
#endif
  return out;
}

bool prefill_attention_available() { return available(); }

std::vector<std::string> prefill_attention_isas() {
  std::vector<std::string> out;
  for (Isa i : isas()) out.emplace_back(isa_name(i));
  return out;
}

}  // namespace
}  // namespace moegen_prefill

#define MOEGEN_PREFILL_FRAGMENT(ns, m) TORCH_LIBRARY_FRAGMENT(ns, m)

MOEGEN_PREFILL_FRAGMENT(MOEGEN_OPS_NS, m) {
  m.def("prefill_attention(Tensor q, Tensor k, Tensor v, int[] seq_lens, float scale, int window, str isa=\"\") -> Tensor",
        &moegen_prefill::prefill_attention);
  m.def("prefill_attention_available() -> bool", &moegen_prefill::prefill_attention_available);
  m.def("prefill_attention_isas() -> str[]", &moegen_prefill::prefill_attention_isas);
}

// Decode attention over moegen's paged KV cache, on the CPU.
//
// One query token per sequence attends to its whole (ragged) context, whose K/V rows are
// scattered over fixed-size cache blocks. The loop is bound by memory latency/bandwidth and FMA
// throughput, so the design is:
//  * a work item is a sequence (split into kv-head ranges, then query-head chunks, only when
//    there are too few sequences for the threads); every K/V vector is loaded once per item and
//    used by all query heads of its group (GQA/MQA sharing, no KV duplication);
//  * tokens are processed in tiles: for each kv head, scores for the tile, one online-softmax
//    update (running max + rescale), then the probability-weighted V accumulation; fp32 math;
//  * while a tile is computed the next one is prefetched (see prefetch_into_l2), a few lines per
//    kernel step: hardware prefetchers do not follow rows scattered over blocks;
//  * items are claimed dynamically, longest first, so ragged batches balance across threads.
// MLA (absorbed DeepSeek attention) is the same kernel with one kv head whose V is a prefix of K.
//
// Compiled with -march=native by moegen/ops/build.py: the SIMD layer (csrc/simd.h) is picked at
// compile time (AVX-512, with bf16 dot products for bf16 scores where the CPU has them;
// AVX2+FMA+F16C; or portable scalar) and the build cache is keyed by the host CPU.
// Knobs (-D via MOEGEN_OPS_CFLAGS): MOEGEN_TILE (tokens per tile), MOEGEN_PREFETCH=0, and
// MOEGEN_SIMD_AVX2 / MOEGEN_SIMD_SCALAR to force a narrower code path (tests use them).

// Test hook for the build fallback; first so that the failure is immediate.
#ifdef MOEGEN_FORCE_BUILD_ERROR
#error "MOEGEN_FORCE_BUILD_ERROR is set (test hook for the build fallback)"
#endif

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "simd.h"

#ifndef MOEGEN_OPS_NS
#define MOEGEN_OPS_NS moegen_ops
#endif

namespace moegen_ops {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// The SIMD layer (csrc/simd.h): everything below is written once against `Simd`.
using moegen_simd::load_partial;
using moegen_simd::Reg;
using moegen_simd::round_up;
using moegen_simd::Simd;
using moegen_simd::W;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

#ifndef MOEGEN_PREFETCH
#define MOEGEN_PREFETCH 1
#endif

// --------------------------------------------------------------------------------------------
// Problem description (element strides) and per-thread scratch.
// --------------------------------------------------------------------------------------------

template <class T>
struct Problem {
  const T* q;
  const T* k;  // base of the K cache
  const T* v;  // base of the V cache (== k for MLA)
  T* out;
  const int32_t* block_tables;
  const int32_t* context_lens;
  int64_t num_seqs, n_heads, n_kv_heads, group;  // group = query heads per kv head
  int64_t dk, dv;                                // score width, value width
  int64_t block_size, max_blocks;
  int64_t row_stride;    // elements between consecutive tokens of one block
  int64_t block_stride;  // elements between consecutive blocks
  int64_t head_stride;   // elements between kv heads inside a token row
  int64_t q_seq_stride, q_head_stride;
  float scale;
  int64_t window;  // 0: attend to everything
};

// A unit of parallel work: one sequence, a range of its kv heads and, within each of their
// groups, a range of query heads. Normally all heads of a sequence: a token's K (or V) row for
// all kv heads is contiguous, so reading it whole is what the memory system does best.
struct Item {
  int64_t seq;
  int64_t kv_begin, kv_end;
  int64_t h_begin, h_end;
  int64_t cost;
};

// Tokens per tile: scores for a tile, one softmax update, then the PV pass. A tile's K and V
// rows (all kv heads) stay in L2 while every head reads its slice of them.
#ifndef MOEGEN_TILE
#define MOEGEN_TILE 32
#endif
constexpr int kTile = MOEGEN_TILE;
static_assert(kTile % 16 == 0, "tile must hold whole vectors");

// Tile row pointers: start of each token's row (all kv heads) in the K and V caches.
template <class T>
struct TileRows {
  const T* k[kTile];
  const T* v[kTile];
  int n = 0;
};

// Where the next tile goes: L2 on AMD CPUs, L1 elsewhere. A tile's K and V rows (64 KiB for 4 kv
// heads of 128) exceed L1, and on an AMD EPYC (Zen 4) prefetching them into it evicted the current
// tile's rows: 512 sequences x 160 tokens, 16/4 heads x 128, bf16, 10.5 ms with the L1 hint, 7.6
// with L2 (qwen3_moe's decode attention 5.7 -> 4.1 s). On the AMX Xeon the L1 hint was the better
// one (23.1 GB/s of K/V vs 21.0 with L2's, docs/performance.md).
inline bool prefetch_into_l2() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool amd = __builtin_cpu_is("amd");
  return amd;
#else
  return false;
#endif
}

// Prefetches the next tile (the part of its K and V rows this item reads) while the current one
// is computed, a few cache lines per call. The kernels call advance() once per token step, so the
// requests are spread evenly over the compute: hardware prefetchers do not follow rows scattered
// over blocks, and a burst of requests at tile start would overflow the miss queues and stall.
struct PrefetchStream {
  struct Segment {
    const char* begin;
    const char* end;
  };
  Segment segs[2 * kTile];  // K and V row ranges; adjacent ranges are merged
  int nseg = 0, seg = 0, per_call = 0;
  const char* p = nullptr;  // next line to request, null when done
  const bool into_l2 = prefetch_into_l2();

  void add(const void* start, int64_t bytes) {
    const char* b = static_cast<const char*>(start);
    if (nseg > 0 && segs[nseg - 1].end == b) {
      segs[nseg - 1].end += bytes;
    } else if (nseg < 2 * kTile) {
      // Start on a line boundary so that stepping by 64 bytes visits every line once.
      const char* line = b - (reinterpret_cast<uintptr_t>(b) & 63);
      segs[nseg++] = {line, b + bytes};
    }
  }

  // Spreads the added ranges over `calls` calls of advance().
  void finish(int64_t calls) {
    int64_t lines = 0;
    for (int i = 0; i < nseg; ++i) lines += (segs[i].end - segs[i].begin + 63) / 64;
    per_call = static_cast<int>(ceil_div(lines, std::max<int64_t>(calls, 1)));
    seg = 0;
    p = nseg > 0 ? segs[0].begin : nullptr;
  }

  void advance() {
    if (!MOEGEN_PREFETCH) return;
    // Locals, so the loop runs in registers rather than through `this`.
    const char* q = p;
    int todo = per_call, s = seg;
    const bool l2 = into_l2;
    while (todo > 0 && q != nullptr) {
      const char* end = segs[s].end;
      const int n = static_cast<int>(std::min<int64_t>(todo, (end - q + 63) / 64));
      if (l2) {
        for (int i = 0; i < n; ++i) __builtin_prefetch(q + 64 * i, 0, 2);  // prefetcht1
      } else {
        for (int i = 0; i < n; ++i) __builtin_prefetch(q + 64 * i, 0, 3);  // prefetcht0
      }
      q += 64 * n, todo -= n;
      if (q >= end) q = ++s < nseg ? segs[s].begin : nullptr;
    }
    p = q, seg = s;
  }
};

// Per-thread buffers. Slot i = kv * heads_pad + h holds one query head's scaled query, running
// max and sum, and output accumulator; scores are per kv head and reused.
struct Scratch {
  std::vector<float> q, s, acc, m, l;
  std::vector<uint16_t> qb;  // raw bf16 queries (bf16 dot-product path), padded to dkp_bf16
  int64_t dkp = 0, dvp = 0, dkp_bf16 = 0, heads_pad = 0;

  void reserve(int64_t kv_heads, int64_t heads_pad_, int64_t dk, int64_t dv) {
    heads_pad = heads_pad_;
    dkp = round_up(dk, W);
    dvp = round_up(dv, W);
    dkp_bf16 = round_up(dk, 2 * W);
    q.assign(kv_heads * heads_pad * dkp, 0.f);
    if (Simd::kBf16Dot) qb.assign(kv_heads * heads_pad * dkp_bf16, 0);
    s.assign(heads_pad * kTile, 0.f);
    acc.assign(kv_heads * heads_pad * dvp, 0.f);
    m.assign(kv_heads * heads_pad, kNegInf);
    l.assign(kv_heads * heads_pad, 0.f);
  }
};

// --------------------------------------------------------------------------------------------
// Micro-kernels. `rows[t] + col` is where the slice of token t used by this kv head starts.
// --------------------------------------------------------------------------------------------

// Scores of HP query heads (rows of q, zero padded to dkp) against n K rows.
// HP heads x (W / HP) tokens fill exactly W accumulators, each K vector is loaded once for
// all HP heads, and one reduce_lanes() turns the W dot products into W scores.
template <class T, int HP>
void qk_scores(const float* q, int64_t dkp, int64_t dk, const T* const* rows, int64_t col, int n,
               float* s, PrefetchStream* pf) {
  constexpr int TT = W / HP;
  static_assert(TT >= 1 && HP * TT == W, "heads per pass must divide the vector width");
  const int64_t nfull = dk / W;
  const int tail = static_cast<int>(dk % W);
  for (int t0 = 0; t0 < n; t0 += TT) {
    const T* r[TT];
    for (int tt = 0; tt < TT; ++tt) r[tt] = rows[std::min(t0 + tt, n - 1)] + col;
    if (pf != nullptr) pf->advance();
    Reg acc[W];
    for (int i = 0; i < W; ++i) acc[i] = Simd::zero();
    auto step = [&](int64_t off, const Reg* kv) {
#pragma GCC unroll 16
      for (int h = 0; h < HP; ++h) {
        const Reg qv = Simd::load(q + h * dkp + off);
#pragma GCC unroll 16
        for (int tt = 0; tt < TT; ++tt) acc[h * TT + tt] = Simd::fma(qv, kv[tt], acc[h * TT + tt]);
      }
    };
    for (int64_t c = 0; c < nfull; ++c) {
      Reg kv[TT];
#pragma GCC unroll 16
      for (int tt = 0; tt < TT; ++tt) kv[tt] = Simd::load(r[tt] + c * W);
      step(c * W, kv);
    }
    if (tail) {  // q is zero padded, so only K needs a partial load
      Reg kv[TT];
      for (int tt = 0; tt < TT; ++tt) kv[tt] = load_partial(r[tt] + nfull * W, tail);
      step(nfull * W, kv);
    }
    float lanes[W];
    Simd::store(lanes, Simd::reduce_lanes(acc));
    const int valid = std::min(TT, n - t0);
    for (int h = 0; h < HP; ++h) {
      for (int tt = 0; tt < valid; ++tt) s[h * kTile + t0 + tt] = lanes[h * TT + tt];
    }
  }
}

#ifdef MOEGEN_BF16_DOT
// qk_scores for bf16 storage with the bf16 dot-product instruction: K is used as stored (no
// widening) and each instruction covers 32 elements. The query is the raw bf16 input, exact,
// so only the softmax scale is applied afterwards, in fp32.
template <int HP>
void qk_scores_bf16(const uint16_t* q, int64_t dkp, int64_t dk, const c10::BFloat16* const* rows,
                    int64_t col, int n, float scale, float* s, PrefetchStream* pf) {
  constexpr int TT = W / HP;
  constexpr int E = 2 * W;  // bf16 elements per vector
  const int64_t nfull = dk / E;
  const int tail = static_cast<int>(dk % E);
  for (int t0 = 0; t0 < n; t0 += TT) {
    const uint16_t* r[TT];
    for (int tt = 0; tt < TT; ++tt) {
      r[tt] = reinterpret_cast<const uint16_t*>(rows[std::min(t0 + tt, n - 1)] + col);
    }
    if (pf != nullptr) pf->advance();
    Reg acc[W];
    for (int i = 0; i < W; ++i) acc[i] = Simd::zero();
    auto step = [&](int64_t off, const __m512i* kv) {
#pragma GCC unroll 16
      for (int h = 0; h < HP; ++h) {
        const __m512i qv = _mm512_loadu_si512(q + h * dkp + off);
#pragma GCC unroll 16
        for (int tt = 0; tt < TT; ++tt) acc[h * TT + tt] = Simd::dot_bf16(acc[h * TT + tt], qv, kv[tt]);
      }
    };
    for (int64_t c = 0; c < nfull; ++c) {
      __m512i kv[TT];
#pragma GCC unroll 16
      for (int tt = 0; tt < TT; ++tt) kv[tt] = _mm512_loadu_si512(r[tt] + c * E);
      step(c * E, kv);
    }
    if (tail) {  // q is zero padded; K is read only up to the end of its row
      const __mmask32 mask = (1u << tail) - 1;
      __m512i kv[TT];
      for (int tt = 0; tt < TT; ++tt) kv[tt] = _mm512_maskz_loadu_epi16(mask, r[tt] + nfull * E);
      step(nfull * E, kv);
    }
    float lanes[W];
    Simd::store(lanes, Simd::mul(Simd::reduce_lanes(acc), Simd::set1(scale)));
    const int valid = std::min(TT, n - t0);
    for (int h = 0; h < HP; ++h) {
      for (int tt = 0; tt < valid; ++tt) s[h * kTile + t0 + tt] = lanes[h * TT + tt];
    }
  }
}
#endif

// acc[h, cols] += sum_t p[h, t] * V[t, cols] for HP heads and CB vectors of columns starting at
// `col`; the HP x CB accumulators live in registers for the whole token loop.
template <class T, int HP, int CB, bool kPartial>
void pv_columns(const float* p, const T* const* rows, int n, int64_t col, int tail, float* acc,
                int64_t dvp, int64_t acc_col, PrefetchStream* pf) {
  Reg a[HP][CB];
  for (int h = 0; h < HP; ++h) {
    for (int c = 0; c < CB; ++c) a[h][c] = Simd::load(acc + h * dvp + acc_col + c * W);
  }
  for (int t = 0; t < n; ++t) {
    const T* r = rows[t] + col;
    if (pf != nullptr) pf->advance();
    Reg v[CB];
#pragma GCC unroll 16
    for (int c = 0; c < CB; ++c) v[c] = kPartial ? load_partial(r, tail) : Simd::load(r + c * W);
#pragma GCC unroll 16
    for (int h = 0; h < HP; ++h) {
      const Reg ph = Simd::set1(p[h * kTile + t]);
#pragma GCC unroll 16
      for (int c = 0; c < CB; ++c) a[h][c] = Simd::fma(ph, v[c], a[h][c]);
    }
  }
  for (int h = 0; h < HP; ++h) {
    for (int c = 0; c < CB; ++c) Simd::store(acc + h * dvp + acc_col + c * W, a[h][c]);
  }
}

template <class T, int HP>
void pv_accumulate(const float* p, const T* const* rows, int64_t col, int n, int64_t dv,
                   float* acc, int64_t dvp, PrefetchStream* pf) {
  constexpr int CB = std::max(1, Simd::kAccRegs / HP);
  const int64_t nfull = dv / W;
  int64_t c = 0;
  // Only the first pass over the tokens advances the prefetch stream: once per token.
  auto first = [&]() { return c == 0 ? pf : nullptr; };
  for (; c + CB <= nfull; c += CB) {
    pv_columns<T, HP, CB, false>(p, rows, n, col + c * W, 0, acc, dvp, c * W, first());
  }
  for (; c < nfull; ++c) {
    pv_columns<T, HP, 1, false>(p, rows, n, col + c * W, 0, acc, dvp, c * W, first());
  }
  if (dv % W) {
    pv_columns<T, HP, 1, true>(p, rows, n, col + nfull * W, dv % W, acc, dvp, nfull * W, first());
  }
}

// One online-softmax step for a head: turns the tile's scores into exp(s - m_new) in place,
// rescales the running sum and accumulator by exp(m_old - m_new). Never exponentiates a
// logit that has not had the running max subtracted.
inline void softmax_update(float* s, int n, float& m, float& l, float* acc, int64_t dvp) {
  const int npad = static_cast<int>(round_up(n, W));
  for (int t = n; t < npad; ++t) s[t] = kNegInf;
  Reg mx = Simd::set1(kNegInf);
  for (int t = 0; t < npad; t += W) mx = Simd::max(mx, Simd::load(s + t));
  const float m_new = std::max(m, Simd::reduce_max(mx));
  const Reg vmax = Simd::set1(m_new);
  Reg sum = Simd::zero();
  for (int t = 0; t < npad; t += W) {
    const Reg e = Simd::exp(Simd::sub(Simd::load(s + t), vmax));
    Simd::store(s + t, e);
    sum = Simd::add(sum, e);
  }
  if (m_new > m && l > 0.f) {  // earlier tiles were weighted against a smaller max
    const float alpha = std::exp(m - m_new);
    const Reg va = Simd::set1(alpha);
    for (int64_t d = 0; d < dvp; d += W) Simd::store(acc + d, Simd::mul(va, Simd::load(acc + d)));
    l *= alpha;
  }
  l += Simd::reduce_add(sum);
  m = m_new;
}

// --------------------------------------------------------------------------------------------
// Per-item driver.
// --------------------------------------------------------------------------------------------

template <class T>
const T* query_row(const Problem<T>& pb, const Item& it, int64_t kv, int64_t h) {
  const int64_t head = (it.kv_begin + kv) * pb.group + it.h_begin + h;
  return pb.q + it.seq * pb.q_seq_stride + head * pb.q_head_stride;
}

// True when scores use the bf16 dot-product kernel (bf16 storage on a CPU that has one).
template <class T>
constexpr bool kUseBf16Dot = Simd::kBf16Dot && std::is_same_v<T, c10::BFloat16>;

// Queries of the item into scratch: fp32 pre-multiplied by the softmax scale, or raw bf16 bits
// for the bf16 dot-product kernel. Padding heads and columns are exact zeros.
template <class T>
void load_queries(const Problem<T>& pb, const Item& it, Scratch& ws) {
  if constexpr (kUseBf16Dot<T>) {
    std::fill(ws.qb.begin(), ws.qb.end(), uint16_t{0});
  } else {
    std::fill(ws.q.begin(), ws.q.end(), 0.f);
  }
  for (int64_t kv = 0; kv < it.kv_end - it.kv_begin; ++kv) {
    for (int64_t h = 0; h < it.h_end - it.h_begin; ++h) {
      const T* src = query_row(pb, it, kv, h);
      const int64_t slot = kv * ws.heads_pad + h;
      if constexpr (kUseBf16Dot<T>) {
        std::memcpy(ws.qb.data() + slot * ws.dkp_bf16, src, pb.dk * sizeof(T));
      } else {
        float* dst = ws.q.data() + slot * ws.dkp;
        for (int64_t d = 0; d < pb.dk; ++d) dst[d] = static_cast<float>(src[d]) * pb.scale;
      }
    }
  }
}

// Row starts of tokens [t0, t0 + n), walking the block table incrementally.
template <class T>
void gather_rows(const Problem<T>& pb, int64_t seq, int64_t t0, int n, TileRows<T>& rows) {
  const int32_t* table = pb.block_tables + seq * pb.max_blocks;
  int64_t b = t0 / pb.block_size, off = t0 % pb.block_size;
  int64_t base = static_cast<int64_t>(table[b]) * pb.block_stride;
  for (int i = 0; i < n; ++i) {
    if (off == pb.block_size) {
      off = 0;
      base = static_cast<int64_t>(table[++b]) * pb.block_stride;
    }
    const int64_t row = base + off * pb.row_stride;
    rows.k[i] = pb.k + row;
    rows.v[i] = pb.v + row;
    ++off;
  }
  rows.n = n;
}

template <class T>
void write_output(const Problem<T>& pb, const Item& it, const Scratch& ws) {
  for (int64_t kv = 0; kv < it.kv_end - it.kv_begin; ++kv) {
    for (int64_t h = 0; h < it.h_end - it.h_begin; ++h) {
      const int64_t slot = kv * ws.heads_pad + h;
      const int64_t head = (it.kv_begin + kv) * pb.group + it.h_begin + h;
      T* dst = pb.out + (it.seq * pb.n_heads + head) * pb.dv;
      const float* src = ws.acc.data() + slot * ws.dvp;
      const float inv = 1.f / ws.l[slot];
      for (int64_t d = 0; d < pb.dv; ++d) dst[d] = static_cast<T>(src[d] * inv);
    }
  }
}

// Scores, softmax update and PV accumulation of one kv head's query heads over one tile.
// pf streams the next tile in while this one is computed.
template <class T, int HP>
void attend_tile(const Problem<T>& pb, const Item& it, int64_t kv, const TileRows<T>& rows,
                 PrefetchStream& pf, Scratch& ws) {
  const int64_t nh = it.h_end - it.h_begin, nh_pad = ws.heads_pad;
  const int64_t col = (it.kv_begin + kv) * pb.head_stride;
  const int64_t slot0 = kv * nh_pad;
  float* s = ws.s.data();
  for (int64_t h = 0; h < nh_pad; h += HP) {
    PrefetchStream* step_pf = h == 0 ? &pf : nullptr;
#ifdef MOEGEN_BF16_DOT
    if constexpr (kUseBf16Dot<T>) {
      qk_scores_bf16<HP>(ws.qb.data() + (slot0 + h) * ws.dkp_bf16, ws.dkp_bf16, pb.dk, rows.k, col,
                         rows.n, pb.scale, s + h * kTile, step_pf);
      continue;
    }
#endif
    qk_scores<T, HP>(ws.q.data() + (slot0 + h) * ws.dkp, ws.dkp, pb.dk, rows.k, col, rows.n,
                     s + h * kTile, step_pf);
  }
  for (int64_t h = 0; h < nh; ++h) {
    softmax_update(s + h * kTile, rows.n, ws.m[slot0 + h], ws.l[slot0 + h],
                   ws.acc.data() + (slot0 + h) * ws.dvp, ws.dvp);
  }
  for (int64_t h = nh; h < nh_pad; ++h) std::fill_n(s + h * kTile, kTile, 0.f);  // pad heads
  for (int64_t h = 0; h < nh_pad; h += HP) {
    pv_accumulate<T, HP>(s + h * kTile, rows.v, col, rows.n, pb.dv,
                         ws.acc.data() + (slot0 + h) * ws.dvp, ws.dvp, h == 0 ? &pf : nullptr);
  }
}

template <class T>
int64_t first_token(const Problem<T>& pb, int64_t seq) {
  const int64_t len = pb.context_lens[seq];
  return pb.window > 0 ? std::max<int64_t>(0, len - pb.window) : 0;
}

// Gathers the tile of `it` starting at token t0 into `rows` and queues the part of its K and V
// rows that the item reads (from its first kv head's slice to its last) for prefetching.
template <class T>
void plan_prefetch(const Problem<T>& pb, const Item& it, int64_t t0, TileRows<T>& rows,
                   PrefetchStream& pf) {
  const int64_t len = pb.context_lens[it.seq];
  gather_rows(pb, it.seq, t0, static_cast<int>(std::min<int64_t>(kTile, len - t0)), rows);
  const int64_t nkv = it.kv_end - it.kv_begin, first_col = it.kv_begin * pb.head_stride;
  const int64_t elem = static_cast<int64_t>(sizeof(T));
  for (int t = 0; t < rows.n; ++t) pf.add(rows.k[t] + first_col, ((nkv - 1) * pb.head_stride + pb.dk) * elem);
  if (pb.k != pb.v) {  // MLA: V is inside the K rows
    for (int t = 0; t < rows.n; ++t) pf.add(rows.v[t] + first_col, ((nkv - 1) * pb.head_stride + pb.dv) * elem);
  }
}

// `upcoming` (may be null) is the item this thread runs next: its first tile is prefetched
// during this item's last, so the pipeline does not drain between items.
template <class T, int HP>
void attend_item(const Problem<T>& pb, const Item& it, const Item* upcoming, Scratch& ws) {
  const int64_t len = pb.context_lens[it.seq];
  const int64_t begin = first_token(pb, it.seq);
  const int64_t nkv = it.kv_end - it.kv_begin;
  load_queries(pb, it, ws);
  std::fill(ws.acc.begin(), ws.acc.end(), 0.f);
  std::fill(ws.m.begin(), ws.m.end(), kNegInf);
  std::fill(ws.l.begin(), ws.l.end(), 0.f);

  TileRows<T> tiles[2];
  int cur = 0;
  gather_rows(pb, it.seq, begin, static_cast<int>(std::min<int64_t>(kTile, len - begin)), tiles[0]);
  for (int64_t t0 = begin; t0 < len; t0 += kTile) {
    PrefetchStream pf;
    if (t0 + kTile < len) {
      plan_prefetch(pb, it, t0 + kTile, tiles[cur ^ 1], pf);
    } else if (upcoming != nullptr) {
      TileRows<T> first;
      plan_prefetch(pb, *upcoming, first_token(pb, upcoming->seq), first, pf);
    }
    // Calls: the score kernel's steps plus the PV kernel's tokens, for every kv head.
    pf.finish(nkv * (ceil_div(tiles[cur].n, W / HP) + tiles[cur].n));
    for (int64_t kv = 0; kv < nkv; ++kv) attend_tile<T, HP>(pb, it, kv, tiles[cur], pf, ws);
    cur ^= 1;
  }
  write_output(pb, it, ws);
}

// Heads handled per micro-kernel pass: enough to fill the accumulators, capped by the vector
// width (QK packs HP heads x W/HP tokens into one register set).
inline int heads_per_pass(int64_t heads) {
  int hp = 1;
  while (hp < heads && hp < std::min(W, Simd::kAccRegs)) hp *= 2;
  return hp;
}

template <class F>
void with_heads_per_pass(int hp, F&& f) {
  switch (hp) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: if constexpr (W >= 2) return f(std::integral_constant<int, 2>{}); break;
    case 4: if constexpr (W >= 4) return f(std::integral_constant<int, 4>{}); break;
    case 8: if constexpr (W >= 8) return f(std::integral_constant<int, 8>{}); break;
    case 16: if constexpr (W >= 16) return f(std::integral_constant<int, 16>{}); break;
  }
  TORCH_CHECK(false, "moegen decode attention: internal error, bad heads-per-pass ", hp);
}

// Items, longest first. A sequence is split (first by kv heads, then by query-head chunks) only
// when there are too few sequences to give every thread several items.
template <class T>
std::vector<Item> make_items(const Problem<T>& pb, int hp, int threads) {
  const int64_t want = 4 * static_cast<int64_t>(threads);
  const int64_t seqs = std::max<int64_t>(pb.num_seqs, 1);
  const int64_t kv_parts = std::clamp<int64_t>(ceil_div(want, seqs), 1, pb.n_kv_heads);
  const int64_t kv_chunk = ceil_div(pb.n_kv_heads, kv_parts);
  const int64_t units = seqs * ceil_div(pb.n_kv_heads, kv_chunk);
  const int64_t h_parts = std::clamp<int64_t>(ceil_div(want, units), 1, ceil_div(pb.group, hp));
  const int64_t h_chunk = round_up(ceil_div(pb.group, h_parts), hp);
  std::vector<Item> items;
  for (int64_t s = 0; s < pb.num_seqs; ++s) {
    const int64_t len = pb.context_lens[s];
    const int64_t span = pb.window > 0 ? std::min(len, pb.window) : len;
    for (int64_t kv = 0; kv < pb.n_kv_heads; kv += kv_chunk) {
      const int64_t kv_end = std::min(pb.n_kv_heads, kv + kv_chunk);
      for (int64_t h = 0; h < pb.group; h += h_chunk) {
        const int64_t h_end = std::min(pb.group, h + h_chunk);
        items.push_back({s, kv, kv_end, h, h_end, span * (kv_end - kv) * (h_end - h + 4)});
      }
    }
  }
  std::stable_sort(items.begin(), items.end(),
                   [](const Item& a, const Item& b) { return a.cost > b.cost; });
  return items;
}

template <class T>
void run_problem(const Problem<T>& pb) {
  const int hp = heads_per_pass(pb.group);
  const int threads = std::max(1, at::get_num_threads());
  const std::vector<Item> items = make_items(pb, hp, threads);
  int64_t max_kv = 0, max_heads = 0;
  for (const Item& it : items) {
    max_kv = std::max(max_kv, it.kv_end - it.kv_begin);
    max_heads = std::max(max_heads, it.h_end - it.h_begin);
  }
  std::atomic<int64_t> next{0};
  with_heads_per_pass(hp, [&](auto hp_const) {
    constexpr int HP = decltype(hp_const)::value;
    // One task per thread; each claims items from the shared queue until it is empty.
    at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
      Scratch ws;
      ws.reserve(max_kv, round_up(max_heads, HP), pb.dk, pb.dv);
      // Claims one item ahead so that its first tile can be prefetched.
      const int64_t count = static_cast<int64_t>(items.size());
      for (int64_t i = next.fetch_add(1); i < count;) {
        const int64_t j = next.fetch_add(1);
        attend_item<T, HP>(pb, items[i], j < count ? &items[j] : nullptr, ws);
        i = j;
      }
    });
  });
}

// --------------------------------------------------------------------------------------------
// Argument checking and the public ops.
// --------------------------------------------------------------------------------------------

void check_common(const at::Tensor& q, const at::Tensor& block_tables,
                  const at::Tensor& context_lens, const char* op) {
  TORCH_CHECK_VALUE(q.device().is_cpu(), op, ": q must be a CPU tensor, got ", q.device());
  TORCH_CHECK_VALUE(q.dim() == 3, op, ": q must be [num_seqs, n_heads, head_dim], got shape ",
              q.sizes());
  TORCH_CHECK_TYPE(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16 ||
                  q.scalar_type() == at::kHalf,
              op, ": storage dtype must be float32, bfloat16 or float16, got ", q.scalar_type());
  TORCH_CHECK_VALUE(block_tables.device().is_cpu() && context_lens.device().is_cpu(), op,
              ": block_tables and context_lens must be CPU tensors");
  TORCH_CHECK_TYPE(block_tables.scalar_type() == at::kInt, op, ": block_tables must be int32, got ",
              block_tables.scalar_type());
  TORCH_CHECK_TYPE(context_lens.scalar_type() == at::kInt, op, ": context_lens must be int32, got ",
              context_lens.scalar_type());
  TORCH_CHECK_VALUE(block_tables.dim() == 2 && block_tables.size(0) == q.size(0), op,
              ": block_tables must be [num_seqs=", q.size(0), ", max_blocks_per_seq], got shape ",
              block_tables.sizes());
  TORCH_CHECK_VALUE(context_lens.dim() == 1 && context_lens.size(0) == q.size(0), op,
              ": context_lens must be [num_seqs=", q.size(0), "], got shape ",
              context_lens.sizes());
}

void check_cache(const at::Tensor& cache, const at::Tensor& q, const char* name, int64_t dim,
                 const char* op) {
  TORCH_CHECK_VALUE(cache.device().is_cpu(), op, ": ", name, " must be a CPU tensor");
  TORCH_CHECK_VALUE(cache.dim() == dim, op, ": ", name, " must have ", dim, " dims, got shape ",
              cache.sizes());
  TORCH_CHECK_TYPE(cache.scalar_type() == q.scalar_type(), op, ": ", name, " dtype ",
              cache.scalar_type(), " differs from q dtype ", q.scalar_type());
  TORCH_CHECK_VALUE(cache.is_contiguous(), op, ": ", name, " must be contiguous");
  TORCH_CHECK_VALUE(cache.size(0) > 0 && cache.size(1) > 0, op, ": ", name,
              " needs at least one block of at least one token, got shape ", cache.sizes());
}

// Every block a sequence will read must exist; done up front so the parallel loop cannot fail.
void check_tables(const int32_t* tables, const int32_t* lens, int64_t num_seqs,
                  int64_t max_blocks, int64_t block_size, int64_t num_blocks, int64_t window,
                  const char* op) {
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t len = lens[s];
    TORCH_CHECK_VALUE(len >= 1 && len <= max_blocks * block_size, op, ": context_lens[", s, "] = ", len,
                " must be in [1, max_blocks_per_seq * block_size = ", max_blocks * block_size, "]");
    const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) / block_size : 0;
    for (int64_t b = first; b < (len + block_size - 1) / block_size; ++b) {
      const int64_t id = tables[s * max_blocks + b];
      TORCH_CHECK_VALUE(id >= 0 && id < num_blocks, op, ": block_tables[", s, ", ", b, "] = ", id,
                  " is outside the cache's ", num_blocks, " blocks (context_lens[", s,
                  "] = ", len, ")");
    }
  }
}

// Calls f(T{}) with the storage element type (checked to be one of the three beforehand).
template <class F>
void dispatch_storage(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: return f(float{});
    case at::kBFloat16: return f(c10::BFloat16{});
    case at::kHalf: return f(c10::Half{});
    default: TORCH_CHECK_TYPE(false, "moegen decode attention: unsupported dtype ", dtype);
  }
}

template <class T>
Problem<T> base_problem(const at::Tensor& q, const at::Tensor& out, const at::Tensor& tables,
                        const at::Tensor& lens, double scale, int64_t window) {
  Problem<T> pb{};
  pb.q = q.data_ptr<T>();
  pb.out = out.data_ptr<T>();
  pb.block_tables = tables.data_ptr<int32_t>();
  pb.context_lens = lens.data_ptr<int32_t>();
  pb.num_seqs = q.size(0);
  pb.n_heads = q.size(1);
  pb.max_blocks = tables.size(1);
  pb.q_seq_stride = q.stride(0);
  pb.q_head_stride = q.stride(1);
  pb.scale = static_cast<float>(scale);
  pb.window = window;
  return pb;
}

at::Tensor paged_decode_attention(const at::Tensor& q_in, const at::Tensor& k_cache,
                                  const at::Tensor& v_cache, const at::Tensor& block_tables_in,
                                  const at::Tensor& context_lens_in, double scale,
                                  int64_t sliding_window) {
  const char* op = "paged_decode_attention";
  check_common(q_in, block_tables_in, context_lens_in, op);
  check_cache(k_cache, q_in, "k_cache", 4, op);
  check_cache(v_cache, q_in, "v_cache", 4, op);
  TORCH_CHECK_VALUE(k_cache.sizes() == v_cache.sizes(), op, ": k_cache ", k_cache.sizes(),
              " and v_cache ", v_cache.sizes(), " must have the same shape");
  const int64_t n_heads = q_in.size(1), n_kv = k_cache.size(2), d = k_cache.size(3);
  TORCH_CHECK_VALUE(q_in.size(2) == d, op, ": q head_dim ", q_in.size(2), " != cache head_dim ", d);
  TORCH_CHECK_VALUE(n_kv > 0 && n_heads % n_kv == 0, op, ": n_heads ", n_heads,
              " must be a multiple of n_kv_heads ", n_kv);
  TORCH_CHECK_VALUE(sliding_window >= 0, op, ": sliding_window must be >= 0, got ", sliding_window);
  const at::Tensor q = q_in.stride(2) == 1 ? q_in : q_in.contiguous();
  const at::Tensor tables = block_tables_in.contiguous();
  const at::Tensor lens = context_lens_in.contiguous();
  const int64_t block_size = k_cache.size(1);
  check_tables(tables.data_ptr<int32_t>(), lens.data_ptr<int32_t>(), q.size(0), tables.size(1),
               block_size, k_cache.size(0), sliding_window, op);

  at::Tensor out = at::empty({q.size(0), n_heads, d}, q.options());
  if (q.size(0) == 0 || n_heads == 0) return out;
  dispatch_storage(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    Problem<T> pb = base_problem<T>(q, out, tables, lens, scale, sliding_window);
    pb.k = k_cache.data_ptr<T>();
    pb.v = v_cache.data_ptr<T>();
    pb.n_kv_heads = n_kv;
    pb.group = n_heads / n_kv;
    pb.dk = pb.dv = d;
    pb.block_size = block_size;
    pb.head_stride = d;
    pb.row_stride = n_kv * d;
    pb.block_stride = block_size * n_kv * d;
    run_problem(pb);
  });
  return out;
}

at::Tensor paged_decode_attention_mla(const at::Tensor& q_in, const at::Tensor& kv_cache,
                                      const at::Tensor& block_tables_in,
                                      const at::Tensor& context_lens_in, double scale,
                                      int64_t kv_lora_rank) {
  const char* op = "paged_decode_attention_mla";
  check_common(q_in, block_tables_in, context_lens_in, op);
  check_cache(kv_cache, q_in, "kv_cache", 3, op);
  const int64_t width = kv_cache.size(2);
  TORCH_CHECK_VALUE(q_in.size(2) == width, op, ": q width ", q_in.size(2),
              " != kv_cache width (kv_lora_rank + rope_dim) ", width);
  TORCH_CHECK_VALUE(kv_lora_rank > 0 && kv_lora_rank <= width, op, ": kv_lora_rank ", kv_lora_rank,
              " must be in [1, ", width, "]");
  const at::Tensor q = q_in.stride(2) == 1 ? q_in : q_in.contiguous();
  const at::Tensor tables = block_tables_in.contiguous();
  const at::Tensor lens = context_lens_in.contiguous();
  const int64_t block_size = kv_cache.size(1);
  check_tables(tables.data_ptr<int32_t>(), lens.data_ptr<int32_t>(), q.size(0), tables.size(1),
               block_size, kv_cache.size(0), 0, op);

  at::Tensor out = at::empty({q.size(0), q.size(1), kv_lora_rank}, q.options());
  if (q.size(0) == 0 || q.size(1) == 0) return out;
  dispatch_storage(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    Problem<T> pb = base_problem<T>(q, out, tables, lens, scale, 0);
    pb.k = pb.v = kv_cache.data_ptr<T>();  // V is the latent prefix of each K row
    pb.n_kv_heads = 1;
    pb.group = q.size(1);
    pb.dk = width;
    pb.dv = kv_lora_rank;
    pb.block_size = block_size;
    pb.head_stride = 0;
    pb.row_stride = width;
    pb.block_stride = block_size * width;
    run_problem(pb);
  });
  return out;
}

std::string impl_name() { return Simd::kName; }

}  // namespace
}  // namespace moegen_ops

// Indirection so MOEGEN_OPS_NS is macro-expanded before TORCH_LIBRARY pastes it.
#define MOEGEN_DEFINE_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)

MOEGEN_DEFINE_LIBRARY(MOEGEN_OPS_NS, m) {
  m.def(
      "paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
      "Tensor context_lens, float scale, int sliding_window=0) -> Tensor",
      &moegen_ops::paged_decode_attention);
  m.def(
      "paged_decode_attention_mla(Tensor q, Tensor kv_cache, Tensor block_tables, "
      "Tensor context_lens, float scale, int kv_lora_rank) -> Tensor",
      &moegen_ops::paged_decode_attention_mla);
  m.def("impl_name() -> str", &moegen_ops::impl_name);
}

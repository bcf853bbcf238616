// The routed experts of one MoE layer in one native call (bfloat16, SwiGLU experts).
//
// Why: one oneDNN GEMM per expert means a Python round trip and, on Intel AMX, a freshly JITed
// primitive for every new row count (each expert's row count changes every step): measured at
// half the AMX rate. Here every expert's gate_up GEMM, silu(gate) * up and down GEMM run from
// one call, over weights laid out once at load in the kernel's own tile format, with the threads
// taking (expert, block of output columns) work items from a shared counter.
//
// Weight layout ("VNNI tiles", the same for the AMX and the AVX-512 BF16 kernels): a weight
// W [N, K] (out, in) is padded to [Np, Kp] (Np a multiple of 32, Kp of 32) and stored as
// [Np/16][Kp/32][16 k-pairs][16 n][2], i.e. one 1 KiB tile per (16 output columns, 32 inputs):
// row p of a tile holds, for each of its 16 columns n, W[n][2p] and W[n][2p+1]. That is the B
// operand of AMX's TDPBF16PS (16 rows of 64 bytes) and of AVX-512's VDPBF16PS (one row = one
// 512-bit register). moegen/layers/fused_experts.py does the packing.
//
// Rounding follows the eager path in moegen/layers/moe.py exactly, apart from fp32 summation
// order inside the GEMMs: gate and up rounded to bf16 (as F.linear's output), silu(gate) rounded,
// times up rounded (csrc/elementwise.cpp's silu_mul), the down GEMM rounded, then times the
// router weight (fp32) and rounded once.
//
// ISAs: "amx" (AMX-BF16 tiles: 2x2 blocks of 16x16 fp32 accumulators), "avx512-bf16" (VDPBF16PS,
// 8 rows x 32 columns of accumulators), "generic" (portable C++ over the same layout, for CPUs
// with neither). The fastest one this CPU and build allow is the default; any may be forced for
// tests. Rows past an expert's last are computed on whatever follows (the next expert's rows or
// zeroed padding) and never stored, so no row count needs its own code path.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <torch/library.h>

#include <optional>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "amx.h"
#include "experts.h"
#include "simd.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif

#ifndef MOEGEN_OPS_NS
#define MOEGEN_OPS_NS moegen_ops
#endif

namespace moegen_experts {
namespace {

using bf16 = c10::BFloat16;

constexpr int kTileN = 16;              // output columns per tile
constexpr int kTileK = 32;              // inputs per tile (16 pairs)
constexpr int kTileElems = kTileN * kTileK;
constexpr int kRowBlock = 32;           // rows per micro-kernel call (two AMX row tiles)
constexpr int kPadRows = kRowBlock;     // zeroed rows after the last so over-reads stay finite
// Activation and output rows are kLdPad elements longer than their padded width: rows a power of
// two bytes apart would all fall into a few L1 sets (weighted output rows of 2 KiB: 5% slower).
constexpr int64_t kLdPad = 32;
// Rows per pass over an item's columns: as many as keep the pass's A operand (x rows for gate_up,
// h rows for down) within kPassABytes, so it stays in L2 while the item's column blocks go by, at
// most kPassRows. Each column block's weights are read from memory once per pass: at prefill sizes
// the passes of 128 rows this replaced were memory bound (2 cores x 1.73 TFLOP/s at 128 FLOP a
// weight byte is the machine's ~27 GB/s). Measured (kernel A/B, AMX Xeon, 2 MiB L2): Mixtral's
// shape at 1,024 rows per expert +15% with gate_up in passes of 384 rows (768 KiB of x) and down
// in passes of 128 (896 KiB of h); down in passes of 256 there (1.8 MiB) -10%.
constexpr int64_t kPassRows = 384, kPassABytes = 896 << 10;
// an item of at most this many rows with quantized weights dequantizes each column step's tiles
// as it goes (decode sizes); a longer one all its tiles once up front
constexpr int64_t kStreamedDequantRows = 256;
// weighted outputs of a layer larger than this are written past the caches (see scale_line)
constexpr int64_t kStreamOutBytes = 16 << 20;
// h (bf16 intermediate rows) a thread keeps for one expert item: an expert whose h fits 3 MiB is
// one item (its weights read once: decode sizes), a bigger one is split into even items of at most
// 3 MiB of h. Down reads an item's h a pass (kPassABytes) at a time, so h need not fit L2 whole
// (measured with the passes above, Mixtral's I = 3584, 1,024 rows: items of ~341 rows +15% over
// items of 128 with 1 MiB of h each; decode's ~130 rows split in two -13%).
constexpr int64_t kOwnHBytes = 3 << 20, kOwnHSplitBytes = 3 << 20;


enum Isa : int64_t { kGeneric = 0, kAvx512Bf16 = 1, kAmx = 2 };

const char* isa_name(int64_t isa) {
  return isa == kAmx ? "amx" : isa == kAvx512Bf16 ? "avx512-bf16" : "generic";
}

// ---- which ISAs this build and CPU can run ------------------------------------------------
#if defined(__AVX512F__) && defined(__AVX512BF16__)
#define MOEGEN_HAVE_AVX512_BF16 1
#endif

bool avx512_bf16_usable() {
#ifdef MOEGEN_HAVE_AVX512_BF16
  return true;  // -march=native: the build machine's ISA is the running one (build.py keys on it)
#else
  return false;
#endif
}

bool isa_available(int64_t isa) {
  return isa == kGeneric || (isa == kAvx512Bf16 && avx512_bf16_usable()) || (isa == kAmx && moegen_amx::usable());
}

// ---- weight formats ------------------------------------------------------------------------
// Weight formats: bf16 tiles, or quantized tiles -- the same layout with one code per element
// (fp8 e4m3 or int8: a byte; int4: two codes a byte, element j of the tile in the low nibble of
// byte j and element j + 256 in the high one) and, per tile, one float32 scale and zero point per
// output column: W = (decode(code) - zero) * scale, in float32 and rounded to bf16 once, which is
// exactly how moegen/layers/quantized.py dequantizes (so the kernel sees the same bf16 weights).
// fp8 stores no zero points; see dequant_tile for the stored forms of scales and zero points.
enum Format : int64_t { kBf16 = 0, kFp8 = 1, kInt8 = 2, kInt4 = 3 };

int64_t code_bytes_per_tile(int64_t fmt) { return fmt == kBf16 ? 2 * kTileElems : fmt == kInt4 ? kTileElems / 2 : kTileElems; }

struct Packed {
  const uint8_t* codes = nullptr;  // bf16 tiles (kBf16) or codes, tile after tile
  const float* scales = nullptr;   // [tiles][16]
  const float* zeros = nullptr;    // [tiles][16], or null (fp8)
};

// ---- dequantization of tiles ----------------------------------------------------------------
// Codes go in blocks of 64 = two k-pair rows (A = row 2i, B = row 2i + 1 of the tile; element
// 2n + j of a row is column n's input j): byte b of 32-bit lane r of block i holds
// b = 0: A[r], 1: A[16 + r], 2: B[r], 3: B[16 + r]. A lane's bytes are then separated by shifts
// and masks (no shuffles: port 5 stays free), each gives 16 float32 elements in order, and one
// VCVTNE2PS2BF16 per row writes 32 bf16 in natural order (moegen/ops/experts.py `pack_codes`).
// Stored forms, so that each element costs a few integer ops and one multiply:
//   fp8: scale * 2^120. The code's bits placed in a float32 ((sign << 31) | (magnitude << 20)) are
//        the e4m3 value times 2^-120 exactly, subnormals included (float32 subnormals: the kernel
//        runs with denormals-are-zero off), so times scale * 2^120 is value * scale, rounded once.
//        NaN codes (0x7f, 0xff) are not taken (moegen.layers.quantized.fits_tiles).
//   int: zero + 2^23. The code ORed into the mantissa of 2^23 is 2^23 + code; minus (2^23 + zero)
//        that is code - zero exactly, then times the scale.
inline int element_at(int64_t i) {  // the tile element stored at code position i (0..511)
  const int64_t block = i / 64, r = (i % 64) / 4, b = i % 4;
  return static_cast<int>((2 * block + b / 2) * 32 + (b % 2) * 16 + r);
}

inline float fp8_scaled_value(uint32_t code) {  // the e4m3 value times 2^-120 (see above)
  const uint32_t bits = ((code & 0x80u) << 24) | ((code & 0x7fu) << 20);
  float v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

inline float int_biased_value(uint32_t code) {  // 2^23 + code
  const uint32_t bits = 0x4b000000u | code;
  float v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

void dequant_tile_scalar(int64_t fmt, const uint8_t* codes, const float* scale, const float* zero, bf16* out) {
  for (int64_t i = 0; i < kTileElems; ++i) {
    const int e = element_at(i);
    const int n = (e % 32) / 2;
    const uint32_t code = fmt != kInt4 ? codes[i] : i < kTileElems / 2 ? codes[i] & 15u : codes[i - kTileElems / 2] >> 4;
    out[e] = bf16(fmt == kFp8 ? fp8_scaled_value(code) * scale[n] : (int_biased_value(code) - zero[n]) * scale[n]);
  }
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && !defined(MOEGEN_SIMD_AVX2) && !defined(MOEGEN_SIMD_SCALAR)
void dequant_tile(int64_t fmt, const uint8_t* codes, const float* scale, const float* zero, bf16* out) {
  // elements 0-15 of a row are columns 0-7 (each twice), elements 16-31 columns 8-15
  const __m512i lo_cols = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
  const __m512i hi_cols = _mm512_add_epi32(lo_cols, _mm512_set1_epi32(8));
  const __m512 s16 = _mm512_loadu_ps(scale), z16 = zero != nullptr ? _mm512_loadu_ps(zero) : _mm512_setzero_ps();
  const __m512 s[2] = {_mm512_permutexvar_ps(lo_cols, s16), _mm512_permutexvar_ps(hi_cols, s16)};
  const __m512 z[2] = {_mm512_permutexvar_ps(lo_cols, z16), _mm512_permutexvar_ps(hi_cols, z16)};
  const __m512i sign = _mm512_set1_epi32(static_cast<int>(0x80000000u)), mag = _mm512_set1_epi32(0x07f00000);
  const __m512i byte = _mm512_set1_epi32(0xff), two23 = _mm512_set1_epi32(0x4b000000);
  const __m512i nibble = _mm512_set1_epi32(0x0f0f0f0f);
  constexpr int64_t kBlocks = kTileElems / 64;
  for (int64_t i = 0; i < kBlocks; ++i) {
    __m512i x = _mm512_loadu_si512(codes + (fmt == kInt4 ? i % (kBlocks / 2) : i) * 64);
    if (fmt == kInt4) x = _mm512_and_si512(i < kBlocks / 2 ? x : _mm512_srli_epi32(x, 4), nibble);
    __m512 v[4];
    for (int b = 0; b < 4; ++b) {
      if (fmt == kFp8) {
        const __m512i t = b == 3 ? x : _mm512_slli_epi32(x, 24 - 8 * b);  // sign at bit 31
        const __m512i m = _mm512_and_si512(_mm512_srli_epi32(t, 4), mag);
        v[b] = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_ternarylogic_epi32(t, m, sign, 0xEC)), s[b % 2]);
      } else {
        const __m512i q = b == 0 ? x : _mm512_srli_epi32(x, 8 * b);
        const __m512 biased = _mm512_castsi512_ps(_mm512_ternarylogic_epi32(q, byte, two23, 0xEA));
        v[b] = _mm512_mul_ps(_mm512_sub_ps(biased, z[b % 2]), s[b % 2]);
      }
    }
    _mm512_storeu_si512(out + i * 64, (__m512i)_mm512_cvtne2ps_pbh(v[1], v[0]));
    _mm512_storeu_si512(out + i * 64 + 32, (__m512i)_mm512_cvtne2ps_pbh(v[3], v[2]));
  }
}
#else
void dequant_tile(int64_t fmt, const uint8_t* codes, const float* scale, const float* zero, bf16* out) {
  dequant_tile_scalar(fmt, codes, scale, zero, out);
}
#endif

void dequant_one(int64_t fmt, const Packed& w, int64_t t, bf16* out) {
  dequant_tile(fmt, w.codes + t * code_bytes_per_tile(fmt), w.scales + t * kTileN,
               w.zeros != nullptr ? w.zeros + t * kTileN : nullptr, out);
}

// `count` consecutive tiles of a packed weight from tile `first`, as bf16 tiles: the weights
// themselves (bf16) or dequantized into `buffer`.
const bf16* tiles_bf16(int64_t fmt, const Packed& w, int64_t first, int64_t count, bf16* buffer) {
  if (fmt == kBf16) return reinterpret_cast<const bf16*>(w.codes) + first * kTileElems;
  for (int64_t t = first; t < first + count; ++t) dequant_one(fmt, w, t, buffer + (t - first) * kTileElems);
  return buffer;
}

// The tiles of the column-block step after the current one, dequantized a few per AMX k step
// while the tile unit multiplies (quantized weights, items of one pass: decode). With `ahead`, each
// tile dequantized brings the codes, scales and zero points of the tile `ahead` tiles on (the
// step after, which the next job dequantizes) into L2: otherwise the dequantization's loads wait
// on memory while the tile unit idles -- measured int8 +5.5% (Mixtral's shape, 128 rows an
// expert) and +15% (qwen3_moe's, 64 rows), +20% and +32% at half those rows; fp8 about as much,
// int4 +2 to +7%.
struct TileJob {
  int64_t fmt = kBf16;
  const Packed* w = nullptr;
  int64_t first[2] = {0, 0};   // each half's first tile (gate | up, or two column blocks)
  int64_t per_half = 0;        // k tiles
  bf16* out = nullptr;         // [2][per_half] tiles
  int64_t done = 0, total = 0;
  int64_t ahead = 0;           // tiles to the next job's same tile, or 0: nothing to bring in

  void run(int64_t n) {
    const int64_t bytes = code_bytes_per_tile(fmt);
    for (; n > 0 && done < total; --n, ++done) {
      const int64_t t = first[done / per_half] + done % per_half;
      // written out here, not as a helper: GCC finds a function of prefetches alone free of side
      // effects and deletes its calls (checked in the assembly)
      if (ahead != 0) {
        const char* codes = reinterpret_cast<const char*>(w->codes + (t + ahead) * bytes);
        for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(codes + b, 0, 2);  // read, L2
        __builtin_prefetch(w->scales + (t + ahead) * kTileN, 0, 2);  // 16 scales: one line
        if (w->zeros != nullptr) __builtin_prefetch(w->zeros + (t + ahead) * kTileN, 0, 2);
      }
      dequant_one(fmt, *w, t, out + done * kTileElems);
    }
  }
  void run_all() { run(total - done); }
};

// ---- micro-kernels: C[32][CB*16] (fp32) = A[32 rows, Kp] x B tiles of CB column blocks ------
// A: bf16 rows with stride lda (elements), k tile kb of a row kb * kbs elements after its start
// (kTileK in plain rows; see Slabs); B[c]: the column block's first tile (kb = 0);
// rows: how many of the 32 are wanted (the rest may be skipped or computed on padding).

// The next column step's weight tiles (two column blocks, a k range) brought into L2 a few lines
// each k step, spread evenly over all of the current step's row blocks: with few rows per expert
// the weights stream from memory, and one core keeps only so many lines in flight (all of a
// step's lines asked for in its first row block measured 10% slower at decode sizes).
struct Prefetch {
  const char* p[2] = {nullptr, nullptr};
  int64_t pos = 0, end = 0, per_step = 0;  // bytes
  void step() {
    for (int64_t n = 0; n < per_step && pos < end; n += 64, pos += 64) {
      __builtin_prefetch(p[0] + pos, 0, 2);   // read, L2 (prefetcht1 on x86)
      __builtin_prefetch(p[1] + pos, 0, 2);
    }
  }
};

#ifdef MOEGEN_HAVE_AMX
// tiles 0-3: C (row tile r, column block c) = 2c + r; 4-5: A row tiles; 6-7: B column blocks.
// C[32 rows (RT = 2) or 16][32] += A[rows, k tiles kb0..kb1) x (B[0] | B[1]) (C starts at zero when
// `first`): four (or two) 16x16 fp32 accumulator tiles, two A row tiles and two B tiles -- the 8
// tile registers. `pending` is an earlier block's epilogue: a few of its rows run in each k step
// (the vector units work while the AMX unit multiplies), the rest before C is stored. `ahead` (or
// null): the next column step's tiles, a few lines brought into L2 each k step.
template <int RT, typename Pending>
void amx_block(const bf16* A, int64_t lda, int64_t kbs, const bf16* const* B, int64_t kb0, int64_t kb1, float* C,
               bool first,
               Pending& pending, Prefetch* ahead) {
  constexpr int64_t ldc = 2 * kTileN * sizeof(float);
  const int64_t a_stride = lda * sizeof(bf16);
  const int64_t per_step = pending.rows_per_step(kb1 - kb0);
  if (first) {
    MOEGEN_TILE_ZERO(0);
    MOEGEN_TILE_ZERO(2);
    if constexpr (RT == 2) {
      MOEGEN_TILE_ZERO(1);
      MOEGEN_TILE_ZERO(3);
    }
  } else {
    MOEGEN_TILE_LOAD(0, C, ldc);
    MOEGEN_TILE_LOAD(2, C + kTileN, ldc);
    if constexpr (RT == 2) {
      MOEGEN_TILE_LOAD(1, C + 16 * 2 * kTileN, ldc);
      MOEGEN_TILE_LOAD(3, C + 16 * 2 * kTileN + kTileN, ldc);
    }
  }
  for (int64_t kb = kb0; kb < kb1; ++kb) {
    MOEGEN_TILE_LOAD(4, A + kb * kbs, a_stride);
    MOEGEN_TILE_LOAD(6, B[0] + kb * kTileElems, 64);
    MOEGEN_TILE_LOAD(7, B[1] + kb * kTileElems, 64);
    MOEGEN_TILE_DPBF16PS(0, 4, 6);
    MOEGEN_TILE_DPBF16PS(2, 4, 7);
    if constexpr (RT == 2) {
      MOEGEN_TILE_LOAD(5, A + 16 * lda + kb * kbs, a_stride);
      MOEGEN_TILE_DPBF16PS(1, 5, 6);
      MOEGEN_TILE_DPBF16PS(3, 5, 7);
    }
    pending.step(per_step);
    if (ahead != nullptr) ahead->step();
  }
  pending.run_all();
  MOEGEN_TILE_STORE(0, C, ldc);
  MOEGEN_TILE_STORE(2, C + kTileN, ldc);
  if constexpr (RT == 2) {
    MOEGEN_TILE_STORE(1, C + 16 * 2 * kTileN, ldc);
    MOEGEN_TILE_STORE(3, C + 16 * 2 * kTileN + kTileN, ldc);
  }
}
#endif

#ifdef MOEGEN_HAVE_AVX512_BF16
// R (<= 8) rows x the two column blocks of B (simd.h's dpbf16_rows). `ahead` (or null): the next
// column step's tiles, a few lines brought into L2 each k block.
template <int R>
void avx512_rows(const bf16* A, int64_t lda, int64_t kbs, const bf16* const* B, int64_t kblocks, float* C,
                 Prefetch* ahead) {
  moegen_simd::dpbf16_rows<R>(A, lda, kbs, B[0], B[1], kTileElems, kblocks, C, 2 * kTileN, [ahead] {
    if (ahead != nullptr) ahead->step();
  });
}

// rows in blocks of 8, the last block as long as the rows left: an expert's rows past a multiple
// of 8 are not multiplied as 8 (qwen3_moe's decode averages 64 rows an expert: ~5% of its work)
void avx512_gemm(const bf16* A, int64_t lda, int64_t kbs, int rows, const bf16* const* B, int64_t kblocks, float* C,
                 Prefetch* ahead) {
  int r0 = 0;
  for (; r0 + 8 <= rows; r0 += 8)
    avx512_rows<8>(A + r0 * lda, lda, kbs, B, kblocks, C + r0 * 2 * kTileN, ahead);
  A += r0 * lda, C += r0 * 2 * kTileN;
  switch (rows - r0) {
    case 1: avx512_rows<1>(A, lda, kbs, B, kblocks, C, ahead); break;
    case 2: avx512_rows<2>(A, lda, kbs, B, kblocks, C, ahead); break;
    case 3: avx512_rows<3>(A, lda, kbs, B, kblocks, C, ahead); break;
    case 4: avx512_rows<4>(A, lda, kbs, B, kblocks, C, ahead); break;
    case 5: avx512_rows<5>(A, lda, kbs, B, kblocks, C, ahead); break;
    case 6: avx512_rows<6>(A, lda, kbs, B, kblocks, C, ahead); break;
    case 7: avx512_rows<7>(A, lda, kbs, B, kblocks, C, ahead); break;
    default: break;
  }
}
#endif

template <int CB>
void generic_gemm(const bf16* A, int64_t lda, int64_t kbs, int rows, const bf16* const* B, int64_t kblocks, float* C) {
  for (int r = 0; r < rows; ++r) {
    float acc[CB][kTileN] = {};
    for (int64_t kb = 0; kb < kblocks; ++kb) {
      for (int p = 0; p < kTileK / 2; ++p) {
        const float a0 = static_cast<float>(A[r * lda + kb * kbs + 2 * p]);
        const float a1 = static_cast<float>(A[r * lda + kb * kbs + 2 * p + 1]);
        for (int c = 0; c < CB; ++c) {
          const bf16* b = B[c] + kb * kTileElems + p * 2 * kTileN;
          for (int n = 0; n < kTileN; ++n)
            acc[c][n] += a0 * static_cast<float>(b[2 * n]) + a1 * static_cast<float>(b[2 * n + 1]);
        }
      }
    }
    for (int c = 0; c < CB; ++c)
      for (int n = 0; n < kTileN; ++n) C[r * CB * kTileN + c * kTileN + n] = acc[c][n];
  }
}

// Work that runs a little at a time inside the next block's k loop (the vector units work while
// the AMX unit multiplies): the rows of a finished block still to post-process -- epi(c, r, nb) gets
// row r's 32 accumulators (column blocks nb and the next, or gate and up), row r of C -- and the
// dequantization of the next step's tiles (`job`: its tiles spread evenly over the `job_steps` k
// steps of the current step, a tile every other k step at Mixtral's decode sizes -- not one a k
// step until done, which crowded the vector work into the step's first half: +5% int8, +2.5% fp8).
template <typename Epi>
struct Pending {
  Epi& epi;
  const float* C;
  int64_t row = 0, end = 0, nb = 0;
  TileJob* job = nullptr;
  int64_t job_steps = 1, job_credit = 0;

  void set(int64_t r0, int64_t rows, int64_t block) { row = r0, end = r0 + rows, nb = block; }
  int64_t rows_per_step(int64_t steps) const { return (end - row + steps - 1) / steps; }
  void run(int64_t n) {
    for (; n > 0 && row < end; --n, ++row) epi(C + row * 2 * kTileN, row, nb);
  }
  void run_all() { run(end - row); }
  void step(int64_t rows) {
    run(rows);
    if (job != nullptr) {
      job_credit += job->total;
      job->run(job_credit / job_steps);
      job_credit %= job_steps;
    }
  }
};

// k tiles per AMX k chunk of a pass: two column blocks' tiles of one chunk (128 KiB) stay close
// while the pass's row blocks go by, and C is stored and reloaded once per chunk. Measured on the
// AMX Xeon (A/B in one process): with passes sized to L2 (kPassRows), 64 beat 32 on Mixtral's
// shape by 4-5% at prefill sizes and 1.0x at decode sizes (int8: +1%, +6%; 128 no better; 16 -7%);
// qwen3_moe's K fits one chunk either way. (Before those passes, 32 had beaten 16 by 2-7% and 64
// had been no better.)
constexpr int64_t kAmxKChunk = 64;

// Where a pass finds the two B column blocks of each step nb (nb0, nb0 + step, ...): `direct`,
// bf16 tiles in memory (the weights, or an item's dequantized tiles) at base[h] + (nb - nb0) k rows
// of tiles; or `streamed`, quantized tiles dequantized step by step into two slots, the next step's
// while this one multiplies.
struct Steps {
  int64_t nb0 = 0, step = 1, kblocks = 0;
  const bf16* base[2] = {nullptr, nullptr};      // direct
  int64_t fmt = kBf16;                           // streamed: from these tiles of w
  const Packed* w = nullptr;
  int64_t first[2] = {0, 0};
  bf16* slots = nullptr;                         // [2 slots][2 halves][kblocks] tiles

  bool streamed() const { return slots != nullptr; }
  int64_t stride(int64_t nb) const { return (nb - nb0) * kblocks * kTileElems; }
  void tiles(int64_t nb, const bf16** B) const {
    if (streamed()) {
      B[0] = slots + ((nb - nb0) / step % 2) * 2 * kblocks * kTileElems;
      B[1] = B[0] + kblocks * kTileElems;
    } else {
      B[0] = base[0] + stride(nb);
      B[1] = base[1] + stride(nb);
    }
  }
  TileJob job(int64_t nb) const {
    TileJob j;
    j.fmt = fmt, j.w = w, j.per_half = kblocks, j.total = 2 * kblocks;
    j.first[0] = first[0] + (nb - nb0) * kblocks, j.first[1] = first[1] + (nb - nb0) * kblocks;
    j.out = slots + ((nb - nb0) / step % 2) * 2 * kblocks * kTileElems;
    return j;
  }
};

// Rows per pass over an item's `rows` A rows of `row_bytes` each (see kPassRows): even passes, as
// many as kPassABytes asks for to the nearest (an expert a few rows over the budget at decode sizes
// stays one pass, its weights read once: two passes there measured -4%), at most kPassRows rows
// each; one pass where the item's quantized tiles are dequantized as it goes (`steps.streamed()`).
int64_t pass_rows(const Steps& steps, int64_t rows, int64_t row_bytes) {
  if (steps.streamed()) return rows;
  const int64_t budget = std::max<int64_t>(kRowBlock, kPassABytes / row_bytes);
  const int64_t passes = std::max<int64_t>({1, (rows + budget / 2) / budget, (rows + kPassRows - 1) / kPassRows});
  return (rows + passes - 1) / passes;
}

// One item's `rows` (<= kPassRows) rows of A against column blocks [nb0, nb1) in steps of `step`
// (`steps` gives each step's two B column blocks), 32 rows at a time, each row then post-processed
// by epi (see Pending).
template <typename Epi>
void pass(int64_t isa, const bf16* A, int64_t lda, int64_t kbs, int64_t rows, int64_t nb1, const Steps& steps,
          Epi epi) {
  alignas(64) float C[kPassRows * 2 * kTileN];
  Pending<Epi> pending{epi, C};
  const int64_t kblocks = steps.kblocks, step = steps.step;
  const bf16* B[2];
  const bf16* next[2];
  TileJob job;
  if (steps.streamed()) {
    job = steps.job(steps.nb0);
    job.run_all();
  }
  for (int64_t nb = steps.nb0; nb < nb1; nb += step) {
    steps.tiles(nb, B);
    const bool last = nb + step >= nb1;
    TileJob* background = nullptr;
    if (!last && steps.streamed()) {
      job = steps.job(nb + step);
      if (nb + 2 * step < nb1) job.ahead = step * kblocks;  // the item's next step's tiles after those
      background = &job;
    } else if (!last) {
      steps.tiles(nb + step, next);
    }
#ifdef MOEGEN_HAVE_AMX
    if (isa == kAmx) {
      const int64_t row_blocks = (rows + kRowBlock - 1) / kRowBlock;
      pending.job = background;
      pending.job_steps = row_blocks * kblocks;
      pending.job_credit = 0;
      for (int64_t kb0 = 0; kb0 < kblocks; kb0 += kAmxKChunk) {
        const int64_t kb1 = std::min(kblocks, kb0 + kAmxKChunk);
        Prefetch ahead;
        if (!last && !steps.streamed()) {
          ahead.p[0] = reinterpret_cast<const char*>(next[0] + kb0 * kTileElems);
          ahead.p[1] = reinterpret_cast<const char*>(next[1] + kb0 * kTileElems);
          ahead.end = (kb1 - kb0) * kTileElems * sizeof(bf16);
          ahead.per_step = (ahead.end / (row_blocks * (kb1 - kb0)) + 63) / 64 * 64;
        }
        Prefetch* pf = ahead.end ? &ahead : nullptr;
        for (int64_t r0 = 0; r0 < rows; r0 += kRowBlock) {
          const int64_t n = std::min<int64_t>(kRowBlock, rows - r0);
          if (n > 16)
            amx_block<2>(A + r0 * lda, lda, kbs, B, kb0, kb1, C + r0 * 2 * kTileN, kb0 == 0, pending, pf);
          else
            amx_block<1>(A + r0 * lda, lda, kbs, B, kb0, kb1, C + r0 * 2 * kTileN, kb0 == 0, pending, pf);
          if (kb1 == kblocks) pending.set(r0, n, nb);
        }
      }
      pending.job = nullptr;
      if (background != nullptr) background->run_all();
      continue;
    }
#endif
    // the next step's tiles come into L2 while this step's row blocks go by (without, the first
    // 8 rows of a step wait on memory; kernel A/B on an AMD EPYC (Zen 4): qwen3_moe's shape at 64
    // rows per expert +3.4%, 512 +1.9%, Mixtral's 1.00-1.01x)
    Prefetch ahead;
    if (!last && !steps.streamed()) {
      ahead.p[0] = reinterpret_cast<const char*>(next[0]);
      ahead.p[1] = reinterpret_cast<const char*>(next[1]);
      ahead.end = kblocks * kTileElems * sizeof(bf16);
      ahead.per_step = (ahead.end / (((rows + 7) / 8) * kblocks) + 63) / 64 * 64;
    }
    for (int64_t r0 = 0; r0 < rows; r0 += kRowBlock) {
      const int n = static_cast<int>(std::min<int64_t>(kRowBlock, rows - r0));
#ifdef MOEGEN_HAVE_AVX512_BF16
      if (isa == kAvx512Bf16)
        avx512_gemm(A + r0 * lda, lda, kbs, n, B, kblocks, C + r0 * 2 * kTileN, ahead.end ? &ahead : nullptr);
      else
#endif
        generic_gemm<2>(A + r0 * lda, lda, kbs, n, B, kblocks, C + r0 * 2 * kTileN);
      pending.set(r0, n, nb);
      pending.run_all();
    }
    if (background != nullptr) background->run_all();
  }
  pending.run_all();
}

// ---- epilogues --------------------------------------------------------------------------
// silu(gate) * up over one tile's 16 columns, with csrc/elementwise.cpp's silu_mul arithmetic
// (simd.h's exp; gate and up first rounded to bf16, as F.linear's outputs are).
inline void silu_mul_tile(const float* gate, const float* up, bf16* out) {
  using moegen_simd::Reg;
  using moegen_simd::Simd;
  for (int n = 0; n < kTileN; n += moegen_simd::W) {
    const Reg g = Simd::round_to<bf16>(Simd::load(gate + n)), u = Simd::round_to<bf16>(Simd::load(up + n));
    Simd::store(out + n, Simd::mul(Simd::round_to<bf16>(moegen_simd::silu(g)), u));
  }
}

// out[:cols] = round(round(c) * w): the down GEMM's output rounded (as F.linear's), then weighted.
inline void scale_row(const float* c, float w, bf16* out, int cols) {
  using moegen_simd::Reg;
  using moegen_simd::Simd;
  const Reg wv = Simd::set1(w);
  int n = 0;
  for (; n + moegen_simd::W <= cols; n += moegen_simd::W)
    Simd::store(out + n, Simd::mul(Simd::round_to<bf16>(Simd::load(c + n)), wv));
  if (n < cols)
    moegen_simd::store_partial(out + n, Simd::mul(Simd::round_to<bf16>(Simd::load(c + n)), wv), cols - n);
}

// scale_row for a whole cache line of output (32 columns at a 64-byte aligned `out`), written past
// the caches: at prefill sizes the down GEMM writes each step's 64 bytes of hundreds of rows, lines
// the core would otherwise first read from memory, of an output too large to stay cached until the
// combine. Measured (kernel A/B, AMX Xeon): 4,096 tokens +7% (qwen3_moe's shape) and +4%
// (Mixtral's); at decode sizes (512 tokens) -1 to -2%, hence kStreamOutBytes. Where the build has
// no AVX-512, an ordinary scale_row.
inline void scale_line(const float* c, float w, bf16* out) {
#if defined(__AVX512F__)
  alignas(64) bf16 line[2 * kTileN];
  scale_row(c, w, line, 2 * kTileN);
  _mm512_stream_si512(reinterpret_cast<__m512i*>(out), _mm512_load_si512(line));
#else
  scale_row(c, w, out, 2 * kTileN);
#endif
}

// ---- the layer -------------------------------------------------------------------------
struct Layer {
  int64_t hidden, inter;          // H, I
  int64_t hp, ip;                 // padded to multiples of 32
  int64_t xs_ld, out_ld;          // row strides of the gathered inputs and weighted outputs (kLdPad)
  // per expert: gate_up [2][ip/16][hp/32] tiles, down [hp/16][ip/32] tiles (one layer's tensors
  // cut by expert, or each expert's own: experts streamed from disk one by one)
  std::vector<Packed> gate_up, down;
  int64_t fmt;
  int64_t isa;
  bool stream_out = false;        // weighted outputs written past the caches (see scale_line)

  // zeroed rows after gathered x rows: only the AMX tiles' 16-row loads read past an item's last
  // row (the AVX-512 and portable paths multiply exactly the rows there are)
  int64_t x_pad_rows() const { return isa == kAmx ? kPadRows : 0; }
  int64_t gate_tile(int64_t half, int64_t nb) const { return (half * (ip / kTileN) + nb) * (hp / kTileK); }
  int64_t down_tile(int64_t nb) const { return nb * (ip / kTileK); }
  int64_t expert_tiles() const { return ip * hp / kTileElems; }    // per matrix
};


struct Item {
  int64_t expert, row0, rows, nb0, nb1;
};

// One item per expert with rows (all its rows, no columns yet), largest first: the stragglers at
// the end of a layer are then small.
std::vector<Item> busy_experts(const std::vector<int64_t>& counts) {
  std::vector<Item> experts;
  int64_t row = 0;
  for (size_t e = 0; e < counts.size(); ++e) {
    if (counts[e]) experts.push_back({static_cast<int64_t>(e), row, counts[e], 0, 0});
    row += counts[e];
  }
  std::stable_sort(experts.begin(), experts.end(), [](const Item& a, const Item& b) { return a.rows > b.rows; });
  return experts;
}

// Work items split by columns: each busy expert's output column blocks in groups, `step` column
// blocks (of 16) per micro-kernel call.
std::vector<Item> make_items(const std::vector<int64_t>& counts, int64_t nblocks, int64_t step, int threads) {
  const std::vector<Item> experts = busy_experts(counts);
  // groups small enough that every thread gets several items, large enough to reuse A rows
  const int64_t want_items = std::max<int64_t>(1, 4 * threads);
  int64_t group = std::max<int64_t>(step, nblocks * static_cast<int64_t>(experts.size()) / want_items);
  group = std::min<int64_t>(std::max<int64_t>(step, (group / step) * step), 8 * step);
  std::vector<Item> items;
  for (const Item& x : experts)
    for (int64_t nb = 0; nb < nblocks; nb += group)
      items.push_back({x.expert, x.row0, x.rows, nb, std::min(nblocks, nb + group)});
  return items;
}

// Float32 subnormal inputs read as themselves on this thread while alive (fp8 tiles decode through
// them, see dequant_tile), whatever torch.set_flush_denormal chose; the caller's mode is restored.
struct KeepDenormals {
#if defined(__x86_64__)
  const unsigned saved = _mm_getcsr();
  KeepDenormals() {
    if (saved & 0x40u) _mm_setcsr(saved & ~0x40u);  // DAZ off
  }
  ~KeepDenormals() {
    if (saved & 0x40u) _mm_setcsr(saved);
  }
#endif
};

template <typename F>
void run_items(const std::vector<Item>& items, int64_t isa, F body) {
  std::atomic<int64_t> next{0};
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), static_cast<int64_t>(items.size()));
  at::parallel_for(0, std::max<int64_t>(threads, 1), 1, [&](int64_t, int64_t) {
    const KeepDenormals keep;
#ifdef MOEGEN_HAVE_AMX
    const moegen_amx::ThreadTiles tiles(isa == kAmx);
#endif
    for (int64_t i; (i = next.fetch_add(1)) < static_cast<int64_t>(items.size());) body(items[i]);
  });
}

// A thread's dequantized tiles of the item at hand (quantized formats).
thread_local at::Tensor tl_dequant;
bf16* workspace(at::Tensor& buffer, int64_t elements);

// How an item's passes find their tiles (see Steps): bf16 weights directly; quantized ones, for
// an item of at most kStreamedDequantRows rows (decode, one pass), streamed through two slots; for
// a longer item (prefill), all its tiles dequantized once up front and shared by its passes.
Steps item_steps(const Layer& L, const Packed& w, const Item& it, int64_t step, int64_t kblocks, int64_t first0,
                 int64_t first1) {
  Steps s;
  s.nb0 = it.nb0, s.step = step, s.kblocks = kblocks, s.fmt = L.fmt, s.w = &w;
  s.first[0] = first0, s.first[1] = first1;
  if (L.fmt == kBf16) {
    s.base[0] = reinterpret_cast<const bf16*>(w.codes) + first0 * kTileElems;
    s.base[1] = reinterpret_cast<const bf16*>(w.codes) + first1 * kTileElems;
  } else if (it.rows <= kStreamedDequantRows) {
    s.slots = workspace(tl_dequant, 2 * 2 * kblocks * kTileElems);
  } else {
    const int64_t tiles = (it.nb1 - it.nb0) * kblocks;  // from first0 (down: both halves of every step)
    const bool halves_apart = step == 1;                // gate_up: the gate's tiles and the up's lie apart
    bf16* buffer = workspace(tl_dequant, (halves_apart ? 2 : 1) * tiles * kTileElems);
    s.base[0] = tiles_bf16(L.fmt, w, first0, tiles, buffer);
    s.base[1] = halves_apart ? tiles_bf16(L.fmt, w, first1, tiles, buffer + tiles * kTileElems)
                             : s.base[0] + (first1 - first0) * kTileElems;
  }
  return s;
}

// The intermediate h (rows x I, bf16) in slabs of 32 columns: element (r, c) at
// p[(c / 32) * slab + r * 32 + c % 32]. gate_up's epilogue then writes each step's rows to one
// contiguous run of lines (each finished by the next step while still cached: row-major h, 16
// columns of a 7 KiB row at a time, cost ~25% of gate_up at prefill sizes in cache misses), and
// each of down's A tiles is one contiguous KiB.
struct Slabs {
  bf16* p;
  int64_t slab;    // elements from one slab to the next: (rows allocated) x 32
  bf16* at(int64_t r, int64_t col) const { return p + col / kTileK * slab + r * kTileK + col % kTileK; }
  Slabs from(int64_t r) const { return {p + r * kTileK, slab}; }
};

// Slabs for `rows` rows (+ kPadRows zeroed: rows past an item's last are multiplied too, never
// stored; zeros keep them finite) of I = ip columns in `buffer`.
Slabs slabs(at::Tensor& buffer, int64_t rows, int64_t ip) {
  const int64_t alloc = rows + kPadRows;
  Slabs h{workspace(buffer, alloc * ip), alloc * kTileK};
  for (int64_t c = 0; c < ip; c += kTileK)
    std::memset(static_cast<void*>(h.at(rows, c)), 0, kPadRows * kTileK * sizeof(bf16));
  return h;
}

// h[r, :] = round(round(silu(round(x W_gate))) * round(x W_up)) for the item's rows/columns; h: from
// the item's first row (row it.row0 of xs).
void gate_up_item(const Layer& L, const Item& it, const bf16* xs, Slabs h) {
  const int64_t kblocks = L.hp / kTileK;
  const Steps steps = item_steps(L, L.gate_up[it.expert], it, 1, kblocks, L.gate_tile(0, it.nb0),
                                 L.gate_tile(1, it.nb0));
  const int64_t chunk = pass_rows(steps, it.rows, L.xs_ld * static_cast<int64_t>(sizeof(bf16)));
  for (int64_t r0 = 0; r0 < it.rows; r0 += chunk) {
    const int64_t row0 = it.row0 + r0;
    auto epi = [&](const float* c, int64_t r, int64_t nb) {
      silu_mul_tile(c, c + kTileN, h.at(r0 + r, nb * kTileN));
    };
    pass(L.isa, xs + row0 * L.xs_ld, L.xs_ld, kTileK, std::min(chunk, it.rows - r0), it.nb1, steps, epi);
  }
}

// out[r, :H] = round(round(h W_down) * weight[r]) for the item's rows/columns; h as in gate_up_item.
void down_item(const Layer& L, const Item& it, Slabs h, const float* weights, bf16* out) {
  const int64_t kblocks = L.ip / kTileK, first = L.down_tile(it.nb0);
  const Steps steps = item_steps(L, L.down[it.expert], it, 2, kblocks, first, first + kblocks);
  const int64_t chunk = pass_rows(steps, it.rows, L.ip * static_cast<int64_t>(sizeof(bf16)));
  for (int64_t r0 = 0; r0 < it.rows; r0 += chunk) {
    const int64_t row0 = it.row0 + r0;
    auto epi = [&](const float* c, int64_t r, int64_t nb) {
      const int64_t col0 = nb * kTileN, cols = std::min<int64_t>(2 * kTileN, L.hidden - col0);
      bf16* dst = out + (row0 + r) * L.out_ld + col0;
      if (L.stream_out && cols == 2 * kTileN && reinterpret_cast<uintptr_t>(dst) % 64 == 0)
        scale_line(c, weights[row0 + r], dst);
      else
        scale_row(c, weights[row0 + r], dst, static_cast<int>(cols));
    };
    pass(L.isa, h.from(r0).p, kTileK, h.slab, std::min(chunk, it.rows - r0), it.nb1, steps, epi);
  }
#if defined(__AVX512F__)
  _mm_sfence();  // scale_line's stores visible before the combine reads them
#endif
}

// h and the gathered x rows kept by each thread for its expert items (see expert_items), grown,
// never shrunk.
thread_local at::Tensor tl_h_own, tl_xs_own;

// The routed rows of x: row r is token tok[r]'s.
struct Rows {
  const bf16* x;
  const int64_t* tok;
  Rows from(int64_t r) const { return {x, tok + r}; }
};

// Rows [lo, hi) of the gathered A operand: the first `rows` are x's rows listed by xs, padded to
// xs_ld columns with zeros; rows past them are zeros (Layer::x_pad_rows). A whole-expert item gathers
// its own rows just before its gate_up, so they are still in its core's L2 when read (rather than
// the whole layer's rows gathered in one pass beforehand, long evicted by then).
void gather_rows(const Layer& L, const Rows& xs, int64_t rows, int64_t lo, int64_t hi, bf16* dst) {
  for (int64_t r = lo; r < hi; ++r) {
    bf16* d = dst + r * L.xs_ld;
    int64_t n = 0;
    if (r < rows) {
      std::memcpy(d, xs.x + xs.tok[r] * L.hidden, L.hidden * sizeof(bf16));
      n = L.hidden;
    }
    std::memset(static_cast<void*>(d + n), 0, (L.xs_ld - n) * sizeof(bf16));
  }
}

// One expert's rows [row0, row0 + rows): gate_up over every column into this thread's own h, then
// down over every output column.
void expert_item(const Layer& L, const Item& it, const Rows& xs, const float* weights, bf16* out) {
  const Slabs h = slabs(tl_h_own, it.rows, L.ip);
  bf16* own = workspace(tl_xs_own, (it.rows + L.x_pad_rows()) * L.xs_ld);
  gather_rows(L, xs.from(it.row0), it.rows, 0, it.rows + L.x_pad_rows(), own);
  gate_up_item(L, {it.expert, 0, it.rows, 0, L.ip / kTileN}, own, h);
  down_item(L, {it.expert, it.row0, it.rows, 0, L.hp / kTileN}, h, weights, out);
}

// Items of whole experts' rows, or of even chunks of them (see kOwnHBytes), largest first.
std::vector<Item> expert_items(const std::vector<int64_t>& counts, const Layer& L) {
  const int64_t row_bytes = L.ip * static_cast<int64_t>(sizeof(bf16));
  const int64_t whole = kOwnHBytes / row_bytes, cap = std::max<int64_t>(kRowBlock, kOwnHSplitBytes / row_bytes);
  std::vector<Item> items;
  for (const Item& x : busy_experts(counts)) {
    const int64_t chunks = x.rows <= whole ? 1 : (x.rows + cap - 1) / cap;
    for (int64_t c = 0, r = 0; c < chunks; ++c) {
      const int64_t n = (x.rows - r) / (chunks - c);  // even split of what is left
      items.push_back({x.expert, x.row0 + r, n, 0, 0});
      r += n;
    }
  }
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.rows > b.rows; });
  return items;
}

// out[t] = the k weighted rows of token t summed in ascending expert order, rounding after each add
// (moe.py's Dispatch.combine, which is the reference's index_add_ per expert into zeros).
void combine(const bf16* weighted, int64_t ld, const int64_t* tok, int64_t tokens, int64_t k, int64_t hidden, bf16* out) {
  using moegen_simd::Reg;
  using moegen_simd::Simd;
  constexpr int W = moegen_simd::W;
  // rows come in expert order, so each token's rows are listed by ascending expert
  std::vector<int64_t> slots(tokens * k), filled(tokens, 0);
  for (int64_t r = 0; r < tokens * k; ++r) {
    const int64_t t = tok[r];
    TORCH_CHECK_VALUE(filled[t] < k, "moe_experts: token ", t, " is routed to more than ", k, " experts");
    slots[t * k + filled[t]++] = r;
  }
  at::parallel_for(0, tokens, std::max<int64_t>(1, 4096 / std::max<int64_t>(hidden, 1)), [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t* s = slots.data() + t * k;
      for (int64_t n = 0; n < hidden; n += W) {
        const int lanes = static_cast<int>(std::min<int64_t>(W, hidden - n));
        auto load = [&](int64_t row) {
          const bf16* p = weighted + row * ld + n;
          return lanes == W ? Simd::load(p) : moegen_simd::load_partial(p, lanes);
        };
        Reg acc = load(s[0]);
        for (int64_t j = 1; j < k; ++j) acc = Simd::round_to<bf16>(Simd::add(acc, load(s[j])));
        if (lanes == W)
          Simd::store(out + t * hidden + n, acc);
        else
          moegen_simd::store_partial(out + t * hidden + n, acc, lanes);
      }
    }
  });
}

// Asks Linux to back a buffer's whole 2 MiB pages with huge pages (transparent huge pages in
// "madvise" mode, the common default), before it is first written: the weights stream through the
// TLB at tens of MB per layer, and 4 KiB pages cost a page walk every 4 KiB (measured: 64 experts
// of [1024, 448] at 64 rows each, 14.8 -> 11.6 ms a layer). A no-op where unsupported.
void advise_huge_pages(void* data, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + static_cast<uintptr_t>(bytes)) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
}

at::Tensor empty_huge(at::IntArrayRef shape, at::ScalarType dtype) {
  at::Tensor t = at::empty(shape, at::TensorOptions().dtype(dtype));
  advise_huge_pages(t.data_ptr(), t.nbytes());
  return t;
}

// Activation buffers kept from call to call (grown, never shrunk): a fresh buffer of tens of MB
// is mapped anew by malloc each time and costs a page fault per 4 KiB on first touch.
thread_local at::Tensor tl_xs, tl_h, tl_weighted;

bf16* workspace(at::Tensor& buffer, int64_t elements) {
  if (!buffer.defined() || buffer.numel() < elements) buffer = empty_huge({elements}, at::kBFloat16);
  return buffer.data_ptr<bf16>();
}

void check(const at::Tensor& t, const char* name, at::ScalarType dtype) { check_tensor(t, name, dtype, "moe_experts"); }

// One packed weight's tensors checked against the layer: [tiles] (bf16), or [codes, scales] (fp8) /
// [codes, scales, zeros] (int8, int4), `tiles` tiles each.
Packed packed(const std::vector<at::Tensor>& parts, int64_t fmt, int64_t tiles, const char* name) {
  const size_t want = fmt == kBf16 ? 1 : fmt == kFp8 ? 2 : 3;
  TORCH_CHECK_VALUE(parts.size() == want, "moe_experts: ", name, " needs ", want, " tensors for format ", fmt,
                    ", got ", parts.size());
  check(parts[0], name, fmt == kBf16 ? at::kBFloat16 : fmt == kFp8 ? at::kFloat8_e4m3fn : at::kByte);
  TORCH_CHECK_VALUE(parts[0].nbytes() == static_cast<size_t>(tiles * code_bytes_per_tile(fmt)), "moe_experts: ",
                    name, " has ", parts[0].nbytes(), " bytes, not ", tiles, " tiles of the layer's shape");
  Packed p;
  p.codes = static_cast<const uint8_t*>(parts[0].data_ptr());
  for (size_t i = 1; i < parts.size(); ++i) {
    check(parts[i], name, at::kFloat);
    TORCH_CHECK_VALUE(parts[i].numel() == tiles * kTileN, "moe_experts: ", name, " scales/zeros need ", kTileN,
                      " per tile");
  }
  if (parts.size() > 1) p.scales = parts[1].data_ptr<float>();
  if (parts.size() > 2) p.zeros = parts[2].data_ptr<float>();
  return p;
}

// Expert e's part of a layer packed whole (`tiles` per matrix and expert).
Packed expert_part(const Packed& layer, int64_t fmt, int64_t e, int64_t tiles) {
  Packed p;
  p.codes = layer.codes + e * tiles * code_bytes_per_tile(fmt);
  if (layer.scales != nullptr) p.scales = layer.scales + e * tiles * kTileN;
  if (layer.zeros != nullptr) p.zeros = layer.zeros + e * tiles * kTileN;
  return p;
}

Layer make_layer(const at::Tensor& x, int64_t inter, int64_t isa, int64_t fmt) {
  check(x, "x", at::kBFloat16);
  TORCH_CHECK_VALUE(fmt >= kBf16 && fmt <= kInt4, "moe_experts: unknown weight format ", fmt);
  TORCH_CHECK_VALUE(x.dim() == 2, "moe_experts: x must be [tokens, hidden]");
  TORCH_CHECK_VALUE(isa_available(isa), "moe_experts: ISA ", isa_name(isa), " is not available on this CPU/build");
  Layer L;
  L.hidden = x.size(1);
  L.inter = inter;
  L.hp = (L.hidden + 31) / 32 * 32;
  L.ip = (inter + 31) / 32 * 32;
  L.xs_ld = L.hp + kLdPad;
  L.out_ld = L.hp + kLdPad;  // rows 64-byte aligned (scale_line)
  L.isa = isa;
  L.fmt = fmt;
  return L;
}


// Every busy expert's rows of x (token_idx: the token of each expert-ordered row), SwiGLU, times
// the row's router weight: into the returned rows (stride L.out_ld, a thread-kept workspace).
bf16* expert_rows(Layer& L, const at::Tensor& x, const at::Tensor& token_idx, const at::Tensor& weights,
                  const std::vector<int64_t>& counts, int64_t rows) {
  const int64_t* tok = token_idx.data_ptr<int64_t>();
  const Rows xs{x.data_ptr<bf16>(), tok};
  const int threads = at::get_num_threads();
  const float* wp = weights.data_ptr<float>();
  bf16* op = workspace(tl_weighted, rows * L.out_ld);
  L.stream_out = rows * L.out_ld * static_cast<int64_t>(sizeof(bf16)) > kStreamOutBytes;
  // Whole experts per thread where there are enough of them to go round: each item's h stays close
  // (in its core's L2 at decode sizes; a pass of it at a time at prefill sizes, see kOwnHBytes),
  // written, then read by down, instead of going through memory -- measured 8% (8
  // experts x 128 rows) to 15% (64 x 64) faster at decode sizes. With fewer experts than threads
  // need, the layer is split by columns in two phases (every thread on every expert) over a shared h.
  //
  // Quantized weights are dequantized once per item: an expert split into several row items
  // (prefill sizes) would be dequantized once per item, so there the split by columns (each
  // column block's tiles dequantized once for all the expert's rows) wins -- measured +30% (fp8 and
  // int8, Mixtral's shape, 1024 rows per expert); experts kept whole stay whole (qwen3_moe's shape,
  // 512 rows per expert: the columns path -5%).
  const std::vector<Item> whole = expert_items(counts, L);
  const bool dequant_per_split = L.fmt != kBf16 && whole.size() > busy_experts(counts).size();
  if (!dequant_per_split && static_cast<int64_t>(whole.size()) >= 2 * threads) {
    run_items(whole, L.isa, [&](const Item& it) { expert_item(L, it, xs, wp, op); });
  } else {
    const int64_t gathered = rows + L.x_pad_rows();
    bf16* xsp = workspace(tl_xs, gathered * L.xs_ld);
    at::parallel_for(0, gathered, 64, [&](int64_t lo, int64_t hi) { gather_rows(L, xs, rows, lo, hi, xsp); });
    const Slabs h = slabs(tl_h, rows, L.ip);
    run_items(make_items(counts, L.ip / kTileN, 1, threads), L.isa,
              [&](const Item& it) { gate_up_item(L, it, xsp, h.from(it.row0)); });
    run_items(make_items(counts, L.hp / kTileN, 2, threads), L.isa,
              [&](const Item& it) { down_item(L, it, h.from(it.row0), wp, op); });
  }
  return op;
}

// x [T, H] bf16; token_idx [R] int64 (the token of each expert-ordered row); weights [R] fp32;
// counts: rows per expert (sum R); gate_up / down: the layer's packed tiles in format `fmt` (see
// Packed), every expert's. Returns [T, H] bf16: per token, its k experts' outputs times their
// router weights, summed.
at::Tensor moe_experts(const at::Tensor& x, const at::Tensor& token_idx, const at::Tensor& weights,
                       std::vector<int64_t> counts, std::vector<at::Tensor> gate_up, std::vector<at::Tensor> down,
                       int64_t inter, int64_t top_k, int64_t isa, int64_t fmt) {
  Layer L = make_layer(x, inter, isa, fmt);
  const int64_t experts = static_cast<int64_t>(counts.size()), tiles = L.expert_tiles();
  const Packed gu = packed(gate_up, fmt, 2 * experts * tiles, "gate_up"), dn = packed(down, fmt, experts * tiles, "down");
  for (int64_t e = 0; e < experts; ++e) {
    L.gate_up.push_back(expert_part(gu, fmt, e, 2 * tiles));
    L.down.push_back(expert_part(dn, fmt, e, tiles));
  }
  const int64_t rows = checked_routing(x, token_idx, weights, counts, "moe_experts"), tokens = x.size(0);
  TORCH_CHECK_VALUE(top_k >= 1 && rows == tokens * top_k, "moe_experts: ", rows, " routed rows for ", tokens,
                    " tokens and top_k ", top_k);
  at::Tensor combined = at::empty({tokens, L.hidden}, x.options());
  if (rows == 0) return combined;
  const bf16* op = expert_rows(L, x, token_idx, weights, counts, rows);
  combine(op, L.out_ld, token_idx.data_ptr<int64_t>(), tokens, top_k, L.hidden, combined.data_ptr<bf16>());
  return combined;
}

// The rows of some experts, each expert's bf16 tiles its own tensors (experts streamed one by one):
// gate_up[e] [2][ip/16][hp/32][512], down[e] [hp/16][ip/32][512], given for every expert with rows
// (counts[e] > 0), those rows contiguous in token_idx / weights in expert order. Writes each row's
// weighted expert output into out [R, H] (bf16), rounded as moe_experts rounds them before its
// combine: summing `out` per token in ascending expert order gives moe_experts' result.
void moe_expert_rows(const at::Tensor& x, const at::Tensor& token_idx, const at::Tensor& weights,
                     std::vector<int64_t> counts, c10::List<std::optional<at::Tensor>> gate_up,
                     c10::List<std::optional<at::Tensor>> down, int64_t inter, int64_t isa, at::Tensor out) {
  Layer L = make_layer(x, inter, isa, kBf16);
  const int64_t experts = static_cast<int64_t>(counts.size()), tiles = L.expert_tiles();
  TORCH_CHECK_VALUE(static_cast<int64_t>(gate_up.size()) == experts && static_cast<int64_t>(down.size()) == experts,
                    "moe_expert_rows: one gate_up and one down per expert");
  L.gate_up.resize(experts);
  L.down.resize(experts);
  for (int64_t e = 0; e < experts; ++e) {
    if (counts[e] == 0) continue;
    const std::optional<at::Tensor> gu = gate_up.get(e), dn = down.get(e);
    TORCH_CHECK_VALUE(gu.has_value() && dn.has_value(), "moe_expert_rows: expert ", e, " has rows but no weights");
    L.gate_up[e] = packed({*gu}, kBf16, 2 * tiles, "gate_up");
    L.down[e] = packed({*dn}, kBf16, tiles, "down");
  }
  const int64_t rows = checked_routing(x, token_idx, weights, counts, "moe_expert_rows");
  check(out, "out", at::kBFloat16);
  TORCH_CHECK_VALUE(out.dim() == 2 && out.size(0) == rows && out.size(1) == L.hidden,
                    "moe_expert_rows: out must be [", rows, ", ", L.hidden, "]");
  if (rows == 0) return;
  const bf16* op = expert_rows(L, x, token_idx, weights, counts, rows);
  bf16* dst = out.data_ptr<bf16>();
  at::parallel_for(0, rows, 256, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) std::memcpy(dst + r * L.hidden, op + r * L.out_ld, L.hidden * sizeof(bf16));
  });
}

// A bf16 weight [N, K] (rows `ld` elements apart) in the kernel's tiles (see the layout at the top):
// into `out`, [ceil(N/32)*2][ceil(K/32)][512] bf16, padding zeroed. Single-threaded: the disk
// tier's reader packs each streamed expert beside the compute.
void pack_tiles_into(const at::Tensor& w, at::Tensor out) {
  TORCH_CHECK_VALUE(w.dim() == 2 && w.scalar_type() == at::kBFloat16 && w.stride(1) == 1,
                    "pack_tiles_into: w must be a bf16 [N, K] with contiguous rows");
  check(out, "out", at::kBFloat16);
  const int64_t n = w.size(0), k = w.size(1), ld = w.stride(0);
  const int64_t np = (n + 31) / 32 * 32, kp = (k + 31) / 32 * 32;
  TORCH_CHECK_VALUE(out.numel() == np * kp, "pack_tiles_into: out needs ", np * kp, " elements");
  const bf16* src = w.data_ptr<bf16>();
  bf16* dst = out.data_ptr<bf16>();
  const bf16 zero(0.0f);
  for (int64_t nb = 0; nb < np / kTileN; ++nb) {
    for (int64_t kb = 0; kb < kp / kTileK; ++kb, dst += kTileElems) {
      const int64_t n0 = nb * kTileN, k0 = kb * kTileK;
      if (n0 + kTileN <= n && k0 + kTileK <= k) {  // whole tile: 4-byte pairs transposed
        uint32_t* d = reinterpret_cast<uint32_t*>(dst);
        for (int64_t c = 0; c < kTileN; ++c) {
          const bf16* row = src + (n0 + c) * ld + k0;
          for (int64_t p = 0; p < kTileK / 2; ++p) {
            uint32_t pair;
            std::memcpy(&pair, row + 2 * p, sizeof(pair));
            d[p * kTileN + c] = pair;
          }
        }
        continue;
      }
      for (int64_t p = 0; p < kTileK / 2; ++p)
        for (int64_t c = 0; c < kTileN; ++c)
          for (int64_t j = 0; j < 2; ++j) {
            const int64_t row = n0 + c, col = k0 + 2 * p + j;
            dst[p * 2 * kTileN + 2 * c + j] = row < n && col < k ? src[row * ld + col] : zero;
          }
    }
  }
}

// A packed weight's tiles as bf16 (the kernel's own dequantization, for tests): [tiles, 512].
at::Tensor dequant_tiles(std::vector<at::Tensor> parts, int64_t fmt) {
  TORCH_CHECK_VALUE(fmt > kBf16 && fmt <= kInt4, "dequant_tiles: not a quantized format: ", fmt);
  const int64_t tiles = static_cast<int64_t>(parts.at(0).nbytes()) / code_bytes_per_tile(fmt);
  const Packed p = packed(parts, fmt, tiles, "weight");
  at::Tensor out = at::empty({tiles, kTileElems}, at::TensorOptions().dtype(at::kBFloat16));
  const KeepDenormals keep;
  tiles_bf16(fmt, p, 0, tiles, out.data_ptr<bf16>());
  return out;
}

// An uninitialised tensor for packed weights, backed by huge pages where the OS allows.
at::Tensor empty_packed(std::vector<int64_t> shape, at::ScalarType dtype) { return empty_huge(shape, dtype); }

std::vector<std::string> experts_isas() {
  std::vector<std::string> names;
  for (int64_t isa : {kAmx, kAvx512Bf16, kGeneric})
    if (isa_available(isa)) names.push_back(isa_name(isa));
  return names;
}

}  // namespace

void check_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype, const char* op) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name, " must be on the CPU");
  TORCH_CHECK_VALUE(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

int64_t checked_routing(const at::Tensor& x, const at::Tensor& token_idx, const at::Tensor& weights,
                        const std::vector<int64_t>& counts, const char* op) {
  check_tensor(token_idx, "token_idx", at::kLong, op);
  check_tensor(weights, "weights", at::kFloat, op);
  int64_t rows = 0;
  for (int64_t c : counts) {
    TORCH_CHECK_VALUE(c >= 0, op, ": negative expert count");
    rows += c;
  }
  TORCH_CHECK_VALUE(token_idx.numel() == rows && weights.numel() == rows, op,
                    ": token_idx and weights need one entry per routed row (", rows, ")");
  const int64_t* tok = token_idx.data_ptr<int64_t>();
  const int64_t tokens = x.size(0);
  for (int64_t r = 0; r < rows; ++r)
    TORCH_CHECK_INDEX(tok[r] >= 0 && tok[r] < tokens, op, ": token index ", tok[r], " out of range");
  return rows;
}

void combine_rows(const c10::BFloat16* weighted, int64_t ld, const int64_t* tok, int64_t tokens, int64_t k,
                  int64_t hidden, c10::BFloat16* out) {
  combine(weighted, ld, tok, tokens, k, hidden, out);
}

}  // namespace moegen_experts

#define MOEGEN_EXPERTS_FRAGMENT(ns, m) TORCH_LIBRARY_FRAGMENT(ns, m)

MOEGEN_EXPERTS_FRAGMENT(MOEGEN_OPS_NS, m) {
  m.def("moe_experts(Tensor x, Tensor token_idx, Tensor weights, int[] counts, Tensor[] gate_up, Tensor[] down, "
        "int inter, int top_k, int isa, int fmt) -> Tensor",
        &moegen_experts::moe_experts);
  m.def("moe_expert_rows(Tensor x, Tensor token_idx, Tensor weights, int[] counts, Tensor?[] gate_up, "
        "Tensor?[] down, int inter, int isa, Tensor(a!) out) -> ()",
        &moegen_experts::moe_expert_rows);
  m.def("pack_tiles_into(Tensor w, Tensor(a!) out) -> ()", &moegen_experts::pack_tiles_into);
  m.def("experts_isas() -> str[]", &moegen_experts::experts_isas);
#ifdef MOEGEN_AMX_EMULATE
  m.def("amx_emulated_tile_products() -> int", [] { return moegen_amx_emulated::products().load(); });
#endif
  m.def("dequant_tiles(Tensor[] parts, int fmt) -> Tensor", &moegen_experts::dequant_tiles);
  m.def("empty_packed(int[] shape, ScalarType dtype) -> Tensor", &moegen_experts::empty_packed);
}

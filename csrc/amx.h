// Intel AMX plumbing shared by the kernels that use its tiles (experts.cpp, experts_int8.cpp,
// prefill_attention.cpp): whether this build and CPU can run them, the one tile layout they use,
// and the tile instructions as MOEGEN_TILE_* macros -- the hardware's, or (-DMOEGEN_AMX_EMULATE)
// a software statement of them, so that the tile code is tested on CPUs without AMX.
#pragma once

#include <cstdint>

#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#ifdef MOEGEN_AMX_EMULATE
#include <c10/util/Exception.h>
#include <atomic>
#include <cstring>
#define MOEGEN_HAVE_AMX 1
#define MOEGEN_HAVE_AMX_INT8 1
#else
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define MOEGEN_HAVE_AMX 1
#endif
#if defined(__AMX_TILE__) && defined(__AMX_INT8__)
#define MOEGEN_HAVE_AMX_INT8 1
#endif
#endif
#if defined(MOEGEN_HAVE_AMX) || defined(MOEGEN_HAVE_AMX_INT8)
#define MOEGEN_HAVE_TILES 1
#endif

#ifdef MOEGEN_AMX_EMULATE
// Tile products the emulated tiles ran, all threads and kernels of this library (outside the
// internal-linkage namespace below so that the kernels share one count; one emulated build is
// loaded per process): tests check that the tile path did the work.
namespace moegen_amx_emulated {
inline std::atomic<int64_t>& products() {
  static std::atomic<int64_t> n{0};
  return n;
}
}  // namespace moegen_amx_emulated
#endif

// Internal linkage: the function-local statics below would otherwise be process-wide (GCC makes
// them unique symbols), so a test loading an emulated build beside the real one would see its
// answers.
namespace moegen_amx {
namespace {

#ifdef MOEGEN_AMX_EMULATE
namespace emulated {
// Linux grants the tile state only on request: a kernel that loaded a tile configuration without
// first asking usable() / int8_usable() would die of SIGILL on a real CPU, so it is an error here.
inline bool& granted() {
  static bool asked = false;
  return asked;
}
}  // namespace emulated
#endif

#ifdef MOEGEN_HAVE_TILES
// AMX-TILE and the CPUID leaf 7 EDX bit `unit` (22: AMX-BF16, 25: AMX-INT8) on this CPU, and the
// tile state granted to this process.
inline bool unit_usable(int unit) {
#ifdef MOEGEN_AMX_EMULATE
  (void)unit;
  emulated::granted() = true;
  return true;
#else
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  if (!((d >> 24) & 1) || !((d >> unit) & 1)) return false;
  // Linux hands out the tile state only on request (once per process; asking again is harmless).
  static const bool granted = [] {
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return granted;
#endif
}
#endif

// AMX-TILE and AMX-BF16 usable here (the bf16 kernels).
inline bool usable() {
#ifdef MOEGEN_HAVE_AMX
  static const bool ok = unit_usable(22);
  return ok;
#else
  return false;
#endif
}

// AMX-TILE and AMX-INT8 usable here (experts_int8.cpp).
inline bool int8_usable() {
#ifdef MOEGEN_HAVE_AMX_INT8
  static const bool ok = unit_usable(25);
  return ok;
#else
  return false;
#endif
}

#ifdef MOEGEN_HAVE_TILES
struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

#ifdef MOEGEN_AMX_EMULATE
// The tile instructions in software, as the ISA reference states them: eight tiles of up to 16
// rows of 64 bytes per thread, shaped by the loaded configuration; a product whose shapes the
// configuration does not allow or whose three tiles are not distinct, or a tile used unconfigured,
// is an error (the CPU's #UD). Not stated: TDPBF16PS's fixed rounding (nearest even, denormals
// flushed, whatever MXCSR says: here C++ float arithmetic under the caller's MXCSR -- the same but
// for subnormal values), and LDTILECFG's checks of the reserved bytes and of tiles 8-15.
namespace emulated {
struct State {
  bool configured = false;
  uint8_t rows[8] = {};
  uint16_t colsb[8] = {};
  alignas(64) uint8_t data[8][16][64] = {};
};
inline State& state() {
  static thread_local State s;
  return s;
}
inline State& shaped(int t) {
  State& s = state();
  TORCH_CHECK(s.configured, "emulated AMX: tile instruction before the tile configuration was loaded");
  TORCH_CHECK(t >= 0 && t < 8 && s.rows[t] > 0 && s.colsb[t] > 0, "emulated AMX: tile ", t, " is not configured");
  return s;
}
inline void load_config(const TileConfig* cfg) {
  State& s = state();
  TORCH_CHECK(granted(), "emulated AMX: tile configuration loaded before the tile state was requested");
  TORCH_CHECK(cfg->palette_id == 1 && cfg->start_row == 0, "emulated AMX: palette 1 only");
  for (int t = 0; t < 8; ++t) {
    TORCH_CHECK(cfg->rows[t] <= 16 && cfg->colsb[t] <= 64 && cfg->colsb[t] % 4 == 0, "emulated AMX: tile ", t,
                " shaped beyond 16 rows of 64 bytes");
    s.rows[t] = cfg->rows[t], s.colsb[t] = cfg->colsb[t];
  }
  std::memset(s.data, 0, sizeof(s.data));
  s.configured = true;
}
inline void release() { state() = State(); }
inline void zero(int t) { std::memset(shaped(t).data[t], 0, sizeof(State::data[0])); }
inline void load(int t, const void* base, int64_t stride) {
  State& s = shaped(t);
  for (int r = 0; r < s.rows[t]; ++r) std::memcpy(s.data[t][r], static_cast<const char*>(base) + r * stride, s.colsb[t]);
}
inline void store(int t, void* base, int64_t stride) {
  State& s = shaped(t);
  for (int r = 0; r < s.rows[t]; ++r) std::memcpy(static_cast<char*>(base) + r * stride, s.data[t][r], s.colsb[t]);
}
// The shapes TDPBF16PS / TDPBUSD accept: C is M x N dwords, A M rows of K dwords, B K rows of N.
inline State& product_shaped(int c, int a, int b) {
  shaped(c), shaped(a);
  State& s = shaped(b);
  TORCH_CHECK(c != a && a != b && c != b, "emulated AMX: a product's tiles must be distinct (", c, ", ", a, ", ", b, ")");
  moegen_amx_emulated::products().fetch_add(1, std::memory_order_relaxed);
  TORCH_CHECK(s.rows[c] == s.rows[a] && s.colsb[c] == s.colsb[b] && s.colsb[a] == 4 * s.rows[b],
              "emulated AMX: tiles ", c, " += ", a, " x ", b, " do not have a product's shapes");
  return s;
}
inline float bf16_value(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &wide, 4);
  return f;
}
// c[m][n] (an Acc in each dword) = step(c[m][n], a[m]'s dword k, b[k]'s dword n) over k in order.
template <typename Acc, typename Step>
void product(int c, int a, int b, Step step) {
  State& s = product_shaped(c, a, b);
  for (int m = 0; m < s.rows[c]; ++m)
    for (int n = 0; n < s.colsb[c] / 4; ++n) {
      Acc acc;
      std::memcpy(&acc, &s.data[c][m][4 * n], 4);
      for (int k = 0; k < s.rows[b]; ++k) acc = step(acc, &s.data[a][m][4 * k], &s.data[b][k][4 * n]);
      std::memcpy(&s.data[c][m][4 * n], &acc, 4);
    }
}
// TDPBF16PS: the two bf16 pairs' products added to the float32 accumulator one after the other.
inline void dpbf16ps(int c, int a, int b) {
  product<float>(c, a, b, [](float acc, const uint8_t* x, const uint8_t* y) {
    acc += bf16_value(x) * bf16_value(y);
    return acc + bf16_value(x + 2) * bf16_value(y + 2);
  });
}
// TDPBUSD: four unsigned (a) by signed (b) byte products, in int32.
inline void dpbusd(int c, int a, int b) {
  product<int32_t>(c, a, b, [](int32_t acc, const uint8_t* x, const uint8_t* y) {
    for (int i = 0; i < 4; ++i) acc += static_cast<int32_t>(x[i]) * static_cast<int8_t>(y[i]);
    return acc;
  });
}
}  // namespace emulated

// Tile numbers must be single literal digits 0-7, as the intrinsics below need them.
#define MOEGEN_TILE_NUMBER(t) \
  [] { static_assert(sizeof(#t) == 2 && #t[0] >= '0' && #t[0] <= '7', "tile numbers are literal digits 0-7"); }()
#define MOEGEN_TILE_ZERO(t) (MOEGEN_TILE_NUMBER(t), moegen_amx::emulated::zero(t))
#define MOEGEN_TILE_LOAD(t, base, stride) (MOEGEN_TILE_NUMBER(t), moegen_amx::emulated::load(t, base, stride))
#define MOEGEN_TILE_STORE(t, base, stride) (MOEGEN_TILE_NUMBER(t), moegen_amx::emulated::store(t, base, stride))
#define MOEGEN_TILE_DPBF16PS(c, a, b) \
  (MOEGEN_TILE_NUMBER(c), MOEGEN_TILE_NUMBER(a), MOEGEN_TILE_NUMBER(b), moegen_amx::emulated::dpbf16ps(c, a, b))
#define MOEGEN_TILE_DPBUSD(c, a, b) \
  (MOEGEN_TILE_NUMBER(c), MOEGEN_TILE_NUMBER(a), MOEGEN_TILE_NUMBER(b), moegen_amx::emulated::dpbusd(c, a, b))
inline void load_config(const TileConfig* cfg) { emulated::load_config(cfg); }
inline void release_tiles() { emulated::release(); }
#else
// Tile numbers must be literal constants: the intrinsics paste them into the instruction.
#define MOEGEN_TILE_ZERO(t) _tile_zero(t)
#define MOEGEN_TILE_LOAD(t, base, stride) _tile_loadd(t, base, stride)
#define MOEGEN_TILE_STORE(t, base, stride) _tile_stored(t, base, stride)
#define MOEGEN_TILE_DPBF16PS(c, a, b) _tile_dpbf16ps(c, a, b)
#define MOEGEN_TILE_DPBUSD(c, a, b) _tile_dpbusd(c, a, b)
inline void load_config(const TileConfig* cfg) { _tile_loadconfig(cfg); }
inline void release_tiles() { _tile_release(); }
#endif

// Tiles 0-7 all full: 16 rows of 64 bytes (a 16x16 fp32 or int32 accumulator, 16 rows of 32 bf16
// or 64 bytes, or 16 bf16 pairs / byte quads for 16 columns). Per thread, before its first tile
// instruction.
inline void configure_full_tiles() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  // GCC 12 may drop the rows/colsb stores as dead (it does not see LDTILECFG read them; the tiles
  // then stay unconfigured and the first tile instruction faults): a compiler barrier keeps them.
  asm volatile("" : : "r"(&cfg) : "memory");
  load_config(&cfg);
}

// This thread's tiles configured (full) while alive, when `use`, and released however its work ends.
struct ThreadTiles {
  const bool use;
  explicit ThreadTiles(bool on) : use(on) {
    if (use) configure_full_tiles();
  }
  ~ThreadTiles() {
    if (use) release_tiles();
  }
  ThreadTiles(const ThreadTiles&) = delete;
  ThreadTiles& operator=(const ThreadTiles&) = delete;
};
#endif

}  // namespace
}  // namespace moegen_amx

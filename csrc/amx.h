// Intel AMX plumbing shared by the kernels that use its tiles (experts.cpp, prefill_attention.cpp):
// whether this build and CPU can run them, and the one tile layout both use.
#pragma once

#include <cstdint>

#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define MOEGEN_HAVE_AMX 1
#endif

namespace moegen_amx {

// AMX-TILE and AMX-BF16 on this CPU, and the tile state granted to this process.
inline bool usable() {
#ifdef MOEGEN_HAVE_AMX
  static const bool ok = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    if (!((d >> 24) & 1) || !((d >> 22) & 1)) return false;  // AMX-TILE, AMX-BF16
    // Linux hands out the tile state only on request (once per process).
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
#else
  return false;
#endif
}

#ifdef MOEGEN_HAVE_AMX
struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0-7 all full: 16 rows of 64 bytes (a 16x16 fp32 accumulator, 16 rows of 32 bf16, or 16
// bf16 pairs for 16 columns). Per thread, before its first tile instruction.
inline void configure_full_tiles() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  // GCC 12 may drop the rows/colsb stores as dead (it does not see LDTILECFG read them; the tiles
  // then stay unconfigured and the first tile instruction faults): a compiler barrier keeps them.
  asm volatile("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
}
#endif

}  // namespace moegen_amx

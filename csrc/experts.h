// What experts.cpp shares with the other experts kernel (experts_int8.cpp).
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

namespace moegen_experts {

// out[t] (hidden bf16) = the k weighted rows of token t (rows `ld` elements apart in `weighted`,
// in expert order; tok[r]: row r's token) summed in ascending expert order, rounding after each add
// (moegen/layers/moe.py's Dispatch.combine).
void combine_rows(const c10::BFloat16* weighted, int64_t ld, const int64_t* tok, int64_t tokens, int64_t k,
                  int64_t hidden, c10::BFloat16* out);

}  // namespace moegen_experts

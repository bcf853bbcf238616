// What experts.cpp shares with the other experts kernel (experts_int8.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <vector>

namespace moegen_experts {

// t is a contiguous CPU tensor of `dtype`, else a ValueError naming op and the argument.
void check_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype, const char* op);

// One call's routing checked: token_idx (int64) and weights (fp32) with one entry per routed row,
// counts (rows per expert) none negative, every token index one of x's rows. Returns the rows.
int64_t checked_routing(const at::Tensor& x, const at::Tensor& token_idx, const at::Tensor& weights,
                        const std::vector<int64_t>& counts, const char* op);

// out[t] (hidden bf16) = the k weighted rows of token t (rows `ld` elements apart in `weighted`,
// in expert order; tok[r]: row r's token) summed in ascending expert order, rounding after each add
// (moegen/layers/moe.py's Dispatch.combine).
void combine_rows(const c10::BFloat16* weighted, int64_t ld, const int64_t* tok, int64_t tokens, int64_t k,
                  int64_t hidden, c10::BFloat16* out);

}  // namespace moegen_experts

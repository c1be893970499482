// Row copies shared by the token ops (csrc/mask_tokens/, csrc/unmask_tokens/): one kept token
// is one row of D elements, copied as bytes, so every dtype works by its element size.
#pragma once

#include <cstdint>

#include "common.h"

namespace microdit {

// Size and dtype checks shared by the CPU and CUDA entry points.
inline void check_token_args(const char* op, std::int64_t B, std::int64_t T, std::int64_t K,
                             std::int64_t D, int dtype) {
  MICRODIT_CHECK(dtype_valid(dtype), op, ": unknown dtype code ", dtype,
                 " (expected 0=float32, 1=float16, 2=bfloat16, 3=float64)");
  MICRODIT_CHECK(B >= 0 && T >= 0 && K >= 0 && D >= 0, op,
                 ": sizes must be non-negative, got B=", B, " T=", T, " K=", K, " D=", D);
}

// Below this many bytes, waking the OpenMP team costs more than the copy itself.
constexpr std::int64_t kRowsParallelBytes = std::int64_t(1) << 16;

inline void check_index_range(const char* op, const std::int64_t* idx, std::int64_t B, std::int64_t K,
                       std::int64_t T) {
  // Serial on purpose: it is cheap next to the copy, and an exception cannot leave an OpenMP
  // region, so every index is validated before any row is touched.
  for (std::int64_t b = 0; b < B; ++b) {
    for (std::int64_t k = 0; k < K; ++k) {
      const std::int64_t t = idx[b * K + k];
      MICRODIT_CHECK(t >= 0 && t < T, op, ": idx[", b, ", ", k, "] = ", t,
                     " is out of range for T = ", T, " tokens (valid: 0 <= idx < ", T, ")");
    }
  }
}


}  // namespace microdit

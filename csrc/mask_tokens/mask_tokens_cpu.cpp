// CPU mask_tokens: one memcpy per kept row, rows spread over OpenMP threads.
#include <cstdint>
#include <cstring>

#include "mask_tokens/mask_tokens.h"
#include "token_rows.h"

namespace microdit {

void mask_tokens_cpu(std::uintptr_t src_addr, std::uintptr_t idx_addr, std::uintptr_t dst_addr,
                       std::int64_t B, std::int64_t T, std::int64_t K, std::int64_t D, int dtype) {
  constexpr const char* op = "mask_tokens";
  check_token_args(op, B, T, K, D, dtype);
  const std::int64_t rows = B * K;
  if (rows == 0) return;
  MICRODIT_CHECK(idx_addr != 0, op, ": idx is a null pointer but B * K = ", rows);
  const auto* idx = reinterpret_cast<const std::int64_t*>(idx_addr);
  check_index_range(op, idx, B, K, T);
  if (D == 0) return;
  MICRODIT_CHECK(src_addr != 0 && dst_addr != 0, op, ": src or dst is a null pointer");

  const auto row_bytes = static_cast<std::int64_t>(D * dtype_size(dtype));
  const auto* src = reinterpret_cast<const unsigned char*>(src_addr);
  auto* dst = reinterpret_cast<unsigned char*>(dst_addr);
#pragma omp parallel for schedule(static) if (rows * row_bytes >= kRowsParallelBytes)
  for (std::int64_t r = 0; r < rows; ++r) {
    const std::int64_t b = r / K;
    std::memcpy(dst + r * row_bytes, src + (b * T + idx[r]) * row_bytes, row_bytes);
  }
}

}  // namespace microdit

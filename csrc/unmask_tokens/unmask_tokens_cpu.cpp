// CPU unmask_tokens: every output row written once (a kept row or the fill), over OpenMP threads.
#include <cstdint>
#include <cstring>
#include <vector>

#include "unmask_tokens/unmask_tokens.h"
#include "token_rows.h"

namespace microdit {

void unmask_tokens_cpu(std::uintptr_t src_addr, std::uintptr_t idx_addr, std::uintptr_t dst_addr,
                        std::uintptr_t fill_addr, std::int64_t B, std::int64_t T, std::int64_t K,
                        std::int64_t D, int dtype) {
  constexpr const char* op = "unmask_tokens";
  check_token_args(op, B, T, K, D, dtype);
  MICRODIT_CHECK(K <= T, op, ": K = ", K, " kept tokens cannot exceed T = ", T,
                 " (indices must be unique within a row)");
  if (B * T == 0) return;
  MICRODIT_CHECK(K == 0 || idx_addr != 0, op, ": idx is a null pointer but B * K = ", B * K);
  const auto* idx = reinterpret_cast<const std::int64_t*>(idx_addr);

  // Which kept token lands on each dst row (-1: fill). Building it first lets every dst row be
  // written exactly once, and validates range and uniqueness before anything is written.
  std::vector<std::int64_t> source(static_cast<std::size_t>(B * T), -1);
  check_index_range(op, idx, B, K, T);
  for (std::int64_t b = 0; b < B; ++b) {
    for (std::int64_t k = 0; k < K; ++k) {
      const std::int64_t t = idx[b * K + k];
      std::int64_t& slot = source[static_cast<std::size_t>(b * T + t)];
      MICRODIT_CHECK(slot < 0, op, ": idx[", b, "] repeats token ", t, " (at k = ", slot,
                     " and k = ", k, "); kept indices must be unique within a row");
      slot = k;
    }
  }
  if (D == 0) return;
  MICRODIT_CHECK(dst_addr != 0 && (K == 0 || src_addr != 0), op,
                 ": src or dst is a null pointer");

  const auto row_bytes = static_cast<std::int64_t>(D * dtype_size(dtype));
  const auto* src = reinterpret_cast<const unsigned char*>(src_addr);
  const auto* fill = reinterpret_cast<const unsigned char*>(fill_addr);
  auto* dst = reinterpret_cast<unsigned char*>(dst_addr);
  const std::int64_t rows = B * T;
#pragma omp parallel for schedule(static) if (rows * row_bytes >= kRowsParallelBytes)
  for (std::int64_t r = 0; r < rows; ++r) {
    unsigned char* out = dst + r * row_bytes;
    const std::int64_t k = source[static_cast<std::size_t>(r)];
    if (k >= 0) {
      std::memcpy(out, src + ((r / T) * K + k) * row_bytes, row_bytes);
    } else if (fill != nullptr) {
      std::memcpy(out, fill, row_bytes);
    } else {
      std::memset(out, 0, row_bytes);  // all-zero bits are +0.0 in every supported dtype
    }
  }
}

}  // namespace microdit

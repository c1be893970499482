// CPU token masking: one memcpy per row, rows spread over OpenMP threads.
#include <cstdint>
#include <cstring>
#include <vector>

#include "token_mask/token_mask.h"

namespace microdit {
namespace {

// Below this many bytes, waking the OpenMP team costs more than the copy itself.
constexpr std::int64_t kParallelBytes = std::int64_t(1) << 16;

void check_index_range(const char* op, const std::int64_t* idx, std::int64_t B, std::int64_t K,
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

}  // namespace

void gather_tokens_cpu(std::uintptr_t src_addr, std::uintptr_t idx_addr, std::uintptr_t dst_addr,
                       std::int64_t B, std::int64_t T, std::int64_t K, std::int64_t D, int dtype) {
  constexpr const char* op = "gather_tokens";
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
#pragma omp parallel for schedule(static) if (rows * row_bytes >= kParallelBytes)
  for (std::int64_t r = 0; r < rows; ++r) {
    const std::int64_t b = r / K;
    std::memcpy(dst + r * row_bytes, src + (b * T + idx[r]) * row_bytes, row_bytes);
  }
}

void scatter_tokens_cpu(std::uintptr_t src_addr, std::uintptr_t idx_addr, std::uintptr_t dst_addr,
                        std::uintptr_t fill_addr, std::int64_t B, std::int64_t T, std::int64_t K,
                        std::int64_t D, int dtype) {
  constexpr const char* op = "scatter_tokens";
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
#pragma omp parallel for schedule(static) if (rows * row_bytes >= kParallelBytes)
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

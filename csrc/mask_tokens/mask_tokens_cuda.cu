// CUDA mask_tokens: a gather of kept rows, pure data movement (see token_rows_cuda.cuh).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "mask_tokens/mask_tokens.h"
#include "token_rows.h"
#include "token_rows_cuda.cuh"

namespace microdit {
namespace {

using namespace token_rows;

template <typename V>
__global__ void __launch_bounds__(kThreads)
    gather_kernel(const V* __restrict__ src, const std::int64_t* __restrict__ idx,
                  V* __restrict__ dst, std::int64_t rows, std::int64_t T, std::int64_t K,
                  std::int64_t row_vecs, int* __restrict__ status) {
  const int lane = threadIdx.x % kWarp;
  const std::int64_t warps = std::int64_t(gridDim.x) * kWarpsPerBlock;
  for (std::int64_t r = std::int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp; r < rows;
       r += warps) {
    const std::int64_t t = idx[r];  // same address in every lane: one broadcast load
    V* out = dst + r * row_vecs;
    if (t < 0 || t >= T) {
      if (status != nullptr && lane == 0) atomicOr(status, 1);
      zero_row(out, row_vecs, lane);
      continue;
    }
    copy_row(out, src + ((r / K) * T + t) * row_vecs, row_vecs, lane);
  }
}

}  // namespace

void mask_tokens_cuda(std::uintptr_t src, std::uintptr_t idx, std::uintptr_t dst,
                        std::int64_t B, std::int64_t T, std::int64_t K, std::int64_t D, int dtype,
                        std::uintptr_t stream, std::uintptr_t status) {
  constexpr const char* op = "mask_tokens_cuda";
  check_token_args(op, B, T, K, D, dtype);
  const std::int64_t rows = B * K;
  if (rows == 0 || D == 0) return;
  MICRODIT_CHECK(src != 0 && idx != 0 && dst != 0, op, ": src, idx or dst is a null pointer");
  MICRODIT_CHECK(T > 0, op, ": T = 0, so there is no token to gather for K = ", K);

  const std::int64_t row_bytes = D * std::int64_t(dtype_size(dtype));
  const int width = vector_width(row_bytes, {src, dst});
  const std::int64_t blocks = std::min((rows + kWarpsPerBlock - 1) / kWarpsPerBlock, kMaxBlocks);
  dispatch_width(width, [&](auto tag) {
    using V = typename decltype(tag)::type;
    gather_kernel<V><<<unsigned(blocks), kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
        reinterpret_cast<const V*>(src), reinterpret_cast<const std::int64_t*>(idx),
        reinterpret_cast<V*>(dst), rows, T, K, row_bytes / width, reinterpret_cast<int*>(status));
  });
  MICRODIT_CUDA_CHECK(cudaGetLastError(), op);
}

}  // namespace microdit

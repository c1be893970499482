// CUDA unmask_tokens: kept rows back in place, the fill elsewhere (see token_rows_cuda.cuh).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "unmask_tokens/unmask_tokens.h"
#include "token_rows.h"
#include "token_rows_cuda.cuh"

namespace microdit {
namespace {

using namespace token_rows;

// One block owns `chunk` consecutive dst rows of one sample. It scans that sample's K indices to
// learn which kept token (if any) lands on each of its rows, then writes each row exactly once:
// a single pass over dst with no workspace. The re-scan of idx per chunk is K * 8 bytes, small
// next to the chunk * D elements the block writes.
template <typename V>
__global__ void __launch_bounds__(kThreads)
    scatter_kernel(const V* __restrict__ src, const std::int64_t* __restrict__ idx,
                   V* __restrict__ dst, const V* __restrict__ fill, std::int64_t B,
                   std::int64_t T, std::int64_t K, std::int64_t row_vecs, int chunk,
                   int* __restrict__ status) {
  extern __shared__ int source[];  // kept-token index for dst row t0 + i, or -1 for fill
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const std::int64_t chunks = (T + chunk - 1) / chunk;
  for (std::int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    for (std::int64_t c = blockIdx.x; c < chunks; c += gridDim.x) {
      const std::int64_t t0 = c * chunk;
      for (int i = threadIdx.x; i < chunk; i += blockDim.x) source[i] = -1;
      __syncthreads();
      for (std::int64_t k = threadIdx.x; k < K; k += blockDim.x) {
        const std::int64_t t = idx[b * K + k];
        if (t < 0 || t >= T) {
          if (status != nullptr && c == 0) atomicOr(status, 1);  // reported by one chunk only
        } else if (t >= t0 && t < t0 + chunk) {
          source[t - t0] = int(k);
        }
      }
      __syncthreads();
      const int rows = int(min(std::int64_t(chunk), T - t0));
      for (int i = warp; i < rows; i += kWarpsPerBlock) {
        V* out = dst + (b * T + t0 + i) * row_vecs;
        const int k = source[i];
        if (k >= 0) {
          copy_row(out, src + (b * K + k) * row_vecs, row_vecs, lane);
        } else if (fill != nullptr) {
          copy_row(out, fill, row_vecs, lane);
        } else {
          zero_row(out, row_vecs, lane);
        }
      }
      __syncthreads();  // `source` is rebuilt for the next chunk
    }
  }
}

}  // namespace

void unmask_tokens_cuda(std::uintptr_t src, std::uintptr_t idx, std::uintptr_t dst,
                         std::uintptr_t fill, std::int64_t B, std::int64_t T, std::int64_t K,
                         std::int64_t D, int dtype, std::uintptr_t stream, std::uintptr_t status) {
  constexpr const char* op = "unmask_tokens_cuda";
  check_token_args(op, B, T, K, D, dtype);
  MICRODIT_CHECK(K <= T, op, ": K = ", K, " kept tokens cannot exceed T = ", T,
                 " (indices must be unique within a row)");
  MICRODIT_CHECK(K <= INT32_MAX, op, ": K = ", K, " exceeds the kernel's int32 row index");
  if (B * T == 0 || D == 0) return;
  MICRODIT_CHECK(dst != 0 && (K == 0 || (src != 0 && idx != 0)), op,
                 ": src, idx or dst is a null pointer");

  const std::int64_t row_bytes = D * std::int64_t(dtype_size(dtype));
  const int width = fill != 0 ? vector_width(row_bytes, {src, dst, fill})
                              : vector_width(row_bytes, {src, dst});
  // Halve the rows per block until there are enough blocks to fill the GPU (without asking the
  // GPU how many SMs it has: 2048 blocks covers any current part), down to one row per warp.
  std::int64_t chunk = 256;
  while (chunk > kWarpsPerBlock && B * ((T + chunk - 1) / chunk) < 2048) chunk /= 2;
  const dim3 grid(unsigned(std::min((T + chunk - 1) / chunk, kMaxBlocks)),
                  unsigned(std::min(B, kMaxBlocks)));
  dispatch_width(width, [&](auto tag) {
    using V = typename decltype(tag)::type;
    scatter_kernel<V><<<grid, kThreads, chunk * sizeof(int), reinterpret_cast<cudaStream_t>(stream)>>>(
        reinterpret_cast<const V*>(src), reinterpret_cast<const std::int64_t*>(idx),
        reinterpret_cast<V*>(dst), reinterpret_cast<const V*>(fill), B, T, K, row_bytes / width,
        int(chunk), reinterpret_cast<int*>(status));
  });
  MICRODIT_CUDA_CHECK(cudaGetLastError(), op);
}

}  // namespace microdit

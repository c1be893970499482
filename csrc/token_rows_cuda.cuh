// CUDA row copies shared by the token ops: one warp copies one row with the widest access
// (16 bytes when alignment allows) that the row size and base addresses permit; grids are capped
// and loop (grid-stride) over the rest.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>

namespace microdit {
namespace token_rows {

constexpr int kWarp = 32;
constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / kWarp;
// Larger problems loop inside the kernel; also keeps gridDim.y within its 65535 limit.
constexpr std::int64_t kMaxBlocks = 65535;

template <typename V>
struct VecTag {
  using type = V;
};

// Widest access width in bytes that divides the row size and every base address.
inline int vector_width(std::int64_t row_bytes, std::initializer_list<std::uintptr_t> addrs) {
  for (int width : {16, 8, 4, 2}) {
    bool ok = row_bytes % width == 0;
    for (std::uintptr_t a : addrs) ok = ok && a % width == 0;
    if (ok) return width;
  }
  return 1;
}

template <typename F>
inline void dispatch_width(int width, F&& f) {
  switch (width) {
    case 16: return f(VecTag<uint4>{});
    case 8: return f(VecTag<uint2>{});
    case 4: return f(VecTag<std::uint32_t>{});
    case 2: return f(VecTag<std::uint16_t>{});
    default: return f(VecTag<std::uint8_t>{});
  }
}

template <typename V>
__device__ __forceinline__ void copy_row(V* __restrict__ dst, const V* __restrict__ src,
                                         std::int64_t n, int lane) {
#pragma unroll 4
  for (std::int64_t i = lane; i < n; i += kWarp) dst[i] = src[i];
}

template <typename V>
__device__ __forceinline__ void zero_row(V* __restrict__ dst, std::int64_t n, int lane) {
  const V zero{};
#pragma unroll 4
  for (std::int64_t i = lane; i < n; i += kWarp) dst[i] = zero;
}

}  // namespace token_rows
}  // namespace microdit

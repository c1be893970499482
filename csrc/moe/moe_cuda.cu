// CUDA expert-choice dispatch and combine. One warp owns one output row (a block row for the
// gathers, a token row for the combine), so there are no atomics and the combine adds a
// token's expert contributions in expert order: the results are deterministic. Rows move in
// 16-byte packs when the row size and addresses allow, else element by element.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "moe/moe.h"

namespace microdit {
namespace {

constexpr int kWarp = 32;
constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / kWarp;
constexpr std::int64_t kMaxBlocks = 65535;  // grid-stride loops cover the rest

template <typename S, int N>
struct alignas(sizeof(S) * N) Pack {
  S v[N];
};

// Elements per access: 16 bytes when D and every base address allow it, else 1.
template <typename S>
int pack_elems(std::int64_t D, std::initializer_list<std::uintptr_t> addrs) {
  constexpr int n = 16 / int(sizeof(S));
  bool ok = D % n == 0;
  for (std::uintptr_t a : addrs) ok = ok && a % 16 == 0;
  return ok ? n : 1;
}

std::int64_t warp_blocks(std::int64_t rows) {
  return std::max<std::int64_t>(1, std::min((rows + kWarpsPerBlock - 1) / kWarpsPerBlock, kMaxBlocks));
}

__global__ void inverse_kernel(const std::int64_t* __restrict__ idx, std::int32_t* __restrict__ inv,
                               std::int64_t B, std::int64_t T, std::int64_t E, std::int64_t K,
                               int* __restrict__ status) {
  const std::int64_t n = B * E * K;
  for (std::int64_t r = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; r < n;
       r += std::int64_t(gridDim.x) * blockDim.x) {
    const std::int64_t b = r / (E * K), e = (r / K) % E, j = r % K;
    const std::int64_t t = idx[r];
    if (t < 0 || t >= T) {
      if (status != nullptr) atomicOr(status, 1);
      continue;
    }
    inv[(b * T + t) * E + e] = std::int32_t(j);
  }
}

// blocks[e, b, j] = w * tokens[b, idx[b, e, j]]; with dweight/blocks_in set, also the dot
// product of the gathered row with blocks_in's row (the combine's backward).
template <typename S, int N>
__global__ void __launch_bounds__(kThreads)
    gather_kernel(const S* __restrict__ tokens, const std::int64_t* __restrict__ idx,
                  const S* __restrict__ weight, S* __restrict__ blocks,
                  const S* __restrict__ blocks_in, S* __restrict__ dweight, std::int64_t B,
                  std::int64_t T, std::int64_t E, std::int64_t K, std::int64_t D) {
  using A = typename Acc<S>::type;
  using P = Pack<S, N>;
  const int lane = threadIdx.x % kWarp;
  const std::int64_t rows = E * B * K, packs = D / N;
  const std::int64_t warps = std::int64_t(gridDim.x) * kWarpsPerBlock;
  for (std::int64_t r = std::int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp; r < rows;
       r += warps) {
    const std::int64_t e = r / (B * K), b = (r / K) % B, j = r % K;
    const std::int64_t src_row = (b * E + e) * K + j;
    const P* in = reinterpret_cast<const P*>(tokens + (b * T + idx[src_row]) * D);
    P* out = blocks == nullptr ? nullptr : reinterpret_cast<P*>(blocks + r * D);
    const P* y = blocks_in == nullptr ? nullptr : reinterpret_cast<const P*>(blocks_in + r * D);
    const A w = weight == nullptr ? A(1) : load_acc(weight[src_row]);
    A dot = 0;
    for (std::int64_t p = lane; p < packs; p += kWarp) {
      const P g = in[p];
      if (out != nullptr) {
        if (weight == nullptr) {
          out[p] = g;
        } else {
          P o;
#pragma unroll
          for (int i = 0; i < N; ++i) o.v[i] = store_as<S>(w * load_acc(g.v[i]));
          out[p] = o;
        }
      }
      if (y != nullptr) {
        const P yv = y[p];
#pragma unroll
        for (int i = 0; i < N; ++i) dot += load_acc(g.v[i]) * load_acc(yv.v[i]);
      }
    }
    if (dweight != nullptr) {
#pragma unroll
      for (int offset = kWarp / 2; offset > 0; offset /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, offset);
      if (lane == 0) dweight[src_row] = store_as<S>(dot);
    }
  }
}

template <typename S, int N>
__global__ void __launch_bounds__(kThreads)
    combine_kernel(const S* __restrict__ blocks, const std::int32_t* __restrict__ inv,
                   const S* __restrict__ weight, S* __restrict__ tokens, std::int64_t B,
                   std::int64_t T, std::int64_t E, std::int64_t K, std::int64_t D) {
  using A = typename Acc<S>::type;
  using P = Pack<S, N>;
  const int lane = threadIdx.x % kWarp;
  const std::int64_t rows = B * T, packs = D / N;
  const std::int64_t warps = std::int64_t(gridDim.x) * kWarpsPerBlock;
  for (std::int64_t r = std::int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp; r < rows;
       r += warps) {
    const std::int64_t b = r / T;
    const std::int32_t* slots = inv + r * E;
    P* out = reinterpret_cast<P*>(tokens + r * D);
    for (std::int64_t p = lane; p < packs; p += kWarp) {
      A acc[N];
#pragma unroll
      for (int i = 0; i < N; ++i) acc[i] = 0;
      for (std::int64_t e = 0; e < E; ++e) {  // expert order: deterministic
        const std::int64_t j = slots[e];
        if (j < 0) continue;
        const A w = weight == nullptr ? A(1) : load_acc(weight[(b * E + e) * K + j]);
        const P v = reinterpret_cast<const P*>(blocks + ((e * B + b) * K + j) * D)[p];
#pragma unroll
        for (int i = 0; i < N; ++i) acc[i] += w * load_acc(v.v[i]);
      }
      P o;
#pragma unroll
      for (int i = 0; i < N; ++i) o.v[i] = store_as<S>(acc[i]);
      out[p] = o;
    }
  }
}

template <typename S>
__global__ void gelu_kernel(S* __restrict__ h, S* __restrict__ d, std::int64_t n) {
  using A = typename Acc<S>::type;
  const A inv_sqrt2 = A(0.70710678118654752440), inv_sqrt_2pi = A(0.39894228040143267794);
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    const A x = load_acc(h[i]);
    const A cdf = A(0.5) + A(0.5) * erf(x * inv_sqrt2);
    d[i] = store_as<S>(cdf + x * inv_sqrt_2pi * exp(A(-0.5) * x * x));
    h[i] = store_as<S>(x * cdf);
  }
}

template <typename S, typename F>
void dispatch_pack(int n, F&& f) {
  constexpr int wide = 16 / int(sizeof(S));
  if (n == wide) return f(std::integral_constant<int, wide>{});
  return f(std::integral_constant<int, 1>{});
}

cudaStream_t as_stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

}  // namespace

void moe_inverse_cuda(std::uintptr_t idx, std::uintptr_t inv, std::int64_t B, std::int64_t T,
                      std::int64_t E, std::int64_t K, std::uintptr_t stream,
                      std::uintptr_t status) {
  constexpr const char* op = "moe_inverse_cuda";
  check_moe_args(op, B, T, E, K, 0, kFloat32);
  if (B * T * E == 0) return;
  MICRODIT_CHECK(inv != 0 && (K == 0 || idx != 0), op, ": idx or inv is a null pointer");
  // All-ones bytes are -1 in int32: "no slot".
  MICRODIT_CUDA_CHECK(cudaMemsetAsync(reinterpret_cast<void*>(inv), 0xff,
                                      std::size_t(B * T * E) * sizeof(std::int32_t), as_stream(stream)),
                      op);
  const std::int64_t n = B * E * K;
  if (n == 0) return;
  const std::int64_t blocks = std::min((n + kThreads - 1) / kThreads, kMaxBlocks);
  inverse_kernel<<<unsigned(blocks), kThreads, 0, as_stream(stream)>>>(
      reinterpret_cast<const std::int64_t*>(idx), reinterpret_cast<std::int32_t*>(inv), B, T, E, K,
      reinterpret_cast<int*>(status));
  MICRODIT_CUDA_CHECK(cudaGetLastError(), op);
}

void moe_dispatch_cuda(std::uintptr_t tokens, std::uintptr_t idx, std::uintptr_t weight,
                     std::uintptr_t blocks, std::int64_t B, std::int64_t T, std::int64_t E,
                     std::int64_t K, std::int64_t D, int dtype, std::uintptr_t stream) {
  constexpr const char* op = "moe_dispatch_cuda";
  check_moe_args(op, B, T, E, K, D, dtype);
  if (B * E * K == 0 || D == 0) return;
  MICRODIT_CHECK(tokens != 0 && idx != 0 && blocks != 0, op, ": tokens, idx or blocks is a null pointer");
  const std::int64_t rows = E * B * K;
  dispatch_dtype(dtype, [&](auto tag) {
    using S = decltype(tag);
    dispatch_pack<S>(pack_elems<S>(D, {tokens, blocks}), [&](auto n) {
      gather_kernel<S, decltype(n)::value><<<unsigned(warp_blocks(rows)), kThreads, 0, as_stream(stream)>>>(
          reinterpret_cast<const S*>(tokens), reinterpret_cast<const std::int64_t*>(idx),
          reinterpret_cast<const S*>(weight), reinterpret_cast<S*>(blocks), nullptr, nullptr, B, T,
          E, K, D);
    });
  });
  MICRODIT_CUDA_CHECK(cudaGetLastError(), op);
}

void moe_combine_backward_cuda(std::uintptr_t grad, std::uintptr_t blocks, std::uintptr_t idx,
                         std::uintptr_t weight, std::uintptr_t dblocks, std::uintptr_t dweight,
                         std::int64_t B, std::int64_t T, std::int64_t E, std::int64_t K,
                         std::int64_t D, int dtype, std::uintptr_t stream) {
  constexpr const char* op = "moe_combine_backward_cuda";
  check_moe_args(op, B, T, E, K, D, dtype);
  if (B * E * K == 0 || (dblocks == 0 && dweight == 0)) return;
  MICRODIT_CHECK(idx != 0, op, ": idx is a null pointer");
  MICRODIT_CHECK(dblocks == 0 || weight != 0, op, ": dblocks needs weight");
  MICRODIT_CHECK(dweight == 0 || blocks != 0, op, ": dweight needs blocks");
  MICRODIT_CHECK(D == 0 || grad != 0, op, ": grad is a null pointer");
  if (D == 0 && dweight != 0) {  // empty dot products
    MICRODIT_CUDA_CHECK(cudaMemsetAsync(reinterpret_cast<void*>(dweight), 0,
                                        std::size_t(B * E * K) * dtype_size(dtype), as_stream(stream)),
                        op);
    return;
  }
  if (D == 0) return;
  const std::int64_t rows = E * B * K;
  dispatch_dtype(dtype, [&](auto tag) {
    using S = decltype(tag);
    dispatch_pack<S>(pack_elems<S>(D, {grad, blocks, dblocks}), [&](auto n) {
      gather_kernel<S, decltype(n)::value><<<unsigned(warp_blocks(rows)), kThreads, 0, as_stream(stream)>>>(
          reinterpret_cast<const S*>(grad), reinterpret_cast<const std::int64_t*>(idx),
          reinterpret_cast<const S*>(weight), reinterpret_cast<S*>(dblocks),
          reinterpret_cast<const S*>(dweight == 0 ? 0 : blocks), reinterpret_cast<S*>(dweight), B,
          T, E, K, D);
    });
  });
  MICRODIT_CUDA_CHECK(cudaGetLastError(), op);
}

void moe_combine_cuda(std::uintptr_t blocks, std::uintptr_t inv, std::uintptr_t weight,
                      std::uintptr_t tokens, std::int64_t B, std::int64_t T, std::int64_t E,
                      std::int64_t K, std::int64_t D, int dtype, std::uintptr_t stream) {
  constexpr const char* op = "moe_combine_cuda";
  check_moe_args(op, B, T, E, K, D, dtype);
  if (B * T * D == 0) return;
  MICRODIT_CHECK(tokens != 0 && (E == 0 || inv != 0), op, ": tokens or inv is a null pointer");
  MICRODIT_CHECK(K == 0 || E == 0 || blocks != 0, op, ": blocks is a null pointer");
  const std::int64_t rows = B * T;
  dispatch_dtype(dtype, [&](auto tag) {
    using S = decltype(tag);
    dispatch_pack<S>(pack_elems<S>(D, {blocks, tokens}), [&](auto n) {
      combine_kernel<S, decltype(n)::value><<<unsigned(warp_blocks(rows)), kThreads, 0, as_stream(stream)>>>(
          reinterpret_cast<const S*>(blocks), reinterpret_cast<const std::int32_t*>(inv),
          reinterpret_cast<const S*>(weight), reinterpret_cast<S*>(tokens), B, T, E, K, D);
    });
  });
  MICRODIT_CUDA_CHECK(cudaGetLastError(), op);
}

void moe_gelu_cuda(std::uintptr_t h, std::uintptr_t d, std::int64_t n, int dtype,
                   std::uintptr_t stream) {
  constexpr const char* op = "moe_gelu_cuda";
  MICRODIT_CHECK(dtype_valid(dtype), op, ": unknown dtype code ", dtype,
                 " (expected 0=float32, 1=float16, 2=bfloat16, 3=float64)");
  MICRODIT_CHECK(n >= 0, op, ": n must be non-negative, got ", n);
  if (n == 0) return;
  MICRODIT_CHECK(h != 0 && d != 0, op, ": h or d is a null pointer");
  const std::int64_t blocks = std::min((n + kThreads - 1) / kThreads, std::int64_t(1) << 16);
  dispatch_dtype(dtype, [&](auto tag) {
    using S = decltype(tag);
    gelu_kernel<S><<<unsigned(blocks), kThreads, 0, as_stream(stream)>>>(
        reinterpret_cast<S*>(h), reinterpret_cast<S*>(d), n);
  });
  MICRODIT_CUDA_CHECK(cudaGetLastError(), op);
}

}  // namespace microdit

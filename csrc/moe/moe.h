// Expert-choice MoE dispatch and combine: move tokens into per-expert contiguous blocks and
// back, weighted by the router's gates, deterministically (no atomics: every output row is
// owned by one thread or warp, which adds its contributions in a fixed order).
//
// Layouts (all contiguous, raw addresses as torch's data_ptr(); see microdit/_ext.py):
//   tokens  (B, T, D)     the layer's input / output, or their gradients
//   idx     (B, E, K)     int64: token chosen by expert e for slot j of sample b
//   weight  (B, E, K)     the gates, in the tokens' dtype (0: all ones)
//   blocks  (E, B, K, D)  expert-major: expert e's rows are one (B*K, D) matrix for its GEMMs
//   inv     (B, T, E)     int32: the slot j with idx[b, e, j] == t, or -1 (the inverse map)
// The dtype code (common.h) covers every floating tensor; accumulation is in float (double
// for float64).
#pragma once

#include <cstdint>

#include "common.h"

namespace microdit {

// inv[b, t, e] = j where idx[b, e, j] == t, else -1. Throws (before writing anything) on an
// index outside [0, T) or a token chosen twice by one expert of one sample.
void moe_inverse_cpu(std::uintptr_t idx, std::uintptr_t inv, std::int64_t B, std::int64_t T,
                     std::int64_t E, std::int64_t K);

// blocks[e, b, j, :] = weight[b, e, j] * tokens[b, idx[b, e, j], :]   (weight 0: a plain copy).
void moe_dispatch_cpu(std::uintptr_t tokens, std::uintptr_t idx, std::uintptr_t weight,
                    std::uintptr_t blocks, std::int64_t B, std::int64_t T, std::int64_t E,
                    std::int64_t K, std::int64_t D, int dtype);

// The combine's backward, fused: with g = grad[b, idx[b, e, j], :],
//   dblocks[e, b, j, :] = weight[b, e, j] * g        (skipped when dblocks == 0)
//   dweight[b, e, j]    = <g, blocks[e, b, j, :]>    (skipped when dweight == 0)
void moe_combine_backward_cpu(std::uintptr_t grad, std::uintptr_t blocks, std::uintptr_t idx,
                        std::uintptr_t weight, std::uintptr_t dblocks, std::uintptr_t dweight,
                        std::int64_t B, std::int64_t T, std::int64_t E, std::int64_t K,
                        std::int64_t D, int dtype);

// tokens[b, t, :] = sum over e = 0..E-1 with j = inv[b, t, e] >= 0 of
//                   weight[b, e, j] * blocks[e, b, j, :]   (weight 0: ones; no slot: zeros).
void moe_combine_cpu(std::uintptr_t blocks, std::uintptr_t inv, std::uintptr_t weight,
                     std::uintptr_t tokens, std::int64_t B, std::int64_t T, std::int64_t E,
                     std::int64_t K, std::int64_t D, int dtype);

// The expert FFN's activation, in place, with its derivative for the backward:
//   d[i] = gelu'(h[i]);  h[i] = gelu(h[i])   (exact GELU, x * Phi(x), as torch's default).
// Storing gelu' instead of the pre-activation turns the backward into one multiply.
void moe_gelu_cpu(std::uintptr_t h, std::uintptr_t d, std::int64_t n, int dtype);

#if defined(MICRODIT_WITH_CUDA)
// The same on device pointers, asynchronous on `stream` (a cudaStream_t as an integer). A
// kernel cannot throw: moe_inverse_cuda drops out-of-range indices (and ORs 1 into the device
// int32 at `status` when status != 0); with repeated indices, which slot wins is unspecified.
// The other kernels trust `idx` and `inv` (produced by moe_inverse_cuda / topk).
void moe_inverse_cuda(std::uintptr_t idx, std::uintptr_t inv, std::int64_t B, std::int64_t T,
                      std::int64_t E, std::int64_t K, std::uintptr_t stream,
                      std::uintptr_t status);
void moe_dispatch_cuda(std::uintptr_t tokens, std::uintptr_t idx, std::uintptr_t weight,
                     std::uintptr_t blocks, std::int64_t B, std::int64_t T, std::int64_t E,
                     std::int64_t K, std::int64_t D, int dtype, std::uintptr_t stream);
void moe_combine_backward_cuda(std::uintptr_t grad, std::uintptr_t blocks, std::uintptr_t idx,
                         std::uintptr_t weight, std::uintptr_t dblocks, std::uintptr_t dweight,
                         std::int64_t B, std::int64_t T, std::int64_t E, std::int64_t K,
                         std::int64_t D, int dtype, std::uintptr_t stream);
void moe_combine_cuda(std::uintptr_t blocks, std::uintptr_t inv, std::uintptr_t weight,
                      std::uintptr_t tokens, std::int64_t B, std::int64_t T, std::int64_t E,
                      std::int64_t K, std::int64_t D, int dtype, std::uintptr_t stream);
void moe_gelu_cuda(std::uintptr_t h, std::uintptr_t d, std::int64_t n, int dtype,
                   std::uintptr_t stream);
#endif

// Size and dtype checks shared by the CPU and CUDA entry points.
inline void check_moe_args(const char* op, std::int64_t B, std::int64_t T, std::int64_t E,
                           std::int64_t K, std::int64_t D, int dtype) {
  MICRODIT_CHECK(dtype_valid(dtype), op, ": unknown dtype code ", dtype,
                 " (expected 0=float32, 1=float16, 2=bfloat16, 3=float64)");
  MICRODIT_CHECK(B >= 0 && T >= 0 && E >= 0 && K >= 0 && D >= 0, op,
                 ": sizes must be non-negative, got B=", B, " T=", T, " E=", E, " K=", K,
                 " D=", D);
  MICRODIT_CHECK(K <= T, op, ": each expert takes K = ", K, " tokens of only T = ", T);
  MICRODIT_CHECK(K <= INT32_MAX, op, ": K = ", K, " exceeds the int32 inverse map");
}

// Calls f(S{}) with S the storage type of `dtype` (float, Half, BFloat16, double).
template <typename F>
void dispatch_dtype(int dtype, F&& f) {
  switch (dtype) {
    case kFloat32: return f(float{});
    case kFloat16: return f(Half{});
    case kBFloat16: return f(BFloat16{});
    default: return f(double{});
  }
}

// Storage <-> accumulation conversions: float for fp32/fp16/bf16, double for fp64.
template <typename S>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

MICRODIT_HD float load_acc(float v) { return v; }
MICRODIT_HD double load_acc(double v) { return v; }
MICRODIT_HD float load_acc(Half v) { return to_float(v); }
MICRODIT_HD float load_acc(BFloat16 v) { return to_float(v); }

template <typename S>
MICRODIT_HD S store_as(typename Acc<S>::type v);
template <>
MICRODIT_HD float store_as<float>(float v) { return v; }
template <>
MICRODIT_HD double store_as<double>(double v) { return v; }
template <>
MICRODIT_HD Half store_as<Half>(float v) { return to_half(v); }
template <>
MICRODIT_HD BFloat16 store_as<BFloat16>(float v) { return to_bfloat16(v); }

}  // namespace microdit

// Token masking: keep K of each sample's T tokens (gather), and put them back (scatter).
//
// Tensors are raw addresses (torch's data_ptr()), contiguous, with sizes and a dtype code, so
// the extension never links libtorch. Rows are copied as bytes, so every dtype works by its
// element size. microdit/_ext.py checks shapes, dtypes and devices before calling these.
#pragma once

#include <cstdint>

#include "common.h"

namespace microdit {

// dst[b, k, :] = src[b, idx[b, k], :];  src (B, T, D), idx (B, K) int64, dst (B, K, D).
// Throws ValueError-style std::invalid_argument, before writing anything, if an index is
// outside [0, T) (negative indices are errors, not counted from the end).
void gather_tokens_cpu(std::uintptr_t src, std::uintptr_t idx, std::uintptr_t dst, std::int64_t B,
                       std::int64_t T, std::int64_t K, std::int64_t D, int dtype);

// dst[b, t, :] = src[b, k, :] where idx[b, k] == t, else fill[:] (zeros when fill == 0).
// src (B, K, D), idx (B, K) int64 unique per row, dst (B, T, D), fill (D,). Every dst row is
// written exactly once. Out-of-range or repeated indices throw before anything is written.
void scatter_tokens_cpu(std::uintptr_t src, std::uintptr_t idx, std::uintptr_t dst,
                        std::uintptr_t fill, std::int64_t B, std::int64_t T, std::int64_t K,
                        std::int64_t D, int dtype);

#if defined(MICRODIT_WITH_CUDA)
// The same on device pointers, launched asynchronously on `stream` (a cudaStream_t as an
// integer; 0 is the legacy default stream). A kernel cannot throw, so an out-of-range index
// never reads or writes out of bounds instead: gather writes a zero row for it, scatter drops
// it (its dst row keeps the fill). If `status` is non-zero it is the address of a device int32
// that the kernel ORs with 1 when it sees such an index, for callers that want to check.
// Repeated indices in scatter leave which source row wins unspecified.
void gather_tokens_cuda(std::uintptr_t src, std::uintptr_t idx, std::uintptr_t dst,
                        std::int64_t B, std::int64_t T, std::int64_t K, std::int64_t D, int dtype,
                        std::uintptr_t stream, std::uintptr_t status);

void scatter_tokens_cuda(std::uintptr_t src, std::uintptr_t idx, std::uintptr_t dst,
                         std::uintptr_t fill, std::int64_t B, std::int64_t T, std::int64_t K,
                         std::int64_t D, int dtype, std::uintptr_t stream, std::uintptr_t status);
#endif

// Size and dtype checks shared by the CPU and CUDA entry points.
inline void check_token_args(const char* op, std::int64_t B, std::int64_t T, std::int64_t K,
                             std::int64_t D, int dtype) {
  MICRODIT_CHECK(dtype_valid(dtype), op, ": unknown dtype code ", dtype,
                 " (expected 0=float32, 1=float16, 2=bfloat16, 3=float64)");
  MICRODIT_CHECK(B >= 0 && T >= 0 && K >= 0 && D >= 0, op,
                 ": sizes must be non-negative, got B=", B, " T=", T, " K=", K, " D=", D);
}

}  // namespace microdit

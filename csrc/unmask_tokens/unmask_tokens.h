// unmask_tokens: put the kept tokens back in place, a fill row (the mask token) elsewhere.
//
// Tensors are raw addresses (torch's data_ptr()), contiguous, with sizes and a dtype code, so
// the extension never links libtorch. Rows are copied as bytes, so every dtype works by its
// element size. microdit/_ext.py checks shapes, dtypes and devices before calling these.
#pragma once

#include <cstdint>

#include "common.h"

namespace microdit {

// dst[b, t, :] = src[b, k, :] where idx[b, k] == t, else fill[:] (zeros when fill == 0).
// src (B, K, D), idx (B, K) int64 unique per row, dst (B, T, D), fill (D,). Every dst row is
// written exactly once. Out-of-range or repeated indices throw before anything is written.
void unmask_tokens_cpu(std::uintptr_t src, std::uintptr_t idx, std::uintptr_t dst,
                        std::uintptr_t fill, std::int64_t B, std::int64_t T, std::int64_t K,
                        std::int64_t D, int dtype);

#if defined(MICRODIT_WITH_CUDA)
// The same on device pointers, launched asynchronously on `stream` (a cudaStream_t as an
// integer; 0 is the legacy default stream). A kernel cannot throw, so an out-of-range index
// never writes out of bounds instead: it is dropped (its dst row keeps the fill). If `status`
// is non-zero it is the address of a device int32 that the kernel ORs with 1 when it sees such an index, for callers that want to check.
// Repeated indices leave which source row wins unspecified.
void unmask_tokens_cuda(std::uintptr_t src, std::uintptr_t idx, std::uintptr_t dst,
                         std::uintptr_t fill, std::int64_t B, std::int64_t T, std::int64_t K,
                         std::int64_t D, int dtype, std::uintptr_t stream, std::uintptr_t status);
#endif

}  // namespace microdit

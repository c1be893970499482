// mask_tokens: keep K of each sample's T tokens (a row gather).
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
void mask_tokens_cpu(std::uintptr_t src, std::uintptr_t idx, std::uintptr_t dst, std::int64_t B,
                       std::int64_t T, std::int64_t K, std::int64_t D, int dtype);

#if defined(MICRODIT_WITH_CUDA)
// The same on device pointers, launched asynchronously on `stream` (a cudaStream_t as an
// integer; 0 is the legacy default stream). A kernel cannot throw, so an out-of-range index
// never reads out of bounds instead: it gives a zero dst row. If `status` is non-zero it is the
// address of a device int32 that the kernel ORs with 1 when it sees such an index, for callers
// that want to check.
void mask_tokens_cuda(std::uintptr_t src, std::uintptr_t idx, std::uintptr_t dst,
                        std::int64_t B, std::int64_t T, std::int64_t K, std::int64_t D, int dtype,
                        std::uintptr_t stream, std::uintptr_t status);
#endif

}  // namespace microdit

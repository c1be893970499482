// The expert FFN's GEMMs through cuBLASLt with the GELU in the epilogue (the `cublaslt` MoE
// backend). cuBLASLt's GELU epilogue is the tanh form, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715
// x^3))), which differs from the published exact GELU by up to 4.7e-4 (at |x| ~ 2.7): inside
// bf16/fp16 rounding at the activations' scale, not in float32, so only those dtypes are taken.
//
// libcublasLt is opened at run time (dlopen), never linked: the module imports on machines
// without it, and a CUDA torch has already loaded it into the process. Nothing here calls the
// CUDA runtime, so this file is plain C++ and builds (and reports why it cannot run) everywhere.
//
// Layouts, row-major and contiguous per expert, E experts in a row (batch strides implied):
//   x     (E, M, K)   the dispatched tokens          dy   (E, M, K)  the gradient at the output
//   w1    (E, K, N)   the first expert weights       w2   (E, N, K)  the second expert weights
//   out   (E, M, N)   the result                     aux  (E, M, N)  GELU's input (pre-activation)
#pragma once

#include <cstdint>
#include <string>

namespace microdit {

// "" when libcublasLt was found with every function used here, else why not (which names were
// tried, what dlopen said). Set MICRODIT_CUBLASLT to a library path to choose one.
std::string cublaslt_load_error();
// cublasLtGetVersion() of the loaded library (e.g. 130100), 0 when none is loaded.
std::int64_t cublaslt_version();

// out = gelu_tanh(x @ w1) and aux = x @ w1 (the epilogue's input, rounded to dtype), one
// strided-batched GEMM over the E experts (a loop of E GEMMs where cuBLASLt has no batched
// algorithm for this epilogue). dtype: 1 = float16, 2 = bfloat16; fp32 accumulation.
// `align`: the largest power of two (<= 256) dividing every address, in bytes. `workspace`:
// device memory of `workspace_bytes` usable on `stream` for the call's duration.
void moe_gemm_gelu_aux_lt(std::uintptr_t x, std::uintptr_t w1, std::uintptr_t out,
                          std::uintptr_t aux, std::int64_t E, std::int64_t M, std::int64_t K,
                          std::int64_t N, int dtype, int device, int align,
                          std::uintptr_t workspace, std::int64_t workspace_bytes,
                          std::uintptr_t stream);

// out = (dy @ w2^T) * gelu_tanh'(aux): the first GEMM's activation gradient, with the GELU's
// backward in the epilogue (cuBLASLt's DGELU), reading the pre-activation saved by the forward.
void moe_gemm_dgelu_lt(std::uintptr_t dy, std::uintptr_t w2, std::uintptr_t aux,
                       std::uintptr_t out, std::int64_t E, std::int64_t M, std::int64_t K,
                       std::int64_t N, int dtype, int device, int align,
                       std::uintptr_t workspace, std::int64_t workspace_bytes,
                       std::uintptr_t stream);

}  // namespace microdit

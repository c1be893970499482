// Shared by every kernel in csrc/: dtype codes, 16-bit float storage types, readable checks.
//
// The extension never includes libtorch, so tensors arrive as raw addresses plus a dtype code;
// the codes below must match DTYPE_CODES in microdit/_ext.py.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <sstream>
#include <stdexcept>
#include <string>

#if defined(__CUDACC__)
#include <cuda_runtime.h>
#define MICRODIT_HD __host__ __device__ __forceinline__
#else
#define MICRODIT_HD inline
#endif

namespace microdit {

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };
constexpr int kNumDTypes = 4;

inline bool dtype_valid(int code) { return code >= 0 && code < kNumDTypes; }

inline const char* dtype_name(int code) {
  static constexpr const char* names[kNumDTypes] = {"float32", "float16", "bfloat16", "float64"};
  return dtype_valid(code) ? names[code] : "unknown";
}

inline std::size_t dtype_size(int code) {
  static constexpr std::size_t sizes[kNumDTypes] = {4, 2, 2, 8};
  return dtype_valid(code) ? sizes[code] : 0;
}

// fp16 and bf16 are carried as raw bits so that CPU code needs no cuda_fp16.h; any arithmetic
// converts to float first (as torch does on the CPU) and rounds back to nearest-even.
struct Half {
  std::uint16_t bits;
};
struct BFloat16 {
  std::uint16_t bits;
};

MICRODIT_HD float float_from_bits(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

MICRODIT_HD std::uint32_t bits_from_float(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

MICRODIT_HD float to_float(Half h) {
  const std::uint32_t sign = std::uint32_t(h.bits & 0x8000u) << 16;
  const std::uint32_t exponent = (h.bits >> 10) & 0x1fu;
  const std::uint32_t mantissa = h.bits & 0x3ffu;
  if (exponent == 0x1f) return float_from_bits(sign | 0x7f800000u | (mantissa << 13));  // inf, nan
  if (exponent == 0) {
    // Subnormal (or zero): mantissa * 2^-24 is exact in float, no normalisation loop needed.
    const float magnitude = float(mantissa) * 5.9604644775390625e-8f;
    return sign ? -magnitude : magnitude;
  }
  return float_from_bits(sign | ((exponent + 112u) << 23) | (mantissa << 13));  // rebias 15 -> 127
}

MICRODIT_HD Half to_half(float f) {
  const std::uint32_t x = bits_from_float(f);
  const std::uint16_t sign = std::uint16_t((x >> 16) & 0x8000u);
  const std::uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return {std::uint16_t(sign | 0x7e00u | ((ax >> 13) & 0x3ffu))};  // quiet nan
  if (ax >= 0x477ff000u) return {std::uint16_t(sign | 0x7c00u)};  // >= 65520 rounds to inf
  if (ax < 0x38800000u) {
    // Below the smallest normal half: the result is round(|f| * 2^24) units of 2^-24, and
    // rintf rounds half to even in the default rounding mode (1024 becomes the smallest normal).
    return {std::uint16_t(sign | std::uint16_t(rintf(float_from_bits(ax) * 16777216.0f)))};
  }
  const std::uint32_t rounded = ax + 0xfffu + ((ax >> 13) & 1u);  // nearest, ties to even
  return {std::uint16_t(sign | ((rounded - 0x38000000u) >> 13))};  // rebias 127 -> 15
}

MICRODIT_HD float to_float(BFloat16 h) { return float_from_bits(std::uint32_t(h.bits) << 16); }

MICRODIT_HD BFloat16 to_bfloat16(float f) {
  const std::uint32_t x = bits_from_float(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return {std::uint16_t((x >> 16) | 0x40u)};  // quiet nan
  return {std::uint16_t((x + 0x7fffu + ((x >> 16) & 1u)) >> 16)};  // nearest, ties to even
}

namespace detail {
template <typename... Args>
std::string concat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}
}  // namespace detail

}  // namespace microdit

// A bad input from the caller: std::invalid_argument, which pybind11 raises as ValueError.
// The message parts are streamed, e.g. MICRODIT_CHECK(k <= t, "op: K = ", k, " exceeds T = ", t).
#define MICRODIT_CHECK(cond, ...)                                               \
  do {                                                                          \
    if (!(cond)) throw std::invalid_argument(::microdit::detail::concat(__VA_ARGS__)); \
  } while (0)

// A failure that is not the caller's fault (a CUDA error, a broken invariant): RuntimeError,
// with the source location because someone will have to debug it.
#define MICRODIT_ENSURE(cond, ...)                                                         \
  do {                                                                                     \
    if (!(cond))                                                                           \
      throw std::runtime_error(                                                            \
          ::microdit::detail::concat(__VA_ARGS__, " [", __FILE__, ":", __LINE__, "]"));    \
  } while (0)

#if defined(__CUDACC__)
#define MICRODIT_CUDA_CHECK(expr, op)                                                    \
  do {                                                                                   \
    const cudaError_t microdit_err_ = (expr);                                            \
    MICRODIT_ENSURE(microdit_err_ == cudaSuccess, op, ": CUDA error ",                   \
                    cudaGetErrorName(microdit_err_), ": ", cudaGetErrorString(microdit_err_)); \
  } while (0)
#endif

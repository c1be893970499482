// CPU expert-choice dispatch and combine: OpenMP over output rows, each row written by one
// thread, inner loops over D left to the compiler's vectoriser.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "moe/moe.h"

namespace microdit {
namespace {

// Below this many bytes, waking the OpenMP team costs more than the work itself.
constexpr std::int64_t kParallelBytes = std::int64_t(1) << 16;

void check_idx(const char* op, const std::int64_t* idx, std::int64_t B, std::int64_t T,
               std::int64_t E, std::int64_t K) {
  // Serial on purpose: cheap next to the row work, and an exception cannot leave an OpenMP
  // region, so every index is validated before any row is touched.
  for (std::int64_t r = 0; r < B * E * K; ++r) {
    const std::int64_t t = idx[r];
    MICRODIT_CHECK(t >= 0 && t < T, op, ": idx[", r / (E * K), ", ", (r / K) % E, ", ", r % K,
                   "] = ", t, " is out of range for T = ", T, " tokens (valid: 0 <= idx < ", T,
                   ")");
  }
}

template <typename S>
void gather(const S* tokens, const std::int64_t* idx, const S* weight, S* blocks, std::int64_t B,
            std::int64_t T, std::int64_t E, std::int64_t K, std::int64_t D) {
  using A = typename Acc<S>::type;
  const std::int64_t rows = E * B * K;
#pragma omp parallel for schedule(static) if (rows * D * std::int64_t(sizeof(S)) >= kParallelBytes)
  for (std::int64_t r = 0; r < rows; ++r) {  // r = (e, b, j): the blocks' row
    const std::int64_t e = r / (B * K), b = (r / K) % B, j = r % K;
    const std::int64_t src_row = (b * E + e) * K + j;  // (b, e, j) in idx and weight
    const S* in = tokens + (b * T + idx[src_row]) * D;
    S* out = blocks + r * D;
    if (weight == nullptr) {
      std::memcpy(out, in, std::size_t(D) * sizeof(S));
    } else {
      const A w = load_acc(weight[src_row]);
      for (std::int64_t d = 0; d < D; ++d) out[d] = store_as<S>(w * load_acc(in[d]));
    }
  }
}

template <typename S>
void gather_dot(const S* grad, const S* blocks, const std::int64_t* idx, const S* weight,
                S* dblocks, S* dweight, std::int64_t B, std::int64_t T, std::int64_t E,
                std::int64_t K, std::int64_t D) {
  using A = typename Acc<S>::type;
  const std::int64_t rows = E * B * K;
#pragma omp parallel for schedule(static) if (rows * D * std::int64_t(sizeof(S)) >= kParallelBytes)
  for (std::int64_t r = 0; r < rows; ++r) {
    const std::int64_t e = r / (B * K), b = (r / K) % B, j = r % K;
    const std::int64_t src_row = (b * E + e) * K + j;
    const S* g = grad + (b * T + idx[src_row]) * D;
    if (dblocks != nullptr) {
      const A w = load_acc(weight[src_row]);
      S* out = dblocks + r * D;
      for (std::int64_t d = 0; d < D; ++d) out[d] = store_as<S>(w * load_acc(g[d]));
    }
    if (dweight != nullptr) {
      const S* y = blocks + r * D;
      A acc = 0;
#pragma omp simd reduction(+ : acc)
      for (std::int64_t d = 0; d < D; ++d) acc += load_acc(g[d]) * load_acc(y[d]);
      dweight[src_row] = store_as<S>(acc);
    }
  }
}

template <typename S>
void combine(const S* blocks, const std::int32_t* inv, const S* weight, S* tokens, std::int64_t B,
             std::int64_t T, std::int64_t E, std::int64_t K, std::int64_t D) {
  using A = typename Acc<S>::type;
  const std::int64_t rows = B * T;
#pragma omp parallel if (rows * D * std::int64_t(sizeof(S)) >= kParallelBytes)
  {
    std::vector<A> acc(static_cast<std::size_t>(D));
#pragma omp for schedule(static)
    for (std::int64_t r = 0; r < rows; ++r) {  // r = (b, t)
      const std::int64_t b = r / T;
      const std::int32_t* slots = inv + r * E;
      std::fill(acc.begin(), acc.end(), A(0));
      for (std::int64_t e = 0; e < E; ++e) {  // a fixed order: the result is deterministic
        const std::int64_t j = slots[e];
        if (j < 0) continue;
        const S* in = blocks + ((e * B + b) * K + j) * D;
        const A w = weight == nullptr ? A(1) : load_acc(weight[(b * E + e) * K + j]);
        A* a = acc.data();
        for (std::int64_t d = 0; d < D; ++d) a[d] += w * load_acc(in[d]);
      }
      S* out = tokens + r * D;
      for (std::int64_t d = 0; d < D; ++d) out[d] = store_as<S>(acc[d]);
    }
  }
}

#if defined(__GNUC__)
#define MICRODIT_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define MICRODIT_ALWAYS_INLINE inline
#endif

// ---- GELU in float without libm calls, so that the loop vectorises (branch-free selects).
// exp(v) for -80 <= v <= 0: 2^n * p(r), |r| <= ln2/2, Cody-Waite reduction; ~1 ulp.
MICRODIT_ALWAYS_INLINE float exp_neg(float v) {
  constexpr float kShift = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float n = (v * 1.44269504088896341f + kShift) - kShift;
  float r = v - n * 0.693145751953125f;  // ln2, high part (exact product)
  r = r - n * 1.428606765330187e-06f;    // ln2, low part
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const std::int32_t bits = (static_cast<std::int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// GELU and its derivative from one exponential: with a = |x|/sqrt2 and E = exp(-x^2/2),
// erfc(a) = E * erfcx(a), so Phi(x) = 1 - E erfcx(a)/2 for x >= 0 and E erfcx(a)/2 below
// (no cancellation in the left tail), and gelu'(x) = Phi(x) + x E / sqrt(2 pi).
// erfcx(a) = P(1 / (1 + a/2)): a least-squares fit, relative error 3e-7 in float.
MICRODIT_ALWAYS_INLINE void gelu_point(float x, float& value, float& slope) {
  const float a = (x < 0 ? -x : x) * 0.70710678118654752f;
  const float t = 1.0f / (1.0f + 0.5f * a);
  float p = 0.027294861435920914f;
  p = p * t - 0.13876065366350498f;
  p = p * t + 0.23893869983985916f;
  p = p * t - 0.0636204154422077f;
  p = p * t - 0.25312131590787307f;
  p = p * t + 0.19517637628133602f;
  p = p * t - 0.021076379701607077f;
  p = p * t + 0.2103761920748252f;
  p = p * t + 0.23975162953498974f;
  p = p * t + 0.28301127494570955f;
  p = p * t + 0.2820276060482186f;
  p = p * t + 2.1265043594123553e-06f;
  const float v = -0.5f * x * x;
  // Below -80 the tail is under 1e-35: zero, which also keeps denormals out of the products.
  const float e = v < -80.0f ? 0.0f : exp_neg(v < -80.0f ? -80.0f : v);
  const float tail = 0.5f * e * p;
  const float cdf = x < 0 ? tail : 1.0f - tail;
  value = x * cdf;
  slope = cdf + x * 0.39894228040143268f * e;
}

// One contiguous run of floats. GCC if-converts the selects above (and so vectorises the
// loop) only without -ftrapping-math; a second copy for CPUs with AVX2 and FMA is picked at
// run time (the baseline x86-64 build has neither).
#define MICRODIT_GELU_BODY                                                                 \
  {                                                                                        \
    for (std::int64_t i = 0; i < n; ++i) {                                                 \
      float value, slope;                                                                  \
      gelu_point(h[i], value, slope);                                                      \
      h[i] = value;                                                                        \
      d[i] = slope;                                                                        \
    }                                                                                      \
  }
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
__attribute__((optimize("O3,no-trapping-math"))) void gelu_run_base(
    float* __restrict h, float* __restrict d, std::int64_t n) MICRODIT_GELU_BODY
__attribute__((optimize("O3,no-trapping-math"), target("avx2,fma"))) void gelu_run_avx2(
    float* __restrict h, float* __restrict d, std::int64_t n) MICRODIT_GELU_BODY
const bool kHasAvx2Fma = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
void gelu_run(float* h, float* d, std::int64_t n) {
  return kHasAvx2Fma ? gelu_run_avx2(h, d, n) : gelu_run_base(h, d, n);
}
#else
void gelu_run(float* __restrict h, float* __restrict d, std::int64_t n) MICRODIT_GELU_BODY
#endif
#undef MICRODIT_GELU_BODY

constexpr std::int64_t kChunk = 4096;  // elements per task: fits L1 with its float copies

template <typename S>
void gelu(S* h, S* d, std::int64_t n) {
  const std::int64_t chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) if (n * std::int64_t(sizeof(S)) >= kParallelBytes)
  for (std::int64_t c = 0; c < chunks; ++c) {
    const std::int64_t i0 = c * kChunk, m = std::min(kChunk, n - i0);
    if constexpr (std::is_same_v<S, float>) {
      gelu_run(h + i0, d + i0, m);
    } else {  // 16-bit storage: through float copies
      float hf[kChunk], df[kChunk];
      for (std::int64_t i = 0; i < m; ++i) hf[i] = load_acc(h[i0 + i]);
      gelu_run(hf, df, m);
      for (std::int64_t i = 0; i < m; ++i) {
        h[i0 + i] = store_as<S>(hf[i]);
        d[i0 + i] = store_as<S>(df[i]);
      }
    }
  }
}

template <>
void gelu<double>(double* h, double* d, std::int64_t n) {  // exact, for float64 checks
  constexpr double kInvSqrt2 = 0.70710678118654752440, kInvSqrt2Pi = 0.39894228040143267794;
#pragma omp parallel for schedule(static) if (n * 8 >= kParallelBytes)
  for (std::int64_t i = 0; i < n; ++i) {
    const double x = h[i];
    const double cdf = 0.5 + 0.5 * std::erf(x * kInvSqrt2);
    d[i] = cdf + x * kInvSqrt2Pi * std::exp(-0.5 * x * x);
    h[i] = x * cdf;
  }
}

}  // namespace

void moe_inverse_cpu(std::uintptr_t idx_addr, std::uintptr_t inv_addr, std::int64_t B,
                     std::int64_t T, std::int64_t E, std::int64_t K) {
  constexpr const char* op = "moe_inverse";
  check_moe_args(op, B, T, E, K, 0, kFloat32);
  if (B * T * E == 0) return;
  MICRODIT_CHECK(inv_addr != 0 && (K == 0 || idx_addr != 0), op, ": idx or inv is a null pointer");
  const auto* idx = reinterpret_cast<const std::int64_t*>(idx_addr);
  auto* inv = reinterpret_cast<std::int32_t*>(inv_addr);
  check_idx(op, idx, B, T, E, K);
  // Built in a scratch buffer so that a repeated index leaves `inv` untouched.
  std::vector<std::int32_t> map(static_cast<std::size_t>(B * T * E), -1);
  for (std::int64_t b = 0; b < B; ++b) {
    for (std::int64_t e = 0; e < E; ++e) {
      for (std::int64_t j = 0; j < K; ++j) {
        const std::int64_t t = idx[(b * E + e) * K + j];
        std::int32_t& slot = map[static_cast<std::size_t>((b * T + t) * E + e)];
        MICRODIT_CHECK(slot < 0, op, ": expert ", e, " of sample ", b, " chooses token ", t,
                       " twice (slots ", slot, " and ", j, "); its indices must be unique");
        slot = std::int32_t(j);
      }
    }
  }
  std::memcpy(inv, map.data(), map.size() * sizeof(std::int32_t));
}

void moe_dispatch_cpu(std::uintptr_t tokens, std::uintptr_t idx, std::uintptr_t weight,
                    std::uintptr_t blocks, std::int64_t B, std::int64_t T, std::int64_t E,
                    std::int64_t K, std::int64_t D, int dtype) {
  constexpr const char* op = "moe_dispatch";
  check_moe_args(op, B, T, E, K, D, dtype);
  if (B * E * K == 0) return;
  MICRODIT_CHECK(idx != 0, op, ": idx is a null pointer but B * E * K = ", B * E * K);
  check_idx(op, reinterpret_cast<const std::int64_t*>(idx), B, T, E, K);
  if (D == 0) return;
  MICRODIT_CHECK(tokens != 0 && blocks != 0, op, ": tokens or blocks is a null pointer");
  dispatch_dtype(dtype, [&](auto tag) {
    using S = decltype(tag);
    gather(reinterpret_cast<const S*>(tokens), reinterpret_cast<const std::int64_t*>(idx),
           reinterpret_cast<const S*>(weight), reinterpret_cast<S*>(blocks), B, T, E, K, D);
  });
}

void moe_combine_backward_cpu(std::uintptr_t grad, std::uintptr_t blocks, std::uintptr_t idx,
                        std::uintptr_t weight, std::uintptr_t dblocks, std::uintptr_t dweight,
                        std::int64_t B, std::int64_t T, std::int64_t E, std::int64_t K,
                        std::int64_t D, int dtype) {
  constexpr const char* op = "moe_combine_backward";
  check_moe_args(op, B, T, E, K, D, dtype);
  if (B * E * K == 0) return;
  MICRODIT_CHECK(idx != 0, op, ": idx is a null pointer but B * E * K = ", B * E * K);
  check_idx(op, reinterpret_cast<const std::int64_t*>(idx), B, T, E, K);
  MICRODIT_CHECK(dblocks == 0 || weight != 0, op, ": dblocks needs weight");
  MICRODIT_CHECK(dweight == 0 || blocks != 0, op, ": dweight needs blocks");
  MICRODIT_CHECK(D == 0 || grad != 0, op, ": grad is a null pointer");
  dispatch_dtype(dtype, [&](auto tag) {
    using S = decltype(tag);
    gather_dot(reinterpret_cast<const S*>(grad), reinterpret_cast<const S*>(blocks),
               reinterpret_cast<const std::int64_t*>(idx), reinterpret_cast<const S*>(weight),
               reinterpret_cast<S*>(dblocks), reinterpret_cast<S*>(dweight), B, T, E, K, D);
  });
}

void moe_combine_cpu(std::uintptr_t blocks, std::uintptr_t inv, std::uintptr_t weight,
                     std::uintptr_t tokens, std::int64_t B, std::int64_t T, std::int64_t E,
                     std::int64_t K, std::int64_t D, int dtype) {
  constexpr const char* op = "moe_combine";
  check_moe_args(op, B, T, E, K, D, dtype);
  if (B * T * D == 0) return;
  MICRODIT_CHECK(tokens != 0 && (E == 0 || inv != 0), op, ": tokens or inv is a null pointer");
  const auto* map = reinterpret_cast<const std::int32_t*>(inv);
  // The map is trusted by the kernel but cheap to validate: a bad slot would read out of bounds.
  for (std::int64_t r = 0; r < B * T * E; ++r) {
    MICRODIT_CHECK(map[r] >= -1 && map[r] < K, op, ": inv[", r / (T * E), ", ", (r / E) % T, ", ",
                   r % E, "] = ", map[r], " is not a slot in [0, K = ", K, ") or -1");
  }
  MICRODIT_CHECK(K == 0 || E == 0 || blocks != 0, op, ": blocks is a null pointer");
  dispatch_dtype(dtype, [&](auto tag) {
    using S = decltype(tag);
    combine(reinterpret_cast<const S*>(blocks), map, reinterpret_cast<const S*>(weight),
            reinterpret_cast<S*>(tokens), B, T, E, K, D);
  });
}

void moe_gelu_cpu(std::uintptr_t h, std::uintptr_t d, std::int64_t n, int dtype) {
  constexpr const char* op = "moe_gelu";
  MICRODIT_CHECK(dtype_valid(dtype), op, ": unknown dtype code ", dtype,
                 " (expected 0=float32, 1=float16, 2=bfloat16, 3=float64)");
  MICRODIT_CHECK(n >= 0, op, ": n must be non-negative, got ", n);
  if (n == 0) return;
  MICRODIT_CHECK(h != 0 && d != 0, op, ": h or d is a null pointer");
  dispatch_dtype(dtype, [&](auto tag) {
    using S = decltype(tag);
    gelu(reinterpret_cast<S*>(h), reinterpret_cast<S*>(d), n);
  });
}

}  // namespace microdit

// cuBLASLt GEMMs with a GELU / GELU-backward epilogue for the MoE experts; see moe_cublaslt.h.
//
// cuBLASLt is column-major: a row-major (R, C) matrix with leading dimension C is the
// column-major (C, R) one. So the row-major out (M, N) = x (M, K) @ w1 (K, N) is computed as the
// column-major D (N x M) = W1 (N x K) * X (K x M) with no transposes, and the backward's
// dh (M, N) = dy (M, K) @ w2 (N, K)^T as D (N x M) = op_T(W2 stored K x N) * DY (K x M).
#include "moe/moe_cublaslt.h"

#include <dlfcn.h>

#include <algorithm>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <tuple>
#include <vector>

#include "common.h"

#if defined(__has_include)
#if __has_include(<cublasLt.h>)
#include <cublasLt.h>
#define MICRODIT_HAVE_CUBLASLT_H 1
#endif
#endif

namespace microdit {
namespace {

// The part of cuBLASLt's C ABI used here (cublasLt.h, cublas_api.h, library_types.h; stable
// since CUDA 11.4 and unchanged in 12 and 13). Where the real header is on the include path
// the values are checked against it at compile time (below).
namespace lt {
using Status = int;
using Handle = void*;
using MatmulDesc = void*;
using Layout = void*;
using Preference = void*;
struct Algo {
  std::uint64_t data[8];
};
struct HeuristicResult {
  Algo algo;
  std::size_t workspace_size;
  Status state;
  float waves_count;
  int reserved[4];
};
constexpr Status kSuccess = 0;
constexpr int kComputeF32 = 68;                 // CUBLAS_COMPUTE_32F
constexpr int kR32F = 0, kR16F = 2, kR16BF = 14;  // CUDA_R_32F, CUDA_R_16F, CUDA_R_16BF
constexpr std::int32_t kOpN = 0, kOpT = 1;      // CUBLAS_OP_N, CUBLAS_OP_T
constexpr int kDescTransA = 3, kDescTransB = 4, kDescEpilogue = 7;
constexpr int kDescAuxPointer = 11, kDescAuxLd = 12, kDescAuxBatchStride = 13;
constexpr int kLayoutBatchCount = 5, kLayoutBatchStride = 6;
constexpr int kPrefMaxWorkspace = 1, kPrefAlignA = 5, kPrefAlignB = 6, kPrefAlignC = 7,
              kPrefAlignD = 8;
constexpr std::uint32_t kEpilogueGeluAux = 32 | 128;  // CUBLASLT_EPILOGUE_GELU_AUX
constexpr std::uint32_t kEpilogueDgelu = 64 | 128;    // CUBLASLT_EPILOGUE_DGELU
}  // namespace lt

#if defined(MICRODIT_HAVE_CUBLASLT_H)
static_assert(lt::kComputeF32 == CUBLAS_COMPUTE_32F && lt::kR32F == CUDA_R_32F &&
              lt::kR16F == CUDA_R_16F && lt::kR16BF == CUDA_R_16BF && lt::kOpN == CUBLAS_OP_N &&
              lt::kOpT == CUBLAS_OP_T);
static_assert(lt::kDescTransA == CUBLASLT_MATMUL_DESC_TRANSA &&
              lt::kDescTransB == CUBLASLT_MATMUL_DESC_TRANSB &&
              lt::kDescEpilogue == CUBLASLT_MATMUL_DESC_EPILOGUE &&
              lt::kDescAuxPointer == CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER &&
              lt::kDescAuxLd == CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD &&
              lt::kDescAuxBatchStride == CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_BATCH_STRIDE);
static_assert(lt::kLayoutBatchCount == CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT &&
              lt::kLayoutBatchStride == CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET &&
              lt::kPrefMaxWorkspace == CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES &&
              lt::kPrefAlignA == CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES &&
              lt::kPrefAlignB == CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES &&
              lt::kPrefAlignC == CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES &&
              lt::kPrefAlignD == CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES);
static_assert(lt::kEpilogueGeluAux == CUBLASLT_EPILOGUE_GELU_AUX &&
              lt::kEpilogueDgelu == CUBLASLT_EPILOGUE_DGELU);
static_assert(sizeof(lt::Algo) == sizeof(cublasLtMatmulAlgo_t) &&
              sizeof(lt::HeuristicResult) == sizeof(cublasLtMatmulHeuristicResult_t) &&
              offsetof(lt::HeuristicResult, state) == offsetof(cublasLtMatmulHeuristicResult_t, state));
#endif

// The functions, resolved once from the library.
struct Api {
  std::string error;  // "" when loaded
  std::int64_t version = 0;
  lt::Status (*create)(lt::Handle*) = nullptr;
  const char* (*status_string)(lt::Status) = nullptr;
  std::size_t (*get_version)() = nullptr;
  lt::Status (*desc_create)(lt::MatmulDesc*, int, int) = nullptr;
  lt::Status (*desc_destroy)(lt::MatmulDesc) = nullptr;
  lt::Status (*desc_set)(lt::MatmulDesc, int, const void*, std::size_t) = nullptr;
  lt::Status (*layout_create)(lt::Layout*, int, std::uint64_t, std::uint64_t, std::int64_t) = nullptr;
  lt::Status (*layout_destroy)(lt::Layout) = nullptr;
  lt::Status (*layout_set)(lt::Layout, int, const void*, std::size_t) = nullptr;
  lt::Status (*pref_create)(lt::Preference*) = nullptr;
  lt::Status (*pref_destroy)(lt::Preference) = nullptr;
  lt::Status (*pref_set)(lt::Preference, int, const void*, std::size_t) = nullptr;
  lt::Status (*heuristic)(lt::Handle, lt::MatmulDesc, lt::Layout, lt::Layout, lt::Layout, lt::Layout,
                          lt::Preference, int, lt::HeuristicResult*, int*) = nullptr;
  lt::Status (*matmul)(lt::Handle, lt::MatmulDesc, const void*, const void*, lt::Layout, const void*,
                       lt::Layout, const void*, const void*, lt::Layout, void*, lt::Layout,
                       const lt::Algo*, void*, std::size_t, void*) = nullptr;
};

template <typename F>
bool resolve(void* lib, const char* name, F& fn, std::string& missing) {
  void* p = dlsym(lib, name);
  if (p == nullptr) {
    missing += missing.empty() ? name : std::string(", ") + name;
    return false;
  }
  fn = reinterpret_cast<F>(p);
  return true;
}

Api load_api() {
  Api api;
  std::vector<std::string> names;
  if (const char* env = std::getenv("MICRODIT_CUBLASLT"); env != nullptr && *env != '\0') {
    names.emplace_back(env);
  } else {
    names = {"libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so"};
  }
  void* lib = nullptr;
  std::string tried;
  for (const std::string& name : names) {
    lib = dlopen(name.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (lib != nullptr) break;
    const char* why = dlerror();
    tried += (tried.empty() ? "" : "; ") + std::string(why != nullptr ? why : name.c_str());
  }
  if (lib == nullptr) {
    api.error = "libcublasLt not found (" + tried +
                "); it comes with a CUDA build of torch (nvidia-cublas), or set MICRODIT_CUBLASLT "
                "to its path";
    return api;
  }
  std::string missing;
  bool ok = true;
  ok &= resolve(lib, "cublasLtCreate", api.create, missing);
  ok &= resolve(lib, "cublasLtGetStatusString", api.status_string, missing);
  ok &= resolve(lib, "cublasLtGetVersion", api.get_version, missing);
  ok &= resolve(lib, "cublasLtMatmulDescCreate", api.desc_create, missing);
  ok &= resolve(lib, "cublasLtMatmulDescDestroy", api.desc_destroy, missing);
  ok &= resolve(lib, "cublasLtMatmulDescSetAttribute", api.desc_set, missing);
  ok &= resolve(lib, "cublasLtMatrixLayoutCreate", api.layout_create, missing);
  ok &= resolve(lib, "cublasLtMatrixLayoutDestroy", api.layout_destroy, missing);
  ok &= resolve(lib, "cublasLtMatrixLayoutSetAttribute", api.layout_set, missing);
  ok &= resolve(lib, "cublasLtMatmulPreferenceCreate", api.pref_create, missing);
  ok &= resolve(lib, "cublasLtMatmulPreferenceDestroy", api.pref_destroy, missing);
  ok &= resolve(lib, "cublasLtMatmulPreferenceSetAttribute", api.pref_set, missing);
  ok &= resolve(lib, "cublasLtMatmulAlgoGetHeuristic", api.heuristic, missing);
  ok &= resolve(lib, "cublasLtMatmul", api.matmul, missing);
  if (!ok) {
    api.error = "libcublasLt lacks " + missing;
    return api;
  }
  api.version = std::int64_t(api.get_version());
  if (api.version < 11400) {  // the GELU_AUX / DGELU epilogues with batch strides
    api.error = "libcublasLt " + std::to_string(api.version) + " is older than 11.4";
  }
  return api;
}

const Api& api() {
  static const Api instance = load_api();  // thread-safe once
  return instance;
}

const Api& checked_api(const char* op) {
  const Api& a = api();
  MICRODIT_ENSURE(a.error.empty(), op, ": ", a.error);
  return a;
}

void check_status(const Api& a, lt::Status s, const char* op, const char* what) {
  MICRODIT_ENSURE(s == lt::kSuccess, op, ": ", what, " failed: ", a.status_string(s), " (", s, ")");
}

std::mutex g_mutex;

lt::Handle handle_for(const Api& a, int device, const char* op) {
  static std::map<int, lt::Handle> handles;  // one per device, never destroyed (process lifetime)
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = handles.find(device);
  if (it != handles.end()) return it->second;
  lt::Handle h = nullptr;
  check_status(a, a.create(&h), op, "cublasLtCreate");
  handles.emplace(device, h);
  return h;
}

// Descriptors owned for one call.
struct Desc {
  const Api& a;
  lt::MatmulDesc desc = nullptr;
  std::vector<lt::Layout> layouts;
  lt::Preference pref = nullptr;
  explicit Desc(const Api& api_) : a(api_) {}
  Desc(const Desc&) = delete;
  Desc& operator=(const Desc&) = delete;
  ~Desc() {
    if (pref != nullptr) a.pref_destroy(pref);
    for (lt::Layout l : layouts) a.layout_destroy(l);
    if (desc != nullptr) a.desc_destroy(desc);
  }
};

// One GEMM in column-major terms: D (m x n) = op(A) (m x k) * B (k x n), each operand `batch`
// times at the given element strides, with an epilogue reading or writing aux (m x n, ld m).
struct Gemm {
  std::uint32_t epilogue;
  std::int32_t trans_a;
  std::int64_t m, n, k;
  std::int64_t lda, ldb, ldd;
  std::int64_t stride_a, stride_b, stride_d;
  int dtype;  // a CUDA data type code
};

lt::Layout make_layout(Desc& d, const char* op, int dtype, std::int64_t rows, std::int64_t cols,
                       std::int64_t ld, std::int32_t batch, std::int64_t stride) {
  lt::Layout l = nullptr;
  check_status(d.a, d.a.layout_create(&l, dtype, std::uint64_t(rows), std::uint64_t(cols), ld), op,
               "cublasLtMatrixLayoutCreate");
  d.layouts.push_back(l);
  if (batch > 1) {
    check_status(d.a, d.a.layout_set(l, lt::kLayoutBatchCount, &batch, sizeof(batch)), op,
                 "setting the batch count");
    check_status(d.a, d.a.layout_set(l, lt::kLayoutBatchStride, &stride, sizeof(stride)), op,
                 "setting the batch stride");
  }
  return l;
}

// Builds the descriptors for `batch` GEMMs; aux is set per call (it is part of the descriptor).
void describe(Desc& d, const char* op, const Gemm& g, std::int32_t batch, std::int64_t ws_bytes,
              std::uint32_t align) {
  const Api& a = d.a;
  check_status(a, a.desc_create(&d.desc, lt::kComputeF32, lt::kR32F), op, "cublasLtMatmulDescCreate");
  const std::int32_t trans_b = lt::kOpN;
  check_status(a, a.desc_set(d.desc, lt::kDescTransA, &g.trans_a, sizeof(g.trans_a)), op, "TRANSA");
  check_status(a, a.desc_set(d.desc, lt::kDescTransB, &trans_b, sizeof(trans_b)), op, "TRANSB");
  check_status(a, a.desc_set(d.desc, lt::kDescEpilogue, &g.epilogue, sizeof(g.epilogue)), op, "EPILOGUE");
  const std::int64_t aux_ld = g.m, aux_stride = g.stride_d;
  check_status(a, a.desc_set(d.desc, lt::kDescAuxLd, &aux_ld, sizeof(aux_ld)), op, "EPILOGUE_AUX_LD");
  if (batch > 1) {
    check_status(a, a.desc_set(d.desc, lt::kDescAuxBatchStride, &aux_stride, sizeof(aux_stride)), op,
                 "EPILOGUE_AUX_BATCH_STRIDE");
  }
  const bool ta = g.trans_a == lt::kOpT;
  make_layout(d, op, g.dtype, ta ? g.k : g.m, ta ? g.m : g.k, g.lda, batch, g.stride_a);
  make_layout(d, op, g.dtype, g.k, g.n, g.ldb, batch, g.stride_b);
  make_layout(d, op, g.dtype, g.m, g.n, g.ldd, batch, g.stride_d);  // C and D
  check_status(a, a.pref_create(&d.pref), op, "cublasLtMatmulPreferenceCreate");
  const std::uint64_t ws = std::uint64_t(ws_bytes);
  check_status(a, a.pref_set(d.pref, lt::kPrefMaxWorkspace, &ws, sizeof(ws)), op, "MAX_WORKSPACE_BYTES");
  for (int attr : {lt::kPrefAlignA, lt::kPrefAlignB, lt::kPrefAlignC, lt::kPrefAlignD}) {
    check_status(a, a.pref_set(d.pref, attr, &align, sizeof(align)), op, "MIN_ALIGNMENT");
  }
}

// The heuristic's first algorithm for these descriptors, or false when it has none.
bool find_algo(Desc& d, lt::Handle h, lt::Algo& algo) {
  lt::HeuristicResult result;
  std::memset(&result, 0, sizeof(result));
  int count = 0;
  const lt::Status s = d.a.heuristic(h, d.desc, d.layouts[0], d.layouts[1], d.layouts[2],
                                     d.layouts[2], d.pref, 1, &result, &count);
  if (s != lt::kSuccess || count < 1 || result.state != lt::kSuccess) return false;
  algo = result.algo;
  return true;
}

using Key = std::tuple<int, std::uint32_t, std::int32_t, std::int64_t, std::int64_t, std::int64_t,
                       std::int64_t, int, std::uint32_t, std::int64_t>;
struct Plan {
  bool batched;  // one strided-batched call; else a loop of single GEMMs
  lt::Algo algo;
};

std::uint32_t pow2_divisor(std::uint64_t v, std::uint32_t cap) {
  std::uint32_t a = 1;
  while (a < cap && v % (2 * a) == 0) a *= 2;
  return a;
}

void run(const char* op, const Gemm& g, std::int64_t E, std::uintptr_t A, std::uintptr_t B,
         std::uintptr_t D, std::uintptr_t aux, int device, int align, std::uintptr_t workspace,
         std::int64_t ws_bytes, std::uintptr_t stream) {
  const Api& a = checked_api(op);
  const lt::Handle h = handle_for(a, device, op);
  const std::size_t esize = 2;  // fp16 / bf16
  // Per-expert operands start at multiples of their strides: the loop's alignment.
  std::uint32_t loop_align = std::uint32_t(align);
  for (std::int64_t s : {g.stride_a, g.stride_b, g.stride_d}) {
    loop_align = std::min(loop_align, pow2_divisor(std::uint64_t(s) * esize, 256));
  }
  const Key key{device, g.epilogue, g.trans_a, g.m, g.n, g.k, E, g.dtype, std::uint32_t(align), ws_bytes};
  static std::map<Key, Plan> plans;
  Plan plan{};
  bool known;
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    auto it = plans.find(key);
    known = it != plans.end();
    if (known) plan = it->second;
  }
  const std::int32_t batch = std::int32_t(E);
  if (!known) {
    Desc batched(a);
    describe(batched, op, g, batch, ws_bytes, std::uint32_t(align));
    plan.batched = batch == 1 ? false : find_algo(batched, h, plan.algo);
    if (!plan.batched) {
      Desc single(a);
      describe(single, op, g, 1, ws_bytes, loop_align);
      MICRODIT_ENSURE(find_algo(single, h, plan.algo), op,
                      ": cuBLASLt has no algorithm for this GEMM with its GELU epilogue (m=", g.m,
                      " n=", g.n, " k=", g.k, ", dtype code ", g.dtype, ", ", align,
                      "-byte aligned operands, ", ws_bytes, " bytes of workspace)");
    }
    std::lock_guard<std::mutex> lock(g_mutex);
    plans.emplace(key, plan);
  }
  const float alpha = 1.0f, beta = 0.0f;
  void* ws = reinterpret_cast<void*>(workspace);
  void* st = reinterpret_cast<void*>(stream);
  Desc d(a);
  if (plan.batched) {
    describe(d, op, g, batch, ws_bytes, std::uint32_t(align));
    const void* auxp = reinterpret_cast<const void*>(aux);
    check_status(a, a.desc_set(d.desc, lt::kDescAuxPointer, &auxp, sizeof(auxp)), op, "EPILOGUE_AUX_POINTER");
    void* dp = reinterpret_cast<void*>(D);
    check_status(a, a.matmul(h, d.desc, &alpha, reinterpret_cast<const void*>(A), d.layouts[0],
                             reinterpret_cast<const void*>(B), d.layouts[1], &beta, dp, d.layouts[2],
                             dp, d.layouts[2], &plan.algo, ws, std::size_t(ws_bytes), st),
                 op, "cublasLtMatmul");
    return;
  }
  describe(d, op, g, 1, ws_bytes, loop_align);
  for (std::int64_t e = 0; e < E; ++e) {
    const void* auxp = reinterpret_cast<const void*>(aux + std::uintptr_t(e * g.stride_d) * esize);
    check_status(a, a.desc_set(d.desc, lt::kDescAuxPointer, &auxp, sizeof(auxp)), op, "EPILOGUE_AUX_POINTER");
    void* dp = reinterpret_cast<void*>(D + std::uintptr_t(e * g.stride_d) * esize);
    check_status(a, a.matmul(h, d.desc, &alpha, reinterpret_cast<const void*>(A + std::uintptr_t(e * g.stride_a) * esize),
                             d.layouts[0], reinterpret_cast<const void*>(B + std::uintptr_t(e * g.stride_b) * esize),
                             d.layouts[1], &beta, dp, d.layouts[2], dp, d.layouts[2], &plan.algo, ws,
                             std::size_t(ws_bytes), st),
                 op, "cublasLtMatmul");
  }
}

int cuda_type(const char* op, int dtype) {
  MICRODIT_CHECK(dtype == kFloat16 || dtype == kBFloat16, op, ": dtype code ", dtype,
                 " not supported (1=float16 or 2=bfloat16: the epilogue's tanh GELU is exact only "
                 "to their rounding)");
  return dtype == kFloat16 ? lt::kR16F : lt::kR16BF;
}

void check_sizes(const char* op, std::int64_t E, std::int64_t M, std::int64_t K, std::int64_t N,
                 int align, std::int64_t ws_bytes) {
  MICRODIT_CHECK(E >= 1 && M >= 1 && K >= 1 && N >= 1, op, ": sizes must be positive, got E=", E,
                 " M=", M, " K=", K, " N=", N);
  MICRODIT_CHECK(E <= INT32_MAX, op, ": E = ", E, " exceeds cuBLASLt's int32 batch count");
  MICRODIT_CHECK(N % 8 == 0, op, ": N = ", N,
                 " must be a multiple of 8 (the epilogue's auxiliary leading dimension)");
  MICRODIT_CHECK(align >= 2 && align <= 256 && (align & (align - 1)) == 0, op, ": align = ", align,
                 " must be a power of two in [2, 256]");
  MICRODIT_CHECK(ws_bytes >= 0, op, ": workspace_bytes must be non-negative, got ", ws_bytes);
}

}  // namespace

std::string cublaslt_load_error() { return api().error; }

std::int64_t cublaslt_version() { return api().error.empty() ? api().version : 0; }

void moe_gemm_gelu_aux_lt(std::uintptr_t x, std::uintptr_t w1, std::uintptr_t out,
                          std::uintptr_t aux, std::int64_t E, std::int64_t M, std::int64_t K,
                          std::int64_t N, int dtype, int device, int align,
                          std::uintptr_t workspace, std::int64_t workspace_bytes,
                          std::uintptr_t stream) {
  constexpr const char* op = "moe_gemm_gelu_aux_lt";
  const int type = cuda_type(op, dtype);
  check_sizes(op, E, M, K, N, align, workspace_bytes);
  MICRODIT_CHECK(x != 0 && w1 != 0 && out != 0 && aux != 0, op, ": a null pointer");
  // D (N x M) = W1 (N x K, ld N) * X (K x M, ld K)
  const Gemm g{lt::kEpilogueGeluAux, lt::kOpN, N, M, K, N, K, N, K * N, M * K, M * N, type};
  run(op, g, E, w1, x, out, aux, device, align, workspace, workspace_bytes, stream);
}

void moe_gemm_dgelu_lt(std::uintptr_t dy, std::uintptr_t w2, std::uintptr_t aux,
                       std::uintptr_t out, std::int64_t E, std::int64_t M, std::int64_t K,
                       std::int64_t N, int dtype, int device, int align,
                       std::uintptr_t workspace, std::int64_t workspace_bytes,
                       std::uintptr_t stream) {
  constexpr const char* op = "moe_gemm_dgelu_lt";
  const int type = cuda_type(op, dtype);
  check_sizes(op, E, M, K, N, align, workspace_bytes);
  MICRODIT_CHECK(dy != 0 && w2 != 0 && out != 0 && aux != 0, op, ": a null pointer");
  // D (N x M) = op_T(W2 stored K x N, ld K) * DY (K x M, ld K)
  const Gemm g{lt::kEpilogueDgelu, lt::kOpT, N, M, K, K, K, N, N * K, M * K, M * N, type};
  run(op, g, E, w2, dy, out, aux, device, align, workspace, workspace_bytes, stream);
}

}  // namespace microdit

// CPU kernel of hprune::scaled_adamw_: AdamW with a learning rate per tensor, all tensors in one
// fused pass (read p, g, m, v once; write p, m, v once), chunks of every tensor spread over the
// intra-op threads. Registered as torch.ops.hprune._scaled_adamw_cpu; the Python op computes the
// per-tensor scalars (hyper_table) and validates the arguments before calling it.
//
// Only <torch/library.h> and ATen headers: <torch/extension.h> costs ~55 s per translation unit.
// Vectorises with -fno-math-errno (setup.py): sqrt's errno check is control flow in the loop.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace hprune {
namespace {

// Elements per task: large enough to amortise the task, small enough to balance two-to-many
// threads over a few big tensors.
constexpr int64_t kChunk = 1 << 15;
// Below this many elements in total the step runs on the calling thread: a parallel region
// costs more than the work (and much more when the machine is oversubscribed).
constexpr int64_t kSerialBelow = 1 << 18;

struct Work {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

struct Scalars {
  float step_size, bc2_sqrt, decay;  // per tensor (hyper_table)
  float w1, beta2, omb2, eps;        // per call
};

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }
template <typename P> inline P from_float(float x);
template <> inline float from_float<float>(float x) { return x; }
// c10::BFloat16(float) rounds to nearest even, the same as torch's .to(torch.bfloat16).
template <> inline c10::BFloat16 from_float<c10::BFloat16>(float x) { return c10::BFloat16(x); }

// The operations of torch.optim.AdamW's single-tensor step, in its order, in fp32.
template <typename P, bool kLerpSmall>
inline __attribute__((always_inline)) void update_range(P* __restrict p, const P* __restrict g,
                                                        float* __restrict m, float* __restrict v,
                                                        int64_t begin, int64_t end, const Scalars s) {
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    const float gi = to_float(g[i]);
    const float pi = to_float(p[i]) * s.decay;
    const float mi0 = m[i];
    // torch's lerp(m, g, w1) picks one of two formulas depending on |w1| < 0.5
    const float mi = kLerpSmall ? mi0 + s.w1 * (gi - mi0) : gi - (gi - mi0) * (1.0f - s.w1);
    const float vi = v[i] * s.beta2 + s.omb2 * gi * gi;
    const float denom = std::sqrt(vi) / s.bc2_sqrt + s.eps;
    p[i] = from_float<P>(pi - s.step_size * (mi / denom));
    m[i] = mi;
    v[i] = vi;
  }
}

// One compiled copy per instruction set, picked once at load time (GCC/Clang function
// multi-versioning): the wheel's baseline is SSE2, where the two divisions and the sqrt per element
// make one core compute-bound; AVX2 / AVX-512 copies keep it at memory speed. The loop bodies are
// inlined into each clone, so each is vectorised for its target. The AVX2 / AVX-512 copies may
// contract a*b+c into FMAs (as nvcc and Triton do on the GPU): last-bit differences from the
// baseline copy and from the reference, within the tests' 1e-6 relative bound.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define HPRUNE_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define HPRUNE_CLONES
#endif

#define HPRUNE_DEFINE_UPDATE(NAME, P, SMALL)                                                          \
  HPRUNE_CLONES void NAME(P* __restrict p, const P* __restrict g, float* __restrict m,                \
                          float* __restrict v, int64_t begin, int64_t end, const Scalars& s) {        \
    update_range<P, SMALL>(p, g, m, v, begin, end, s);                                                \
  }
HPRUNE_DEFINE_UPDATE(update_f32_small, float, true)
HPRUNE_DEFINE_UPDATE(update_f32_large, float, false)
HPRUNE_DEFINE_UPDATE(update_bf16_small, c10::BFloat16, true)
HPRUNE_DEFINE_UPDATE(update_bf16_large, c10::BFloat16, false)
#undef HPRUNE_DEFINE_UPDATE

inline void update(float* p, const float* g, float* m, float* v, int64_t b, int64_t e, const Scalars& s,
                   bool small) {
  small ? update_f32_small(p, g, m, v, b, e, s) : update_f32_large(p, g, m, v, b, e, s);
}
inline void update(c10::BFloat16* p, const c10::BFloat16* g, float* m, float* v, int64_t b, int64_t e,
                   const Scalars& s, bool small) {
  small ? update_bf16_small(p, g, m, v, b, e, s) : update_bf16_large(p, g, m, v, b, e, s);
}

template <typename P>
void run(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
         const float* hyper, double beta1, double beta2, double eps) {
  const int64_t n = static_cast<int64_t>(params.size());
  std::vector<Work> work;
  int64_t total = 0;
  for (int64_t t = 0; t < n; ++t) {
    const int64_t numel = params[t].numel();
    total += numel;
    for (int64_t b = 0; b < numel; b += kChunk) work.push_back({t, b, std::min(numel, b + kChunk)});
  }
  const float w1 = static_cast<float>(1.0 - beta1);
  const bool lerp_small = std::abs(w1) < 0.5f;
  const auto body = [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const Work& w = work[k];
      const int64_t t = w.tensor;
      const Scalars s{hyper[t], hyper[n + t], hyper[2 * n + t], w1, static_cast<float>(beta2),
                      static_cast<float>(1.0 - beta2), static_cast<float>(eps)};
      P* p = params[t].data_ptr<P>();
      const P* g = grads[t].data_ptr<P>();
      float* m = exp_avgs[t].data_ptr<float>();
      float* v = exp_avg_sqs[t].data_ptr<float>();
      update(p, g, m, v, w.begin, w.end, s, lerp_small);
    }
  };
  const int64_t items = static_cast<int64_t>(work.size());
  if (total < kSerialBelow) {
    body(0, items);
  } else {
    at::parallel_for(0, items, 1, body);
  }
}

void scaled_adamw_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                      at::TensorList exp_avg_sqs, const at::Tensor& hyper, double beta1, double beta2,
                      double eps) {
  const int64_t n = static_cast<int64_t>(params.size());
  TORCH_CHECK(static_cast<int64_t>(grads.size()) == n && static_cast<int64_t>(exp_avgs.size()) == n &&
                  static_cast<int64_t>(exp_avg_sqs.size()) == n,
              "_scaled_adamw_cpu: mismatched list lengths");
  if (n == 0) return;
  TORCH_CHECK(hyper.device().is_cpu() && hyper.scalar_type() == at::kFloat && hyper.is_contiguous() &&
                  hyper.numel() == 3 * n,
              "_scaled_adamw_cpu: hyper must be a contiguous CPU float32 [3, n] table");
  const auto dtype = params[0].scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16,
              "_scaled_adamw_cpu: parameters must be float32 or bfloat16, got ", dtype);
  for (int64_t t = 0; t < n; ++t) {
    const auto& p = params[t];
    TORCH_CHECK(p.device().is_cpu() && grads[t].device().is_cpu() && exp_avgs[t].device().is_cpu() &&
                    exp_avg_sqs[t].device().is_cpu(),
                "_scaled_adamw_cpu: tensor ", t, " is not on the CPU");
    TORCH_CHECK(p.scalar_type() == dtype && grads[t].scalar_type() == dtype &&
                    exp_avgs[t].scalar_type() == at::kFloat && exp_avg_sqs[t].scalar_type() == at::kFloat,
                "_scaled_adamw_cpu: tensor ", t, ": dtypes must be (", dtype, ", ", dtype, ", float, float)");
    TORCH_CHECK(grads[t].numel() == p.numel() && exp_avgs[t].numel() == p.numel() &&
                    exp_avg_sqs[t].numel() == p.numel(),
                "_scaled_adamw_cpu: tensor ", t, ": sizes differ");
    TORCH_CHECK(p.is_contiguous() && grads[t].is_contiguous() && exp_avgs[t].is_contiguous() &&
                    exp_avg_sqs[t].is_contiguous(),
                "_scaled_adamw_cpu: tensor ", t, " is not contiguous");
  }
  const float* h = hyper.data_ptr<float>();
  if (dtype == at::kFloat) {
    run<float>(params, grads, exp_avgs, exp_avg_sqs, h, beta1, beta2, eps);
  } else {
    run<c10::BFloat16>(params, grads, exp_avgs, exp_avg_sqs, h, beta1, beta2, eps);
  }
}

}  // namespace
}  // namespace hprune

TORCH_LIBRARY_FRAGMENT(hprune, m) {
  m.def(
      "_scaled_adamw_cpu(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor hyper, float beta1, float beta2, float eps) -> ()");
}

TORCH_LIBRARY_IMPL(hprune, CPU, m) { m.impl("_scaled_adamw_cpu", &hprune::scaled_adamw_cpu); }

// CUDA kernel of hprune::scaled_adamw_: AdamW with a learning rate per tensor over many tensors in
// ONE launch (multi-tensor apply with the per-tensor table in device memory instead of kernel
// arguments, so there is no 4 KB argument limit and no second launch however many tensors).
//
// A persistent grid walks the global list of chunks (kChunkElems elements of one tensor each);
// a block finds the tensor of its chunk by binary search over the chunk prefix sums, reads the
// tensor's three scalars (step size, sqrt of the second bias correction, decay factor) from the
// hyper table, and streams its chunk with 16-byte accesses when all four pointers allow it.
// Memory bound: 28 bytes per fp32 element (read p, g, m, v; write p, m, v), 22 for bf16 params.
//
// CUDA runtime headers only (no torch, no cuBLAS); the torch binding is scaled_adamw_binding.cpp.
#include "scaled_adamw.h"

#include <cuda_bf16.h>

#include <atomic>

#include <cstdint>

namespace hprune {
namespace scaled_adamw {
namespace {

constexpr int kThreads = 256;
constexpr int kVec = 4;     // elements per thread per access
constexpr int kUnroll = 2;  // accesses in flight per thread and stream
static_assert(kChunkElems % (kThreads * kVec * kUnroll) == 0, "chunk must tile the block's loop");

struct Consts {
  float w1;     // 1 - beta1: lerp weight of the first moment
  float beta2;
  float omb2;   // 1 - beta2
  float eps;
  bool lerp_small;  // |w1| < 0.5: torch's lerp picks its formula by the weight
};

template <typename P>
struct Access;

template <>
struct Access<float> {
  static constexpr uintptr_t kAlign = 16;
  __device__ __forceinline__ static void load4(const float* p, float out[4]) {
    const float4 x = __ldcs(reinterpret_cast<const float4*>(p));  // streamed: touched once
    out[0] = x.x;
    out[1] = x.y;
    out[2] = x.z;
    out[3] = x.w;
  }
  __device__ __forceinline__ static void store4(float* p, const float in[4]) {
    __stcs(reinterpret_cast<float4*>(p), make_float4(in[0], in[1], in[2], in[3]));
  }
  __device__ __forceinline__ static float load1(const float* p) { return *p; }
  __device__ __forceinline__ static void store1(float* p, float x) { *p = x; }
};

template <>
struct Access<__nv_bfloat16> {
  static constexpr uintptr_t kAlign = 8;
  __device__ __forceinline__ static void load4(const __nv_bfloat16* p, float out[4]) {
    const uint2 x = __ldcs(reinterpret_cast<const uint2*>(p));
    const __nv_bfloat162 lo = *reinterpret_cast<const __nv_bfloat162*>(&x.x);
    const __nv_bfloat162 hi = *reinterpret_cast<const __nv_bfloat162*>(&x.y);
    const float2 a = __bfloat1622float2(lo);
    const float2 b = __bfloat1622float2(hi);
    out[0] = a.x;
    out[1] = a.y;
    out[2] = b.x;
    out[3] = b.y;
  }
  __device__ __forceinline__ static void store4(__nv_bfloat16* p, const float in[4]) {
    // round to nearest even, like torch's .to(torch.bfloat16)
    const __nv_bfloat162 lo = __floats2bfloat162_rn(in[0], in[1]);
    const __nv_bfloat162 hi = __floats2bfloat162_rn(in[2], in[3]);
    uint2 x;
    x.x = *reinterpret_cast<const unsigned int*>(&lo);
    x.y = *reinterpret_cast<const unsigned int*>(&hi);
    __stcs(reinterpret_cast<uint2*>(p), x);
  }
  __device__ __forceinline__ static float load1(const __nv_bfloat16* p) { return __bfloat162float(*p); }
  __device__ __forceinline__ static void store1(__nv_bfloat16* p, float x) { *p = __float2bfloat16_rn(x); }
};

__device__ __forceinline__ void load4f(const float* p, float out[4]) { Access<float>::load4(p, out); }
__device__ __forceinline__ void store4f(float* p, const float in[4]) { Access<float>::store4(p, in); }

// torch.optim.AdamW's single-tensor step for one element, in its order. The IEEE intrinsics keep
// sqrt and division exact even when the extension is compiled with --use_fast_math.
__device__ __forceinline__ void adamw(float& p, float g, float& m, float& v, float step_size,
                                      float bc2_sqrt, float decay, const Consts& c) {
  p = p * decay;
  m = c.lerp_small ? m + c.w1 * (g - m) : g - (g - m) * (1.0f - c.w1);
  v = v * c.beta2 + c.omb2 * g * g;
  const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v), bc2_sqrt), c.eps);
  p = p - step_size * __fdiv_rn(m, denom);
}

template <typename P>
__global__ void __launch_bounds__(kThreads)
    scaled_adamw_kernel(const TensorMeta* __restrict__ meta, const float* __restrict__ hyper,
                        int64_t n, int64_t total_chunks, Consts c) {
  for (int64_t chunk = blockIdx.x; chunk < total_chunks; chunk += gridDim.x) {
    // first tensor whose chunk_end exceeds `chunk` (every thread computes it: same addresses,
    // broadcast loads, and the ~50 KB table stays in cache)
    int64_t lo = 0, hi = n - 1;
    while (lo < hi) {
      const int64_t mid = (lo + hi) >> 1;
      if (meta[mid].chunk_end > chunk) {
        hi = mid;
      } else {
        lo = mid + 1;
      }
    }
    const int64_t t = lo;
    const int64_t first_chunk = t == 0 ? 0 : meta[t - 1].chunk_end;
    const int64_t numel = meta[t].numel;
    const int64_t begin = (chunk - first_chunk) * kChunkElems;
    const int64_t end = begin + kChunkElems < numel ? begin + kChunkElems : numel;
    P* __restrict__ p = static_cast<P*>(meta[t].param);
    const P* __restrict__ g = static_cast<const P*>(meta[t].grad);
    float* __restrict__ m = meta[t].exp_avg;
    float* __restrict__ v = meta[t].exp_avg_sq;
    const float step_size = hyper[t];
    const float bc2_sqrt = hyper[n + t];
    const float decay = hyper[2 * n + t];

    // per tensor: one misaligned tensor takes the scalar path alone, the others stay vectorised
    const bool aligned = reinterpret_cast<uintptr_t>(p) % Access<P>::kAlign == 0 &&
                         reinterpret_cast<uintptr_t>(g) % Access<P>::kAlign == 0 &&
                         reinterpret_cast<uintptr_t>(m) % 16 == 0 && reinterpret_cast<uintptr_t>(v) % 16 == 0;
    int64_t scalar_from = begin;
    if (aligned) {
      // begin is a multiple of kVec, so every vector access below stays aligned
      const int64_t vec_end = begin + ((end - begin) / kVec) * kVec;
      for (int64_t base = begin + threadIdx.x * kVec; base < vec_end;
           base += static_cast<int64_t>(kThreads) * kVec * kUnroll) {
        float pr[kUnroll][kVec], gr[kUnroll][kVec], mr[kUnroll][kVec], vr[kUnroll][kVec];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {  // all loads first: kUnroll * 4 accesses in flight
          const int64_t i = base + static_cast<int64_t>(u) * kThreads * kVec;
          if (i < vec_end) {
            Access<P>::load4(p + i, pr[u]);
            Access<P>::load4(g + i, gr[u]);
            load4f(m + i, mr[u]);
            load4f(v + i, vr[u]);
          }
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t i = base + static_cast<int64_t>(u) * kThreads * kVec;
          if (i < vec_end) {
#pragma unroll
            for (int k = 0; k < kVec; ++k) {
              adamw(pr[u][k], gr[u][k], mr[u][k], vr[u][k], step_size, bc2_sqrt, decay, c);
            }
            Access<P>::store4(p + i, pr[u]);
            store4f(m + i, mr[u]);
            store4f(v + i, vr[u]);
          }
        }
      }
      scalar_from = vec_end;  // fewer than kVec elements left, at the tensor's end
    }
    for (int64_t i = scalar_from + threadIdx.x; i < end; i += kThreads) {
      float pi = Access<P>::load1(p + i);
      float mi = m[i];
      float vi = v[i];
      adamw(pi, Access<P>::load1(g + i), mi, vi, step_size, bc2_sqrt, decay, c);
      Access<P>::store1(p + i, pi);
      m[i] = mi;
      v[i] = vi;
    }
  }
}

constexpr int kMaxDevices = 64;

// Blocks of scaled_adamw_kernel<P> resident at once on `device` (SMs x blocks per SM). It does not
// change while the process runs, so it is asked of the driver once per device and type, not on
// every optimizer step.
template <typename P>
cudaError_t resident_blocks(int device, int* out) {
  static std::atomic<int> cache[kMaxDevices];  // zero-initialised (static storage); 0 = not asked yet
  const bool cached = device >= 0 && device < kMaxDevices;
  if (cached) {
    const int v = cache[device].load(std::memory_order_relaxed);
    if (v > 0) {
      *out = v;
      return cudaSuccess;
    }
  }
  int sms = 0;
  cudaError_t err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  int per_sm = 0;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, scaled_adamw_kernel<P>, kThreads, 0);
  if (err != cudaSuccess) return err;
  const int v = sms * (per_sm > 0 ? per_sm : 1);
  if (cached) cache[device].store(v, std::memory_order_relaxed);  // a race stores the same value
  *out = v;
  return cudaSuccess;
}

template <typename P>
cudaError_t launch(const TensorMeta* meta, const float* hyper, int64_t n, int64_t total_chunks,
                   const Consts& c, cudaStream_t stream) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  int blocks = 0;
  err = resident_blocks<P>(device, &blocks);
  if (err != cudaSuccess) return err;
  // persistent grid: exactly the blocks that fit at once, striding over the chunks
  int64_t grid = blocks;
  if (grid > total_chunks) grid = total_chunks;
  // cudaLaunchKernel returns THIS launch's error; cudaGetLastError after <<<>>> may instead
  // report (and clear) an earlier, unrelated error of another library on this thread
  Consts c_arg = c;
  void* args[] = {&meta, &hyper, &n, &total_chunks, &c_arg};
  return cudaLaunchKernel(reinterpret_cast<const void*>(scaled_adamw_kernel<P>),
                          dim3(static_cast<unsigned int>(grid)), dim3(kThreads), args, 0, stream);
}

}  // namespace

cudaError_t launch_scaled_adamw(ParamType type, const TensorMeta* meta, const float* hyper,
                                int64_t n_tensors, int64_t total_chunks, float w1, float beta2,
                                float omb2, float eps, cudaStream_t stream) {
  if (n_tensors <= 0 || total_chunks <= 0) return cudaSuccess;
  const Consts c{w1, beta2, omb2, eps, fabsf(w1) < 0.5f};
  switch (type) {
    case ParamType::kFloat32:
      return launch<float>(meta, hyper, n_tensors, total_chunks, c, stream);
    case ParamType::kBFloat16:
      return launch<__nv_bfloat16>(meta, hyper, n_tensors, total_chunks, c, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace scaled_adamw
}  // namespace hprune

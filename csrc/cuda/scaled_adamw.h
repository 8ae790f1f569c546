// Launcher interface of the CUDA kernel of hprune::scaled_adamw_. Plain C++ and the CUDA runtime
// only, so the .cu file compiles without torch (and without cuBLAS headers); the torch binding is
// scaled_adamw_binding.cpp.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace hprune {
namespace scaled_adamw {

// Elements of one tensor one block updates per chunk (a multiple of kThreads * kVec * kUnroll).
constexpr int64_t kChunkElems = 16384;

// One entry per tensor, in device memory (48 bytes). Blocks map a global chunk index to its tensor
// by binary search over chunk_end (inclusive prefix sum of the tensors' chunk counts).
struct TensorMeta {
  void* param;          // float or __nv_bfloat16, numel elements
  const void* grad;     // same dtype as param
  float* exp_avg;       // float32
  float* exp_avg_sq;    // float32
  int64_t numel;
  int64_t chunk_end;    // chunks of tensors [0, this one] together
};

enum class ParamType : int { kFloat32 = 0, kBFloat16 = 1 };

// Number of chunks of a tensor of `numel` elements.
inline int64_t num_chunks(int64_t numel) { return (numel + kChunkElems - 1) / kChunkElems; }

// One launch updating every chunk of every tensor. meta: n_tensors entries (device memory);
// hyper: float32 [3, n_tensors] (device memory) rows step_size, bc2_sqrt, decay;
// total_chunks = meta[n_tensors - 1].chunk_end. w1 = 1 - beta1, omb2 = 1 - beta2.
cudaError_t launch_scaled_adamw(ParamType type, const TensorMeta* meta, const float* hyper,
                                int64_t n_tensors, int64_t total_chunks, float w1, float beta2,
                                float omb2, float eps, cudaStream_t stream);

}  // namespace scaled_adamw
}  // namespace hprune

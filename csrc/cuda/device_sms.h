// SM count of a CUDA device, queried once per device and cached (shared by the W4A16 bindings:
// the split-K plan and the persistent CUTLASS grid both size themselves by it). Header-only, for
// the torch bindings (uses TORCH_CHECK); `op` names the caller in the error.
#pragma once

#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <map>
#include <mutex>

namespace hprune {

inline int device_sm_count(int device, const char* op) {
  static std::mutex mu;
  static std::map<int, int> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(device);
  if (it != cache.end()) return it->second;
  int n = 0;
  cudaError_t err = cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device);
  TORCH_CHECK(err == cudaSuccess, op, ": cannot query the SM count: ", cudaGetErrorString(err));
  cache[device] = n;
  return n;
}

}  // namespace hprune

// Torch binding of the CUDA kernel of hprune::scaled_adamw_: torch.ops.hprune._scaled_adamw_cuda.
// Builds the per-tensor table (pointers, sizes, chunk prefix sums) in pinned host memory, copies
// it to the device on the current stream (asynchronously) and launches the kernel once.
//
// c10/cuda/CUDAStream.h rather than ATen/cuda/CUDAContext.h: the latter pulls in cuBLAS headers.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <mutex>
#include <vector>

#include "cuda/scaled_adamw.h"

namespace hprune {
namespace {

namespace sa = hprune::scaled_adamw;

// Host tables whose copies were recorded into a CUDA graph: a replay copies from the same host
// address again, so those buffers must never be freed or reused (a few bytes per tensor, once
// per captured graph).
std::mutex g_captured_mutex;
std::vector<at::Tensor> g_captured_tables;

void scaled_adamw_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                       at::TensorList exp_avg_sqs, const at::Tensor& hyper, double beta1, double beta2,
                       double eps) {
  const int64_t n = static_cast<int64_t>(params.size());
  TORCH_CHECK(static_cast<int64_t>(grads.size()) == n && static_cast<int64_t>(exp_avgs.size()) == n &&
                  static_cast<int64_t>(exp_avg_sqs.size()) == n,
              "_scaled_adamw_cuda: mismatched list lengths");
  if (n == 0) return;
  const at::Device device = params[0].device();
  TORCH_CHECK(device.is_cuda(), "_scaled_adamw_cuda: parameters must be CUDA tensors, got ", device);
  TORCH_CHECK(hyper.device() == device && hyper.scalar_type() == at::kFloat && hyper.is_contiguous() &&
                  hyper.numel() == 3 * n,
              "_scaled_adamw_cuda: hyper must be a contiguous float32 [3, n] table on ", device);
  const auto dtype = params[0].scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16,
              "_scaled_adamw_cuda: parameters must be float32 or bfloat16, got ", dtype);

  const c10::cuda::CUDAGuard guard(device);
  at::Tensor meta_host = at::empty({n * static_cast<int64_t>(sizeof(sa::TensorMeta))},
                                   at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  auto* meta = reinterpret_cast<sa::TensorMeta*>(meta_host.data_ptr());
  int64_t chunks = 0;
  for (int64_t t = 0; t < n; ++t) {
    const at::Tensor& p = params[t];
    const at::Tensor& g = grads[t];
    const at::Tensor& m = exp_avgs[t];
    const at::Tensor& v = exp_avg_sqs[t];
    TORCH_CHECK(p.device() == device && g.device() == device && m.device() == device && v.device() == device,
                "_scaled_adamw_cuda: tensor ", t, " is not on ", device);
    TORCH_CHECK(p.scalar_type() == dtype && g.scalar_type() == dtype && m.scalar_type() == at::kFloat &&
                    v.scalar_type() == at::kFloat,
                "_scaled_adamw_cuda: tensor ", t, ": dtypes must be (", dtype, ", ", dtype, ", float, float)");
    TORCH_CHECK(g.numel() == p.numel() && m.numel() == p.numel() && v.numel() == p.numel(),
                "_scaled_adamw_cuda: tensor ", t, ": sizes differ");
    TORCH_CHECK(p.is_contiguous() && g.is_contiguous() && m.is_contiguous() && v.is_contiguous(),
                "_scaled_adamw_cuda: tensor ", t, " is not contiguous");
    chunks += sa::num_chunks(p.numel());
    meta[t] = sa::TensorMeta{p.data_ptr(), g.data_ptr(), m.data_ptr<float>(), v.data_ptr<float>(), p.numel(),
                             chunks};
  }
  if (chunks == 0) return;
  // Pinned source + non_blocking: an asynchronous copy ordered before the kernel on this stream;
  // the caching host allocator keeps the buffer until the copy has run.
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  TORCH_CHECK(cudaStreamIsCapturing(stream, &capture) == cudaSuccess, "_scaled_adamw_cuda: cudaStreamIsCapturing failed");
  if (capture != cudaStreamCaptureStatusNone) {
    const std::lock_guard<std::mutex> lock(g_captured_mutex);
    g_captured_tables.push_back(meta_host);
  }
  const at::Tensor meta_dev = meta_host.to(device, /*non_blocking=*/true);
  const cudaError_t err = sa::launch_scaled_adamw(
      dtype == at::kFloat ? sa::ParamType::kFloat32 : sa::ParamType::kBFloat16,
      reinterpret_cast<const sa::TensorMeta*>(meta_dev.data_ptr()), hyper.data_ptr<float>(), n, chunks,
      static_cast<float>(1.0 - beta1), static_cast<float>(beta2), static_cast<float>(1.0 - beta2),
      static_cast<float>(eps), stream);
  TORCH_CHECK(err == cudaSuccess, "_scaled_adamw_cuda: kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace
}  // namespace hprune

TORCH_LIBRARY_FRAGMENT(hprune, m) {
  m.def(
      "_scaled_adamw_cuda(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor hyper, float beta1, float beta2, float eps) -> ()");
}

TORCH_LIBRARY_IMPL(hprune, CUDA, m) { m.impl("_scaled_adamw_cuda", &hprune::scaled_adamw_cuda); }

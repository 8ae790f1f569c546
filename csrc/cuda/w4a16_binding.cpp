// torch binding of the CUDA W4A16 kernel: registers hprune::w4a16_mm_cuda (CUDA only).
// The Python op torch.ops.hprune.w4a16_mm validates its arguments (with ShapeError) before it
// calls this; the checks here only guard against direct misuse.
// Uses c10/cuda/CUDAStream.h rather than ATen/cuda/CUDAContext.h, which pulls cuBLAS headers.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <map>
#include <mutex>
#include <optional>
#include <utility>

#include "w4a16.h"
#include "device_sms.h"

namespace {

// Split-K arrival counters: zero between launches (each launch resets the ones it used), one
// buffer per (device, stream) so launches on different streams never share them. Inside CUDA-graph
// capture a fresh zeroed buffer per launch: the zeroing is recorded into the graph (a cached
// buffer allocated there would never be zeroed for eager use, and replays of two graphs would
// share it).
at::Tensor counters(const at::Device& device, int64_t stream_id, int64_t needed, bool capturing) {
  if (capturing) {
    return at::zeros({needed}, at::TensorOptions().dtype(at::kInt).device(device));
  }
  static std::mutex mu;
  static std::map<std::pair<int, int64_t>, at::Tensor> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto key = std::make_pair(static_cast<int>(device.index()), stream_id);
  auto it = cache.find(key);
  if (it != cache.end() && it->second.numel() >= needed) return it->second;
  at::Tensor buf = at::zeros({std::max<int64_t>(needed, 4096)}, at::TensorOptions().dtype(at::kInt).device(device));
  cache[key] = buf;
  return buf;
}

at::Tensor w4a16_mm_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                         const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& bias,
                         int64_t group_size, int64_t fmt) {
  TORCH_CHECK(x.is_cuda(), "w4a16_mm_cuda: x must be on a CUDA device");
  for (const at::Tensor* t : {&qweight, &scales}) {
    TORCH_CHECK(t->device() == x.device(), "w4a16_mm_cuda: qweight and scales must be on x's device");
  }
  TORCH_CHECK(!zeros || zeros->device() == x.device(), "w4a16_mm_cuda: zeros must be on x's device");
  TORCH_CHECK(!bias || bias->device() == x.device(), "w4a16_mm_cuda: bias must be on x's device");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "w4a16_mm_cuda: x must be 2-D (M, K) with unit stride on K");
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "w4a16_mm_cuda: x must be float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.dim() == 2 && qweight.is_contiguous(),
              "w4a16_mm_cuda: qweight must be contiguous uint8 (N, Kp/2)");
  // before G is computed from it: group_size 0 would divide by zero
  TORCH_CHECK(group_size == 32 || group_size == 64 || (group_size > 0 && group_size % 128 == 0),
              "w4a16_mm_cuda: group_size must be 32, 64 or a multiple of 128, got ", group_size);
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0);
  const int64_t G = (K + group_size - 1) / group_size;
  TORCH_CHECK(qweight.size(1) == (K + 31) / 32 * 16, "w4a16_mm_cuda: qweight has ", qweight.size(1),
              " bytes per row; K=", K, " needs ", (K + 31) / 32 * 16);
  TORCH_CHECK(scales.scalar_type() == x.scalar_type() && scales.is_contiguous() && scales.dim() == 2 &&
                  scales.size(0) == G && scales.size(1) == N,
              "w4a16_mm_cuda: scales must be contiguous (G, N) in x's dtype");
  TORCH_CHECK(fmt >= 0 && fmt <= 2, "w4a16_mm_cuda: unknown format id ", fmt);
  TORCH_CHECK((fmt == hprune::kW4A16Int4) == zeros.has_value(), "w4a16_mm_cuda: zeros are required for int4 only");
  if (zeros) {
    TORCH_CHECK(zeros->scalar_type() == x.scalar_type() && zeros->is_contiguous() && zeros->sizes() == scales.sizes(),
                "w4a16_mm_cuda: zeros must be contiguous (G, N) in x's dtype");
  }
  if (bias) {
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->is_contiguous() && bias->numel() == N,
                "w4a16_mm_cuda: bias must be contiguous (N,) in x's dtype");
  }
  TORCH_CHECK(K % 8 == 0 && N % 8 == 0, "w4a16_mm_cuda: K and N must be multiples of 8 (K=", K, ", N=", N, ")");
  TORCH_CHECK(M <= INT32_MAX && N <= INT32_MAX && K <= INT32_MAX, "w4a16_mm_cuda: dimensions too large");

  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0) return out;
  const int dev = x.get_device();
  hprune::W4A16Plan plan = hprune::w4a16_plan(static_cast<int>(M), static_cast<int>(N), static_cast<int>(K),
                                              hprune::device_sm_count(dev, "w4a16_mm_cuda"));
  c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream(dev);
  at::Tensor ws, cnt;
  if (plan.split_k > 1) {
    ws = at::empty({static_cast<int64_t>(plan.workspace_floats)}, x.options().dtype(at::kFloat));
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    TORCH_CHECK(cudaStreamIsCapturing(stream.stream(), &capture) == cudaSuccess,
                "w4a16_mm_cuda: cudaStreamIsCapturing failed");
    cnt = counters(x.device(), stream.id(), plan.tiles, capture != cudaStreamCaptureStatusNone);
  }
  hprune::W4A16Args args{};
  args.x = x.data_ptr();
  args.qweight = qweight.data_ptr<uint8_t>();
  args.scales = scales.data_ptr();
  args.zeros = zeros ? zeros->data_ptr() : nullptr;
  args.bias = bias ? bias->data_ptr() : nullptr;
  args.out = out.data_ptr();
  args.workspace = plan.split_k > 1 ? ws.data_ptr<float>() : nullptr;
  args.counters = plan.split_k > 1 ? cnt.data_ptr<int>() : nullptr;
  args.M = static_cast<int>(M);
  args.N = static_cast<int>(N);
  args.K = static_cast<int>(K);
  args.stride_xm = x.stride(0);
  args.group_size = static_cast<int>(group_size);
  args.fmt = static_cast<int>(fmt);
  args.act = x.scalar_type() == at::kHalf ? hprune::kW4A16Fp16 : hprune::kW4A16Bf16;
  for (const void* ptr : {args.x, static_cast<const void*>(args.qweight), args.scales, args.zeros}) {
    TORCH_CHECK(reinterpret_cast<uintptr_t>(ptr) % 16 == 0, "w4a16_mm_cuda: tensors must be 16-byte aligned");
  }
  TORCH_CHECK(args.stride_xm % 8 == 0, "w4a16_mm_cuda: rows of x must be 16-byte aligned");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(args.bias) % 4 == 0, "w4a16_mm_cuda: bias must be 4-byte aligned");
  cudaError_t err = hprune::w4a16_launch(args, plan, stream.stream());
  TORCH_CHECK(err == cudaSuccess, "w4a16_mm_cuda: launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hprune, m) {
  m.def("w4a16_mm_cuda(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, Tensor? bias, int group_size, "
        "int fmt) -> Tensor");
}

TORCH_LIBRARY_IMPL(hprune, CUDA, m) { m.impl("w4a16_mm_cuda", &w4a16_mm_cuda); }

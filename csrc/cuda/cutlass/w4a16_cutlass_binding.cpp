// torch binding of the CUTLASS W4A16 kernel: registers hprune::w4a16_mm_cutlass (CUDA only).
// hprune/kernels/w4a16.py validates the op's arguments and prepares the weight
// (hprune/kernels/cutlass_w4a16.py) before it calls this; the checks here guard direct misuse.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <optional>

#include "w4a16_cutlass.h"
#include "../device_sms.h"

namespace {

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

at::Tensor w4a16_mm_cutlass(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                            const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& bias,
                            int64_t group_size, int64_t fmt) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.stride(1) == 1,
              "w4a16_mm_cutlass: x must be a 2-D CUDA tensor (M, K) with unit stride on K");
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "w4a16_mm_cutlass: x must be float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(fmt == hprune::kCutlassInt4 || fmt == hprune::kCutlassInt4Sym,
              "w4a16_mm_cutlass: fmt must be int4 (0) or int4_sym (1), got ", fmt);
  TORCH_CHECK(group_size > 0 && group_size % 64 == 0, "w4a16_mm_cutlass: group_size must be a multiple of 64");
  TORCH_CHECK(scales.dim() == 2 && scales.is_contiguous(), "w4a16_mm_cutlass: scales must be contiguous (G, N)");
  const int64_t M = x.size(0), K = x.size(1), N = scales.size(1);
  const int64_t G = (K + group_size - 1) / group_size;
  TORCH_CHECK(scales.size(0) == G, "w4a16_mm_cutlass: scales has ", scales.size(0), " groups; K=", K, " needs ", G);
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.numel() == N * K / 2,
              "w4a16_mm_cutlass: codes must be contiguous uint8 with N*K/2 = ", N * K / 2, " bytes");
  const bool with_zero = fmt == hprune::kCutlassInt4;
  const at::ScalarType scale_type = with_zero ? at::kFloat : x.scalar_type();
  TORCH_CHECK(scales.scalar_type() == scale_type, "w4a16_mm_cutlass: scales must be ", scale_type);
  TORCH_CHECK(zeros.has_value() == with_zero, "w4a16_mm_cutlass: zeros are required for int4 only");
  if (zeros) {
    TORCH_CHECK(zeros->scalar_type() == at::kFloat && zeros->is_contiguous() && zeros->sizes() == scales.sizes(),
                "w4a16_mm_cutlass: zeros must be contiguous float32 (G, N)");
  }
  if (bias) {
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->is_contiguous() && bias->numel() == N,
                "w4a16_mm_cutlass: bias must be contiguous (N,) in x's dtype");
  }
  for (const at::Tensor* t : {&codes, &scales}) {
    TORCH_CHECK(t->device() == x.device(), "w4a16_mm_cutlass: all tensors must be on x's device");
  }
  TORCH_CHECK(!zeros || zeros->device() == x.device(), "w4a16_mm_cutlass: zeros must be on x's device");
  TORCH_CHECK(!bias || bias->device() == x.device(), "w4a16_mm_cutlass: bias must be on x's device");
  TORCH_CHECK(N % 128 == 0 && K % 64 == 0, "w4a16_mm_cutlass: needs N % 128 == 0 and K % 64 == 0 (N=", N, ", K=", K, ")");
  TORCH_CHECK(M <= INT32_MAX && N <= INT32_MAX && K <= INT32_MAX, "w4a16_mm_cutlass: dimensions too large");

  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0) return out;
  const int dev = x.get_device();
  hprune::W4A16CutlassArgs args{};
  args.x = x.data_ptr();
  args.codes = codes.data_ptr<uint8_t>();
  args.scales = scales.data_ptr();
  args.zeros = zeros ? zeros->data_ptr() : nullptr;
  args.bias = bias ? bias->data_ptr() : nullptr;
  args.out = out.data_ptr();
  args.M = static_cast<int>(M);
  args.N = static_cast<int>(N);
  args.K = static_cast<int>(K);
  args.stride_xm = x.stride(0);
  args.group_size = static_cast<int>(group_size);
  args.fmt = static_cast<int>(fmt);
  args.act = x.scalar_type() == at::kHalf ? hprune::kCutlassFp16 : hprune::kCutlassBf16;
  args.device = dev;
  args.num_sms = hprune::device_sm_count(dev, "w4a16_mm_cutlass");
  for (const void* p : {args.x, static_cast<const void*>(args.codes), args.scales, args.zeros, args.bias}) {
    TORCH_CHECK(aligned16(p), "w4a16_mm_cutlass: tensors must be 16-byte aligned");
  }
  TORCH_CHECK(args.stride_xm % 8 == 0, "w4a16_mm_cutlass: rows of x must be 16-byte aligned");
  c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream(dev);
  const size_t ws_bytes = hprune::w4a16_cutlass_workspace_bytes(args);
  at::Tensor ws;
  if (ws_bytes) ws = at::empty({static_cast<int64_t>(ws_bytes)}, x.options().dtype(at::kByte));
  const char* err = hprune::w4a16_cutlass_run(args, ws_bytes ? ws.data_ptr() : nullptr, stream.stream());
  TORCH_CHECK(err == nullptr, "w4a16_mm_cutlass: ", err);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hprune, m) {
  m.def("w4a16_mm_cutlass(Tensor x, Tensor codes, Tensor scales, Tensor? zeros, Tensor? bias, int group_size, "
        "int fmt) -> Tensor");
}

TORCH_LIBRARY_IMPL(hprune, CUDA, m) { m.impl("w4a16_mm_cutlass", &w4a16_mm_cutlass); }

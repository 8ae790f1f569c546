// W4A16 GEMM on Hopper (sm_90a) from CUTLASS's mixed-input collective
// (sm90_mma_tma_gmma_rs_warpspecialized_mixed_input: TMA loads, warp-specialised producer and two
// consumer warpgroups, the 4-bit operand converted in registers, wgmma with A from registers).
// See w4a16_cutlass.h for the operands and the exact arithmetic.
//
// The 4-bit operand must pass through registers, which wgmma allows only for A, so the kernel
// computes out^T (N, M) = W (N, K) x^T: W is A (its "M" is our N), x is B, and out^T in
// column-major order is out (M, N) row-major. The per-output-channel bias is then a per-row
// bias of out^T (LinCombPerRowBias), added to the fp32 accumulator before the one rounding to T.
//
// Instantiations (compile time ~ one to two minutes each): {fp16, bf16} x {int4, int4_sym}, one
// tile configuration: 128 x 128 x 64, cooperative (two consumer warpgroups on 64-row halves),
// cluster 1x1x1, persistent. At M >= 128 (where the dispatch table sends it) this is the shape
// CUTLASS's example 55 and Machete use for compute-bound sizes.
#include "w4a16_cutlass.h"

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/fusion/operations.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/kernel_hardware_info.h>

#include "w4a16_cutlass_layout.hpp"

namespace hprune {
namespace {

using namespace cute;

// T: the activation / MMA type; kWithZero: "int4" (fp32 scale and shifted zero) versus "int4_sym"
// (scale in T). Codes are signed 4-bit (q - 8) in both: CUTLASS converts int4b_t to fp32 / fp16 /
// bf16 with lop3 bit tricks, while uint4b_t -> fp32 would be one I2F per code.
template <class T, bool kWithZero>
struct W4A16Gemm {
  using Code = cutlass::int4b_t;
  // "int4": fp32, because with a T scale and zero CUTLASS would round (q - 8) * s to T before adding
  // the zero (two roundings); in fp32, (q - 8) * s + (z + 8 s) is one FMA whose exact value is
  // q * s + z, rounded to T once, as in formats.dequantize. "int4_sym": T, one multiply of exact
  // operands, rounded once.
  using Scale = cute::conditional_t<kWithZero, float, T>;
  using MainloopA = cute::conditional_t<kWithZero, cute::tuple<Code, Scale, Scale>, cute::tuple<Code, Scale>>;

  using TileShape = Shape<_128, _128, _64>;
  using ClusterShape = Shape<_1, _1, _1>;
  static constexpr int kAlignX = 128 / cutlass::sizeof_bits<T>::value;     // 8 elements: 16 bytes
  static constexpr int kAlignW = 128 / cutlass::sizeof_bits<Code>::value;  // 32 codes: 16 bytes

  using LayoutX = cutlass::layout::ColumnMajor;  // B = x^T (K, M) stored K-fastest: x (M, K) row-major
  using LayoutOut = cutlass::layout::ColumnMajor;  // out^T (N, M) column-major = out (M, N) row-major

  using Fusion = cutlass::epilogue::fusion::LinCombPerRowBias<T, float, T, T, float>;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, LayoutOut, kAlignX,  // no C operand: out = acc + bias
      T, LayoutOut, kAlignX,
      cutlass::epilogue::TmaWarpSpecializedCooperative, Fusion>::CollectiveOp;

  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      MainloopA, cutlass_w4a16::WeightLayout, kAlignW,
      T, LayoutX, kAlignX,
      float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static typename Gemm::Arguments arguments(const W4A16CutlassArgs& a) {
    using StrideX = typename Kernel::StrideB;
    using StrideScale = typename Mainloop::StrideScale;
    using StrideOut = typename Kernel::StrideD;
    const int64_t n = a.N, m = a.M, g = (a.K + a.group_size - 1) / a.group_size;
    StrideX stride_x = make_stride(static_cast<int64_t>(a.stride_xm), Int<1>{}, static_cast<int64_t>(0));
    StrideScale stride_s = make_stride(Int<1>{}, n, static_cast<int64_t>(0));  // (G, N) row-major = N-major
    StrideOut stride_out = make_stride(Int<1>{}, n, static_cast<int64_t>(0));
    (void)m;
    (void)g;
    typename Mainloop::Arguments mainloop{};
    mainloop.ptr_A = reinterpret_cast<const Code*>(a.codes);
    mainloop.dA = cutlass_w4a16::weight_layout(a.N, a.K);
    mainloop.ptr_B = static_cast<const T*>(a.x);
    mainloop.dB = stride_x;
    mainloop.ptr_S = static_cast<const Scale*>(a.scales);
    mainloop.dS = stride_s;
    mainloop.group_size = a.group_size;
    if constexpr (kWithZero) mainloop.ptr_Z = static_cast<const Scale*>(a.zeros);

    typename Epilogue::Arguments epilogue{};
    epilogue.thread.alpha = 1.0f;
    epilogue.thread.beta = 0.0f;
    epilogue.thread.bias_ptr = static_cast<const T*>(a.bias);  // nullptr: adds 0
    epilogue.ptr_C = nullptr;
    epilogue.ptr_D = static_cast<T*>(a.out);
    epilogue.dD = stride_out;

    cutlass::KernelHardwareInfo hw;
    hw.device_id = a.device;
    hw.sm_count = a.num_sms;
    return typename Gemm::Arguments{cutlass::gemm::GemmUniversalMode::kGemm, {a.N, a.M, a.K, 1}, mainloop,
                                    epilogue, hw};
  }

  static size_t workspace_bytes(const W4A16CutlassArgs& a) { return Gemm::get_workspace_size(arguments(a)); }

  static const char* run(const W4A16CutlassArgs& a, void* workspace, cudaStream_t stream) {
    typename Gemm::Arguments args = arguments(a);
    Gemm gemm;
    if (gemm.can_implement(args) != cutlass::Status::kSuccess) return "CUTLASS cannot implement this W4A16 problem";
    cutlass::Status st = gemm.initialize(args, workspace, stream);
    if (st != cutlass::Status::kSuccess) return cutlassGetStatusString(st);
    st = gemm.run(stream);
    if (st != cutlass::Status::kSuccess) return cutlassGetStatusString(st);
    return nullptr;
  }
};

const char* unsupported(const W4A16CutlassArgs& a) {
  if (a.fmt != kCutlassInt4 && a.fmt != kCutlassInt4Sym) return "format not served by the CUTLASS kernel";
  if (a.act != kCutlassFp16 && a.act != kCutlassBf16) return "activation dtype not served by the CUTLASS kernel";
  if (a.N % 128 || a.K % 64) return "the CUTLASS kernel needs N % 128 == 0 and K % 64 == 0";
  if (a.group_size <= 0 || a.group_size % 64) return "the CUTLASS kernel needs group_size % 64 == 0";
  if (a.stride_xm % 8) return "the CUTLASS kernel needs 16-byte aligned rows of x";
  if ((a.fmt == kCutlassInt4) != (a.zeros != nullptr)) return "zeros are required for int4 only";
  return nullptr;
}

}  // namespace

size_t w4a16_cutlass_workspace_bytes(const W4A16CutlassArgs& a) {
  if (unsupported(a)) return 0;
  const bool zero = a.fmt == kCutlassInt4;
  if (a.act == kCutlassBf16) {
    return zero ? W4A16Gemm<cutlass::bfloat16_t, true>::workspace_bytes(a)
                : W4A16Gemm<cutlass::bfloat16_t, false>::workspace_bytes(a);
  }
  return zero ? W4A16Gemm<cutlass::half_t, true>::workspace_bytes(a) : W4A16Gemm<cutlass::half_t, false>::workspace_bytes(a);
}

const char* w4a16_cutlass_run(const W4A16CutlassArgs& a, void* workspace, cudaStream_t stream) {
  if (const char* why = unsupported(a)) return why;
  const bool zero = a.fmt == kCutlassInt4;
  if (a.act == kCutlassBf16) {
    return zero ? W4A16Gemm<cutlass::bfloat16_t, true>::run(a, workspace, stream)
                : W4A16Gemm<cutlass::bfloat16_t, false>::run(a, workspace, stream);
  }
  return zero ? W4A16Gemm<cutlass::half_t, true>::run(a, workspace, stream)
              : W4A16Gemm<cutlass::half_t, false>::run(a, workspace, stream);
}

}  // namespace hprune

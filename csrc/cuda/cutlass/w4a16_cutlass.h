// W4A16 GEMM on Hopper from CUTLASS's mixed-input collective (CUDA runtime only; no torch, no
// CUTLASS types in this header): out (M, N) = x (M, K) @ W^T + bias, W (N, K) 4-bit codes.
//
// Weights come prepared (hprune/kernels/cutlass_w4a16.py, once per weight):
//   codes   uint8 (N * K / 2)   the codes in the order of w4a16_cutlass_layout.hpp, two per byte
//                               (even position in the low nibble), as signed q - 8 (the nibble q ^ 8)
//   scales  (G, N), G = ceil(K / group_size): float32 s for "int4", the activation dtype for "int4_sym"
//   zeros   (G, N) float32 z + 8 s for "int4" (exact in float32: checked), nullptr for "int4_sym"
// Each weight is then exactly hprune.quant.formats.dequantize's: round_T(q * s + z) (one fp32 FMA
// of (q - 8) * s + (z + 8 s), exact value q * s + z, as formats' fp32 q * s + z) or
// round_T((q - 8) * s) (one T multiply of exact operands).
// Requirements (checked by the caller, re-checked here): sm_90a, fp16/bf16, N % 128 == 0,
// K % 64 == 0, group_size % 64 == 0, rows of x and all pointers 16-byte aligned, out (M, N) dense.
#pragma once

#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

namespace hprune {

enum W4A16CutlassFmt : int { kCutlassInt4 = 0, kCutlassInt4Sym = 1 };  // = formats.FMT_ID (nf4 not served)
enum W4A16CutlassAct : int { kCutlassFp16 = 0, kCutlassBf16 = 1 };

struct W4A16CutlassArgs {
  const void* x;            // (M, K) activations, row stride stride_xm elements
  const uint8_t* codes;     // (N * K / 2) prepared codes
  const void* scales;       // (G, N)
  const void* zeros;        // (G, N) or nullptr
  const void* bias;         // (N,) in the activation dtype, or nullptr
  void* out;                // (M, N)
  int M, N, K;
  long long stride_xm;
  int group_size;
  int fmt;                  // W4A16CutlassFmt
  int act;                  // W4A16CutlassAct
  int device;               // CUDA device ordinal
  int num_sms;              // SMs of that device (the persistent kernel's grid)
};

// Bytes of workspace the launch needs (0 today; asked anyway, CUTLASS may change).
size_t w4a16_cutlass_workspace_bytes(const W4A16CutlassArgs& args);

// Launches on `stream`. Returns nullptr on success, else a message naming what failed.
const char* w4a16_cutlass_run(const W4A16CutlassArgs& args, void* workspace, cudaStream_t stream);

}  // namespace hprune

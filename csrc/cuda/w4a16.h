// W4A16 matmul launcher (CUDA runtime only; no torch, no cuBLAS): out = x @ W^T (+ bias), W packed
// in 4 bits in the layout of hprune/quant/formats.py:
//   qweight uint8 (N, Kp/2), Kp = ceil(K/32)*32; in each 16-byte chunk c of a row, byte i holds
//   k = 32c + i in its low nibble and k = 32c + 16 + i in its high nibble.
//   scales (G, N) and zeros (G, N) (fmt int4 only) in the activation dtype, G = ceil(K/group).
// Requirements (checked by the caller): fp16/bf16 activations, K % 8 == 0, N % 8 == 0, rows of x
// and all pointers 16-byte aligned, group_size in {32, 64} or a multiple of 128, out (M, N) dense.
#pragma once

#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

namespace hprune {

enum W4A16Fmt : int { kW4A16Int4 = 0, kW4A16Int4Sym = 1, kW4A16Nf4 = 2 };  // = formats.FMT_ID
enum W4A16Act : int { kW4A16Fp16 = 0, kW4A16Bf16 = 1 };

struct W4A16Args {
  const void* x;            // (M, K) activations, row stride stride_xm elements
  const uint8_t* qweight;   // (N, Kp/2)
  const void* scales;       // (G, N)
  const void* zeros;        // (G, N) or nullptr
  const void* bias;         // (N,) or nullptr
  void* out;                // (M, N)
  float* workspace;         // split_k * M * N floats when plan.split_k > 1
  int* counters;            // plan.tiles ints, zero on entry (left zero on exit)
  int M, N, K;
  long long stride_xm;
  int group_size;
  int fmt;                  // W4A16Fmt
  int act;                  // W4A16Act
};

struct W4A16Plan {
  int config;               // 0: small M (16x64x128), 1: medium (64x64x64), 2: large (128x128x64)
  int split_k;              // K slices (serial reduction: the last CTA of a tile sums the partials)
  int tiles;                // output tiles = counters needed
  size_t workspace_floats;  // floats of workspace needed (0 without split-K)
};

// Picks the tile configuration and split-K for a problem on a GPU with `num_sms` SMs.
W4A16Plan w4a16_plan(int M, int N, int K, int num_sms);

// Launches on `stream`; returns the launch error (cudaSuccess if none).
cudaError_t w4a16_launch(const W4A16Args& args, const W4A16Plan& plan, cudaStream_t stream);

}  // namespace hprune

// The order in which the CUTLASS W4A16 kernel reads 4-bit weight codes from global memory (CuTe
// only, no CUDA runtime: the kernel and a host-side test program include it).
//
// The kernel computes out^T = W x^T, so the weight W (N, K) is the A operand of a Hopper wgmma
// whose A comes from registers. For a 16-bit MMA one warp holds a 16 (n) x 16 (k) block of A,
// 8 values per thread (PTX ISA, "wgmma .m64nNk16 register fragment A"):
//     lane = t0 + 4 t1 (t0 in 0..3, t1 in 0..7), value v = v0 + 2 v1 + 4 v2 (each bit 0..1)
//     n = t1 + 8 v1,   k = v0 + 2 t0 + 8 v2.
// The atom below stores that block so each thread's 8 codes are one contiguous 32-bit word
// (offset 8 * lane), in the value order [0, 2, 4, 6, 1, 3, 5, 7]: CUTLASS's int4 -> fp16/bf16
// converter for that order extracts pairs of nibbles with one lop3 each. Atoms tile (N, K, L)
// N-fastest (cute::tile_to_shape's default order). hprune.kernels.cutlass_w4a16.reorder_weight
// is the same map in PyTorch; tests/test_cutlass_w4a16.py checks the two agree, and that the
// atom matches the thread/value layout CuTe gives the wgmma A operand.
#pragma once

#include <cute/layout.hpp>

namespace hprune {
namespace cutlass_w4a16 {

using namespace cute;

//                       n = (t1, v1)         k = (v0, t0, v2)
using WeightAtom = Layout<Shape<Shape<_8, _2>, Shape<_2, _4, _2>>,
                          Stride<Stride<_32, _1>, Stride<_4, _8, _2>>>;

using WeightLayout = decltype(tile_to_shape(WeightAtom{}, make_shape(int{}, int{}, int{})));

// The layout of a reordered (N, K) weight (L = 1): element (n, k) is code number
// weight_layout(N, K)(n, k, 0) of the packed array (two codes per byte, the even one in the low nibble).
inline WeightLayout weight_layout(int n, int k) { return tile_to_shape(WeightAtom{}, make_shape(n, k, 1)); }

}  // namespace cutlass_w4a16
}  // namespace hprune

// Host program for tests/test_cutlass_w4a16.py: prints the CUTLASS W4A16 kernel's weight order
// (csrc/cuda/cutlass/w4a16_cutlass_layout.hpp) and checks its atom against CuTe's wgmma A layout.
// Usage: cutlass_layout_check N K  ->  line 1: "atom ok" or the first mismatch;
//                                      then N lines of K offsets: layout(n, k, 0).
#include <cstdio>
#include <cstdlib>

#include <cute/atom/mma_traits_sm90_gmma.hpp>

#include "w4a16_cutlass_layout.hpp"

int main(int argc, char** argv) {
  using namespace cute;
  if (argc != 3) return 2;
  const int n_rows = std::atoi(argv[1]), k_cols = std::atoi(argv[2]);
  // CuTe's register layout of the wgmma A operand for 16-bit types: (thread, value) -> m + 64 k
  // in a 64 x 16 tile. Warp 0 (threads 0..31) owns rows 0..15.
  auto tv = SM90::GMMA::ALayout_64x16{};
  hprune::cutlass_w4a16::WeightAtom atom;
  const int pos_of_value[8] = {0, 4, 1, 5, 2, 6, 3, 7};  // value order [0,2,4,6,1,3,5,7] in memory
  for (int t = 0; t < 32; ++t) {
    for (int v = 0; v < 8; ++v) {
      int idx = tv(t, v);
      int m = idx % 64, k = idx / 64;
      int want = 8 * t + pos_of_value[v];
      if (m >= 16 || int(atom(m, k)) != want) {
        std::printf("mismatch thread %d value %d: (m=%d, k=%d) at %d, expected %d\n", t, v, m, k,
                    m < 16 ? int(atom(m, k)) : -1, want);
        return 1;
      }
    }
  }
  std::printf("atom ok\n");
  auto layout = hprune::cutlass_w4a16::weight_layout(n_rows, k_cols);
  for (int n = 0; n < n_rows; ++n) {
    for (int k = 0; k < k_cols; ++k) std::printf(k ? " %d" : "%d", int(layout(n, k, 0)));
    std::printf("\n");
  }
  return 0;
}

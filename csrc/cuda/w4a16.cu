// Fused W4A16 GEMM for sm_80+ (A100, H100/H200): out = x @ W^T (+ bias) with W packed in 4 bits.
//
// Structure (one CTA = one BM x BN output tile, optionally one K slice of it):
//   * a STAGES-deep cp.async pipeline copies x (BM x BK), the packed weights (BN x BK/2 bytes) and
//     the tile's scales / zeros into shared memory (zero-filled outside M, N, K);
//   * each warp computes a WM x WN sub-tile with mma.sync.m16n8k16 (fp32 accumulate). The B
//     fragments are dequantised in registers: one 32-bit shared load gives a thread the 8 codes
//     of two mma k-steps (the layout puts k and k+16 in one byte), a byte permute + masks + the
//     exponent trick (0x6400 / 0x4300) turn codes into exact fp16/bf16 integers, and one hmul2
//     (int4_sym) / hfma2 (int4) applies the scale (and zero): the weight is rounded once, as the
//     reference defines it. NF4 goes through a 16-entry fp32 table in shared memory.
//   * K order inside an mma is permuted identically for A and B (logical k 2t,2t+1 <-> actual
//     4t,4t+1; 2t+8,2t+9 <-> 4t+2,4t+3), so A fragments are two 64-bit shared loads per row.
//   * split-K reduces serially in one launch: each slice writes its fp32 partial tile to the
//     workspace, the last CTA to arrive at the tile (atomic counter) sums them in slice order
//     (deterministic), adds the bias and writes the output, and resets the counter.
// Shared-memory rows are padded so the fragment loads are free of bank conflicts.
// Only the CUDA runtime headers are needed; mma.sync/cp.async are sm_80 instructions that sm_90
// runs as well (no sm_90-only instructions are used; a wgmma path would be the next step).
#include "w4a16.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace hprune {
namespace {

__constant__ float kNf4Code[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

// ---- element-type traits ---------------------------------------------------------------------

template <typename T> struct Act;

template <> struct Act<__half> {
  using T2 = __half2;
  static constexpr uint32_t kMagic = 0x64006400u;  // 1024.0 in both halves: 1024 + q is exact
  static constexpr float kBase = 1024.0f;
  __device__ __forceinline__ static T2 splat(__half v) { return __half2half2(v); }
  __device__ __forceinline__ static T2 from_floats(float a, float b) { return __floats2half2_rn(a, b); }
  __device__ __forceinline__ static float to_float(__half v) { return __half2float(v); }
  __device__ __forceinline__ static float2 to_float2(T2 v) { return __half22float2(v); }
  __device__ __forceinline__ static void mma(float* c, const uint32_t* a, const uint32_t* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};

template <> struct Act<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  static constexpr uint32_t kMagic = 0x43004300u;  // 128.0 in both halves: 128 + q is exact
  static constexpr float kBase = 128.0f;
  __device__ __forceinline__ static T2 splat(__nv_bfloat16 v) { return __bfloat162bfloat162(v); }
  __device__ __forceinline__ static T2 from_floats(float a, float b) { return __floats2bfloat162_rn(a, b); }
  __device__ __forceinline__ static float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ __forceinline__ static float2 to_float2(T2 v) { return __bfloat1622float2(v); }
  __device__ __forceinline__ static void mma(float* c, const uint32_t* a, const uint32_t* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};

template <typename V> __device__ __forceinline__ uint32_t as_u32(V v) {
  union { V v; uint32_t u; } c;
  c.v = v;
  return c.u;
}
template <typename V> __device__ __forceinline__ V from_u32(uint32_t u) {
  union { uint32_t u; V v; } c;
  c.u = u;
  return c.v;
}

// ---- async copies ----------------------------------------------------------------------------

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const int bytes = pred ? 16 : 0;  // 0: no read, the 16 bytes are zero-filled
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// ---- dequantisation --------------------------------------------------------------------------

// `q2` holds two codes in bits 0-3 and 16-19; returns the two weights as a packed T2.
template <typename T, int FMT>
__device__ __forceinline__ uint32_t dequant_pair(uint32_t q2, typename Act<T>::T2 s2, typename Act<T>::T2 z2,
                                                 float s, const float* lut) {
  using A = Act<T>;
  using T2 = typename A::T2;
  if constexpr (FMT == kW4A16Nf4) {
    const float w0 = __fmul_rn(lut[q2 & 0xF], s);
    const float w1 = __fmul_rn(lut[(q2 >> 16) & 0xF], s);
    return as_u32(A::from_floats(w0, w1));
  } else {
    const T2 v = from_u32<T2>(q2 | A::kMagic);  // base + q, exact
    const float off = A::kBase + (FMT == kW4A16Int4Sym ? 8.0f : 0.0f);
    const T2 q = __hsub2(v, A::from_floats(off, off));  // q or q - 8, exact
    if constexpr (FMT == kW4A16Int4Sym) {
      return as_u32(__hmul2(q, s2));  // exact product, rounded once
    } else {
      return as_u32(__hfma2(q, s2, z2));  // q * s + z, rounded once
    }
  }
}

// ---- the kernel ------------------------------------------------------------------------------

template <int BM_, int BN_, int BK_, int WARPS_M_, int WARPS_N_, int STAGES_>
struct Tile {
  static constexpr int BM = BM_, BN = BN_, BK = BK_, WARPS_M = WARPS_M_, WARPS_N = WARPS_N_, STAGES = STAGES_;
  static constexpr int THREADS = WARPS_M * WARPS_N * 32;
  static constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;
  static constexpr int MF = WM / 16, NF = WN / 8;  // mma fragments per warp
  static constexpr int CHUNKS = BK / 32;           // 32-wide K chunks per stage
  static constexpr int A_LD = BK + 16;             // elements per x row in smem (pad: no conflicts)
  static constexpr int B_LD = BK / 2 + 16;         // bytes per packed row in smem
  static constexpr int S_ROWS = BK / 32;           // scale rows per stage (group 32 needs BK/32)
  template <typename T> static constexpr int a_bytes() { return BM * A_LD * (int)sizeof(T); }
  static constexpr int b_bytes() { return BN * B_LD; }
  template <typename T> static constexpr int s_bytes() { return S_ROWS * BN * (int)sizeof(T); }
  template <typename T> static constexpr int stage_bytes() { return a_bytes<T>() + b_bytes() + 2 * s_bytes<T>(); }
  template <typename T> static constexpr int smem_bytes() { return STAGES * stage_bytes<T>(); }
  static_assert(WM % 16 == 0 && WN % 8 == 0, "warp tile must be whole mma fragments");
  static_assert(BK % 64 == 0, "BK must be a multiple of 64");
};

template <typename T, int FMT, class C>
__global__ void __launch_bounds__(C::THREADS) w4a16_kernel(const W4A16Args p, const int k_tiles_per_split) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using A = Act<T>;
  using T2 = typename A::T2;
  extern __shared__ __align__(16) uint8_t smem[];
  __shared__ float lut[16];
  __shared__ int s_is_last;

  const int tid = threadIdx.x;
  const int lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;  // mma "groupID" and "threadID in group"
  const int warp_m = warp / C::WARPS_N, warp_n = warp % C::WARPS_N;
  const int n0 = blockIdx.x * C::BN, m0 = blockIdx.y * C::BM;
  const int M = p.M, N = p.N, K = p.K;
  const int group = p.group_size;
  const int kchunks = (K + 31) / 32;                 // chunks per packed row
  const int kbytes = kchunks * 16;                   // bytes per packed row
  const int G = (K + group - 1) / group;
  const int k_tiles = (K + C::BK - 1) / C::BK;
  const int kt_begin = blockIdx.z * k_tiles_per_split;
  const int kt_end = min(k_tiles, kt_begin + k_tiles_per_split);
  const int n_kt = max(0, kt_end - kt_begin);
  const int s_rows = group >= C::BK ? 1 : C::BK / group;

  if (tid < 16) lut[tid] = kNf4Code[tid];

  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ scales = static_cast<const T*>(p.scales);
  const T* __restrict__ zeros = static_cast<const T*>(p.zeros ? p.zeros : p.scales);

  auto stage_a = [&](int s) { return reinterpret_cast<T*>(smem + s * C::template stage_bytes<T>()); };
  auto stage_b = [&](int s) { return smem + s * C::template stage_bytes<T>() + C::template a_bytes<T>(); };
  auto stage_s = [&](int s) {
    return reinterpret_cast<T*>(smem + s * C::template stage_bytes<T>() + C::template a_bytes<T>() + C::b_bytes());
  };
  auto stage_z = [&](int s) { return stage_s(s) + C::S_ROWS * C::BN; };

  auto load_stage = [&](int slot, int kt) {
    const int k0 = kt * C::BK;
    T* As = stage_a(slot);
    uint8_t* Bs = stage_b(slot);
    T* Ss = stage_s(slot);
    T* Zs = stage_z(slot);
    constexpr int A_VECS = C::BM * C::BK / 8;  // 16-byte vectors of x
#pragma unroll
    for (int i = tid; i < A_VECS; i += C::THREADS) {
      const int r = i / (C::BK / 8), v = i % (C::BK / 8);
      const int gm = m0 + r, gk = k0 + v * 8;
      const bool ok = gm < M && gk < K;
      const T* src = ok ? x + (long long)gm * p.stride_xm + gk : x;
      cp_async16(As + r * C::A_LD + v * 8, src, ok);
    }
    constexpr int B_VECS = C::BN * C::CHUNKS;  // one 16-byte chunk = 32 k of one row
#pragma unroll
    for (int i = tid; i < B_VECS; i += C::THREADS) {
      const int r = i / C::CHUNKS, v = i % C::CHUNKS;
      const int gn = n0 + r, gc = k0 / 32 + v;
      const bool ok = gn < N && gc < kchunks;
      const uint8_t* src = ok ? p.qweight + (long long)gn * kbytes + gc * 16 : p.qweight;
      cp_async16(Bs + r * C::B_LD + v * 16, src, ok);
    }
    const int g0 = k0 / group;
    const int s_vecs = s_rows * (C::BN / 8);
    for (int i = tid; i < s_vecs; i += C::THREADS) {
      const int r = i / (C::BN / 8), v = i % (C::BN / 8);
      const int gg = g0 + r, gn = n0 + v * 8;
      const bool ok = gg < G && gn < N;
      const long long off = ok ? (long long)gg * N + gn : 0;
      cp_async16(Ss + r * C::BN + v * 8, scales + off, ok);
      if constexpr (FMT == kW4A16Int4) cp_async16(Zs + r * C::BN + v * 8, zeros + off, ok);
    }
  };

  float acc[C::MF][C::NF][4];
#pragma unroll
  for (int i = 0; i < C::MF; ++i)
#pragma unroll
    for (int j = 0; j < C::NF; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

  // prologue: STAGES-1 tiles in flight
#pragma unroll
  for (int s = 0; s < C::STAGES - 1; ++s) {
    if (s < n_kt) load_stage(s, kt_begin + s);
    cp_async_commit();
  }

  for (int it = 0; it < n_kt; ++it) {
    cp_async_wait<C::STAGES - 2>();  // tile `it` has landed (for this thread) ...
    __syncthreads();                 // ... for every thread; and slot (it-1) is free to refill
    const int next = it + C::STAGES - 1;
    if (next < n_kt) load_stage(next % C::STAGES, kt_begin + next);
    cp_async_commit();

    const int slot = it % C::STAGES;
    const T* As = stage_a(slot);
    const uint8_t* Bs = stage_b(slot);
    const T* Ss = stage_s(slot);
    const T* Zs = stage_z(slot);
#pragma unroll
    for (int c = 0; c < C::CHUNKS; ++c) {
      // A fragments of the two k-steps of this chunk (lo: k 0-15, hi: k 16-31)
      uint32_t a[2][C::MF][4];
#pragma unroll
      for (int mf = 0; mf < C::MF; ++mf) {
        const T* r0 = As + (warp_m * C::WM + mf * 16 + g) * C::A_LD + c * 32 + 4 * t;
        const T* r1 = r0 + 8 * C::A_LD;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const uint2 v0 = *reinterpret_cast<const uint2*>(r0 + 16 * h);
          const uint2 v1 = *reinterpret_cast<const uint2*>(r1 + 16 * h);
          a[h][mf][0] = v0.x;  // row g,   actual k 4t, 4t+1   (logical 2t, 2t+1)
          a[h][mf][1] = v1.x;  // row g+8
          a[h][mf][2] = v0.y;  // row g,   actual k 4t+2, 4t+3 (logical 2t+8, 2t+9)
          a[h][mf][3] = v1.y;  // row g+8
        }
      }
      const int srow = group >= C::BK ? 0 : (c * 32) / group;
#pragma unroll
      for (int nf = 0; nf < C::NF; ++nf) {
        const int nl = warp_n * C::WN + nf * 8 + g;
        const uint32_t w = *reinterpret_cast<const uint32_t*>(Bs + nl * C::B_LD + c * 16 + 4 * t);
        const T s = Ss[srow * C::BN + nl];
        const T2 s2 = A::splat(s);
        const T2 z2 = FMT == kW4A16Int4 ? A::splat(Zs[srow * C::BN + nl]) : s2;
        const float sf = A::to_float(s);
        // bytes [B0 B1 B2 B3] -> [B0 B2 B1 B3] so B0/B1 (and B2/B3) share a 16-bit lane pair
        const uint32_t r = __byte_perm(w, 0, 0x3120);
        uint32_t b[2][2];
        b[0][0] = dequant_pair<T, FMT>(r & 0x000F000Fu, s2, z2, sf, lut);          // k 4t, 4t+1
        b[0][1] = dequant_pair<T, FMT>((r >> 8) & 0x000F000Fu, s2, z2, sf, lut);   // k 4t+2, 4t+3
        b[1][0] = dequant_pair<T, FMT>((r >> 4) & 0x000F000Fu, s2, z2, sf, lut);   // k 16+4t, +1
        b[1][1] = dequant_pair<T, FMT>((r >> 12) & 0x000F000Fu, s2, z2, sf, lut);  // k 16+4t+2, +3
#pragma unroll
        for (int mf = 0; mf < C::MF; ++mf) {
          A::mma(acc[mf][nf], a[0][mf], b[0]);
          A::mma(acc[mf][nf], a[1][mf], b[1]);
        }
      }
    }
  }
  cp_async_wait<0>();

  const T* bias = static_cast<const T*>(p.bias);
  T* out = static_cast<T*>(p.out);
  auto store = [&](int row, int col, float v0, float v1) {
    if (bias) {
      const float2 b = A::to_float2(*reinterpret_cast<const T2*>(bias + col));
      v0 += b.x;
      v1 += b.y;
    }
    *reinterpret_cast<T2*>(out + (long long)row * N + col) = A::from_floats(v0, v1);
  };

  if (gridDim.z == 1) {
#pragma unroll
    for (int mf = 0; mf < C::MF; ++mf)
#pragma unroll
      for (int nf = 0; nf < C::NF; ++nf) {
        const int col = n0 + warp_n * C::WN + nf * 8 + 2 * t;
        const int row = m0 + warp_m * C::WM + mf * 16 + g;
        if (col < N) {
          if (row < M) store(row, col, acc[mf][nf][0], acc[mf][nf][1]);
          if (row + 8 < M) store(row + 8, col, acc[mf][nf][2], acc[mf][nf][3]);
        }
      }
    return;
  }

  // serial split-K: publish this slice's partial tile ...
  const long long mn = (long long)M * N;
  float* ws = p.workspace;
#pragma unroll
  for (int mf = 0; mf < C::MF; ++mf)
#pragma unroll
    for (int nf = 0; nf < C::NF; ++nf) {
      const int col = n0 + warp_n * C::WN + nf * 8 + 2 * t;
      const int row = m0 + warp_m * C::WM + mf * 16 + g;
      if (col < N) {
        if (row < M)
          *reinterpret_cast<float2*>(ws + blockIdx.z * mn + (long long)row * N + col) =
              make_float2(acc[mf][nf][0], acc[mf][nf][1]);
        if (row + 8 < M)
          *reinterpret_cast<float2*>(ws + blockIdx.z * mn + (long long)(row + 8) * N + col) =
              make_float2(acc[mf][nf][2], acc[mf][nf][3]);
      }
    }
  __threadfence();  // the partial is visible device-wide before this CTA is counted
  __syncthreads();
  const int tile = blockIdx.y * gridDim.x + blockIdx.x;
  if (tid == 0) s_is_last = atomicAdd(p.counters + tile, 1) == (int)gridDim.z - 1;
  __syncthreads();
  if (!s_is_last) return;
  __threadfence();
  // ... and the last one to arrive sums every slice in order (deterministic) and writes out
#pragma unroll
  for (int mf = 0; mf < C::MF; ++mf)
#pragma unroll
    for (int nf = 0; nf < C::NF; ++nf) {
      const int col = n0 + warp_n * C::WN + nf * 8 + 2 * t;
      const int row = m0 + warp_m * C::WM + mf * 16 + g;
      if (col >= N) continue;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int rr = row + 8 * h;
        if (rr >= M) continue;
        float2 sum = make_float2(0.0f, 0.0f);
        for (int z = 0; z < (int)gridDim.z; ++z) {
          const float2 v = __ldcg(reinterpret_cast<const float2*>(ws + z * mn + (long long)rr * N + col));
          sum.x += v.x;
          sum.y += v.y;
        }
        store(rr, col, sum.x, sum.y);
      }
    }
  if (tid == 0) p.counters[tile] = 0;  // ready for the next launch
#else
  __trap();  // built for an architecture without mma.sync.m16n8k16 / cp.async (needs sm_80+)
#endif
}

// ---- host side -------------------------------------------------------------------------------

using SmallTile = Tile<16, 64, 128, 1, 4, 4>;    // M <= 16: memory bound, split-K
using MediumTile = Tile<64, 64, 64, 2, 2, 4>;    // M <= 256
using LargeTile = Tile<128, 128, 64, 2, 4, 4>;   // M > 256: compute bound

template <class C>
int split_for(int M, int N, int K, int num_sms, int* tiles) {
  const int t = ((M + C::BM - 1) / C::BM) * ((N + C::BN - 1) / C::BN);
  const int k_tiles = (K + C::BK - 1) / C::BK;
  int split = 1;
  // more K slices while the grid has < 2 CTAs per SM and each slice keeps >= 2 K tiles
  while (split < 16 && t * split < 2 * num_sms && k_tiles >= 4 * split) split *= 2;
  const int per = (k_tiles + split - 1) / split;
  *tiles = t;
  return (k_tiles + per - 1) / per;  // no empty slice
}

template <typename T, int FMT, class C>
cudaError_t launch_tile(const W4A16Args& a, const W4A16Plan& plan, cudaStream_t stream) {
  const int smem = C::template smem_bytes<T>();
  auto kernel = w4a16_kernel<T, FMT, C>;
  static int configured_device = -1;  // the attribute is per device; set it when it changes
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  if (configured_device != dev) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
    configured_device = dev;
  }
  const int k_tiles = (a.K + C::BK - 1) / C::BK;
  const int per = (k_tiles + plan.split_k - 1) / plan.split_k;
  dim3 grid((a.N + C::BN - 1) / C::BN, (a.M + C::BM - 1) / C::BM, plan.split_k);
  // cudaLaunchKernel returns THIS launch's error; cudaGetLastError after <<<>>> may instead
  // report (and clear) an earlier, unrelated error of another library on this thread
  W4A16Args a_arg = a;
  int per_arg = per;
  void* args[] = {&a_arg, &per_arg};
  return cudaLaunchKernel(reinterpret_cast<const void*>(kernel), grid, dim3(C::THREADS), args,
                          static_cast<size_t>(smem), stream);
}

template <typename T, int FMT>
cudaError_t launch_fmt(const W4A16Args& a, const W4A16Plan& plan, cudaStream_t stream) {
  switch (plan.config) {
    case 0: return launch_tile<T, FMT, SmallTile>(a, plan, stream);
    case 1: return launch_tile<T, FMT, MediumTile>(a, plan, stream);
    default: return launch_tile<T, FMT, LargeTile>(a, plan, stream);
  }
}

template <typename T>
cudaError_t launch_act(const W4A16Args& a, const W4A16Plan& plan, cudaStream_t stream) {
  switch (a.fmt) {
    case kW4A16Int4: return launch_fmt<T, kW4A16Int4>(a, plan, stream);
    case kW4A16Int4Sym: return launch_fmt<T, kW4A16Int4Sym>(a, plan, stream);
    case kW4A16Nf4: return launch_fmt<T, kW4A16Nf4>(a, plan, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

W4A16Plan w4a16_plan(int M, int N, int K, int num_sms) {
  W4A16Plan plan{};
  if (M <= 16) {
    plan.config = 0;
    plan.split_k = split_for<SmallTile>(M, N, K, num_sms, &plan.tiles);
  } else if (M <= 256) {
    plan.config = 1;
    plan.split_k = split_for<MediumTile>(M, N, K, num_sms, &plan.tiles);
  } else {
    plan.config = 2;
    plan.split_k = 1;
    plan.tiles = ((M + LargeTile::BM - 1) / LargeTile::BM) * ((N + LargeTile::BN - 1) / LargeTile::BN);
  }
  plan.workspace_floats = plan.split_k > 1 ? (size_t)plan.split_k * M * N : 0;
  return plan;
}

cudaError_t w4a16_launch(const W4A16Args& args, const W4A16Plan& plan, cudaStream_t stream) {
  if (args.M <= 0 || args.N <= 0) return cudaSuccess;
  if (args.K % 8 || args.N % 8) return cudaErrorInvalidValue;
  const int g = args.group_size;
  if (!(g == 32 || g == 64 || (g > 0 && g % 128 == 0))) return cudaErrorInvalidValue;
  if (plan.split_k > 1 && (!args.workspace || !args.counters)) return cudaErrorInvalidValue;
  if (args.act == kW4A16Fp16) return launch_act<__half>(args, plan, stream);
  if (args.act == kW4A16Bf16) return launch_act<__nv_bfloat16>(args, plan, stream);
  return cudaErrorInvalidValue;
}

}  // namespace hprune

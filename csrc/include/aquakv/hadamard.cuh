// y = scale * H (signs * x) over the last dim (n = 2..32768), H the unnormalised Sylvester
// Walsh-Hadamard matrix; fp32 math, values in fp32/fp16/bf16. Torch-free.
//
// One pass over memory: each tile (tile.cuh) is read once with 16-byte loads, transformed in
// registers (+ warp shuffles, + one shared-memory exchange for n > 1024 fp16 / 512 fp32) and
// written once with 16-byte stores. Rows shorter than a run (n < 8 fp16 / 4 fp32) simply share a run.
#pragma once

#include "aquakv/tile.cuh"

namespace aquakv::cuda {

struct HadamardArgs {
  const void* x;       // [rows, n], 16-byte aligned, contiguous
  void* out;           // [rows, n], 16-byte aligned, contiguous
  const float* signs;  // [n] or nullptr; 16-byte aligned
  float scale;
  int64_t rows;
};

AQUAKV_HD_TEMPLATE
template <class Cfg, class Simt>
AQUAKV_HD void hadamard_body(const Simt& simt, const HadamardArgs& a, float* smem) {
  using T = typename Cfg::Elem;
  constexpr int R = Cfg::kRun;
  const T* x = static_cast<const T*>(a.x);
  T* out = static_cast<T*>(a.out);
  const int tid = simt.thread(), lane = tid & 31, warp = tid >> 5;
  const int64_t total = a.rows << Cfg::kLogG;
  const int64_t tiles = (total + Cfg::kTile - 1) >> Cfg::kLogTile;

  // A thread's columns are the same in every tile: small register sets keep their signs for good.
  constexpr bool kHoistSigns = Cfg::kEPT <= 32;
  float hoisted[kHoistSigns ? Cfg::kEPT : 1];
  if constexpr (kHoistSigns) {
    if (a.signs) load_signs<Cfg, false>(a.signs, hoisted, lane, warp);
  }

  for (int64_t tile = simt.block(); tile < tiles; tile += simt.blocks()) {
    const int64_t base = tile << Cfg::kLogTile;
    float v[Cfg::kEPT];
    AQUAKV_UNROLL
    for (int c = 0; c < Cfg::kChunks; ++c) load_run<T>(x, base + Cfg::load_index(c, 0, lane, warp), total, &v[c * R]);
    if (a.signs) {
      if constexpr (kHoistSigns) {
        AQUAKV_UNROLL
        for (int j = 0; j < Cfg::kEPT; ++j) v[j] *= hoisted[j];
      } else {
        AQUAKV_UNROLL
        for (int c = 0; c < Cfg::kChunks; ++c) {
          float s[R];
          load_floats<R>(a.signs + (Cfg::load_index(c, 0, lane, warp) & (Cfg::kG - 1)), s);
          AQUAKV_UNROLL
          for (int k = 0; k < R; ++k) v[c * R + k] *= s[k];
        }
      }
    }
    fwht_tile<Cfg>(simt, v, smem, lane, warp);
    AQUAKV_UNROLL
    for (int j = 0; j < Cfg::kEPT; ++j) v[j] = a.scale * v[j];
    AQUAKV_UNROLL
    for (int c = 0; c < Cfg::kChunks; ++c) store_run<T>(out, base + Cfg::store_index(c, 0, lane, warp), total, &v[c * R]);
  }
}

// Launch shape of the hadamard kernel for a size and a row count.
template <class Cfg>
struct HadamardPlan {
  static constexpr int kThreads = Cfg::kThreads;
  static constexpr size_t kSmemBytes = Cfg::kSplit ? sizeof(float) * Cfg::kTile : 0;
  static int64_t tiles(int64_t rows) { return ((rows << Cfg::kLogG) + Cfg::kTile - 1) >> Cfg::kLogTile; }
};

#if defined(__CUDACC__) && !defined(AQUAKV_HOST_EMULATION)
template <class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kMinBlocks) hadamard_kernel(HadamardArgs a) {
  hadamard_body<Cfg>(DeviceSimt{}, a, dynamic_smem());
}

// Launches y = scale * H (signs * x) on `stream`. x, out: [rows, 2^log_n] contiguous, 16-byte
// aligned; signs: 16-byte aligned [2^log_n] or nullptr. Returns the launch status.
template <typename = void>  // instantiates the kernels only where the launcher is called
inline cudaError_t hadamard(DType dtype, int log_n, const HadamardArgs& a, cudaStream_t stream) {
  if (a.rows == 0) return cudaSuccess;
  return visit_tile(dtype, log_n, [&](auto tag) -> cudaError_t {
    using Cfg = typename decltype(tag)::type;
    using Plan = HadamardPlan<Cfg>;
    const auto kernel = hadamard_kernel<Cfg>;
    if (cudaError_t err = allow_smem(kernel, Plan::kSmemBytes); err != cudaSuccess) return err;
    kernel<<<static_cast<unsigned>(grid_for(Plan::tiles(a.rows))), Plan::kThreads, Plan::kSmemBytes, stream>>>(a);
    return cudaGetLastError();
  });
}
#endif

}  // namespace aquakv::cuda

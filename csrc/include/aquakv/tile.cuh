// How a block holds a tile of values in registers, and the Walsh-Hadamard transform over it.
//
// A block works on a tile of kTile consecutive values (whole rows or groups of 2^kLogG). Each
// thread holds kChunks runs of 16 bytes (kRun values). The tile index of a thread's register is
// a bit field, low bits first:
//
//   load layout:   | run k : kLogRun | lane : 5 | chunk c : kQ | warp : kLogWarps |
//   store layout:  | run k : kLogRun | lane : 5 | warp : kW    | chunk c : kQ     |   (kSplit only)
//
// Each warp-wide access of a run touches 32 consecutive 16-byte runs (512 contiguous bytes).
// The transform over the low kLogG bits goes bit by bit in ascending order, exactly like the
// host FWHT (csrc/include/aquakv/hadamard.h), so fp32 results match the CPU kernel bit for bit:
//   run bits -> in-register butterflies; lane bits -> __shfl_xor_sync; chunk bits -> registers;
//   warp bits (only when a group spans several warps, kSplit) -> one exchange through shared
//   memory into the store layout, where they are chunk bits, then registers again.
// Groups up to 32 * kRun * 4 values (1024 fp16 / 512 fp32) fit in one warp (no shared memory);
// a tile then holds 4 warps' worth of groups. Larger groups take a block of 2^kW warps.
#pragma once

#include "aquakv/cuda_common.cuh"

namespace aquakv::cuda {

template <typename T, int kLogGroup>
struct TileCfg {
  static_assert(kLogGroup >= 1 && kLogGroup <= 15, "group (row) sizes 2..32768");
  using Elem = T;
  static constexpr int kLogG = kLogGroup;
  static constexpr int kG = 1 << kLogG;
  static constexpr int kLogRun = RunOf<T>::kLog;
  static constexpr int kRun = RunOf<T>::kSize;
  static constexpr int kWarpQ = 2;  // chunk bits when a group fits in one warp: 4 runs in flight per thread
  static constexpr bool kSplit = kLogG > kLogRun + 5 + kWarpQ;
  static constexpr int kRest = kLogG - kLogRun - 5;  // group bits above the lane bits (kSplit)
  // Split groups share the bits above the lanes between chunks and warps, with kQ >= kW so the
  // warp bits fit into the chunk bits of the store layout.
  static constexpr int kQ = kSplit ? (kRest + 1) / 2 : kWarpQ;
  static constexpr int kW = kSplit ? kRest - kQ : 0;
  static constexpr int kLogWarps = kSplit ? kW : 2;
  static constexpr int kWarps = 1 << kLogWarps;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kChunks = 1 << kQ;
  static constexpr int kEPT = kRun * kChunks;  // values per thread
  static constexpr int kLogTile = kLogRun + 5 + kQ + kLogWarps;
  static constexpr int kTile = 1 << kLogTile;
  // Blocks per SM the kernels ask ptxas to fit (__launch_bounds__): a register budget of the values,
  // their hoisted signs and ~64 for the rest. Without a target ptxas sometimes picks a low count
  // and spills (seen on the fp16 quantize with G = 1024).
  static constexpr int kRegBudget = (kEPT <= 32 ? 2 * kEPT : kEPT) + 64;
  static constexpr int kMinBlocksRaw = 65536 / (kThreads * kRegBudget);
  static constexpr int kMinBlocks = kMinBlocksRaw < 1 ? 1 : kMinBlocksRaw > 8 ? 8 : kMinBlocksRaw;
  static_assert(kQ >= kW, "store layout needs a chunk bit for every warp bit");
  static_assert(!kSplit || kLogTile == kLogG, "a split group is exactly one tile");
  static_assert(kSplit || kLogG <= kLogRun + 5 + kQ, "an unsplit group lies inside one warp");
  static_assert(kThreads <= 1024, "block size");

  // Tile index of value k of chunk c held by (lane, warp), before the exchange.
  static AQUAKV_HD AQUAKV_INLINE int load_index(int c, int k, int lane, int warp) {
    return k | lane << kLogRun | c << (kLogRun + 5) | warp << (kLogRun + 5 + kQ);
  }
  // ... and after it (the layout the results are stored from).
  static AQUAKV_HD AQUAKV_INLINE int store_index(int c, int k, int lane, int warp) {
    if constexpr (kSplit) {
      return k | lane << kLogRun | warp << (kLogRun + 5) | c << (kLogRun + 5 + kW);
    } else {
      return load_index(c, k, lane, warp);
    }
  }
};

// (a, b) -> (a + b, a - b): the butterfly, with the same operand order as the host FWHT.
AQUAKV_HD AQUAKV_INLINE void butterfly(float& lo, float& hi) {
  const float a = lo, b = hi;
  lo = a + b;
  hi = a - b;
}

// Butterflies over the chunk bits [from, to) of the register array.
template <class Cfg, int kFrom, int kTo>
AQUAKV_HD AQUAKV_INLINE void chunk_stages(float (&v)[Cfg::kEPT]) {
  AQUAKV_UNROLL
  for (int j = kFrom; j < kTo; ++j) {
    AQUAKV_UNROLL
    for (int c = 0; c < Cfg::kChunks; ++c) {
      if (c & (1 << j)) continue;
      AQUAKV_UNROLL
      for (int k = 0; k < Cfg::kRun; ++k) butterfly(v[c * Cfg::kRun + k], v[(c | 1 << j) * Cfg::kRun + k]);
    }
  }
}

// The transform over the group bits that live in registers and lanes (everything but warp bits).
AQUAKV_HD_TEMPLATE
template <class Cfg, class Simt>
AQUAKV_HD AQUAKV_INLINE void fwht_warp_part(const Simt& simt, float (&v)[Cfg::kEPT], int lane) {
  constexpr int R = Cfg::kRun;
  AQUAKV_UNROLL
  for (int b = 0; b < Cfg::kLogRun; ++b) {
    if (b >= Cfg::kLogG) break;
    AQUAKV_UNROLL
    for (int c = 0; c < Cfg::kChunks; ++c) {
      AQUAKV_UNROLL
      for (int k = 0; k < R; ++k)
        if (!(k & (1 << b))) butterfly(v[c * R + k], v[c * R + (k | 1 << b)]);
    }
  }
  AQUAKV_UNROLL
  for (int i = 0; i < 5; ++i) {
    if (Cfg::kLogRun + i >= Cfg::kLogG) break;
    const bool upper = (lane >> i) & 1;
    AQUAKV_UNROLL
    for (int j = 0; j < Cfg::kEPT; ++j) {
      const float other = simt.shfl_xor(v[j], 1 << i);
      // lower lane holds a, upper holds b: lower gets a + b, upper a - b
      v[j] = upper ? other - v[j] : v[j] + other;
    }
  }
  constexpr int kChunkBitsInGroup = Cfg::kLogG - Cfg::kLogRun - 5;
  constexpr int kTo = kChunkBitsInGroup < 0 ? 0 : (kChunkBitsInGroup > Cfg::kQ ? Cfg::kQ : kChunkBitsInGroup);
  chunk_stages<Cfg, 0, kTo>(v);
}

// Moves the registers from the load layout to the store layout through shared memory
// (kTile floats at smem). Ends with a barrier, so smem is free again when it returns.
AQUAKV_HD_TEMPLATE
template <class Cfg, class Simt>
AQUAKV_HD AQUAKV_INLINE void exchange_to_store_layout(const Simt& simt, float (&v)[Cfg::kEPT], float* smem, int lane,
                                                      int warp) {
  AQUAKV_UNROLL
  for (int c = 0; c < Cfg::kChunks; ++c) {
    float* dst = smem + Cfg::load_index(c, 0, lane, warp);
    AQUAKV_UNROLL
    for (int q = 0; q < Cfg::kRun; q += 4) store_f4(dst + q, &v[c * Cfg::kRun + q]);
  }
  simt.sync();
  AQUAKV_UNROLL
  for (int c = 0; c < Cfg::kChunks; ++c) {
    const float* src = smem + Cfg::store_index(c, 0, lane, warp);
    AQUAKV_UNROLL
    for (int q = 0; q < Cfg::kRun; q += 4) load_f4(src + q, &v[c * Cfg::kRun + q]);
  }
  simt.sync();
}

// The whole transform over the group bits: registers and lanes, then (kSplit) the warp bits after
// the exchange. On return v is in the store layout.
AQUAKV_HD_TEMPLATE
template <class Cfg, class Simt>
AQUAKV_HD AQUAKV_INLINE void fwht_tile(const Simt& simt, float (&v)[Cfg::kEPT], float* smem, int lane, int warp) {
  fwht_warp_part<Cfg>(simt, v, lane);
  if constexpr (Cfg::kSplit) {
    exchange_to_store_layout<Cfg>(simt, v, smem, lane, warp);
    chunk_stages<Cfg, Cfg::kQ - Cfg::kW, Cfg::kQ>(v);
  }
}

// Sums `part` over the lane bits of the group (the reduction twin of the lane butterflies).
AQUAKV_HD_TEMPLATE
template <class Cfg, int N, class Simt>
AQUAKV_HD AQUAKV_INLINE void sum_over_group_lanes(const Simt& simt, float (&part)[N]) {
  AQUAKV_UNROLL
  for (int i = 0; i < 5; ++i) {
    if (Cfg::kLogRun + i >= Cfg::kLogG) break;
    AQUAKV_UNROLL
    for (int j = 0; j < N; ++j) part[j] += simt.shfl_xor(part[j], 1 << i);
  }
}

// Signs of the thread's values in a given layout: signs[index mod G], 16-byte vector loads when
// a run lies inside one group. `signs` must be 16-byte aligned (launchers guarantee it).
template <class Cfg, bool kStore>
AQUAKV_HD AQUAKV_INLINE void load_signs(const float* signs, float (&s)[Cfg::kEPT], int lane, int warp) {
  constexpr int R = Cfg::kRun;
  AQUAKV_UNROLL
  for (int c = 0; c < Cfg::kChunks; ++c) {
    const int e = kStore ? Cfg::store_index(c, 0, lane, warp) : Cfg::load_index(c, 0, lane, warp);
    if constexpr (Cfg::kG >= R) {
      load_floats<R>(signs + (e & (Cfg::kG - 1)), &s[c * R]);
    } else {
      AQUAKV_UNROLL
      for (int k = 0; k < R; ++k) s[c * R + k] = signs[(e + k) & (Cfg::kG - 1)];
    }
  }
}

// Calls f(TypeTag<TileCfg<T, log_g>>{}) for the runtime (dtype, log2 of the group or row size): the
// one place where runtime sizes become template arguments. cudaErrorInvalidValue outside 1..15.
template <class F>
inline cudaError_t visit_tile(DType dtype, int log_g, F&& f) {
  AQUAKV_CUDA_DISPATCH_DTYPE(dtype, T, AQUAKV_CUDA_DISPATCH_LOG2(log_g, L, return f(TypeTag<TileCfg<T, L>>{})));
  return cudaErrorInvalidValue;
}

}  // namespace aquakv::cuda

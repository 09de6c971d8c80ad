// Fused HIGGS quantize / dequantize over groups of G = 2^kLogG values (docs/method.md). Torch-free.
//
// quantize, per tile of whole groups (tile.cuh):
//   load x (16-byte runs) -> * signs -> group sum of squares (registers, shuffles, smem across warps)
//   -> FWHT -> y = H(D x) / s (y = 0 when s == 0) -> y to shared memory -> nearest grid point of
//   every d-vector (argmax <y, g> - ||g||^2 / 2, lowest index on exact ties; grid and half norms
//   in shared memory) -> pack 8 codes = `code_bits` bytes per thread into the LSB-first stream.
// dequantize: stage the tile's code bytes and scales in shared memory -> unpack + grid lookup of
//   every d-vector into shared memory -> 16-byte loads into registers -> FWHT ->
//   x = (s / G * sign) * H y^ -> cast -> 16-byte stores.
// Groups of a row follow each other and so do rows, so a launch sees one flat array of groups;
// since (G / d * code_bits) % 8 == 0, every group's codes start on a byte boundary.
// The arithmetic follows the CPU kernel (csrc/cpu/higgs_cpu.cpp) operation for operation; only
// the order of the sum of squares and fused multiply-adds in the grid scores differ, so codes can
// differ from the CPU's only where two grid points are within rounding of a tie.
#pragma once

#include "aquakv/tile.cuh"

namespace aquakv::cuda {

struct HiggsArgs {
  void* values;             // quantize: x [groups * G] (read); dequantize: out [groups * G] (written). 16-byte aligned
  uint8_t* codes;           // [groups * G / d * code_bits / 8]; quantize writes it, dequantize reads it. 16-byte aligned
  __half* scales;           // [groups]: the group norms s (quantize writes them; quantize_scaled reads them)
  const float* grid;        // [n_points, d], 16-byte aligned
  const float* half_norms;  // [n_points] = ||g_j||^2 / 2 in device memory; read only by quantize with a grid
                            // too large for shared memory (see higgs_quantize_workspace_bytes)
  const float* signs;       // [G], 16-byte aligned
  int64_t groups;           // total groups (rows * C / G)
  int n_points;             // 2^code_bits
  int d;                    // grid dim, a power of two dividing G
  int code_bits;            // bits of one d-dim code = log2(n_points): 1..8 or 16 (not bits per value)
};

// Grids with at most this many floats (quantize: n * (d + 1), dequantize: n * d) live in shared
// memory; bigger ones (the 2^16-point E8 grid) are read through the caches from device memory.
constexpr int kGridSmemFloats = 4096;

// log2 of a power of two (n_points, d: validated by csrc/checks.h before any launch).
AQUAKV_HD AQUAKV_INLINE int log2_pow2(int n) {
  int b = 0;
  while ((1 << b) < n) ++b;
  return b;
}
AQUAKV_HD AQUAKV_INLINE int64_t group_code_bytes(int log_g, int d, int code_bits) {
  return ((int64_t{1} << log_g) / d) * code_bits / 8;
}

// ||g||^2 / 2 summed in index order without fused multiply-adds, as the host code does it
// (csrc/include/aquakv/grid.h), so that ties rank the same on both.
AQUAKV_HD AQUAKV_INLINE float half_norm_of(const float* g, int d) {
  float s = 0.f;
  for (int k = 0; k < d; ++k) s = add_rn(s, mul_rn(g[k], g[k]));
  return 0.5f * s;
}
inline void grid_half_norms_host(const float* grid, int n, int d, float* out) {
  for (int j = 0; j < n; ++j) out[j] = half_norm_of(grid + static_cast<int64_t>(j) * d, d);
}

// Shared-memory layout and grid size of one launch. Offsets are in floats, multiples of 4.
struct HiggsPlan {
  int64_t tiles;
  size_t smem_bytes;
  bool grid_in_smem;
  int log_d;
  int code_bytes_per_tile;
  int off_red;     // quantize: per-warp partial sums of squares
  int off_codes;   // dequantize: the tile's code bytes
  int off_scales;  // dequantize: s / G per group of the tile
  int off_grid;    // the grid, when staged
  int off_hn;      // quantize: half norms, when staged
};

AQUAKV_HD AQUAKV_INLINE int round4(int v) { return (v + 3) & ~3; }

template <class Cfg>
inline HiggsPlan higgs_plan(const HiggsArgs& a, bool quantize) {
  HiggsPlan p{};
  constexpr int kGroupsPerTile = Cfg::kTile >> Cfg::kLogG;
  p.tiles = (a.groups + kGroupsPerTile - 1) / kGroupsPerTile;
  p.log_d = log2_pow2(a.d);
  p.code_bytes_per_tile = static_cast<int>(group_code_bytes(Cfg::kLogTile, a.d, a.code_bits));
  int off = 0;
  if (quantize) {
    p.grid_in_smem = a.n_points * (a.d + 1) <= kGridSmemFloats;
    off = Cfg::kTile;  // y, then the codes in place
    p.off_red = off;
    off += 32;
    if (p.grid_in_smem) {
      p.off_grid = off;
      off += round4(a.n_points * a.d);
      p.off_hn = off;
      off += round4(a.n_points);
    }
  } else {
    p.grid_in_smem = a.n_points * a.d <= kGridSmemFloats;
    off = Cfg::kTile;  // y^, then the exchange buffer of split groups
    p.off_codes = off;
    // +16 bytes: the unpacker reads one word past a code, and staging copies 16 bytes at a time
    off += round4((p.code_bytes_per_tile + 16 + 3) / 4);
    p.off_scales = off;
    off += round4(kGroupsPerTile);
    if (p.grid_in_smem) {
      p.off_grid = off;
      off += round4(a.n_points * a.d);
    }
  }
  p.smem_bytes = sizeof(float) * static_cast<size_t>(off);
  return p;
}

// ---- nearest grid point ------------------------------------------------------------------------

// One grid point (D floats) from a 16-byte aligned grid.
template <int D>
AQUAKV_HD AQUAKV_INLINE void load_point(const float* grid, int j, float* g) {
  const float* p = grid + j * D;
  if constexpr (D >= 4) {
    AQUAKV_UNROLL
    for (int q = 0; q < D; q += 4) load_f4(p + q, g + q);
  } else {
    AQUAKV_UNROLL
    for (int k = 0; k < D; ++k) g[k] = p[k];
  }
}

// <y, g> in the association order of the host search (csrc/include/aquakv/grid.h).
template <int D>
AQUAKV_HD AQUAKV_INLINE float dot(const float* y, const float* g) {
  if constexpr (D == 1) {
    return y[0] * g[0];
  } else if constexpr (D == 2) {
    return y[0] * g[0] + y[1] * g[1];
  } else if constexpr (D == 4) {
    return (y[0] * g[0] + y[1] * g[1]) + (y[2] * g[2] + y[3] * g[3]);
  } else {
    float s = 0.f;
    AQUAKV_UNROLL
    for (int k = 0; k < D; ++k) s += y[k] * g[k];
    return s;
  }
}

// Codes of the sub-vectors m < m_valid of y (shared memory, [m_valid, D]); each thread takes SV
// sub-vectors at once so a grid point read from shared memory serves several scores. The code of
// sub-vector m replaces y[m * D] (as raw bits): only its owner ever reads those D floats.
template <int D>
AQUAKV_HD AQUAKV_INLINE void nearest_codes(int tid, int nthreads, float* y_smem, int m_valid, const float* grid,
                                           const float* hn, int n) {
  constexpr int SV = D >= 4 ? 2 : 8 / D;
  for (int m0 = 0; m0 < m_valid; m0 += nthreads * SV) {
    float y[SV][D], best[SV];
    int code[SV];
    AQUAKV_UNROLL
    for (int i = 0; i < SV; ++i) {
      const int m = m0 + i * nthreads + tid;
      AQUAKV_UNROLL
      for (int k = 0; k < D; ++k) y[i][k] = m < m_valid ? y_smem[m * D + k] : 0.f;
      best[i] = -__builtin_huge_valf();
      code[i] = 0;
    }
    for (int j = 0; j < n; ++j) {
      float g[D];
      load_point<D>(grid, j, g);
      const float h = hn[j];
      AQUAKV_UNROLL
      for (int i = 0; i < SV; ++i) {
        const float s = dot<D>(y[i], g) - h;
        if (s > best[i]) {  // strict: the lowest index keeps an exact tie; a NaN score never wins
          best[i] = s;
          code[i] = j;
        }
      }
    }
    AQUAKV_UNROLL
    for (int i = 0; i < SV; ++i) {
      const int m = m0 + i * nthreads + tid;
      if (m < m_valid) y_smem[m * D] = bits_to_float(static_cast<uint32_t>(code[i]));
    }
  }
}

// Any other d (16 and up): one sub-vector at a time, y read from shared memory.
AQUAKV_HD AQUAKV_INLINE void nearest_codes_any(int tid, int nthreads, float* y_smem, int m_valid, const float* grid,
                                               const float* hn, int n, int d) {
  for (int m = tid; m < m_valid; m += nthreads) {
    const float* y = y_smem + static_cast<int64_t>(m) * d;
    float best = -__builtin_huge_valf();
    int code = 0;
    for (int j = 0; j < n; ++j) {
      const float* g = grid + static_cast<int64_t>(j) * d;
      float s = 0.f;
      for (int k = 0; k < d; ++k) s += y[k] * g[k];
      s -= hn[j];
      if (s > best) {
        best = s;
        code = j;
      }
    }
    y_smem[static_cast<int64_t>(m) * d] = bits_to_float(static_cast<uint32_t>(code));
  }
}

// Packs the codes of sub-vectors [0, m_valid) (raw bits at y_smem[m << log_d]) into `out`, 8 codes
// (= code_bits bytes) per thread, LSB first; m_valid * code_bits is a multiple of 8 (whole groups).
AQUAKV_HD AQUAKV_INLINE void pack_codes(int tid, int nthreads, const float* y_smem, int log_d, int m_valid, int code_bits,
                                        uint8_t* out) {
  for (int blk = tid; blk * 8 < m_valid; blk += nthreads) {
    const int m0 = blk * 8;
    const int cnt = m_valid - m0 < 8 ? m_valid - m0 : 8;
    uint64_t lo = 0, hi = 0;  // bit i*code_bits of the block lands in lo (< 64) or hi; code_bits | 64 when it spills
    AQUAKV_UNROLL
    for (int i = 0; i < 8; ++i) {
      if (i >= cnt) break;
      const uint64_t c = float_to_bits(y_smem[(m0 + i) << log_d]);
      const int pos = i * code_bits;
      if (pos < 64) {
        lo |= c << pos;
      } else {
        hi |= c << (pos - 64);
      }
    }
    uint8_t* dst = out + static_cast<int64_t>(blk) * code_bits;
    const int nbytes = cnt * code_bits / 8;
    const bool pow2 = (code_bits & (code_bits - 1)) == 0;
    if (cnt == 8 && pow2 && (reinterpret_cast<uintptr_t>(dst) & (code_bits - 1)) == 0) {
      switch (code_bits) {
        case 1: *dst = static_cast<uint8_t>(lo); break;
        case 2: *reinterpret_cast<uint16_t*>(dst) = static_cast<uint16_t>(lo); break;
        case 4: *reinterpret_cast<uint32_t*>(dst) = static_cast<uint32_t>(lo); break;
        case 8: *reinterpret_cast<uint64_t*>(dst) = lo; break;
        default:
          store16(dst, make_uint4(static_cast<uint32_t>(lo), static_cast<uint32_t>(lo >> 32),
                                  static_cast<uint32_t>(hi), static_cast<uint32_t>(hi >> 32)));
      }
    } else {
      for (int j = 0; j < nbytes; ++j) dst[j] = static_cast<uint8_t>(j < 8 ? lo >> (8 * j) : hi >> (8 * (j - 8)));
    }
  }
}

// Stages the grid (and for quantize its half norms) in shared memory when the plan says so;
// returns through grid/hn the pointers the search and lookup should read.
AQUAKV_HD_TEMPLATE
template <class Simt>
AQUAKV_HD AQUAKV_INLINE void stage_grid(const Simt& simt, const HiggsArgs& a, const HiggsPlan& p, float* smem,
                                        bool with_half_norms, const float*& grid, const float*& hn) {
  grid = a.grid;
  hn = a.half_norms;
  if (!p.grid_in_smem) return;
  const int tid = simt.thread(), nthreads = simt.threads();
  float* g = smem + p.off_grid;
  for (int i = tid; i < a.n_points * a.d; i += nthreads) g[i] = a.grid[i];
  if (with_half_norms) {
    float* h = smem + p.off_hn;
    for (int j = tid; j < a.n_points; j += nthreads) h[j] = half_norm_of(a.grid + j * a.d, a.d);
    hn = h;
  }
  grid = g;
  simt.sync();
}

// ---- quantize -------------------------------------------------------------------------------------

// kGivenScales (higgs_quantize_scaled): s is read from a.scales instead of computed and written; the rest,
// y = H(D x) / s (y = 0 when s == 0) and the search, is the same code.
AQUAKV_HD_TEMPLATE
template <class Cfg, bool kGivenScales = false, class Simt>
AQUAKV_HD void higgs_quantize_body(const Simt& simt, const HiggsArgs& a, const HiggsPlan& p, float* smem) {
  using T = typename Cfg::Elem;
  constexpr int R = Cfg::kRun, kEPT = Cfg::kEPT;
  constexpr int kSeg = Cfg::kG < R ? Cfg::kG : R;  // values of one group inside a run
  constexpr int kSegs = kEPT / kSeg;
  const T* x = static_cast<const T*>(a.values);
  const int tid = simt.thread(), lane = tid & 31, warp = tid >> 5;
  const int64_t total = a.groups << Cfg::kLogG;
  float* y_smem = smem;
  float* red = smem + p.off_red;

  const float *grid, *hn;
  stage_grid(simt, a, p, smem, /*with_half_norms=*/true, grid, hn);

  constexpr bool kHoistSigns = kEPT <= 32;
  float hoisted[kHoistSigns ? kEPT : 1];
  if constexpr (kHoistSigns) load_signs<Cfg, false>(a.signs, hoisted, lane, warp);

  for (int64_t tile = simt.block(); tile < p.tiles; tile += simt.blocks()) {
    const int64_t base = tile << Cfg::kLogTile;
    const int valid = static_cast<int>(total - base < Cfg::kTile ? total - base : Cfg::kTile);

    float v[kEPT];
    AQUAKV_UNROLL
    for (int c = 0; c < Cfg::kChunks; ++c) load_run<T>(x, base + Cfg::load_index(c, 0, lane, warp), total, &v[c * R]);
    if constexpr (kHoistSigns) {
      AQUAKV_UNROLL
      for (int j = 0; j < kEPT; ++j) v[j] *= hoisted[j];
    } else {
      AQUAKV_UNROLL
      for (int c = 0; c < Cfg::kChunks; ++c) {
        float s[R];
        load_floats<R>(a.signs + (Cfg::load_index(c, 0, lane, warp) & (Cfg::kG - 1)), s);
        AQUAKV_UNROLL
        for (int k = 0; k < R; ++k) v[c * R + k] *= s[k];
      }
    }

    // Sum of squares per group: per segment, then over the chunk, lane and warp bits of the group.
    float ss[kSegs];
    if constexpr (!kGivenScales) {
      AQUAKV_UNROLL
      for (int s = 0; s < kSegs; ++s) {
        ss[s] = 0.f;
        AQUAKV_UNROLL
        for (int k = 0; k < kSeg; ++k) ss[s] += v[s * kSeg + k] * v[s * kSeg + k];
      }
      if constexpr (Cfg::kG > R) {
        static_assert(kSegs == Cfg::kChunks, "one segment per chunk");
        AQUAKV_UNROLL
        for (int j = 0; j < Cfg::kQ; ++j) {
          if (Cfg::kLogRun + 5 + j >= Cfg::kLogG) break;
          AQUAKV_UNROLL
          for (int c = 0; c < Cfg::kChunks; ++c) {
            if (c & (1 << j)) continue;
            const float t = ss[c] + ss[c | 1 << j];
            ss[c] = t;
            ss[c | 1 << j] = t;
          }
        }
      }
      sum_over_group_lanes<Cfg>(simt, ss);
      if constexpr (Cfg::kSplit) {
        if (lane == 0) red[warp] = ss[0];  // every chunk holds the warp's total; read after the exchange's barrier
      }
    }

    fwht_tile<Cfg>(simt, v, y_smem, lane, warp);

    float norm[kSegs], inv[kSegs];
    if constexpr (kGivenScales) {
      AQUAKV_UNROLL
      for (int s = 0; s < kSegs; ++s) {  // the segment's group (a split group is the whole tile)
        const int e = Cfg::load_index(s * kSeg / R, s * kSeg % R, lane, warp);
        const int64_t group = Cfg::kSplit ? tile : (base + e) >> Cfg::kLogG;
        norm[s] = Cfg::kSplit || e < valid ? to_float(a.scales[group]) : 0.f;
        inv[s] = norm[s] != 0.f ? 1.f / norm[s] : 0.f;  // s == 0: y = 0; a NaN s: NaN y, code 0
      }
    } else {
      if constexpr (Cfg::kSplit) {
        float t = 0.f;
        for (int w = 0; w < Cfg::kWarps; ++w) t += red[w];
        AQUAKV_UNROLL
        for (int s = 0; s < kSegs; ++s) ss[s] = t;
      }
      AQUAKV_UNROLL
      for (int s = 0; s < kSegs; ++s) {
        norm[s] = sqrtf(ss[s]);
        inv[s] = norm[s] > 0.f ? 1.f / norm[s] : 0.f;  // s == 0: y = 0, never NaN
      }
    }
    // Split groups: one group per tile, so any segment's factor is the group's (store layout).
    AQUAKV_UNROLL
    for (int j = 0; j < kEPT; ++j) v[j] *= inv[Cfg::kSplit ? 0 : j / kSeg];
    AQUAKV_UNROLL
    for (int c = 0; c < Cfg::kChunks; ++c) {
      float* dst = y_smem + Cfg::store_index(c, 0, lane, warp);
      AQUAKV_UNROLL
      for (int q = 0; q < R; q += 4) store_f4(dst + q, &v[c * R + q]);
    }
    if constexpr (kGivenScales) {
      // the scales are the caller's
    } else if constexpr (Cfg::kSplit) {
      if (tid == 0) a.scales[tile] = from_float<__half>(norm[0]);
    } else {
      AQUAKV_UNROLL
      for (int s = 0; s < kSegs; ++s) {
        const int e = Cfg::load_index(s * kSeg / R, s * kSeg % R, lane, warp);
        if ((e & (Cfg::kG - 1)) == 0 && e < valid) a.scales[(base + e) >> Cfg::kLogG] = from_float<__half>(norm[s]);
      }
    }
    simt.sync();  // y complete

    const int m_valid = valid >> p.log_d;
    switch (a.d) {
      case 1: nearest_codes<1>(tid, Cfg::kThreads, y_smem, m_valid, grid, hn, a.n_points); break;
      case 2: nearest_codes<2>(tid, Cfg::kThreads, y_smem, m_valid, grid, hn, a.n_points); break;
      case 4: nearest_codes<4>(tid, Cfg::kThreads, y_smem, m_valid, grid, hn, a.n_points); break;
      case 8: nearest_codes<8>(tid, Cfg::kThreads, y_smem, m_valid, grid, hn, a.n_points); break;
      default: nearest_codes_any(tid, Cfg::kThreads, y_smem, m_valid, grid, hn, a.n_points, a.d);
    }
    simt.sync();  // codes complete

    pack_codes(tid, Cfg::kThreads, y_smem, p.log_d, m_valid, a.code_bits,
               a.codes + tile * static_cast<int64_t>(p.code_bytes_per_tile));
    simt.sync();  // shared memory free for the next tile
  }
}

// ---- dequantize -----------------------------------------------------------------------------------

// Code of sub-vector m from the tile's LSB-first code stream (32-bit words in shared memory).
AQUAKV_HD AQUAKV_INLINE uint32_t extract_code(const uint32_t* words, int m, int code_bits, uint32_t mask) {
  const int o = m * code_bits;
  const uint64_t both = static_cast<uint64_t>(words[(o >> 5) + 1]) << 32 | words[o >> 5];
  return static_cast<uint32_t>(both >> (o & 31)) & mask;
}

// y^ of sub-vectors [0, m_valid) of the tile into y_smem ([m_valid, D] floats): one code
// extraction per sub-vector, D grid values copied. Keeping the decode out of registers lets one
// kernel serve every d without a register array live across the switch over d.
template <int D>
AQUAKV_HD AQUAKV_INLINE void decode_codes(int tid, int nthreads, const uint32_t* words, float* y_smem, int m_valid,
                                          const float* grid, int code_bits) {
  const uint32_t mask = (1u << code_bits) - 1u;
  for (int m = tid; m < m_valid; m += nthreads) {
    const uint32_t code = extract_code(words, m, code_bits, mask);
    float g[D];
    load_point<D>(grid, static_cast<int>(code), g);
    AQUAKV_UNROLL
    for (int k = 0; k < D; ++k) y_smem[m * D + k] = g[k];
  }
}

AQUAKV_HD AQUAKV_INLINE void decode_codes_any(int tid, int nthreads, const uint32_t* words, float* y_smem, int m_valid,
                                              const float* grid, int code_bits, int d) {
  const uint32_t mask = (1u << code_bits) - 1u;
  for (int m = tid; m < m_valid; m += nthreads) {
    const float* g = grid + static_cast<int64_t>(extract_code(words, m, code_bits, mask)) * d;
    for (int k = 0; k < d; ++k) y_smem[static_cast<int64_t>(m) * d + k] = g[k];
  }
}

AQUAKV_HD_TEMPLATE
template <class Cfg, class Simt>
AQUAKV_HD void higgs_dequantize_body(const Simt& simt, const HiggsArgs& a, const HiggsPlan& p, float* smem) {
  using T = typename Cfg::Elem;
  constexpr int R = Cfg::kRun, kEPT = Cfg::kEPT;
  constexpr int kGroupsPerTile = Cfg::kTile >> Cfg::kLogG;
  T* out = static_cast<T*>(a.values);
  const int tid = simt.thread(), lane = tid & 31, warp = tid >> 5;
  const int64_t total = a.groups << Cfg::kLogG;
  const int64_t group_bytes = group_code_bytes(Cfg::kLogG, a.d, a.code_bits);
  float* y_smem = smem;  // y^ of the tile, then (split groups) the exchange buffer
  uint8_t* code_smem = reinterpret_cast<uint8_t*>(smem + p.off_codes);
  const uint32_t* words = reinterpret_cast<const uint32_t*>(code_smem);
  float* factor = smem + p.off_scales;
  const float inv_g = 1.f / static_cast<float>(Cfg::kG);

  const float *grid, *unused_hn;
  stage_grid(simt, a, p, smem, /*with_half_norms=*/false, grid, unused_hn);

  constexpr bool kHoistSigns = kEPT <= 32;
  float hoisted[kHoistSigns ? kEPT : 1];
  if constexpr (kHoistSigns) load_signs<Cfg, true>(a.signs, hoisted, lane, warp);

  for (int64_t tile = simt.block(); tile < p.tiles; tile += simt.blocks()) {
    const int64_t base = tile << Cfg::kLogTile;
    const int valid = static_cast<int>(total - base < Cfg::kTile ? total - base : Cfg::kTile);
    const int valid_groups = valid >> Cfg::kLogG;

    const uint8_t* src = a.codes + tile * static_cast<int64_t>(p.code_bytes_per_tile);
    const int nbytes = static_cast<int>(valid_groups * group_bytes);
    if (((reinterpret_cast<uintptr_t>(src) | static_cast<uintptr_t>(nbytes)) & 15) == 0) {
      for (int i = tid * 16; i < nbytes; i += Cfg::kThreads * 16) store16(code_smem + i, load16(src + i));
    } else {
      for (int i = tid; i < nbytes; i += Cfg::kThreads) code_smem[i] = src[i];
    }
    for (int gi = tid; gi < valid_groups; gi += Cfg::kThreads)
      factor[gi] = to_float(a.scales[tile * kGroupsPerTile + gi]) * inv_g;
    simt.sync();  // codes and factors staged

    const int m_valid = valid >> p.log_d;
    switch (a.d) {
      case 1: decode_codes<1>(tid, Cfg::kThreads, words, y_smem, m_valid, grid, a.code_bits); break;
      case 2: decode_codes<2>(tid, Cfg::kThreads, words, y_smem, m_valid, grid, a.code_bits); break;
      case 4: decode_codes<4>(tid, Cfg::kThreads, words, y_smem, m_valid, grid, a.code_bits); break;
      case 8: decode_codes<8>(tid, Cfg::kThreads, words, y_smem, m_valid, grid, a.code_bits); break;
      default: decode_codes_any(tid, Cfg::kThreads, words, y_smem, m_valid, grid, a.code_bits, a.d);
    }
    simt.sync();  // y^ complete

    float v[kEPT];
    AQUAKV_UNROLL
    for (int c = 0; c < Cfg::kChunks; ++c) {
      const int e0 = Cfg::load_index(c, 0, lane, warp);
      AQUAKV_UNROLL
      for (int q = 0; q < R; q += 4) {
        if (e0 < valid) {
          load_f4(y_smem + e0 + q, &v[c * R + q]);
        } else {  // past the last group: never stored, but keep the arithmetic on defined values
          v[c * R + q] = v[c * R + q + 1] = v[c * R + q + 2] = v[c * R + q + 3] = 0.f;
        }
      }
    }
    if constexpr (Cfg::kSplit) simt.sync();  // everyone has read y^ before the exchange overwrites it

    fwht_tile<Cfg>(simt, v, y_smem, lane, warp);

    AQUAKV_UNROLL
    for (int c = 0; c < Cfg::kChunks; ++c) {
      const int e0 = Cfg::store_index(c, 0, lane, warp);
      float s[R];
      if constexpr (kHoistSigns) {
        AQUAKV_UNROLL
        for (int k = 0; k < R; ++k) s[k] = hoisted[c * R + k];
      } else {
        load_floats<R>(a.signs + (e0 & (Cfg::kG - 1)), s);
      }
      AQUAKV_UNROLL
      for (int k = 0; k < R; ++k) {
        // a run is inside one group unless G < R; never read a factor of a group past the end
        const int gi = Cfg::kG >= R ? e0 >> Cfg::kLogG : (e0 + k) >> Cfg::kLogG;
        const float f = gi < valid_groups ? factor[gi] : 0.f;
        v[c * R + k] = f * s[k] * v[c * R + k];
      }
      store_run<T>(out, base + e0, total, &v[c * R]);
    }
    simt.sync();  // shared memory free for the next tile
  }
}

#if defined(__CUDACC__) && !defined(AQUAKV_HOST_EMULATION)
template <class Cfg, bool kGivenScales>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kMinBlocks) higgs_quantize_kernel(HiggsArgs a, HiggsPlan p) {
  higgs_quantize_body<Cfg, kGivenScales>(DeviceSimt{}, a, p, dynamic_smem());
}
template <class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kMinBlocks) higgs_dequantize_kernel(HiggsArgs a, HiggsPlan p) {
  higgs_dequantize_body<Cfg>(DeviceSimt{}, a, p, dynamic_smem());
}
template <typename = void>  // a template only so that several translation units may include it
__global__ void grid_half_norms_kernel(const float* grid, int n, int d, float* out) {
  const int j = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (j < n) out[j] = half_norm_of(grid + static_cast<int64_t>(j) * d, d);
}

// Device scratch quantize needs: the half norms of a grid too large for shared memory.
inline size_t higgs_quantize_workspace_bytes(int n_points, int d) {
  return n_points * (d + 1) <= kGridSmemFloats ? 0 : sizeof(float) * static_cast<size_t>(n_points);
}

// Fused quantize of a.groups groups of 2^log_g values of `dtype` on `stream`. `workspace` must hold
// higgs_quantize_workspace_bytes(a.n_points, a.d) bytes (may be null when that is 0).
// kGivenScales: higgs_quantize_scaled, s read from a.scales (not written).
template <bool kGivenScales = false>  // a template: instantiates the kernels only where the launcher is called
inline cudaError_t higgs_quantize(DType dtype, int log_g, HiggsArgs a, float* workspace, cudaStream_t stream) {
  if (a.groups == 0) return cudaSuccess;
  if (higgs_quantize_workspace_bytes(a.n_points, a.d) > 0) {
    if (workspace == nullptr) return cudaErrorInvalidValue;
    grid_half_norms_kernel<><<<(a.n_points + 255) / 256, 256, 0, stream>>>(a.grid, a.n_points, a.d, workspace);
    if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
    a.half_norms = workspace;
  }
  return visit_tile(dtype, log_g, [&](auto tag) -> cudaError_t {
    using Cfg = typename decltype(tag)::type;
    const HiggsPlan p = higgs_plan<Cfg>(a, /*quantize=*/true);
    const auto kernel = higgs_quantize_kernel<Cfg, kGivenScales>;
    if (cudaError_t err = allow_smem(kernel, p.smem_bytes); err != cudaSuccess) return err;
    kernel<<<static_cast<unsigned>(grid_for(p.tiles)), Cfg::kThreads, p.smem_bytes, stream>>>(a, p);
    return cudaGetLastError();
  });
}

// Fused dequantize into a.values (2^log_g values of `dtype` per group) on `stream`.
template <typename = void>  // instantiates the kernels only where the launcher is called
inline cudaError_t higgs_dequantize(DType dtype, int log_g, const HiggsArgs& a, cudaStream_t stream) {
  if (a.groups == 0) return cudaSuccess;
  return visit_tile(dtype, log_g, [&](auto tag) -> cudaError_t {
    using Cfg = typename decltype(tag)::type;
    const HiggsPlan p = higgs_plan<Cfg>(a, /*quantize=*/false);
    const auto kernel = higgs_dequantize_kernel<Cfg>;
    if (cudaError_t err = allow_smem(kernel, p.smem_bytes); err != cudaSuccess) return err;
    kernel<<<static_cast<unsigned>(grid_for(p.tiles)), Cfg::kThreads, p.smem_bytes, stream>>>(a, p);
    return cudaGetLastError();
  });
}
#endif

}  // namespace aquakv::cuda

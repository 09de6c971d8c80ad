// Command-line runner of the CUDA kernel bodies on the host (see host_simt.h), used by
// tests/test_cuda_emulated.py. Raw little-endian binary files in and out:
//
//   emulate_ops hadamard   DTYPE ROWS LOG_N SCALE X SIGNS|- OUT                      [MAX_BLOCKS]
//   emulate_ops quantize   DTYPE ROWS C LOG_G N_POINTS D X GRID SIGNS CODES SCALES    [MAX_BLOCKS]
//   emulate_ops quantize_scaled DTYPE ROWS C LOG_G N_POINTS D X GRID SIGNS CODES SCALES [MAX_BLOCKS]
//     (SCALES is read: the given s of every group; higgs_quantize_scaled)
//   emulate_ops dequantize DTYPE ROWS C LOG_G N_POINTS D CODES SCALES GRID SIGNS OUT  [MAX_BLOCKS]
//   emulate_ops linear     DTYPE BATCH OUT IN LOG_G N_POINTS D X CODES SCALES GRID SIGNS BIAS|- Y [MAX_BLOCKS]
//     (higgs_linear: both launches, the gemv with the batch tile its launcher picks)
//   emulate_ops pack       ROWS COUNT BITS CODES OUT                                  [MAX_BLOCKS]
//   emulate_ops unpack     ROWS COUNT BITS PACKED OUT                                 [MAX_BLOCKS]
//   emulate_ops reconstruct DTYPE B T C LOG_G N_POINTS D HEAD_DIM PRED_COLS RESIDUAL_FIRST CODES SCALES GRID
//               SIGNS PRED|- BIAS COS|- SIN|- OUT OUT_NUMEL S0 S1 S2 S3 HAT|- HAT_NUMEL H0 H1 H2   [MAX_BLOCKS]
//     (the epilogue of aqua_reconstruct, as its launcher runs it: PRED is the prediction without bias,
//     [C/PRED_COLS, B*T, PRED_COLS] float32; OUT and HAT are read, written with the given strides and
//     written back; RESIDUAL_FIRST 1 forces the dequantize-first path the launcher takes for big segments)
//
// DTYPE is f32, f16 or bf16. MAX_BLOCKS caps the grid (default 3) so that the grid-stride loops
// run several tiles per block, as they do on a GPU for large inputs.
#define AQUAKV_HOST_EMULATION 1

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "aquakv/aqua.cuh"
#include "aquakv/bitpack.cuh"
#include "aquakv/bitpack.h"
#include "aquakv/hadamard.cuh"
#include "aquakv/higgs.cuh"
#include "aquakv/higgs_linear.cuh"
#include "host_simt.h"

namespace {

using aquakv::cuda::DType;
using aquakv::emu::HostSimt;

// 16-byte aligned byte buffer, like a CUDA allocation.
struct Buffer {
  std::vector<uint4> words;
  size_t bytes = 0;
  explicit Buffer(size_t n = 0) : words(n / 16 + 2), bytes(n) {}
  void* data() { return words.data(); }
};

Buffer read_file(const std::string& path, size_t bytes) {
  Buffer b(bytes);
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open " + path);
  f.read(static_cast<char*>(b.data()), static_cast<std::streamsize>(bytes));
  if (static_cast<size_t>(f.gcount()) != bytes)
    throw std::runtime_error(path + ": expected " + std::to_string(bytes) + " bytes");
  return b;
}

void write_file(const std::string& path, const void* p, size_t bytes) {
  std::ofstream f(path, std::ios::binary);
  f.write(static_cast<const char*>(p), static_cast<std::streamsize>(bytes));
  if (!f) throw std::runtime_error("cannot write " + path);
}

DType parse_dtype(const std::string& s) {
  if (s == "f32") return DType::kFloat32;
  if (s == "f16") return DType::kFloat16;
  if (s == "bf16") return DType::kBFloat16;
  throw std::runtime_error("dtype must be f32, f16 or bf16, got " + s);
}
size_t dtype_size(DType d) { return d == DType::kFloat32 ? 4 : 2; }

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": unsupported configuration");
}

int64_t blocks_for(int64_t tiles, int64_t max_blocks) { return tiles < max_blocks ? tiles : max_blocks; }

int run_hadamard(char** argv, int argc) {
  const DType dtype = parse_dtype(argv[2]);
  const int64_t rows = std::atoll(argv[3]);
  const int log_n = std::atoi(argv[4]);
  const float scale = std::strtof(argv[5], nullptr);
  const int64_t max_blocks = argc > 9 ? std::atoll(argv[9]) : 3;
  const size_t bytes = static_cast<size_t>(rows << log_n) * dtype_size(dtype);
  Buffer x = read_file(argv[6], bytes), out(bytes);
  const bool has_signs = std::string(argv[7]) != "-";
  Buffer signs = has_signs ? read_file(argv[7], sizeof(float) << log_n) : Buffer();
  aquakv::cuda::HadamardArgs a{x.data(), out.data(), has_signs ? static_cast<const float*>(signs.data()) : nullptr,
                               scale, rows};
  check(aquakv::cuda::visit_tile(dtype, log_n,
                                     [&](auto tag) {
                                       using Cfg = typename decltype(tag)::type;
                                       using Plan = aquakv::cuda::HadamardPlan<Cfg>;
                                       aquakv::emu::run_grid(blocks_for(Plan::tiles(rows), max_blocks), Cfg::kThreads,
                                                             Plan::kSmemBytes, [&](const HostSimt& s, float* smem) {
                                                               aquakv::cuda::hadamard_body<Cfg>(s, a, smem);
                                                             });
                                       return cudaSuccess;
                                     }),
        "hadamard");
  write_file(argv[8], out.data(), bytes);
  return 0;
}

int run_quantize(char** argv, int argc, bool given_scales) {
  const DType dtype = parse_dtype(argv[2]);
  const int64_t rows = std::atoll(argv[3]), channels = std::atoll(argv[4]);
  const int log_g = std::atoi(argv[5]);
  const int n_points = std::atoi(argv[6]), d = std::atoi(argv[7]);
  const int64_t max_blocks = argc > 13 ? std::atoll(argv[13]) : 3;
  const int code_bits = aquakv::cuda::log2_pow2(n_points);
  const int64_t groups = rows * (channels >> log_g);
  const int64_t code_bytes = groups * aquakv::cuda::group_code_bytes(log_g, d, code_bits);
  Buffer x = read_file(argv[8], static_cast<size_t>(rows * channels) * dtype_size(dtype));
  Buffer grid = read_file(argv[9], sizeof(float) * n_points * d);
  Buffer signs = read_file(argv[10], sizeof(float) << log_g);
  Buffer codes(code_bytes), half_norms(sizeof(float) * n_points);
  Buffer scales = given_scales ? read_file(argv[12], 2 * groups) : Buffer(2 * groups);
  aquakv::cuda::grid_half_norms_host(static_cast<const float*>(grid.data()), n_points, d,
                                     static_cast<float*>(half_norms.data()));
  aquakv::cuda::HiggsArgs a{};
  a.values = x.data();
  a.codes = static_cast<uint8_t*>(codes.data());
  a.scales = static_cast<__half*>(scales.data());
  a.grid = static_cast<const float*>(grid.data());
  a.half_norms = static_cast<const float*>(half_norms.data());
  a.signs = static_cast<const float*>(signs.data());
  a.groups = groups;
  a.n_points = n_points;
  a.d = d;
  a.code_bits = code_bits;
  check(aquakv::cuda::visit_tile(dtype, log_g,
                                  [&](auto tag) {
                                    using Cfg = typename decltype(tag)::type;
                                    const auto plan = aquakv::cuda::higgs_plan<Cfg>(a, /*quantize=*/true);
                                    aquakv::emu::run_grid(blocks_for(plan.tiles, max_blocks), Cfg::kThreads,
                                                          plan.smem_bytes, [&](const HostSimt& s, float* smem) {
                                                            if (given_scales) {
                                                              aquakv::cuda::higgs_quantize_body<Cfg, true>(s, a, plan,
                                                                                                           smem);
                                                            } else {
                                                              aquakv::cuda::higgs_quantize_body<Cfg>(s, a, plan, smem);
                                                            }
                                                          });
                                    return cudaSuccess;
                                  }),
        "quantize");
  write_file(argv[11], codes.data(), code_bytes);
  if (!given_scales) write_file(argv[12], scales.data(), 2 * groups);
  return 0;
}

int run_dequantize(char** argv, int argc) {
  const DType dtype = parse_dtype(argv[2]);
  const int64_t rows = std::atoll(argv[3]), channels = std::atoll(argv[4]);
  const int log_g = std::atoi(argv[5]);
  const int n_points = std::atoi(argv[6]), d = std::atoi(argv[7]);
  const int64_t max_blocks = argc > 13 ? std::atoll(argv[13]) : 3;
  const int code_bits = aquakv::cuda::log2_pow2(n_points);
  const int64_t groups = rows * (channels >> log_g);
  const int64_t code_bytes = groups * aquakv::cuda::group_code_bytes(log_g, d, code_bits);
  const size_t out_bytes = static_cast<size_t>(rows * channels) * dtype_size(dtype);
  Buffer codes = read_file(argv[8], code_bytes), scales = read_file(argv[9], 2 * groups);
  Buffer grid = read_file(argv[10], sizeof(float) * n_points * d);
  Buffer signs = read_file(argv[11], sizeof(float) << log_g);
  Buffer out(out_bytes);
  aquakv::cuda::HiggsArgs a{};
  a.values = out.data();
  a.codes = static_cast<uint8_t*>(codes.data());
  a.scales = static_cast<__half*>(scales.data());
  a.grid = static_cast<const float*>(grid.data());
  a.signs = static_cast<const float*>(signs.data());
  a.groups = groups;
  a.n_points = n_points;
  a.d = d;
  a.code_bits = code_bits;
  check(aquakv::cuda::visit_tile(dtype, log_g,
                                  [&](auto tag) {
                                    using Cfg = typename decltype(tag)::type;
                                    const auto plan = aquakv::cuda::higgs_plan<Cfg>(a, /*quantize=*/false);
                                    aquakv::emu::run_grid(blocks_for(plan.tiles, max_blocks), Cfg::kThreads,
                                                          plan.smem_bytes, [&](const HostSimt& s, float* smem) {
                                                            aquakv::cuda::higgs_dequantize_body<Cfg>(s, a, plan, smem);
                                                          });
                                    return cudaSuccess;
                                  }),
        "dequantize");
  write_file(argv[12], out.data(), out_bytes);
  return 0;
}

int run_bitpack(char** argv, int argc, bool pack) {
  const int64_t rows = std::atoll(argv[2]), count = std::atoll(argv[3]);
  const int bits = std::atoi(argv[4]);
  const int64_t max_blocks = argc > 7 ? std::atoll(argv[7]) : 3;
  const int64_t row_bytes = aquakv::packed_row_bytes(count, bits);
  aquakv::cuda::BitpackArgs a{nullptr, nullptr, rows, count, bits};
  Buffer codes(sizeof(int32_t) * rows * count), packed(rows * row_bytes);
  if (pack) {
    codes = read_file(argv[5], sizeof(int32_t) * rows * count);
  } else {
    packed = read_file(argv[5], rows * row_bytes);
  }
  a.codes = static_cast<int32_t*>(codes.data());
  a.packed = static_cast<uint8_t*>(packed.data());
  const int64_t nblocks = blocks_for(aquakv::cuda::bitpack_blocks(a), max_blocks);
  aquakv::emu::run_grid(nblocks, aquakv::cuda::kBitpackThreads, 0, [&](const HostSimt& s, float*) {
    if (pack) {
      aquakv::cuda::pack_bits_body(s, a);
    } else {
      aquakv::cuda::unpack_bits_body(s, a);
    }
  });
  if (pack) {
    write_file(argv[6], packed.data(), rows * row_bytes);
  } else {
    write_file(argv[6], codes.data(), sizeof(int32_t) * rows * count);
  }
  return 0;
}

int run_reconstruct(char** argv, int argc) {
  const DType dtype = parse_dtype(argv[2]);
  const int64_t batch = std::atoll(argv[3]), tokens = std::atoll(argv[4]), channels = std::atoll(argv[5]);
  const int log_g = std::atoi(argv[6]), n_points = std::atoi(argv[7]), d = std::atoi(argv[8]);
  const int64_t head_dim = std::atoll(argv[9]), pred_cols = std::atoll(argv[10]);
  const bool force_residual = std::atoi(argv[11]) != 0;
  const int64_t max_blocks = argc > 31 ? std::atoll(argv[31]) : 3;
  const int64_t rows = batch * tokens, groups = rows * (channels >> log_g);
  const int code_bits = aquakv::cuda::log2_pow2(n_points);
  const auto opt = [](const char* path, size_t bytes) { return std::string(path) == "-" ? Buffer() : read_file(path, bytes); };
  Buffer codes = read_file(argv[12], groups * aquakv::cuda::group_code_bytes(log_g, d, code_bits));
  Buffer scales = read_file(argv[13], 2 * groups);
  Buffer grid = read_file(argv[14], sizeof(float) * n_points * d);
  Buffer signs = read_file(argv[15], sizeof(float) << log_g);
  Buffer pred = opt(argv[16], sizeof(float) * rows * channels);
  Buffer bias = read_file(argv[17], sizeof(float) * channels);
  Buffer cos = opt(argv[18], sizeof(float) * rows * head_dim), sin = opt(argv[19], sizeof(float) * rows * head_dim);
  const size_t out_bytes = static_cast<size_t>(std::atoll(argv[21])) * dtype_size(dtype);
  Buffer out = read_file(argv[20], out_bytes);
  const bool has_hat = std::string(argv[26]) != "-";
  const size_t hat_bytes = sizeof(float) * static_cast<size_t>(std::atoll(argv[27]));
  Buffer hat = has_hat ? read_file(argv[26], hat_bytes) : Buffer();

  aquakv::cuda::ReconArgs a{};
  a.codes = static_cast<const uint8_t*>(codes.data());
  a.scales = static_cast<const __half*>(scales.data());
  a.grid = static_cast<const float*>(grid.data());
  a.signs = static_cast<const float*>(signs.data());
  a.log_g = log_g;
  a.d = d;
  a.code_bits = code_bits;
  a.pred = pred.bytes ? static_cast<const float*>(pred.data()) : nullptr;
  a.pred_cols = pred_cols;
  a.bias = static_cast<const float*>(bias.data());
  a.cos = cos.bytes ? static_cast<const float*>(cos.data()) : nullptr;
  a.sin = sin.bytes ? static_cast<const float*>(sin.data()) : nullptr;
  a.out = out.data();
  for (int i = 0; i < 4; ++i) a.out_stride[i] = std::atoll(argv[22 + i]);
  a.hat = has_hat ? static_cast<float*>(hat.data()) : nullptr;
  for (int i = 0; i < 3; ++i) a.hat_stride[i] = std::atoll(argv[28 + i]);
  a.batch = batch;
  a.tokens = tokens;
  a.channels = channels;
  a.head_dim = head_dim;

  const int64_t tile_values = aquakv::cuda::recon_tile_values(head_dim, int64_t{1} << log_g);
  Buffer residual;
  if (force_residual || tile_values == 0) {  // the launcher's dequantize-first path
    residual = Buffer(sizeof(float) * rows * channels);
    aquakv::cuda::HiggsArgs h{};
    h.values = residual.data();
    h.codes = static_cast<uint8_t*>(codes.data());
    h.scales = static_cast<__half*>(scales.data());
    h.grid = a.grid;
    h.signs = a.signs;
    h.groups = groups;
    h.n_points = n_points;
    h.d = d;
    h.code_bits = code_bits;
    check(aquakv::cuda::visit_tile(DType::kFloat32, log_g,
                                    [&](auto tag) {
                                      using Cfg = typename decltype(tag)::type;
                                      const auto plan = aquakv::cuda::higgs_plan<Cfg>(h, /*quantize=*/false);
                                      aquakv::emu::run_grid(blocks_for(plan.tiles, max_blocks), Cfg::kThreads,
                                                            plan.smem_bytes, [&](const HostSimt& s, float* smem) {
                                                              aquakv::cuda::higgs_dequantize_body<Cfg>(s, h, plan, smem);
                                                            });
                                      return cudaSuccess;
                                    }),
          "reconstruct (dequantize first)");
    a.residual = static_cast<const float*>(residual.data());
  }
  const auto launch = [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    const int threads = aquakv::cuda::kReconThreads;
    if (a.residual != nullptr) {
      const int64_t blocks = blocks_for((rows * channels + threads - 1) / threads, max_blocks);
      aquakv::emu::run_grid(blocks, threads, 0, [&](const HostSimt& s, float*) {
        aquakv::cuda::aqua_reconstruct_residual_body<T>(s, a);
      });
    } else {
      const int64_t blocks = blocks_for((rows * channels + tile_values - 1) / tile_values, max_blocks);
      aquakv::emu::run_grid(blocks, threads, sizeof(float) * tile_values, [&](const HostSimt& s, float* smem) {
        aquakv::cuda::aqua_reconstruct_body<T>(s, a, tile_values, smem);
      });
    }
    return cudaSuccess;
  };
  cudaError_t err = cudaErrorInvalidValue;
  if (dtype == DType::kFloat32) err = launch(aquakv::cuda::TypeTag<float>{});
  if (dtype == DType::kFloat16) err = launch(aquakv::cuda::TypeTag<__half>{});
  if (dtype == DType::kBFloat16) err = launch(aquakv::cuda::TypeTag<__nv_bfloat16>{});
  check(err, "reconstruct");
  write_file(argv[20], out.data(), out_bytes);
  if (has_hat) write_file(argv[26], hat.data(), hat_bytes);
  return 0;
}

int run_linear(char** argv, int argc) {
  const DType dtype = parse_dtype(argv[2]);
  const int64_t batch = std::atoll(argv[3]), out = std::atoll(argv[4]), in = std::atoll(argv[5]);
  const int log_g = std::atoi(argv[6]), n_points = std::atoi(argv[7]), d = std::atoi(argv[8]);
  const int64_t max_blocks = argc > 16 ? std::atoll(argv[16]) : 3;
  const int code_bits = aquakv::cuda::log2_pow2(n_points);
  const int64_t groups = in >> log_g;
  const size_t es = dtype_size(dtype);
  Buffer x = read_file(argv[9], static_cast<size_t>(batch * in) * es);
  Buffer codes = read_file(argv[10], out * groups * aquakv::cuda::group_code_bytes(log_g, d, code_bits));
  Buffer scales = read_file(argv[11], 2 * out * groups);
  Buffer grid = read_file(argv[12], sizeof(float) * n_points * d);
  Buffer signs = read_file(argv[13], sizeof(float) << log_g);
  const bool has_bias = std::string(argv[14]) != "-";
  Buffer bias = has_bias ? read_file(argv[14], out * es) : Buffer();
  Buffer xr(sizeof(float) * batch * in), y(static_cast<size_t>(batch * out) * es);
  aquakv::cuda::LinearCudaArgs a{};
  a.x = x.data();
  a.signs = static_cast<const float*>(signs.data());
  a.xr = static_cast<float*>(xr.data());
  a.codes = static_cast<const uint8_t*>(codes.data());
  a.scales = static_cast<const uint16_t*>(scales.data());
  a.grid = static_cast<const float*>(grid.data());
  a.bias = has_bias ? bias.data() : nullptr;
  a.y = y.data();
  a.batch = batch;
  a.in = in;
  a.out = out;
  a.log_g = log_g;
  a.n_points = n_points;
  a.d = d;
  a.code_bits = code_bits;
  const int threads = aquakv::cuda::kLinearThreads;
  const auto launch = [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    if (in > 0)
      aquakv::emu::run_grid(blocks_for(aquakv::cuda::linear_rotate_tiles(a), max_blocks), threads,
                            aquakv::cuda::linear_rotate_smem(a), [&](const HostSimt& s, float* smem) {
                              aquakv::cuda::higgs_linear_rotate_body<T>(s, a, smem);
                            });
    const auto gemv = [&](auto kb) {
      constexpr int kB = decltype(kb)::value;
      aquakv::emu::run_grid(blocks_for(aquakv::cuda::linear_gemv_blocks(a, kB), max_blocks), threads,
                            aquakv::cuda::linear_gemv_smem(a), [&](const HostSimt& s, float* smem) {
                              aquakv::cuda::higgs_linear_gemv_body<T, kB>(s, a, smem);
                            });
    };
    switch (aquakv::cuda::linear_batch_tile(batch)) {
      case 1: gemv(aquakv::cuda::IntTag<1>{}); break;
      case 2: gemv(aquakv::cuda::IntTag<2>{}); break;
      case 4: gemv(aquakv::cuda::IntTag<4>{}); break;
      default: gemv(aquakv::cuda::IntTag<8>{}); break;
    }
    return cudaSuccess;
  };
  cudaError_t err = cudaErrorInvalidValue;
  if (dtype == DType::kFloat32) err = launch(aquakv::cuda::TypeTag<float>{});
  if (dtype == DType::kFloat16) err = launch(aquakv::cuda::TypeTag<__half>{});
  if (dtype == DType::kBFloat16) err = launch(aquakv::cuda::TypeTag<__nv_bfloat16>{});
  check(err, "linear");
  write_file(argv[15], y.data(), static_cast<size_t>(batch * out) * es);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const std::string op = argc > 1 ? argv[1] : "";
    if (op == "hadamard" && argc >= 9) return run_hadamard(argv, argc);
    if (op == "quantize" && argc >= 13) return run_quantize(argv, argc, false);
    if (op == "quantize_scaled" && argc >= 13) return run_quantize(argv, argc, true);
    if (op == "dequantize" && argc >= 13) return run_dequantize(argv, argc);
    if ((op == "pack" || op == "unpack") && argc >= 7) return run_bitpack(argv, argc, op == "pack");
    if (op == "linear" && argc >= 16) return run_linear(argv, argc);
    if (op == "reconstruct" && argc >= 31) return run_reconstruct(argv, argc);
    std::fprintf(stderr, "usage: see the header of tests/cuda_emulation/emulate_ops.cu\n");
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "emulate_ops: %s\n", e.what());
    return 1;
  }
}

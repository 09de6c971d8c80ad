// Command-line runner of the CUDA kernel bodies on the host (see host_simt.h), used by
// tests/test_cuda_emulated.py. Raw little-endian binary files in and out:
//
//   emulate_ops hadamard   DTYPE ROWS LOG_N SCALE X SIGNS|- OUT                      [MAX_BLOCKS]
//   emulate_ops quantize   DTYPE ROWS C LOG_G N_POINTS D X GRID SIGNS CODES SCALES    [MAX_BLOCKS]
//   emulate_ops dequantize DTYPE ROWS C LOG_G N_POINTS D CODES SCALES GRID SIGNS OUT  [MAX_BLOCKS]
//   emulate_ops pack       ROWS COUNT BITS CODES OUT                                  [MAX_BLOCKS]
//   emulate_ops unpack     ROWS COUNT BITS PACKED OUT                                 [MAX_BLOCKS]
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

#include "aquakv/bitpack.cuh"
#include "aquakv/bitpack.h"
#include "aquakv/hadamard.cuh"
#include "aquakv/higgs.cuh"
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

int run_quantize(char** argv, int argc) {
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
  Buffer codes(code_bytes), scales(2 * groups), half_norms(sizeof(float) * n_points);
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
                                                            aquakv::cuda::higgs_quantize_body<Cfg>(s, a, plan, smem);
                                                          });
                                    return cudaSuccess;
                                  }),
        "quantize");
  write_file(argv[11], codes.data(), code_bytes);
  write_file(argv[12], scales.data(), 2 * groups);
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

}  // namespace

int main(int argc, char** argv) {
  try {
    const std::string op = argc > 1 ? argv[1] : "";
    if (op == "hadamard" && argc >= 9) return run_hadamard(argv, argc);
    if (op == "quantize" && argc >= 13) return run_quantize(argv, argc);
    if (op == "dequantize" && argc >= 13) return run_dequantize(argv, argc);
    if ((op == "pack" || op == "unpack") && argc >= 7) return run_bitpack(argv, argc, op == "pack");
    std::fprintf(stderr, "usage: see the header of tests/cuda_emulation/emulate_ops.cu\n");
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "emulate_ops: %s\n", e.what());
    return 1;
  }
}

// Microbenchmarks of the torch-free CUDA kernels (csrc/include/aquakv/*.cuh).
//
// For every case: random non-zero inputs, warm-up, then the median over many samples of
// cudaEvent-timed batches of launches, rotating over enough input/output buffers that the working
// set is at least 4x the L2 cache (so L2 does not flatter small sizes). Bandwidth counts the bytes
// each kernel must read plus write once, and is shown beside a device-to-device copy measured in
// the same run: "% copy" is the figure bench/README.md targets (>= 85% hadamard, >= 70% quantize /
// dequantize at large T on an H100).
//
//   bench_kernels            all cases (hadamard 64..32768 at 256 MiB of fp16 rows; HIGGS at
//                            T = 4k, 32k, 128k tokens x C = 1024)
//   bench_kernels --quick    fewer samples and sizes (a smoke run)
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <functional>
#include <string>
#include <vector>

#include "aquakv/bitpack.cuh"
#include "aquakv/hadamard.cuh"
#include "aquakv/higgs.cuh"

namespace {

using namespace aquakv::cuda;

#define CHECK_CUDA(expr)                                                                                  \
  do {                                                                                                    \
    const cudaError_t err_ = (expr);                                                                      \
    if (err_ != cudaSuccess) {                                                                            \
      std::fprintf(stderr, "%s:%d: %s failed: %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(err_)); \
      std::exit(1);                                                                                       \
    }                                                                                                     \
  } while (0)

// Deterministic pseudo-random values in [-2, 2] that are never exactly 0 (zeros hide bugs and can time faster).
template <typename T>
__global__ void fill_random(T* p, int64_t n, uint32_t seed) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ seed;
    h ^= h >> 16;
    h *= 0x7feb352du;
    h ^= h >> 15;
    h *= 0x846ca68bu;
    h ^= h >> 16;
    const float u = (static_cast<float>(h >> 8) + 0.5f) * (1.0f / 16777216.0f);  // (0, 1)
    const float v = 4.0f * u - 2.0f;
    p[i] = from_float<T>(v == 0.f ? 0.25f : v);
  }
}

template <typename T>
void fill(T* p, int64_t n, uint32_t seed) {
  fill_random<T><<<1024, 256>>>(p, n, seed);
  CHECK_CUDA(cudaGetLastError());
}

struct Device {
  cudaDeviceProp prop{};
  double copy_gbs = 0;  // measured device-to-device copy bandwidth, read + write bytes
};

// Median time in ms of one call of `launch(i)` (i = buffer index to use), over `samples` samples of
// `batch` calls each, after `warmup` calls.
double time_ms(const std::function<void(int)>& launch, int nbuf, int samples, int batch, int warmup) {
  int next = 0;
  for (int i = 0; i < warmup; ++i) launch(next++ % nbuf);
  CHECK_CUDA(cudaDeviceSynchronize());
  cudaEvent_t start, stop;
  CHECK_CUDA(cudaEventCreate(&start));
  CHECK_CUDA(cudaEventCreate(&stop));
  std::vector<float> ms;
  for (int s = 0; s < samples; ++s) {
    CHECK_CUDA(cudaEventRecord(start));
    for (int b = 0; b < batch; ++b) launch(next++ % nbuf);
    CHECK_CUDA(cudaEventRecord(stop));
    CHECK_CUDA(cudaEventSynchronize(stop));
    float t = 0;
    CHECK_CUDA(cudaEventElapsedTime(&t, start, stop));
    ms.push_back(t / batch);
  }
  CHECK_CUDA(cudaEventDestroy(start));
  CHECK_CUDA(cudaEventDestroy(stop));
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

// Buffers so that nbuf * bytes_per_set >= 4 * L2 (at least 2).
int buffers_for(const Device& dev, size_t bytes_per_set) {
  const size_t want = 4 * static_cast<size_t>(dev.prop.l2CacheSize);
  return static_cast<int>(std::max<size_t>(2, (want + bytes_per_set - 1) / bytes_per_set));
}

struct Options {
  bool quick = false;
  int samples = 51;
};

void print_row(const char* op, const std::string& shape, double ms, double bytes, const Device& dev,
               const std::string& note = "") {
  const double gbs = bytes / (ms * 1e-3) / 1e9;
  std::printf("| %-10s | %-34s | %9.4f | %8.1f | %5.1f%% | %s\n", op, shape.c_str(), ms, gbs, 100.0 * gbs / dev.copy_gbs,
              note.c_str());
  std::fflush(stdout);
}

void bench_copy(Device& dev, const Options& opt) {
  const size_t bytes = size_t{256} << 20;
  const int nbuf = buffers_for(dev, 2 * bytes);
  std::vector<void*> src(nbuf), dst(nbuf);
  for (int i = 0; i < nbuf; ++i) {
    CHECK_CUDA(cudaMalloc(&src[i], bytes));
    CHECK_CUDA(cudaMalloc(&dst[i], bytes));
    fill(static_cast<float*>(src[i]), bytes / 4, 1 + i);
  }
  const double ms = time_ms([&](int i) { CHECK_CUDA(cudaMemcpyAsync(dst[i], src[i], bytes, cudaMemcpyDeviceToDevice)); },
                            nbuf, opt.samples, 5, 5);
  dev.copy_gbs = 2.0 * bytes / (ms * 1e-3) / 1e9;
  std::printf("| %-10s | %-34s | %9.4f | %8.1f | %5.1f%% | %s\n", "copy", "256 MiB device-to-device", ms, dev.copy_gbs,
              100.0, "the floor: read + write bytes");
  for (int i = 0; i < nbuf; ++i) {
    CHECK_CUDA(cudaFree(src[i]));
    CHECK_CUDA(cudaFree(dst[i]));
  }
}

// fp16 rows of n values, 256 MiB in all; signs on (the random Hadamard transform).
void bench_hadamard(const Device& dev, const Options& opt, int log_n) {
  const int64_t n = int64_t{1} << log_n;
  const size_t bytes = size_t{256} << 20;
  const int64_t rows = static_cast<int64_t>(bytes / 2) / n;
  const int nbuf = buffers_for(dev, 2 * bytes);
  std::vector<__half*> x(nbuf), y(nbuf);
  float* signs;
  CHECK_CUDA(cudaMalloc(&signs, sizeof(float) * n));
  {
    std::vector<float> s(n);
    for (int64_t i = 0; i < n; ++i) s[i] = (i * 7 + 3) % 5 < 2 ? -1.f : 1.f;
    CHECK_CUDA(cudaMemcpy(signs, s.data(), sizeof(float) * n, cudaMemcpyHostToDevice));
  }
  for (int i = 0; i < nbuf; ++i) {
    CHECK_CUDA(cudaMalloc(&x[i], bytes));
    CHECK_CUDA(cudaMalloc(&y[i], bytes));
    fill(x[i], rows * n, 100 + i);
  }
  const float scale = 1.f / std::sqrt(static_cast<float>(n));
  const double ms = time_ms(
      [&](int i) {
        CHECK_CUDA(hadamard(DType::kFloat16, log_n, HadamardArgs{x[i], y[i], signs, scale, rows}, nullptr));
      },
      nbuf, opt.samples, 3, 3);

  // Spot check of row 0 against a host FWHT (float64), so a broken kernel is never timed silently.
  std::vector<__half> hx(n), hy(n);
  std::vector<float> hs(n);
  CHECK_CUDA(cudaMemcpy(hx.data(), x[0], 2 * n, cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaMemcpy(hy.data(), y[0], 2 * n, cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaMemcpy(hs.data(), signs, 4 * n, cudaMemcpyDeviceToHost));
  std::vector<double> r(n);
  for (int64_t i = 0; i < n; ++i) r[i] = static_cast<double>(__half2float(hx[i])) * hs[i];
  for (int64_t h = 1; h < n; h *= 2)
    for (int64_t i = 0; i < n; i += 2 * h)
      for (int64_t j = i; j < i + h; ++j) {
        const double a = r[j], b = r[j + h];
        r[j] = a + b;
        r[j + h] = a - b;
      }
  double err = 0, ref = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double want = r[i] * scale;
    err = std::max(err, std::abs(static_cast<double>(__half2float(hy[i])) - want));
    ref = std::max(ref, std::abs(want));
  }
  char note[96];
  std::snprintf(note, sizeof note, "row 0 max err %.1e of max %.2f%s", err, ref, err > 2e-3 * ref ? "  WRONG" : "");
  print_row("hadamard", std::to_string(rows) + " x " + std::to_string(n) + " fp16", ms, 2.0 * bytes, dev, note);

  for (int i = 0; i < nbuf; ++i) {
    CHECK_CUDA(cudaFree(x[i]));
    CHECK_CUDA(cudaFree(y[i]));
  }
  CHECK_CUDA(cudaFree(signs));
}

// T tokens x C = 1024 fp16 values, groups of G, grid (d, n): quantize, then dequantize its output.
void bench_higgs(const Device& dev, const Options& opt, int64_t tokens, int log_g, int d, int n_points) {
  const int64_t channels = 1024, g = int64_t{1} << log_g;
  const int code_bits = log2_pow2(n_points);
  const int64_t values = tokens * channels, groups = values / g;
  const int64_t code_bytes = groups * group_code_bytes(log_g, d, code_bits);
  const size_t x_bytes = 2 * static_cast<size_t>(values);
  const size_t set_bytes = 2 * x_bytes + code_bytes + 2 * groups;
  const int nbuf = buffers_for(dev, set_bytes);
  std::vector<__half*> x(nbuf), xr(nbuf), scales(nbuf);
  std::vector<uint8_t*> codes(nbuf);
  float *grid, *signs, *workspace = nullptr;
  CHECK_CUDA(cudaMalloc(&grid, sizeof(float) * n_points * d));
  CHECK_CUDA(cudaMalloc(&signs, sizeof(float) * g));
  {
    // A Gaussian-like grid: timings do not depend on its values (brute-force search).
    std::vector<float> hg(static_cast<size_t>(n_points) * d), hs(g);
    uint64_t st = 12345;
    for (auto& v : hg) {
      double acc = 0;
      for (int k = 0; k < 12; ++k) {
        st = st * 6364136223846793005ull + 1442695040888963407ull;
        acc += static_cast<double>(st >> 11) / 9007199254740992.0;
      }
      v = static_cast<float>(acc - 6.0);
    }
    for (int64_t i = 0; i < g; ++i) hs[i] = (i * 5 + 1) % 3 == 0 ? -1.f : 1.f;
    CHECK_CUDA(cudaMemcpy(grid, hg.data(), hg.size() * sizeof(float), cudaMemcpyHostToDevice));
    CHECK_CUDA(cudaMemcpy(signs, hs.data(), hs.size() * sizeof(float), cudaMemcpyHostToDevice));
  }
  const size_t ws = higgs_quantize_workspace_bytes(n_points, d);
  if (ws) CHECK_CUDA(cudaMalloc(&workspace, ws));
  for (int i = 0; i < nbuf; ++i) {
    CHECK_CUDA(cudaMalloc(&x[i], x_bytes));
    CHECK_CUDA(cudaMalloc(&xr[i], x_bytes));
    CHECK_CUDA(cudaMalloc(&codes[i], code_bytes));
    CHECK_CUDA(cudaMalloc(&scales[i], 2 * groups));
    fill(x[i], values, 1000 + i);
  }
  auto args = [&](int i, void* values_ptr) {
    HiggsArgs a{};
    a.values = values_ptr;
    a.codes = codes[i];
    a.scales = scales[i];
    a.grid = grid;
    a.signs = signs;
    a.groups = groups;
    a.n_points = n_points;
    a.d = d;
    a.code_bits = code_bits;
    return a;
  };
  const int batch = tokens >= 32768 ? 3 : 10;
  const double q_ms = time_ms(
      [&](int i) { CHECK_CUDA(higgs_quantize(DType::kFloat16, log_g, args(i, x[i]), workspace, nullptr)); }, nbuf,
      opt.samples, batch, 3);
  const double dq_ms = time_ms(
      [&](int i) { CHECK_CUDA(higgs_dequantize(DType::kFloat16, log_g, args(i, xr[i]), nullptr)); }, nbuf,
      opt.samples, batch, 3);

  // Sanity: relative error of the round trip of buffer 0 (a 2-bit grid gives ~0.1-0.3 on this data).
  std::vector<__half> hx(values), hr(values);
  CHECK_CUDA(cudaMemcpy(hx.data(), x[0], x_bytes, cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaMemcpy(hr.data(), xr[0], x_bytes, cudaMemcpyDeviceToHost));
  double num = 0, den = 0;
  for (int64_t i = 0; i < values; ++i) {
    const double a = __half2float(hx[i]), b = __half2float(hr[i]);
    num += (a - b) * (a - b);
    den += a * a;
  }
  char note[96];
  std::snprintf(note, sizeof note, "round trip rel MSE %.3f%s", num / den, !(num / den < 1.0) ? "  WRONG" : "");
  char shape[64];
  std::snprintf(shape, sizeof shape, "%lldk x 1024 fp16, G=%lld (%d,%d)", static_cast<long long>(tokens / 1024),
                static_cast<long long>(g), d, n_points);
  const double q_bytes = static_cast<double>(x_bytes + code_bytes + 2 * groups);
  print_row("quantize", shape, q_ms, q_bytes, dev, note);
  print_row("dequantize", shape, dq_ms, q_bytes, dev);

  for (int i = 0; i < nbuf; ++i) {
    CHECK_CUDA(cudaFree(x[i]));
    CHECK_CUDA(cudaFree(xr[i]));
    CHECK_CUDA(cudaFree(codes[i]));
    CHECK_CUDA(cudaFree(scales[i]));
  }
  CHECK_CUDA(cudaFree(grid));
  CHECK_CUDA(cudaFree(signs));
  if (workspace) CHECK_CUDA(cudaFree(workspace));
}

}  // namespace

int main(int argc, char** argv) {
  Options opt;
  std::string command;
  for (int i = 0; i < argc; ++i) {
    command += (i ? " " : "") + std::string(argv[i]);
    if (std::strcmp(argv[i], "--quick") == 0) {
      opt.quick = true;
      opt.samples = 11;
    }
  }
  Device dev;
  CHECK_CUDA(cudaGetDeviceProperties(&dev.prop, 0));
  char date[32];
  const std::time_t now = std::time(nullptr);
  std::strftime(date, sizeof date, "%Y-%m-%d %H:%M UTC", std::gmtime(&now));
  std::printf("command: %s\ndevice: %s (sm_%d%d, %d SMs, L2 %d MiB), %s\n\n", command.c_str(), dev.prop.name,
              dev.prop.major, dev.prop.minor, dev.prop.multiProcessorCount, dev.prop.l2CacheSize >> 20, date);
  std::printf("| op         | shape                              |   ms (med) |     GB/s | %% copy | check\n");
  std::printf("|------------|------------------------------------|-----------|----------|--------|------\n");
  bench_copy(dev, opt);
  const std::vector<int> log_ns = opt.quick ? std::vector<int>{6, 7, 10, 15} : std::vector<int>{6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  for (int log_n : log_ns) bench_hadamard(dev, opt, log_n);
  const std::vector<int64_t> tokens = opt.quick ? std::vector<int64_t>{32768} : std::vector<int64_t>{4096, 32768, 131072};
  for (int64_t t : tokens) {
    bench_higgs(dev, opt, t, 7, 2, 16);  // 2-bit, group 128: the torch-pipeline comparison
    bench_higgs(dev, opt, t, 6, 2, 16);  // 2-bit, group 64 (head_dim 64 caches)
    if (!opt.quick) bench_higgs(dev, opt, t, 7, 2, 256);  // 4-bit
  }
  if (!opt.quick) bench_higgs(dev, opt, 4096, 10, 8, 65536);  // 2-bit E8-size grid from device memory (ALU-bound)
  return 0;
}

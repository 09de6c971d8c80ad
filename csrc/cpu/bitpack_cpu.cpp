// CPU kernels of aquakv::pack_bits / unpack_bits (layout: csrc/include/aquakv/bitpack.h).
#include <torch/library.h>

#include "aquakv/bitpack.h"
#include "aquakv/dispatch.h"
#include "checks.h"
#include "cpu_common.h"

namespace aquakv::cpu {
namespace {

at::Tensor pack_bits_cpu(const at::Tensor& codes_in, int64_t bits) {
  check_pack_args(codes_in, bits);
  const at::Tensor codes = codes_in.contiguous();
  const int64_t count = codes.size(-1);
  const int64_t nbytes = packed_row_bytes(count, bits);
  at::Tensor out = at::empty(with_last_dim(codes, nbytes), codes.options().dtype(at::kByte));
  if (out.numel() == 0) return out;
  const int64_t rows = num_rows(codes);
  const int32_t* cp = codes.data_ptr<int32_t>();
  uint8_t* op = out.data_ptr<uint8_t>();
  AQUAKV_DISPATCH_BITS(bits, B, [&] {
    at::parallel_for(0, rows, grain_for(count), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) pack_row<B>(cp + r * count, count, op + r * nbytes);
    });
  });
  return out;
}

at::Tensor unpack_bits_cpu(const at::Tensor& packed_in, int64_t bits, int64_t count) {
  check_unpack_args(packed_in, bits, count);
  const at::Tensor packed = packed_in.contiguous();
  const int64_t nbytes = packed.size(-1);
  at::Tensor out = at::empty(with_last_dim(packed, count), packed.options().dtype(at::kInt));
  if (out.numel() == 0) return out;
  const int64_t rows = num_rows(packed);
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  int32_t* op = out.data_ptr<int32_t>();
  AQUAKV_DISPATCH_BITS(bits, B, [&] {
    at::parallel_for(0, rows, grain_for(count), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) unpack_row<B>(pp + r * nbytes, count, op + r * count);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(aquakv, CPU, m) {
  m.impl("pack_bits", &pack_bits_cpu);
  m.impl("unpack_bits", &unpack_bits_cpu);
}

}  // namespace aquakv::cpu

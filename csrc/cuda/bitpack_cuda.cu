// CUDA launchers of aquakv::pack_bits / unpack_bits (kernels: csrc/include/aquakv/bitpack.cuh).
#include <torch/library.h>

#include "aquakv/bitpack.cuh"
#include "checks.h"
#include "launch_common.cuh"

namespace aquakv::cuda {
namespace {

at::Tensor pack_bits_cuda(const at::Tensor& codes_in, int64_t bits) {
  check_pack_args(codes_in, bits);
  const c10::cuda::CUDAGuard guard(codes_in.device());
  const at::Tensor codes = codes_in.contiguous();
  const int64_t count = codes.size(-1);
  at::Tensor out = at::empty(with_last_dim(codes, packed_row_bytes(count, bits)), codes.options().dtype(at::kByte));
  if (out.numel() == 0) return out;
  const BitpackArgs a{const_cast<int32_t*>(codes.const_data_ptr<int32_t>()), out.data_ptr<uint8_t>(), num_rows(codes), count,
                      static_cast<int>(bits)};
  check_launch("pack_bits", pack_bits(a, current_stream()));
  return out;
}

at::Tensor unpack_bits_cuda(const at::Tensor& packed_in, int64_t bits, int64_t count) {
  check_unpack_args(packed_in, bits, count);
  const c10::cuda::CUDAGuard guard(packed_in.device());
  const at::Tensor packed = packed_in.contiguous();
  at::Tensor out = at::empty(with_last_dim(packed, count), packed.options().dtype(at::kInt));
  if (out.numel() == 0) return out;
  const BitpackArgs a{out.data_ptr<int32_t>(), const_cast<uint8_t*>(packed.const_data_ptr<uint8_t>()), num_rows(packed),
                      count, static_cast<int>(bits)};
  check_launch("unpack_bits", unpack_bits(a, current_stream()));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(aquakv, CUDA, m) {
  m.impl("pack_bits", &pack_bits_cuda);
  m.impl("unpack_bits", &unpack_bits_cuda);
}

}  // namespace aquakv::cuda

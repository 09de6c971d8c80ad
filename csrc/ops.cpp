// The op catalogue: every aquakv schema lives here, in one place.
// Implementations register themselves per backend (csrc/cpu/*.cpp, csrc/cuda/*.cu);
// fake (meta) kernels for torch.compile are registered in python/aquakv/ops.py.
//
// Conventions shared by every op (the NumPy reference in python/aquakv/reference/ is the truth):
//  * "rows" are all leading dims flattened; ops work on the last dim.
//  * signs: float32 [n] of +-1, the diagonal D of the random Hadamard transform.
//  * grid: float32 [n_points, d], n_points = 2**code_bits with code_bits in 1..8 or 16. code_bits is
//    the width of one code, which stands for d values (so code_bits / d bits per value).
//  * packed codes: uint8, LSB-first bitstream per row: code i fills bits [i*b, (i+1)*b) of the row,
//    bit k of the row lives in bit (k % 8) of byte k / 8; a row takes ceil(count * b / 8) bytes.
//    b is `bits` of pack_bits / unpack_bits (the field width), code_bits for HIGGS codes.
//  See docs/ops.md for the catalogue, the refusals and the gradients.
#include <torch/library.h>

TORCH_LIBRARY(aquakv, m) {
  // y = scale * H (signs * x) over the last dim, H the unnormalised +-1 Walsh-Hadamard matrix
  // (scale = 1/sqrt(n) makes it orthonormal). x: [..., n], n a power of two in 2..32768;
  // fp32/fp16/bf16, computed in fp32, returned in x's dtype.
  m.def("hadamard(Tensor x, Tensor? signs=None, float scale=1.0) -> Tensor");

  // HIGGS quantize, fused: per group g of group_size values
  //   s = ||x_g||_2;  y = sqrt(G)/s * H_orth(signs * x_g)  (y = 0 when s == 0);
  //   code_i = argmin_j ||y_i - grid_j||^2 over the G/d sub-vectors (lowest j on exact ties).
  // x: [..., C], C % group_size == 0. Returns (codes uint8 [..., C/d*code_bits/8], scales fp16 [..., C/G]).
  // A group holding NaN/Inf gets a non-finite scale (callers check scales, which is cheap).
  m.def("higgs_quantize(Tensor x, Tensor grid, Tensor signs, int group_size) -> (Tensor, Tensor)");

  // higgs_quantize's nearest-grid search under GIVEN scales: y = sqrt(G)/s * H_orth(signs * x_g) with s the
  // float value of scales [..., C/G] (fp16); y = 0 where s == 0 (NaN s: code 0). Returns codes uint8
  // [..., C/d*code_bits/8], laid out as higgs_quantize's (re-encoding weights under their current scales).
  m.def("higgs_quantize_scaled(Tensor x, Tensor scales, Tensor grid, Tensor signs, int group_size) -> Tensor");

  // Inverse of higgs_quantize: x_g = s/sqrt(G) * signs * H_orth^T grid[codes]; returns [..., C] in dtype.
  m.def("higgs_dequantize(Tensor codes, Tensor scales, Tensor grid, Tensor signs, int group_size, "
        "ScalarType dtype) -> Tensor");

  // Dense bit packing. `bits` is the width of one packed field (for HIGGS codes: code_bits), not
  // bits per value. codes: int32 [..., count] (only the low `bits` bits are kept);
  // returns uint8 [..., ceil(count*bits/8)]. bits in 1..8 or 16.
  m.def("pack_bits(Tensor codes, int bits) -> Tensor");
  // packed: uint8 [..., nbytes] -> int32 [..., count]; nbytes must equal ceil(count*bits/8), count <= 2**58.
  m.def("unpack_bits(Tensor packed, int bits, int count) -> Tensor");

  // A linear layer served from its HIGGS codes: y = x W^T (+ bias) with W [out, in] the higgs_dequantize of
  // codes [out, in/d*code_bits/8] and scales [out, in/G] (every group inside one row), never materialised:
  //   y_j = sum_g s_jg/G * < H(signs * x_g), grid[codes_jg] >   (H unnormalised, so s/G = s/sqrt(G) * H_orth).
  // x: [..., in] float32/float16/bfloat16; bias [out] in x's dtype or None. Returns [..., out] in x's dtype,
  // accumulated in float32 and rounded once.
  m.def("higgs_linear(Tensor x, Tensor codes, Tensor scales, Tensor grid, Tensor signs, int group_size, "
        "Tensor? bias=None) -> Tensor");

  // AQUA-KV reconstruction of one block of cached tokens, fused. Rows are [B, T]; C = H * D.
  //   r    = higgs_dequantize(codes, scales, grid, signs, group_size) in float32 [B, T, C]
  //   pred = per predictor group g of C/G channels: sum_i inputs[i][..., g-th C_i/G slice] @ weights[i][g]
  //          (@ up[g] when given), + bias;  inputs[i] float32 [B, T, C_i], weights[i] float32 [G, C_i/G, M]
  //          (M = C/G, or the rank r with up float32 [G, r, C/G]); no inputs: pred = bias
  //   hat  = pred + r  -> hat_out (float32 [B, T, C], optional)
  //   out[b, h, t, :] = rope(hat[b, t, h*D:(h+1)*D]) rounded once to out's dtype; out is [B, H, T, D]
  //          with any strides; rope(x) = x * cos + rotate_half(x) * sin with cos, sin float32 [B, T, D];
  //          cos = sin = None: out = hat (D = out.size(-1)).
  m.def("aqua_reconstruct(Tensor codes, Tensor scales, Tensor grid, Tensor signs, int group_size, "
        "Tensor[] inputs, Tensor[] weights, Tensor? up, Tensor bias, Tensor? cos, Tensor? sin, "
        "Tensor(a!) out, Tensor(b!)? hat_out) -> ()");
}

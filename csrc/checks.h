// Input checks shared by the CPU and CUDA launchers of torch.ops.aquakv.*.
//
// Every message names the op and the argument, e.g.
//   "higgs_quantize: last dim 192 is not a multiple of group_size 128".
// Policy (the same on every backend):
//  * non-contiguous inputs are accepted: launchers call .contiguous() on them (a copy only when needed);
//  * tensors with zero rows (any leading dim 0) or a zero-width last dim are valid and give empty outputs
//    of the right shape; shapes are still checked, so an invalid shape fails even when it is empty;
//  * all tensor arguments must live on the same device.
#pragma once

#include <ATen/ATen.h>

#include "aquakv/bitpack.h"

#include <cctype>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace aquakv {

constexpr int64_t kMaxHadamard = 32768;

inline bool is_power_of_two(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }

// log2 of a power of two. Callers pass sizes the checks below already validated; anything else is a
// bug in aquakv, not bad user input, hence an internal assert rather than a message.
inline int log2_of_power_of_two(int64_t v) {
  TORCH_INTERNAL_ASSERT(is_power_of_two(v), "log2_of_power_of_two: ", v, " is not a power of two");
  int b = 0;
  while ((int64_t{1} << b) < v) ++b;
  return b;
}

// Number of rows once all leading dims are flattened (the ops work on the last dim).
inline int64_t num_rows(const at::Tensor& t) {
  int64_t rows = 1;
  for (int64_t i = 0; i + 1 < t.dim(); ++i) rows *= t.size(i);
  return rows;
}

// t's shape with the last dim replaced by `last`.
inline std::vector<int64_t> with_last_dim(const at::Tensor& t, int64_t last) {
  std::vector<int64_t> sizes(t.sizes().begin(), t.sizes().end());
  sizes.back() = last;
  return sizes;
}

// torch's Python spelling of a dtype (float32, uint8, ...), which is what users wrote.
inline std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kDouble: return "torch.float64";
    case at::kByte: return "torch.uint8";
    case at::kChar: return "torch.int8";
    case at::kShort: return "torch.int16";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kBool: return "torch.bool";
    case at::kComplexHalf: return "torch.complex32";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    default: break;
  }
  // The rest are spelled like c10's name in lower case: UInt16 -> torch.uint16, Float8_e5m2 -> torch.float8_e5m2.
  std::string name = c10::toString(t);
  for (char& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return "torch." + name;
}

inline void check_at_least_1d(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.dim() >= 1, op, ": ", name, " must have at least 1 dim (the last dim is the one transformed), got a 0-dim tensor");
}

inline void check_float_dtype(const char* op, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              op, ": ", name, " must be float32, float16 or bfloat16, got ", dtype_name(dtype));
}

inline void check_dtype(const char* op, const char* name, const at::Tensor& t, at::ScalarType want) {
  TORCH_CHECK(t.scalar_type() == want, op, ": ", name, " must be ", dtype_name(want), ", got ",
              dtype_name(t.scalar_type()));
}

// All named tensors on the same device as the first one.
inline void check_same_device(const char* op, std::initializer_list<std::pair<const char*, const at::Tensor*>> ts) {
  const auto& first = *ts.begin();
  for (const auto& [name, t] : ts) {
    TORCH_CHECK(t->device() == first.second->device(), op, ": ", name, " is on ", t->device(), " but ", first.first,
                " is on ", first.second->device(), "; all tensors must be on the same device");
  }
}

// Field widths pack_bits / unpack_bits support: 1..8 or 16. (Their `bits` is the width of one packed
// field; for HIGGS that field is a whole d-dim code, code_bits = log2(n_points), not bits per value.)
inline void check_bits(const char* op, int64_t bits) {
  TORCH_CHECK((bits >= 1 && bits <= 8) || bits == 16, op, ": bits must be in 1..8 or 16, got ", bits);
}

// Largest count of packed fields per row: count * 16 must not overflow int64 in packed_row_bytes.
// (No real tensor gets near it; an expanded view or a bad `count` argument can.)
constexpr int64_t kMaxCount = int64_t{1} << 58;

inline void check_count(const char* op, int64_t count) {
  TORCH_CHECK(count >= 0, op, ": count must be >= 0, got ", count);
  TORCH_CHECK(count <= kMaxCount, op, ": count ", count, " is too large (at most 2**58 codes per row)");
}

inline void check_hadamard_size(const char* op, const char* what, int64_t n) {
  TORCH_CHECK(is_power_of_two(n) && n >= 2 && n <= kMaxHadamard, op, ": ", what, " ", n,
              " must be a power of two in 2..", kMaxHadamard);
}

// signs: float32 1-D [n] (the +-1 diagonal of the random Hadamard transform).
inline void check_signs(const char* op, const at::Tensor& signs, int64_t n, const char* n_name) {
  check_dtype(op, "signs", signs, at::kFloat);
  TORCH_CHECK(signs.dim() == 1 && signs.size(0) == n, op, ": signs must be 1-D of length ", n_name, " = ", n,
              ", got shape ", signs.sizes());
}

// grid: float32 [n_points, d] with n_points = 2**code_bits, code_bits in 1..8 or 16 (bits per d-dim
// code, not per value). Returns code_bits.
inline int check_grid(const char* op, const at::Tensor& grid) {
  check_dtype(op, "grid", grid, at::kFloat);
  TORCH_CHECK(grid.dim() == 2 && grid.size(1) >= 1, op, ": grid must be 2-D [n_points, d] with d >= 1, got shape ",
              grid.sizes());
  const int64_t n = grid.size(0);
  const bool ok = is_power_of_two(n) && ((n >= 2 && n <= 256) || n == 65536);
  TORCH_CHECK(ok, op, ": grid has ", n, " points; it must have 2**code_bits points with code_bits in 1..8 or 16");
  return log2_of_power_of_two(n);
}

// The one group-size rule (mirrored, message for message, by aquakv.ops.check_group_size):
// group_size is a power of two in 2..32768 (the Hadamard range), a multiple of the grid dim d, and
// its G/d codes of code_bits each fill whole bytes, so every group's codes start on a byte boundary.
inline void check_group_size(const char* op, int64_t group_size, int64_t d, int64_t code_bits) {
  // d and code_bits come from a checked grid here; the guards matter to direct callers of the rule.
  TORCH_CHECK(d >= 1, op, ": grid dim d must be >= 1, got ", d);
  TORCH_CHECK((code_bits >= 1 && code_bits <= 8) || code_bits == 16, op,
              ": code_bits must be in 1..8 or 16, got ", code_bits);
  check_hadamard_size(op, "group_size", group_size);
  TORCH_CHECK(group_size % d == 0, op, ": group_size ", group_size, " is not a multiple of the grid dim d = ", d);
  TORCH_CHECK((group_size / d * code_bits) % 8 == 0, op, ": group_size ", group_size, " / d ", d, " * code_bits ",
              code_bits, " = ", group_size / d * code_bits, " bits of codes per group is not a multiple of 8; each "
              "group's codes must fill whole bytes so groups stay byte-aligned");
}

// ---- whole-op checks: one call per launcher, identical on every backend ---------------------

// hadamard(x, signs?, scale): x [..., n] float, n a power of two in 2..32768, signs float32 [n].
inline void check_hadamard_args(const at::Tensor& x, const std::optional<at::Tensor>& signs) {
  constexpr const char* op = "hadamard";
  check_at_least_1d(op, "x", x);
  check_float_dtype(op, "x", x.scalar_type());
  check_hadamard_size(op, "last dim of x", x.size(-1));
  if (signs.has_value()) {
    check_signs(op, *signs, x.size(-1), "x.size(-1)");
    check_same_device(op, {{"x", &x}, {"signs", &*signs}});
  }
}

// What a HIGGS launcher needs to know, all derived from validated arguments.
struct HiggsShape {
  int64_t rows;         // leading dims flattened
  int64_t channels;     // C, a multiple of group_size
  int64_t groups;       // C / group_size per row
  int64_t d;            // grid dim
  int code_bits;        // log2(n_points): bits of one d-dim code (not bits per value)
  int64_t group_bytes;  // group_size / d * code_bits / 8 packed code bytes per group
};

inline HiggsShape check_higgs_common(const char* op, const at::Tensor& grid, const at::Tensor& signs, int64_t group_size) {
  HiggsShape s{};
  s.code_bits = check_grid(op, grid);
  s.d = grid.size(1);
  check_group_size(op, group_size, s.d, s.code_bits);
  check_signs(op, signs, group_size, "group_size");
  s.group_bytes = group_size / s.d * s.code_bits / 8;
  return s;
}

// higgs_quantize(x, grid, signs, group_size): x [..., C] float, C % group_size == 0.
inline HiggsShape check_higgs_quantize_args(const at::Tensor& x, const at::Tensor& grid, const at::Tensor& signs,
                                            int64_t group_size) {
  constexpr const char* op = "higgs_quantize";
  check_at_least_1d(op, "x", x);
  check_float_dtype(op, "x", x.scalar_type());
  HiggsShape s = check_higgs_common(op, grid, signs, group_size);
  s.channels = x.size(-1);
  TORCH_CHECK(s.channels % group_size == 0, op, ": last dim ", s.channels, " is not a multiple of group_size ",
              group_size, " (pad x with zeros to a multiple and trim after dequantize)");
  check_same_device(op, {{"x", &x}, {"grid", &grid}, {"signs", &signs}});
  s.rows = num_rows(x);
  s.groups = s.channels / group_size;
  return s;
}

// higgs_quantize_scaled(x, scales, grid, signs, group_size): x [..., C] float, C % group_size == 0,
// scales fp16 [..., C/group_size] with x's leading dims (the given s of every group).
inline HiggsShape check_higgs_quantize_scaled_args(const at::Tensor& x, const at::Tensor& scales,
                                                   const at::Tensor& grid, const at::Tensor& signs,
                                                   int64_t group_size) {
  constexpr const char* op = "higgs_quantize_scaled";
  check_at_least_1d(op, "x", x);
  check_at_least_1d(op, "scales", scales);
  check_float_dtype(op, "x", x.scalar_type());
  check_dtype(op, "scales", scales, at::kHalf);
  HiggsShape s = check_higgs_common(op, grid, signs, group_size);
  s.channels = x.size(-1);
  TORCH_CHECK(s.channels % group_size == 0, op, ": last dim ", s.channels, " is not a multiple of group_size ",
              group_size, " (pad x with zeros to a multiple and trim after dequantize)");
  s.groups = s.channels / group_size;
  const std::vector<int64_t> want = with_last_dim(x, s.groups);
  TORCH_CHECK(scales.sizes() == at::IntArrayRef(want), op, ": scales must be [..., C/group_size] = ",
              at::IntArrayRef(want), " (x's leading dims), got shape ", scales.sizes());
  check_same_device(op, {{"x", &x}, {"scales", &scales}, {"grid", &grid}, {"signs", &signs}});
  s.rows = num_rows(x);
  return s;
}

// codes and scales of packed HIGGS groups agree: same leading dims, and codes' last dim holds
// exactly `scales last dim` groups of s.group_bytes. Fills s.groups, s.rows and s.channels.
inline void check_codes_match_scales(const char* op, const at::Tensor& codes, const at::Tensor& scales,
                                     int64_t group_size, HiggsShape& s) {
  TORCH_CHECK(codes.dim() == scales.dim() && codes.sizes().slice(0, codes.dim() - 1) ==
                                                 scales.sizes().slice(0, scales.dim() - 1),
              op, ": codes ", codes.sizes(), " and scales ", scales.sizes(), " must have the same leading dims");
  s.groups = scales.size(-1);
  TORCH_CHECK(codes.size(-1) == s.groups * s.group_bytes, op, ": codes last dim ", codes.size(-1), " does not match ",
              s.groups, " groups (scales last dim) * ", s.group_bytes, " bytes per group (group_size ", group_size,
              " / d ", s.d, " * code_bits ", s.code_bits, " / 8)");
  s.rows = num_rows(scales);
  s.channels = s.groups * group_size;
}

// higgs_dequantize(codes, scales, grid, signs, group_size, dtype):
// codes uint8 [..., G_count * group_bytes], scales fp16 [..., G_count] with the same leading dims.
inline HiggsShape check_higgs_dequantize_args(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& grid,
                                              const at::Tensor& signs, int64_t group_size, at::ScalarType dtype) {
  constexpr const char* op = "higgs_dequantize";
  check_at_least_1d(op, "codes", codes);
  check_at_least_1d(op, "scales", scales);
  check_dtype(op, "codes", codes, at::kByte);
  check_dtype(op, "scales", scales, at::kHalf);
  check_float_dtype(op, "dtype", dtype);
  HiggsShape s = check_higgs_common(op, grid, signs, group_size);
  check_codes_match_scales(op, codes, scales, group_size, s);
  check_same_device(op, {{"codes", &codes}, {"scales", &scales}, {"grid", &grid}, {"signs", &signs}});
  return s;
}

// higgs_linear(x, codes, scales, grid, signs, group_size, bias?): x [..., in] float; codes uint8
// [out, groups * group_bytes] and scales fp16 [out, groups] with in = groups * group_size (every group inside
// one row of W); bias [out] in x's dtype or None. s.rows = out, s.channels = in.
inline HiggsShape check_higgs_linear_args(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                                          const at::Tensor& grid, const at::Tensor& signs, int64_t group_size,
                                          const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "higgs_linear";
  check_at_least_1d(op, "x", x);
  check_float_dtype(op, "x", x.scalar_type());
  TORCH_CHECK(codes.dim() == 2, op, ": codes must be 2-D [out, groups * bytes per group], got shape ", codes.sizes());
  TORCH_CHECK(scales.dim() == 2, op, ": scales must be 2-D [out, groups], got shape ", scales.sizes());
  check_dtype(op, "codes", codes, at::kByte);
  check_dtype(op, "scales", scales, at::kHalf);
  HiggsShape s = check_higgs_common(op, grid, signs, group_size);
  check_codes_match_scales(op, codes, scales, group_size, s);
  TORCH_CHECK(x.size(-1) == s.channels, op, ": x last dim ", x.size(-1), " does not match the weight's in = ",
              s.groups, " groups (scales last dim) * group_size ", group_size, " = ", s.channels);
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), op, ": bias must be ", dtype_name(x.scalar_type()),
                " like x, got ", dtype_name(bias->scalar_type()));
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == s.rows, op, ": bias must be 1-D of length out = ", s.rows,
                ", got shape ", bias->sizes());
    check_same_device(op, {{"x", &x}, {"codes", &codes}, {"scales", &scales}, {"grid", &grid}, {"signs", &signs},
                           {"bias", &*bias}});
  } else {
    check_same_device(op, {{"x", &x}, {"codes", &codes}, {"scales", &scales}, {"grid", &grid}, {"signs", &signs}});
  }
  return s;
}

// ---- aqua_reconstruct --------------------------------------------------------------------------

// The prediction's tensors (inputs, weights, up) share one dtype, float32 or bfloat16: inputs[0]'s.
inline void check_prediction_dtype(const char* op, const char* name, const at::Tensor& t, const at::Tensor& first) {
  const at::ScalarType want = first.scalar_type();
  TORCH_CHECK(want == at::kFloat || want == at::kBFloat16, op, ": inputs[0] must be torch.float32 or ",
              "torch.bfloat16 (the prediction's matmul dtype), got ", dtype_name(want));
  TORCH_CHECK(t.scalar_type() == want, op, ": ", name, " must be ", dtype_name(want), " like inputs[0] (inputs, ",
              "weights and up share the prediction's matmul dtype), got ", dtype_name(t.scalar_type()));
}

// What the reconstruct launchers need, all derived from validated arguments.
struct ReconShape {
  HiggsShape higgs;  // the residual's codes (rows = B * T, channels = C)
  int64_t batch;     // B
  int64_t tokens;    // T
  int64_t channels;  // C = H * D
  int64_t heads;     // H
  int64_t head_dim;  // D
  int64_t pred_groups;  // G of the predictor's block-diagonal map (0 when there are no inputs)
  int64_t inner;        // M: C / G without up, the rank r with up
  bool rotated;         // cos and sin given
};

// aqua_reconstruct(codes, scales, grid, signs, group_size, inputs, weights, up, bias, cos, sin, out, hat_out):
// codes uint8 [B, T, bytes], scales fp16 [B, T, C/group_size]; inputs[i] [B, T, C_i] with weights[i]
// [G, C_i/G, M] and up [G, r, C/G] or None, all float32 or all bfloat16; bias float32 [C]; cos, sin float32
// [B, T, D] or both None; out float [B, H, T, D] (any strides); hat_out float32 [B, T, C] or None.
inline ReconShape check_aqua_reconstruct_args(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& grid,
                                              const at::Tensor& signs, int64_t group_size, at::TensorList inputs,
                                              at::TensorList weights, const std::optional<at::Tensor>& up,
                                              const at::Tensor& bias, const std::optional<at::Tensor>& cos,
                                              const std::optional<at::Tensor>& sin, const at::Tensor& out,
                                              const std::optional<at::Tensor>& hat_out) {
  constexpr const char* op = "aqua_reconstruct";
  ReconShape r{};
  TORCH_CHECK(codes.dim() == 3, op, ": codes must be 3-D [B, T, bytes], got shape ", codes.sizes());
  TORCH_CHECK(scales.dim() == 3, op, ": scales must be 3-D [B, T, C/group_size], got shape ", scales.sizes());
  check_dtype(op, "codes", codes, at::kByte);
  check_dtype(op, "scales", scales, at::kHalf);
  r.higgs = check_higgs_common(op, grid, signs, group_size);
  check_codes_match_scales(op, codes, scales, group_size, r.higgs);
  r.batch = scales.size(0);
  r.tokens = scales.size(1);
  r.channels = r.higgs.channels;
  const int64_t C = r.channels;

  TORCH_CHECK(inputs.size() == weights.size(), op, ": got ", inputs.size(), " inputs but ", weights.size(),
              " weights; each input needs its weight");
  for (size_t i = 0; i < inputs.size(); ++i) {
    const std::string x_name = "inputs[" + std::to_string(i) + "]", w_name = "weights[" + std::to_string(i) + "]";
    const at::Tensor& x = inputs[i];
    const at::Tensor& w = weights[i];
    check_prediction_dtype(op, x_name.c_str(), x, inputs[0]);
    TORCH_CHECK(x.dim() == 3 && x.size(0) == r.batch && x.size(1) == r.tokens, op, ": ", x_name,
                " must be [B, T, C_i] with B, T = ", r.batch, ", ", r.tokens, " (scales' leading dims), got shape ",
                x.sizes());
    check_prediction_dtype(op, w_name.c_str(), w, inputs[0]);
    TORCH_CHECK(w.dim() == 3, op, ": ", w_name, " must be 3-D [G, C_i/G, M], got shape ", w.sizes());
    if (i == 0) {
      r.pred_groups = w.size(0);
      TORCH_CHECK(r.pred_groups >= 1, op, ": weights[0] has G = 0 groups; G must be >= 1");
      TORCH_CHECK(C % r.pred_groups == 0, op, ": C = ", C, " channels (scales last dim * group_size) is not a ",
                  "multiple of G = ", r.pred_groups, " (weights' first dim)");
      if (up.has_value()) {
        check_prediction_dtype(op, "up", *up, inputs[0]);
        TORCH_CHECK(up->dim() == 3 && up->size(0) == r.pred_groups && up->size(2) == C / r.pred_groups, op,
                    ": up must be [G, r, C/G] = [", r.pred_groups, ", r, ", C / r.pred_groups, "], got shape ",
                    up->sizes());
        r.inner = up->size(1);
      } else {
        r.inner = C / r.pred_groups;
      }
    }
    TORCH_CHECK(w.size(0) == r.pred_groups, op, ": ", w_name, " has ", w.size(0), " groups but weights[0] has ",
                r.pred_groups, "; all weights must share G");
    TORCH_CHECK(x.size(2) % r.pred_groups == 0, op, ": ", x_name, " last dim ", x.size(2),
                " is not a multiple of G = ", r.pred_groups, " (weights' first dim)");
    TORCH_CHECK(w.size(1) == x.size(2) / r.pred_groups && w.size(2) == r.inner, op, ": ", w_name,
                " must be [G, C_i/G, M] = [", r.pred_groups, ", ", x.size(2) / r.pred_groups, ", ", r.inner, "] (M = ",
                up.has_value() ? "the rank, up's second dim" : "C/G without up", "), got shape ", w.sizes());
  }
  TORCH_CHECK(!(inputs.empty() && up.has_value()), op,
              ": up must be None when there are no inputs (an intercept-only predictor)");
  check_dtype(op, "bias", bias, at::kFloat);
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == C, op, ": bias must be 1-D of length C = ", C, ", got shape ",
              bias.sizes());

  TORCH_CHECK(cos.has_value() == sin.has_value(), op, ": cos and sin must be given together (both None: no RoPE)");
  r.rotated = cos.has_value();
  check_float_dtype(op, "out", out.scalar_type());
  TORCH_CHECK(out.dim() == 4, op, ": out must be 4-D [B, H, T, D], got shape ", out.sizes());
  if (r.rotated) {
    check_dtype(op, "cos", *cos, at::kFloat);
    check_dtype(op, "sin", *sin, at::kFloat);
    TORCH_CHECK(cos->dim() == 3 && cos->size(0) == r.batch && cos->size(1) == r.tokens, op,
                ": cos must be [B, T, D] with B, T = ", r.batch, ", ", r.tokens, ", got shape ", cos->sizes());
    TORCH_CHECK(sin->sizes() == cos->sizes(), op, ": sin ", sin->sizes(), " must have cos' shape ", cos->sizes());
    r.head_dim = cos->size(2);
    TORCH_CHECK(r.head_dim >= 2 && r.head_dim % 2 == 0, op, ": head dim D = ", r.head_dim,
                " (cos last dim) must be even and >= 2 for rotate-half RoPE");
  } else {
    r.head_dim = out.size(3);
    TORCH_CHECK(r.head_dim >= 1, op, ": head dim D = 0 (out last dim); it must be >= 1");
  }
  TORCH_CHECK(C % r.head_dim == 0, op, ": C = ", C, " channels is not a multiple of the head dim D = ", r.head_dim);
  r.heads = C / r.head_dim;
  TORCH_CHECK(out.size(0) == r.batch && out.size(1) == r.heads && out.size(2) == r.tokens && out.size(3) == r.head_dim,
              op, ": out must be [B, H, T, D] = [", r.batch, ", ", r.heads, ", ", r.tokens, ", ", r.head_dim,
              "], got shape ", out.sizes());
  if (hat_out.has_value()) {
    check_dtype(op, "hat_out", *hat_out, at::kFloat);
    TORCH_CHECK(hat_out->dim() == 3 && hat_out->size(0) == r.batch && hat_out->size(1) == r.tokens &&
                    hat_out->size(2) == C,
                op, ": hat_out must be [B, T, C] = [", r.batch, ", ", r.tokens, ", ", C, "], got shape ",
                hat_out->sizes());
  }

  // The same device everywhere: checked last, over every tensor argument in schema order.
  std::vector<std::pair<std::string, const at::Tensor*>> named = {
      {"codes", &codes}, {"scales", &scales}, {"grid", &grid}, {"signs", &signs}};
  for (size_t i = 0; i < inputs.size(); ++i) named.emplace_back("inputs[" + std::to_string(i) + "]", &inputs[i]);
  for (size_t i = 0; i < weights.size(); ++i) named.emplace_back("weights[" + std::to_string(i) + "]", &weights[i]);
  if (up.has_value()) named.emplace_back("up", &*up);
  named.emplace_back("bias", &bias);
  if (cos.has_value()) named.emplace_back("cos", &*cos);
  if (sin.has_value()) named.emplace_back("sin", &*sin);
  named.emplace_back("out", &out);
  if (hat_out.has_value()) named.emplace_back("hat_out", &*hat_out);
  for (const auto& [name, t] : named) {
    TORCH_CHECK(t->device() == codes.device(), op, ": ", name, " is on ", t->device(), " but codes is on ",
                codes.device(), "; all tensors must be on the same device");
  }
  return r;
}

// pack_bits(codes, bits): codes int32 [..., count].
inline void check_pack_args(const at::Tensor& codes, int64_t bits) {
  constexpr const char* op = "pack_bits";
  check_at_least_1d(op, "codes", codes);
  check_dtype(op, "codes", codes, at::kInt);
  check_bits(op, bits);
  TORCH_CHECK(codes.size(-1) <= kMaxCount, op, ": codes last dim ", codes.size(-1),
              " is too large (at most 2**58 codes per row)");
}

// unpack_bits(packed, bits, count): packed uint8 [..., ceil(count*bits/8)].
inline void check_unpack_args(const at::Tensor& packed, int64_t bits, int64_t count) {
  constexpr const char* op = "unpack_bits";
  check_at_least_1d(op, "packed", packed);
  check_dtype(op, "packed", packed, at::kByte);
  check_bits(op, bits);
  check_count(op, count);  // before packed_row_bytes, whose count * bits must not overflow
  const int64_t want = packed_row_bytes(count, bits);
  TORCH_CHECK(packed.size(-1) == want, op, ": packed last dim ", packed.size(-1),
              " must equal ceil(count * bits / 8) = ceil(", count, " * ", bits, " / 8) = ", want);
}

}  // namespace aquakv

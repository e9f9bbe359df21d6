// a2ats_core.rotary: RoPE by arbitrary positions (cpp/include/a2ats/rotary.h).
#include "a2ats/rotary.h"

#include "dispatch.h"

namespace a2ats::bind {
namespace {

py::object rotary(py::handle x_obj, py::handle positions_obj, py::handle inv_freq_obj, bool interleaved,
                  py::handle out_obj, py::handle stream_obj) {
  TensorArg x(x_obj, "x"), positions(positions_obj, "positions"), inv_freq(inv_freq_obj, "inv_freq");
  x.expect_dtype(kFloatTypes).expect_ndim(4).expect_last_dim_contiguous();
  const int64_t B = x.size(0), H = x.size(1), T = x.size(2), D = x.size(3);
  if (D > kMaxHeadDim)
    throw_value("x.shape[3] (head_dim) must be <= " + std::to_string(kMaxHeadDim) + ", got " + std::to_string(D));
  positions.expect_dtype({DType::kInt32, DType::kInt64}).expect_shape({B, T}, "(batch, tokens) of x");
  positions.expect_device(x.device(), x);
  inv_freq.expect_dtype({DType::kFloat32}).expect_ndim(1).expect_contiguous().expect_device(x.device(), x);
  const int64_t half = inv_freq.size(0);
  if (2 * half > D)
    throw_value("inv_freq has " + std::to_string(half) + " frequencies, so the rotary dim " + std::to_string(2 * half) +
                " exceeds head_dim " + std::to_string(D));
  Output out(out_obj, "out", x, {B, H, T, D}, x.dtype());
  const auto xr = x.byte_range(), orr = out.view.byte_range();
  const bool same = out.view.data() == x.data() && [&] {
    for (int d = 0; d < 4; ++d)
      if (x.size(d) > 1 && x.stride(d) != out.view.stride(d)) return false;
    return true;
  }();
  if (!same && xr.first < orr.second && orr.first < xr.second)
    throw_value("out overlaps x without being the very same view; pass out=x for in-place or a separate array");
  RotaryParams p;
  p.batch = B;
  p.num_heads = H;
  p.num_tokens = T;
  p.head_dim = D;
  p.rotary_dim = 2 * half;
  p.interleaved = interleaved;
  p.dtype = x.dtype();
  p.pos_dtype = positions.dtype();
  for (int d = 0; d < 3; ++d) {
    p.x_stride[d] = x.stride(d);
    p.out_stride[d] = out.view.stride(d);
  }
  p.pos_stride[0] = positions.stride(0);
  p.pos_stride[1] = positions.stride(1);
  run_on_device(
      x, stream_obj, "rotary",
      [&] { rotary_cpu(x.data(), out.view.data(), positions.data(), inv_freq.data<float>(), p); },
      A2ATS_ON_CUDA(rotary_cuda(x.data(), out.view.data(), positions.data(), inv_freq.data<float>(), p, stream)));
  return out.object;
}

}  // namespace

void bind_rotary(py::module_& m) {
  m.def("rotary", &rotary, py::arg("x"), py::arg("positions"), py::arg("inv_freq"), py::kw_only(),
        py::arg("interleaved") = false, py::arg("out") = py::none(), py::arg("stream") = py::none(),
        R"doc(Rotate x (B, H, T, D) by positions (B, T) int32/int64 (may be negative) with inv_freq (R/2,) f32.

Dims >= R pass through. Pairs are (x[i], x[i + R/2]) as in transformers' rotate_half, or
(x[2i], x[2i+1]) when interleaved. Math in f32; out may be x itself. Returns out (B, H, T, D).)doc");
}

}  // namespace a2ats::bind

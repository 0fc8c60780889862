// Rotary position embedding on q and k (HF rotate_half convention), forward and backward.
//
// With x = [x1, x2] split at D/2 and cos/sin = [c1, c2], [s1, s2]:
//   forward : out1 = x1*c1 - x2*s1           out2 = x2*c2 + x1*s2
//   backward: dx1  = g1*c1 + g2*s2           dx2  = g2*c2 - g1*s1     (the transposed map)
// q/k are [B, H, S, D] with any strides except a unit last stride; cos/sin are [B, S, D] (the
// batch stride may be 0). One thread per (b, h, s, pair); fp32 math, one rounding per output.
// Dtypes (input, cos/sin, output): all equal, or (bf16|fp16, fp32, fp32) -- the forward under
// autocast, where HF's fp32 cos/sin promote the bf16 q/k -- and its backward (fp32, fp32, bf16|fp16).
#include "common.cuh"

#include <vector>

namespace sf {
namespace {

struct RotaryTensor {
  const void* in;
  void* out;
  int64_t sb, sh, ss;  // input strides (elements) of dims b, h, s
  int64_t ob, oh, os;  // output strides
  int heads;
};

template <typename TI, typename TC, typename TO>
__global__ void rotary_kernel(RotaryTensor t, const TC* __restrict__ cos, const TC* __restrict__ sin, int64_t cb,
                              int64_t cs, int64_t sb_, int64_t ss_, int S, int half, int64_t total, bool backward) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= total) return;
  const int i = static_cast<int>(idx % half);
  int64_t rest = idx / half;
  const int s = static_cast<int>(rest % S);
  rest /= S;
  const int h = static_cast<int>(rest % t.heads);
  const int64_t b = rest / t.heads;
  const TI* x = static_cast<const TI*>(t.in) + b * t.sb + h * t.sh + s * t.ss;
  TO* o = static_cast<TO*>(t.out) + b * t.ob + h * t.oh + s * t.os;
  const TC* c = cos + b * cb + s * cs;
  const TC* sn = sin + b * sb_ + s * ss_;
  const float x1 = to_f(x[i]), x2 = to_f(x[i + half]);
  const float c1 = to_f(c[i]), c2 = to_f(c[i + half]);
  const float s1 = to_f(sn[i]), s2 = to_f(sn[i + half]);
  if (!backward) {
    o[i] = from_f<TO>(x1 * c1 - x2 * s1);
    o[i + half] = from_f<TO>(x2 * c2 + x1 * s2);
  } else {
    o[i] = from_f<TO>(x1 * c1 + x2 * s2);
    o[i + half] = from_f<TO>(x2 * c2 - x1 * s1);
  }
}

template <typename TI, typename TC, typename TO>
void launch_one(const at::Tensor& x, at::Tensor& out, const at::Tensor& cos, const at::Tensor& sin, bool backward) {
  const int64_t B = x.size(0), S = x.size(2), D = x.size(3);
  const int64_t total = B * x.size(1) * S * (D / 2);
  if (total == 0) return;
  RotaryTensor t{x.data_ptr<TI>(), out.data_ptr<TO>(), x.stride(0), x.stride(1), x.stride(2),
                 out.stride(0), out.stride(1), out.stride(2), static_cast<int>(x.size(1))};
  const int threads = 256;
  const int64_t blocks = (total + threads - 1) / threads;
  rotary_kernel<TI, TC, TO><<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      t, cos.data_ptr<TC>(), sin.data_ptr<TC>(), cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1),
      static_cast<int>(S), static_cast<int>(D / 2), total, backward);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void check_qk(const at::Tensor& x, const at::Tensor& cos, const char* name) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 4 && x.stride(3) == 1, "rotary: ", name, " must be a CUDA [B, H, S, D] tensor with unit last stride");
  TORCH_CHECK(x.size(0) == cos.size(0) && x.size(2) == cos.size(1) && x.size(3) == cos.size(2), "rotary: ", name,
              " shape ", x.sizes(), " does not match cos/sin ", cos.sizes());
}

template <typename TI, typename TC, typename TO>
void launch_both(const at::Tensor& q, const at::Tensor& k, at::Tensor& qo, at::Tensor& ko, const at::Tensor& cos,
                 const at::Tensor& sin, bool backward) {
  launch_one<TI, TC, TO>(q, qo, cos, sin, backward);
  launch_one<TI, TC, TO>(k, ko, cos, sin, backward);
}

}  // namespace

std::vector<at::Tensor> rotary(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                               const at::Tensor& sin, bool backward, at::ScalarType out_dtype) {
  TORCH_CHECK(cos.dim() == 3 && cos.sizes() == sin.sizes() && cos.stride(2) == 1 && sin.stride(2) == 1,
              "rotary: cos/sin must be [B, S, D] with unit last stride");
  TORCH_CHECK(cos.size(2) % 2 == 0, "rotary: head_dim must be even");
  check_qk(q, cos, "q");
  check_qk(k, cos, "k");
  const at::ScalarType in = q.scalar_type(), cs = cos.scalar_type();
  TORCH_CHECK(k.scalar_type() == in && sin.scalar_type() == cs, "rotary: q/k and cos/sin must each share a dtype");
  const c10::cuda::OptionalCUDAGuard guard(q.device());
  // empty_like keeps q's strides (HF's q is a transposed view of a contiguous [B, S, H, D]).
  at::Tensor qo = at::empty_like(q, q.options().dtype(out_dtype)), ko = at::empty_like(k, k.options().dtype(out_dtype));
  if (in == cs && cs == out_dtype) {
    dispatch_float(in, "rotary", [&](auto v) {
      using T = decltype(v);
      launch_both<T, T, T>(q, k, qo, ko, cos, sin, backward);
    });
  } else if (cs == at::kFloat && out_dtype == at::kFloat && (in == at::kBFloat16 || in == at::kHalf)) {
    dispatch_float(in, "rotary", [&](auto v) {
      using T = decltype(v);
      launch_both<T, float, float>(q, k, qo, ko, cos, sin, backward);
    });
  } else if (in == at::kFloat && cs == at::kFloat && (out_dtype == at::kBFloat16 || out_dtype == at::kHalf)) {
    dispatch_float(out_dtype, "rotary", [&](auto v) {
      using T = decltype(v);
      launch_both<float, float, T>(q, k, qo, ko, cos, sin, backward);
    });
  } else {
    TORCH_CHECK(false, "rotary: unsupported dtypes (q/k ", in, ", cos/sin ", cs, ", out ", out_dtype, ")");
  }
  return {qo, ko};
}

}  // namespace sf

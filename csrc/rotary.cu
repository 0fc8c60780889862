// Rotary position embedding on q and k (HF rotate_half convention), forward and backward.
//
// With x = [x1, x2] split at D/2 and cos/sin = [c1, c2], [s1, s2]:
//   forward : out1 = x1*c1 - x2*s1           out2 = x2*c2 + x1*s2
//   backward: dx1  = g1*c1 + g2*s2           dx2  = g2*c2 - g1*s1     (the transposed map)
// q/k are [B, H, S, D] with any strides except a unit last stride; cos/sin are [B, S, D] (the
// batch stride may be 0). One thread per (b, h, s, pair); fp32 math, one rounding per output.
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

template <typename T>
__global__ void rotary_kernel(RotaryTensor t, const T* __restrict__ cos, const T* __restrict__ sin, int64_t cb,
                              int64_t cs, int64_t sb_, int64_t ss_, int S, int half, int64_t total, bool backward) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= total) return;
  const int i = static_cast<int>(idx % half);
  int64_t rest = idx / half;
  const int s = static_cast<int>(rest % S);
  rest /= S;
  const int h = static_cast<int>(rest % t.heads);
  const int64_t b = rest / t.heads;
  const T* x = static_cast<const T*>(t.in) + b * t.sb + h * t.sh + s * t.ss;
  T* o = static_cast<T*>(t.out) + b * t.ob + h * t.oh + s * t.os;
  const T* c = cos + b * cb + s * cs;
  const T* sn = sin + b * sb_ + s * ss_;
  const float x1 = to_f(x[i]), x2 = to_f(x[i + half]);
  const float c1 = to_f(c[i]), c2 = to_f(c[i + half]);
  const float s1 = to_f(sn[i]), s2 = to_f(sn[i + half]);
  if (!backward) {
    o[i] = from_f<T>(x1 * c1 - x2 * s1);
    o[i + half] = from_f<T>(x2 * c2 + x1 * s2);
  } else {
    o[i] = from_f<T>(x1 * c1 + x2 * s2);
    o[i + half] = from_f<T>(x2 * c2 - x1 * s1);
  }
}

template <typename T>
void launch_one(const at::Tensor& x, at::Tensor& out, const at::Tensor& cos, const at::Tensor& sin, bool backward) {
  const int64_t B = x.size(0), S = x.size(2), D = x.size(3);
  const int64_t total = B * x.size(1) * S * (D / 2);
  if (total == 0) return;
  RotaryTensor t{x.data_ptr<T>(), out.data_ptr<T>(), x.stride(0), x.stride(1), x.stride(2),
                 out.stride(0), out.stride(1), out.stride(2), static_cast<int>(x.size(1))};
  const int threads = 256;
  const int64_t blocks = (total + threads - 1) / threads;
  rotary_kernel<T><<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      t, cos.data_ptr<T>(), sin.data_ptr<T>(), cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1),
      static_cast<int>(S), static_cast<int>(D / 2), total, backward);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void check_qk(const at::Tensor& x, const at::Tensor& cos, const char* name) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 4 && x.stride(3) == 1, "rotary: ", name, " must be a CUDA [B, H, S, D] tensor with unit last stride");
  TORCH_CHECK(x.size(0) == cos.size(0) && x.size(2) == cos.size(1) && x.size(3) == cos.size(2), "rotary: ", name,
              " shape ", x.sizes(), " does not match cos/sin ", cos.sizes());
  TORCH_CHECK(x.scalar_type() == cos.scalar_type(), "rotary: ", name, " and cos/sin must share a dtype");
}

}  // namespace

std::vector<at::Tensor> rotary(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                               const at::Tensor& sin, bool backward) {
  TORCH_CHECK(cos.dim() == 3 && cos.sizes() == sin.sizes() && cos.stride(2) == 1 && sin.stride(2) == 1,
              "rotary: cos/sin must be [B, S, D] with unit last stride");
  TORCH_CHECK(cos.size(2) % 2 == 0, "rotary: head_dim must be even");
  check_qk(q, cos, "q");
  check_qk(k, cos, "k");
  const c10::cuda::OptionalCUDAGuard guard(q.device());
  at::Tensor qo = at::empty_like(q), ko = at::empty_like(k);
  dispatch_float(q.scalar_type(), "rotary", [&](auto v) {
    using T = decltype(v);
    launch_one<T>(q, qo, cos, sin, backward);
    launch_one<T>(k, ko, cos, sin, backward);
  });
  return {qo, ko};
}

}  // namespace sf

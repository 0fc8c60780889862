// Rotary position embedding on q and k (HF rotate_half convention), forward and backward.
//
// With x = [x1, x2] split at D/2 and cos/sin = [c1, c2], [s1, s2]:
//   forward : out1 = x1*c1 - x2*s1           out2 = x2*c2 + x1*s2
//   backward: dx1  = g1*c1 + g2*s2           dx2  = g2*c2 - g1*s1     (the transposed map)
// q/k are [B, H, S, D] with any strides except a unit last stride; cos/sin are [B, S, D] (the
// batch stride may be 0). Grid (S / rows-per-block, H, B), threads (pairs, positions): no integer
// division per thread, and a warp reads consecutive elements. fp32 math, one rounding per output.
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
};

template <typename TI, typename TC, typename TO>
__global__ void rotary_kernel(RotaryTensor t, const TC* __restrict__ cos, const TC* __restrict__ sin, int64_t cb,
                              int64_t cs, int64_t sb_, int64_t ss_, int S, int half, bool backward) {
  const int s = blockIdx.x * blockDim.y + threadIdx.y;
  if (s >= S) return;
  const int64_t h = blockIdx.y, b = blockIdx.z;
  const TI* x = static_cast<const TI*>(t.in) + b * t.sb + h * t.sh + s * t.ss;
  TO* o = static_cast<TO*>(t.out) + b * t.ob + h * t.oh + s * t.os;
  const TC* c = cos + b * cb + s * cs;
  const TC* sn = sin + b * sb_ + s * ss_;
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
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
}

constexpr int64_t kMaxGridYZ = 65535;  // gridDim.y / gridDim.z limit: heads and batch

template <typename TI, typename TC, typename TO>
void launch_one(const at::Tensor& x, at::Tensor& out, const at::Tensor& cos, const at::Tensor& sin, bool backward) {
  const int64_t B = x.size(0), Hn = x.size(1), S = x.size(2), half = x.size(3) / 2;
  if (B * Hn * S * half == 0) return;
  TORCH_CHECK(B <= kMaxGridYZ && Hn <= kMaxGridYZ && S <= INT_MAX, "rotary: batch and heads must be at most 65535");
  RotaryTensor t{x.data_ptr<TI>(), out.data_ptr<TO>(), x.stride(0), x.stride(1), x.stride(2),
                 out.stride(0), out.stride(1), out.stride(2)};
  int tx = 32;  // threads over the pairs: half rounded up to a warp multiple, at most 256
  while (tx < half && tx < 256) tx *= 2;
  const int ty = 256 / tx;  // sequence positions per block
  const dim3 block(tx, ty), grid(static_cast<unsigned>((S + ty - 1) / ty), static_cast<unsigned>(Hn), static_cast<unsigned>(B));
  rotary_kernel<TI, TC, TO><<<grid, block, 0, c10::cuda::getCurrentCUDAStream()>>>(
      t, cos.data_ptr<TC>(), sin.data_ptr<TC>(), cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1),
      static_cast<int>(S), static_cast<int>(half), backward);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void check_qk(const at::Tensor& x, const at::Tensor& cos, const char* name) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 4 && x.stride(3) == 1, "rotary: ", name, " must be a CUDA [B, H, S, D] tensor with unit last stride");
  TORCH_CHECK(x.device() == cos.device(), "rotary: ", name, " and cos/sin must be on one device");
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
  TORCH_CHECK(sin.device() == cos.device(), "rotary: cos and sin must be on one device");
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

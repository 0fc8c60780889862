// RMSNorm with LlamaRMSNorm semantics, optionally fused with the residual add.
//
// forward (one block per row of H):
//   s    = x + residual                       (in x's dtype; only with a residual)
//   rstd = rsqrt(mean(s^2) + eps)              (fp32)
//   y    = TO( float(TX(s * rstd)) * w )       (TO = promote(TX, TW), as HF: cast, then times w)
// backward, with xh = s * rstd and g = TX(dy * w) (the gradient that reaches the cast):
//   ds   = rstd * (g - xh * mean(g * xh)) (+ incoming grad of the returned s)
//   dw   = sum_rows dy * TX(xh)            (per-block partial sums in shared memory, then a sum)
#include "common.cuh"

#include <vector>

namespace sf {
namespace {

template <typename TX, typename TW, typename TO, int VEC>
__global__ void rmsnorm_fwd_kernel(const TX* __restrict__ x, const TX* __restrict__ res, const TW* __restrict__ w,
                                   TO* __restrict__ y, TX* s_out, float* __restrict__ rstd_out, int H, float eps) {
  __shared__ float smem[32];
  const int64_t row = blockIdx.x;
  const int nvec = H / VEC;
  const TX* xr = x + row * H;
  TX* __restrict__ sr = res ? s_out + row * H : nullptr;
  float ss = 0.f;
  for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
    Vec<TX, VEC> a = load_vec<TX, VEC>(xr + i * VEC);
    if (res) {
      Vec<TX, VEC> b = load_vec<TX, VEC>(res + row * H + i * VEC);
#pragma unroll
      for (int e = 0; e < VEC; ++e) a.v[e] = from_f<TX>(to_f(a.v[e]) + to_f(b.v[e]));
      store_vec<TX, VEC>(sr + i * VEC, a);
    }
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const float f = to_f(a.v[e]);
      ss += f * f;
    }
  }
  const float r = rsqrtf(block_sum(ss, smem) / H + eps);
  if (threadIdx.x == 0) rstd_out[row] = r;
  // Second pass over the row (from L1/L2): s is recomputed from x and residual, bit-identical, rather
  // than re-read from s_out, which this kernel wrote (no read-after-write through the read-only path).
  for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
    Vec<TX, VEC> a = load_vec<TX, VEC>(xr + i * VEC);
    if (res) {
      const Vec<TX, VEC> b = load_vec<TX, VEC>(res + row * H + i * VEC);
#pragma unroll
      for (int e = 0; e < VEC; ++e) a.v[e] = from_f<TX>(to_f(a.v[e]) + to_f(b.v[e]));
    }
    const Vec<TW, VEC> wv = load_vec<TW, VEC>(w + i * VEC);
    Vec<TO, VEC> o;
#pragma unroll
    for (int e = 0; e < VEC; ++e) o.v[e] = from_f<TO>(to_f(from_f<TX>(to_f(a.v[e]) * r)) * to_f(wv.v[e]));
    store_vec<TO, VEC>(y + row * H + i * VEC, o);
  }
}

template <typename TX, typename TW, typename TO, int VEC>
__global__ void rmsnorm_bwd_kernel(const TO* __restrict__ dy, const TX* __restrict__ xs, const TW* __restrict__ w,
                                   const float* __restrict__ rstd, const TX* __restrict__ ds_in, TX* __restrict__ dx,
                                   float* __restrict__ dw_partial, int64_t rows, int H) {
  __shared__ float smem[32];
  // H floats when dw_partial != nullptr; column i*VEC+e at dw_acc[e*nvec + i], so the threads of a warp
  // (consecutive i) hit consecutive banks.
  extern __shared__ float dw_acc[];
  const int nvec = H / VEC;
  if (dw_partial) {
    for (int i = threadIdx.x; i < nvec; i += blockDim.x)
#pragma unroll
      for (int e = 0; e < VEC; ++e) dw_acc[e * nvec + i] = 0.f;
  }
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const float r = rstd[row];
    const int64_t off = row * H;
    float dot = 0.f;
    for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
      const Vec<TO, VEC> d = load_vec<TO, VEC>(dy + off + i * VEC);
      const Vec<TX, VEC> a = load_vec<TX, VEC>(xs + off + i * VEC);
      const Vec<TW, VEC> wv = load_vec<TW, VEC>(w + i * VEC);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float g = to_f(from_f<TX>(to_f(d.v[e]) * to_f(wv.v[e])));
        dot += g * to_f(a.v[e]) * r;
      }
    }
    const float c = block_sum(dot, smem) / H;
    for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
      const Vec<TO, VEC> d = load_vec<TO, VEC>(dy + off + i * VEC);
      const Vec<TX, VEC> a = load_vec<TX, VEC>(xs + off + i * VEC);
      const Vec<TW, VEC> wv = load_vec<TW, VEC>(w + i * VEC);
      Vec<TX, VEC> extra;
      if (ds_in) extra = load_vec<TX, VEC>(ds_in + off + i * VEC);
      Vec<TX, VEC> o;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float xh = to_f(a.v[e]) * r;
        const float g = to_f(from_f<TX>(to_f(d.v[e]) * to_f(wv.v[e])));
        float v = r * (g - xh * c);
        if (ds_in) v += to_f(extra.v[e]);
        o.v[e] = from_f<TX>(v);
        if (dw_partial) dw_acc[e * nvec + i] += to_f(d.v[e]) * to_f(from_f<TX>(xh));
      }
      store_vec<TX, VEC>(dx + off + i * VEC, o);
    }
  }
  if (dw_partial) {  // each thread only ever touched its own columns: no barrier needed
    for (int i = threadIdx.x; i < nvec; i += blockDim.x)
#pragma unroll
      for (int e = 0; e < VEC; ++e) dw_partial[int64_t(blockIdx.x) * H + i * VEC + e] = dw_acc[e * nvec + i];
  }
}

template <typename T, int N>
bool vec_ok(const T* p) { return aligned_to(p, sizeof(T) * N); }

// An optional input that must match `ref` (contiguous, same device, shape and dtype); true when given.
bool optional_like(const c10::optional<at::Tensor>& t, const at::Tensor& ref, const char* what) {
  if (!t.has_value() || !t->defined()) return false;
  TORCH_CHECK(t->is_contiguous() && t->device() == ref.device() && t->sizes() == ref.sizes() &&
                  t->scalar_type() == ref.scalar_type(),
              what, " must be a contiguous tensor with the device, shape and dtype of ", ref.sizes(), " ",
              ref.scalar_type(), " on ", ref.device());
  return true;
}

}  // namespace

std::vector<at::Tensor> rmsnorm_fwd(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                                    const at::Tensor& weight, double eps) {
  SF_CHECK_CUDA(x); SF_CHECK_CONTIG(x); SF_CHECK_CUDA(weight); SF_CHECK_CONTIG(weight);
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 1 && weight.size(0) == x.size(1), "rmsnorm_fwd: x [R, H], weight [H]");
  TORCH_CHECK(x.size(0) <= INT_MAX, "rmsnorm_fwd: at most 2^31-1 rows (one block per row)");
  TORCH_CHECK(weight.device() == x.device(), "rmsnorm_fwd: weight must be on x's device");
  const bool has_res = optional_like(residual, x, "rmsnorm_fwd: residual");
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const int64_t rows = x.size(0);
  const int H = static_cast<int>(x.size(1));
  at::Tensor s = has_res ? at::empty_like(x) : at::empty({0}, x.options());
  at::Tensor rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  at::Tensor y;
  dispatch_float2(x.scalar_type(), weight.scalar_type(), "rmsnorm_fwd", [&](auto xv, auto wv) {
    using TX = decltype(xv);
    using TW = decltype(wv);
    using TO = promote_t<TX, TW>;
    y = at::empty(x.sizes(), x.options().dtype(scalar_type_of<TO>()));
    if (rows == 0 || H == 0) return;
    constexpr int V = 16 / sizeof(TX);
    const TX* res_p = has_res ? residual->data_ptr<TX>() : nullptr;
    TX* s_p = has_res ? s.data_ptr<TX>() : nullptr;
    const bool vec = H % V == 0 && vec_ok<TX, V>(x.data_ptr<TX>()) && vec_ok<TW, V>(weight.data_ptr<TW>()) &&
                     vec_ok<TO, V>(y.data_ptr<TO>()) && (!has_res || (vec_ok<TX, V>(res_p) && vec_ok<TX, V>(s_p)));
    auto launch = [&](auto kernel, int threads) {
      kernel<<<rows, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          x.data_ptr<TX>(), res_p, weight.data_ptr<TW>(), y.data_ptr<TO>(), s_p, rstd.data_ptr<float>(), H, (float)eps);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (vec) launch(rmsnorm_fwd_kernel<TX, TW, TO, V>, threads_for(H / V));
    else launch(rmsnorm_fwd_kernel<TX, TW, TO, 1>, threads_for(H));
  });
  return {y, s, rstd};
}

std::vector<at::Tensor> rmsnorm_bwd(const at::Tensor& dy, const at::Tensor& xs, const at::Tensor& weight,
                                    const at::Tensor& rstd, const c10::optional<at::Tensor>& ds, bool need_dw) {
  SF_CHECK_CUDA(dy); SF_CHECK_CONTIG(dy); SF_CHECK_CONTIG(xs); SF_CHECK_CONTIG(weight); SF_CHECK_CONTIG(rstd);
  TORCH_CHECK(dy.sizes() == xs.sizes() && xs.dim() == 2 && weight.size(0) == xs.size(1), "rmsnorm_bwd: shapes");
  TORCH_CHECK(xs.is_cuda() && weight.is_cuda() && rstd.is_cuda() && rstd.scalar_type() == at::kFloat &&
              rstd.numel() == xs.size(0), "rmsnorm_bwd: xs/weight/rstd must be CUDA tensors, rstd fp32 [R]");
  TORCH_CHECK(xs.device() == dy.device() && weight.device() == dy.device() && rstd.device() == dy.device(),
              "rmsnorm_bwd: all tensors on one device");
  const bool has_ds = optional_like(ds, xs, "rmsnorm_bwd: ds");
  const c10::cuda::OptionalCUDAGuard guard(xs.device());
  const int64_t rows = xs.size(0);
  const int H = static_cast<int>(xs.size(1));
  at::Tensor dx = at::empty_like(xs);
  at::Tensor dw = at::zeros_like(weight);  // stays zero without rows or without need_dw
  if (rows == 0 || H == 0) return {dx, dw};
  const int sms = sm_count();
  const size_t smem = need_dw ? size_t(H) * sizeof(float) : 0;
  TORCH_CHECK(smem <= 128 * 1024, "rmsnorm_bwd: hidden size ", H, " too large for the shared-memory dw accumulator");
  at::Tensor partial;
  dispatch_float2(xs.scalar_type(), weight.scalar_type(), "rmsnorm_bwd", [&](auto xv, auto wv) {
    using TX = decltype(xv);
    using TW = decltype(wv);
    using TO = promote_t<TX, TW>;
    TORCH_CHECK(dy.scalar_type() == scalar_type_of<TO>(), "rmsnorm_bwd: dy dtype must be the forward output dtype");
    constexpr int V = 16 / sizeof(TX);
    const TX* ds_p = has_ds ? ds->data_ptr<TX>() : nullptr;
    const bool vec = H % V == 0 && vec_ok<TO, V>(dy.data_ptr<TO>()) && vec_ok<TX, V>(xs.data_ptr<TX>()) &&
                     vec_ok<TW, V>(weight.data_ptr<TW>()) && vec_ok<TX, V>(dx.data_ptr<TX>()) &&
                     (!has_ds || vec_ok<TX, V>(ds_p));
    auto stream = c10::cuda::getCurrentCUDAStream();
    auto launch = [&](auto kernel, int threads) {
      if (smem > 48 * 1024)
        C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
      // As many persistent blocks as fit on the device at once (each one owns a dw partial row).
      int per_sm = 0;
      C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem));
      const int64_t blocks = std::min<int64_t>(rows, int64_t(std::max(per_sm, 1)) * sms);
      if (need_dw) partial = at::empty({blocks, H}, xs.options().dtype(at::kFloat));
      float* part_p = need_dw ? partial.data_ptr<float>() : nullptr;
      kernel<<<blocks, threads, smem, stream>>>(dy.data_ptr<TO>(), xs.data_ptr<TX>(), weight.data_ptr<TW>(),
                                                rstd.data_ptr<float>(), ds_p, dx.data_ptr<TX>(), part_p, rows, H);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (vec) launch(rmsnorm_bwd_kernel<TX, TW, TO, V>, threads_for(H / V));
    else launch(rmsnorm_bwd_kernel<TX, TW, TO, 1>, threads_for(H));
  });
  if (need_dw) dw = partial.sum(0).to(weight.scalar_type());
  return {dx, dw};
}

}  // namespace sf

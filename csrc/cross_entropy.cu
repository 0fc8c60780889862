// Chunked linear + cross-entropy (the Python side documents the math: shardformer/kernels/cross_entropy.py).
//
// Per chunk of rows: logits = h @ W^T (cuBLAS via ATen, in W's dtype), then two custom kernels, one
// block per row:
//   ce_chunk_stats : online max / sum(exp) over the first `vocab_valid` columns, and the target logit
//   ce_chunk_grad_ : overwrite the logits with row_scale * (exp(z - lse) - onehot)  (0 on padding)
// and the gradient matmuls dh = dz @ W, dW += dz^T @ h (fp32 accumulator). The full [N, V] logits
// never exist; peak extra memory is one [chunk, V] buffer. The stats/grad kernels are exported too,
// so the vocab-parallel loop in Python can all-reduce the stats between them.
#include "common.cuh"

#include <atomic>
#include <vector>

namespace sf {
namespace {

template <typename T>
__global__ void ce_stats_kernel(const T* __restrict__ logits, int64_t ld, const int64_t* __restrict__ target,
                                int vocab_valid, float* __restrict__ m_out, float* __restrict__ s_out,
                                float* __restrict__ zt_out) {
  __shared__ float sm[32], ss[32];
  const int64_t row = blockIdx.x;
  const T* z = logits + row * ld;
  float m = -INFINITY, s = 0.f;
  for (int j = threadIdx.x; j < vocab_valid; j += blockDim.x) {
    const float x = to_f(z[j]);
    if (x > m) {
      s = s * expf(m - x) + 1.f;
      m = x;
    } else if (x != -INFINITY) {
      s += expf(x - m);
    }
  }
  block_lse(m, s, sm, ss);
  if (threadIdx.x == 0) {
    const int64_t t = target[row];
    m_out[row] = m;
    s_out[row] = s;
    zt_out[row] = (t >= 0 && t < vocab_valid) ? to_f(z[t]) : 0.f;  // callers map other targets to -1
  }
}

template <typename T>
__global__ void ce_grad_kernel(T* __restrict__ logits, int64_t ld, int V, const float* __restrict__ lse,
                               const int64_t* __restrict__ target, int vocab_valid, const float* __restrict__ row_scale) {
  const int64_t row = blockIdx.x;
  T* z = logits + row * ld;
  const float l = lse[row], sc = row_scale[row];
  const int64_t t = target[row];
  for (int j = threadIdx.x; j < V; j += blockDim.x) {
    float g = 0.f;
    if (j < vocab_valid && sc != 0.f) g = (expf(to_f(z[j]) - l) - (j == t ? 1.f : 0.f)) * sc;
    z[j] = from_f<T>(g);
  }
}

void check_chunk(const at::Tensor& logits, const at::Tensor& target, int64_t vocab_valid) {
  TORCH_CHECK(logits.is_cuda() && logits.dim() == 2 && logits.stride(1) == 1, "ce: logits must be a CUDA [C, V] tensor with unit column stride");
  TORCH_CHECK(target.is_cuda() && target.scalar_type() == at::kLong && target.is_contiguous() && target.numel() == logits.size(0),
              "ce: target_local must be a contiguous int64 [C] CUDA tensor");
  TORCH_CHECK(vocab_valid >= 0 && vocab_valid <= logits.size(1), "ce: vocab_valid out of range");
  TORCH_CHECK(logits.size(0) <= INT_MAX && logits.size(1) <= INT_MAX, "ce: at most 2^31-1 rows and columns per chunk");
}

}  // namespace

std::vector<at::Tensor> ce_chunk_stats(const at::Tensor& logits, const at::Tensor& target_local, int64_t vocab_valid) {
  check_chunk(logits, target_local, vocab_valid);
  const c10::cuda::OptionalCUDAGuard guard(logits.device());
  const int64_t rows = logits.size(0);
  auto opts = logits.options().dtype(at::kFloat);
  at::Tensor m = at::empty({rows}, opts), s = at::empty({rows}, opts), zt = at::empty({rows}, opts);
  if (rows == 0) return {m, s, zt};
  dispatch_float(logits.scalar_type(), "ce_chunk_stats", [&](auto v) {
    using T = decltype(v);
    ce_stats_kernel<T><<<rows, threads_for(std::max<int64_t>(vocab_valid, 1)), 0, c10::cuda::getCurrentCUDAStream()>>>(
        logits.data_ptr<T>(), logits.stride(0), target_local.data_ptr<int64_t>(), static_cast<int>(vocab_valid),
        m.data_ptr<float>(), s.data_ptr<float>(), zt.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {m, s, zt};
}

at::Tensor ce_chunk_grad_(at::Tensor logits, const at::Tensor& lse, const at::Tensor& target_local, int64_t vocab_valid,
                          const at::Tensor& row_scale) {
  check_chunk(logits, target_local, vocab_valid);
  TORCH_CHECK(lse.is_cuda() && row_scale.is_cuda() && lse.scalar_type() == at::kFloat && row_scale.scalar_type() == at::kFloat &&
              lse.numel() == logits.size(0) && row_scale.numel() == logits.size(0),
              "ce_chunk_grad_: lse/row_scale must be fp32 CUDA tensors with one value per row");
  const c10::cuda::OptionalCUDAGuard guard(logits.device());
  const int64_t rows = logits.size(0);
  if (rows == 0) return logits;
  at::Tensor l = lse.contiguous(), sc = row_scale.contiguous();
  dispatch_float(logits.scalar_type(), "ce_chunk_grad_", [&](auto v) {
    using T = decltype(v);
    ce_grad_kernel<T><<<rows, threads_for(logits.size(1)), 0, c10::cuda::getCurrentCUDAStream()>>>(
        logits.data_ptr<T>(), logits.stride(0), static_cast<int>(logits.size(1)), l.data_ptr<float>(),
        target_local.data_ptr<int64_t>(), static_cast<int>(vocab_valid), sc.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return logits;
}

// acc += a @ b with acc fp32 and a, b in the matmul dtype. addmm with out_dtype=fp32 accumulates in the
// GEMM's epilogue (one fp32 read and write of acc); where this build or device refuses it, the product is
// formed in the matmul dtype and added (an extra [V, H] temporary and pass).
static void accumulate_fp32(at::Tensor& acc, const at::Tensor& a, const at::Tensor& b) {
  static std::atomic<bool> fused_ok{true};
  if (a.scalar_type() == at::kFloat) {
    acc.addmm_(a, b);
    return;
  }
  if (fused_ok.load()) {
    try {
      at::addmm_out(acc, acc, a, b, at::kFloat);
      return;
    } catch (const std::exception& e) {
      fused_ok.store(false);
      TORCH_WARN_ONCE("shardformer linear_ce: addmm with out_dtype=float32 refused (", e.what(),
                      "); accumulating the weight gradient through a temporary instead");
    }
  }
  acc.add_(at::mm(a, b));
}

// acc += a @ b for the Python (vocab-parallel) chunk loop; acc fp32 [M, N], a [M, K], b [K, N] in one dtype.
void addmm_fp32_(at::Tensor acc, const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(acc.is_cuda() && a.is_cuda() && b.is_cuda() && acc.device() == a.device() && a.device() == b.device(),
              "addmm_fp32_: CUDA tensors on one device expected");
  TORCH_CHECK(acc.scalar_type() == at::kFloat && a.scalar_type() == b.scalar_type(),
              "addmm_fp32_: acc must be fp32 and a, b share a dtype");
  TORCH_CHECK(acc.dim() == 2 && a.dim() == 2 && b.dim() == 2 && a.size(0) == acc.size(0) && b.size(1) == acc.size(1) &&
              a.size(1) == b.size(0), "addmm_fp32_: shapes acc [M, N], a [M, K], b [K, N]");
  const c10::cuda::OptionalCUDAGuard guard(acc.device());
  accumulate_fp32(acc, a, b);
}

// Returns {loss (fp32 scalar), grad_hidden (fp32 [N, H] or empty), grad_weight (fp32 [V, H] or empty)}.
// `weight` is already in the matmul dtype; `hidden` is cast to it chunk by chunk.
std::vector<at::Tensor> linear_ce_forward(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& target,
                                          int64_t ignore_index, int64_t chunk_size, bool mean, int64_t vocab_valid,
                                          bool need_h, bool need_w) {
  TORCH_CHECK(hidden.is_cuda() && weight.is_cuda() && target.is_cuda(), "linear_ce_forward: CUDA tensors expected");
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1) && target.dim() == 1 &&
              target.size(0) == hidden.size(0), "linear_ce_forward: hidden [N, H], weight [V, H], target [N]");
  TORCH_CHECK(chunk_size > 0, "linear_ce_forward: chunk_size must be positive");
  const c10::cuda::OptionalCUDAGuard guard(hidden.device());
  const int64_t N = hidden.size(0), H = hidden.size(1), V = weight.size(0);
  const auto cdt = weight.scalar_type();
  auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor tgt = target.to(at::kLong).contiguous();
  at::Tensor valid_all = tgt.ne(ignore_index);
  at::Tensor n_valid = valid_all.sum().to(at::kFloat);
  at::Tensor scale = mean ? n_valid.reciprocal() : at::ones({}, f32);
  at::Tensor grad_h = need_h ? at::empty({N, H}, f32) : at::empty({0}, f32);
  at::Tensor grad_w = need_w ? at::zeros({V, H}, f32) : at::empty({0}, f32);
  at::Tensor loss = at::zeros({}, f32);
  at::Tensor wt = weight.t();
  for (int64_t start = 0; start < N; start += chunk_size) {
    const int64_t len = std::min(chunk_size, N - start);
    at::Tensor h = hidden.narrow(0, start, len).to(cdt);
    at::Tensor valid = valid_all.narrow(0, start, len);
    at::Tensor t = tgt.narrow(0, start, len);
    at::Tensor here = valid.logical_and(t.ge(0)).logical_and(t.lt(vocab_valid));
    at::Tensor tl = at::where(here, t, at::full_like(t, -1)).contiguous();
    at::Tensor logits = at::mm(h, wt);
    auto st = ce_chunk_stats(logits, tl, vocab_valid);
    at::Tensor lse = st[0] + st[1].log();
    loss.add_(at::where(valid, lse - st[2], at::zeros_like(lse)).sum());
    if (need_h || need_w) {
      at::Tensor row_scale = at::where(valid, scale.expand_as(lse), at::zeros_like(lse));
      ce_chunk_grad_(logits, lse, tl, vocab_valid, row_scale);
      if (need_h) grad_h.narrow(0, start, len).copy_(at::mm(logits, weight));
      if (need_w) accumulate_fp32(grad_w, logits.t(), h);
    }
  }
  if (mean) loss.div_(n_valid);
  return {loss, grad_h, grad_w};
}

}  // namespace sf

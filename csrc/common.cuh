// Shared helpers for the shardformer CUDA kernels: dtype dispatch, vector loads, block reductions.
// All kernels read fp32/fp16/bf16 and accumulate in fp32.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace sf {

// Calls f(T{}) with T the C++ type of a floating dtype (float, at::Half, at::BFloat16).
template <typename F>
inline void dispatch_float(at::ScalarType t, const char* what, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(at::Half{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    default: TORCH_CHECK(false, what, ": unsupported dtype ", t, " (expected float32, float16 or bfloat16)");
  }
}

// Calls f(A{}, B{}) with the C++ types of two floating dtypes (e.g. an input's and a weight's).
template <typename F>
inline void dispatch_float2(at::ScalarType a, at::ScalarType b, const char* what, F&& f) {
  dispatch_float(a, what, [&](auto av) { dispatch_float(b, what, [&](auto bv) { f(av, bv); }); });
}

template <typename T>
constexpr at::ScalarType scalar_type_of() { return c10::CppTypeToScalarType<T>::value; }

// torch's type promotion for two floating dtypes: same -> same, otherwise float32.
template <typename A, typename B>
using promote_t = std::conditional_t<std::is_same<A, B>::value, A, float>;

template <typename T>
__device__ __forceinline__ float to_f(T v) { return static_cast<float>(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v) { return static_cast<T>(v); }

// N elements of T loaded/stored as one aligned transaction.
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Vec<T, N> load_vec(const T* p) { return *reinterpret_cast<const Vec<T, N>*>(p); }

// 16-byte multiples are stored as uint4 words with __stwb: a plain struct assignment may be split
// by the compiler into per-element stores (seen in the PTX of the RMSNorm backward).
template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, N>& v) {
  if constexpr (sizeof(Vec<T, N>) % 16 == 0) {
    constexpr int K = sizeof(Vec<T, N>) / 16;
    uint4 words[K];
    memcpy(words, &v, sizeof(words));
#pragma unroll
    for (int k = 0; k < K; ++k) __stwb(reinterpret_cast<uint4*>(p) + k, words[k]);
  } else {
    *reinterpret_cast<Vec<T, N>*>(p) = v;
  }
}

inline bool aligned_to(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
// `smem` holds 32 floats. Safe to call repeatedly.
__device__ __forceinline__ float block_sum(float v, float* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  return warp_sum(lane < nwarps ? smem[lane] : 0.f);
}

// Online-softmax state (running max m, sum of exp(x - m)); merge handles empty (-inf, 0) states.
__device__ __forceinline__ void lse_merge(float& m, float& s, float m2, float s2) {
  const float mx = fmaxf(m, m2);
  if (mx == -INFINITY) return;
  s = s * expf(m - mx) + s2 * expf(m2 - mx);
  m = mx;
}

__device__ __forceinline__ void block_lse(float& m, float& s, float* smem_m, float* smem_s) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) lse_merge(m, s, __shfl_xor_sync(0xffffffffu, m, o), __shfl_xor_sync(0xffffffffu, s, o));
  __syncthreads();
  if (lane == 0) { smem_m[warp] = m; smem_s[warp] = s; }
  __syncthreads();
  m = lane < nwarps ? smem_m[lane] : -INFINITY;
  s = lane < nwarps ? smem_s[lane] : 0.f;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) lse_merge(m, s, __shfl_xor_sync(0xffffffffu, m, o), __shfl_xor_sync(0xffffffffu, s, o));
}

// Number of SMs of the current device (the launch grids are sized from it).
inline int sm_count() {
  int dev = 0, n = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
  return n;
}

inline int threads_for(int64_t work) {
  int64_t t = ((work + 31) / 32) * 32;
  return static_cast<int>(t < 32 ? 32 : (t > 1024 ? 1024 : t));
}

#define SF_CHECK_CUDA(x) TORCH_CHECK((x).is_cuda(), #x " must be a CUDA tensor")
#define SF_CHECK_CONTIG(x) TORCH_CHECK((x).is_contiguous(), #x " must be contiguous")

}  // namespace sf

// Python bindings of the single shardformer CUDA extension (shardformer._C, or shardformer_C when JIT-built).
// The Python side (shardformer/kernels/ops.py) wraps these in custom ops and autograd Functions.
#include <torch/extension.h>

#include <vector>

namespace sf {
std::vector<at::Tensor> rmsnorm_fwd(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                                    const at::Tensor& weight, double eps);
std::vector<at::Tensor> rmsnorm_bwd(const at::Tensor& dy, const at::Tensor& xs, const at::Tensor& weight,
                                    const at::Tensor& rstd, const c10::optional<at::Tensor>& ds, bool need_dw);
std::vector<at::Tensor> rotary(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                               const at::Tensor& sin, bool backward, at::ScalarType out_dtype);
at::Tensor swiglu_fwd(const at::Tensor& gate, const at::Tensor& up);
std::vector<at::Tensor> swiglu_bwd(const at::Tensor& dy, const at::Tensor& gate, const at::Tensor& up);
std::vector<at::Tensor> ce_chunk_stats(const at::Tensor& logits, const at::Tensor& target_local, int64_t vocab_valid);
at::Tensor ce_chunk_grad_(at::Tensor logits, const at::Tensor& lse, const at::Tensor& target_local,
                          int64_t vocab_valid, const at::Tensor& row_scale);
void addmm_fp32_(at::Tensor acc, const at::Tensor& a, const at::Tensor& b);
std::vector<at::Tensor> linear_ce_forward(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& target,
                                          int64_t ignore_index, int64_t chunk_size, bool mean, int64_t vocab_valid,
                                          bool need_h, bool need_w);
}  // namespace sf

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "shardformer fused CUDA kernels: RMSNorm(+residual), rotary, SwiGLU, chunked linear+cross-entropy";
  m.def("rmsnorm_fwd", &sf::rmsnorm_fwd, "RMSNorm forward -> (y, s, rstd)", py::arg("x"), py::arg("residual"),
        py::arg("weight"), py::arg("eps"));
  m.def("rmsnorm_bwd", &sf::rmsnorm_bwd, "RMSNorm backward -> (dx, dw)", py::arg("dy"), py::arg("xs"),
        py::arg("weight"), py::arg("rstd"), py::arg("ds"), py::arg("need_dw"));
  m.def("rotary", &sf::rotary, "rotary on q and k (backward=True applies the transpose)", py::arg("q"),
        py::arg("k"), py::arg("cos"), py::arg("sin"), py::arg("backward"), py::arg("out_dtype"));
  m.def("swiglu_fwd", &sf::swiglu_fwd, "silu(gate) * up");
  m.def("swiglu_bwd", &sf::swiglu_bwd, "SwiGLU backward -> (dgate, dup)");
  m.def("ce_chunk_stats", &sf::ce_chunk_stats, "per-row (max, sumexp, target logit) of a logits chunk");
  m.def("ce_chunk_grad_", &sf::ce_chunk_grad_, "overwrite a logits chunk with its scaled CE gradient");
  m.def("addmm_fp32_", &sf::addmm_fp32_, "acc += a @ b with fp32 accumulation (acc fp32)");
  m.def("linear_ce_forward", &sf::linear_ce_forward, "chunked linear+CE -> (loss, grad_hidden, grad_weight)");
}

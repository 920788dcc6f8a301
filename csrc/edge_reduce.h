// Shape/dtype contract of edge_reduce, shared by the CPU and CUDA kernels.
#pragma once
#include <ATen/ATen.h>

#include <optional>

namespace milenas_fast {

// The most candidates one call takes: the CUDA kernels get one pointer per candidate in a fixed-size struct.
constexpr int64_t kMaxCandidates = 8;

// ys: the K candidates, each [N, C, H, W], one dtype and device (read where they are: no stack).
inline void check_edge_reduce_inputs(at::TensorList ys, const at::Tensor& w, const at::Tensor& mean,
                                     const at::Tensor& rstd) {
  const int64_t K = static_cast<int64_t>(ys.size());
  TORCH_CHECK(K >= 1 && K <= kMaxCandidates, "edge_reduce: need 1 to ", kMaxCandidates, " candidates, got ", K);
  const at::Tensor& y = ys[0];
  TORCH_CHECK(y.dim() == 4, "edge_reduce: each candidate must be [N, C, H, W], got ", y.sizes());
  const auto st = y.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf,
              "edge_reduce: candidates must be float32, bfloat16 or float16, got ", st);
  for (int64_t k = 1; k < K; ++k) {
    TORCH_CHECK(ys[k].sizes() == y.sizes() && ys[k].scalar_type() == st && ys[k].device() == y.device(),
                "edge_reduce: ys[", k, "] must match ys[0] (", y.sizes(), ", ", st, ", ", y.device(), "), got ",
                ys[k].sizes(), ", ", ys[k].scalar_type(), ", ", ys[k].device());
  }
  const int64_t C = y.size(1);
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.dim() == 1 && w.size(0) == K,
              "edge_reduce: w must be float32 [K=", K, "], got ", w.scalar_type(), " ", w.sizes());
  for (const at::Tensor* t : {&mean, &rstd}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 2 && t->size(0) == K && t->size(1) == C,
                "edge_reduce: mean and rstd must be float32 [K=", K, ", C=", C, "], got ", t->scalar_type(),
                " ", t->sizes());
  }
  for (const at::Tensor* t : {&w, &mean, &rstd}) {
    TORCH_CHECK(t->device() == y.device(), "edge_reduce: all inputs must be on ", y.device(), ", got ",
                t->device());
  }
}

// acc, when given: ys[0]'s shape, dtype and device (read in place: made contiguous only if it is not).
inline void check_acc(const std::optional<at::Tensor>& acc, at::TensorList ys) {
  if (!acc.has_value()) return;
  const at::Tensor& y = ys[0];
  TORCH_CHECK(acc->sizes() == y.sizes() && acc->scalar_type() == y.scalar_type() && acc->device() == y.device(),
              "edge_reduce: acc must match ys[0] (", y.sizes(), ", ", y.scalar_type(), ", ", y.device(), "), got ",
              acc->sizes(), ", ", acc->scalar_type(), ", ", acc->device());
}

inline void check_grad_out(const at::Tensor& grad_out, at::TensorList ys) {
  const at::Tensor& y = ys[0];
  TORCH_CHECK(grad_out.sizes() == y.sizes() && grad_out.scalar_type() == y.scalar_type() &&
                  grad_out.device() == y.device(),
              "edge_reduce_backward: grad_out must match ys[0] (", y.sizes(), ", ", y.scalar_type(), "), got ",
              grad_out.sizes(), ", ", grad_out.scalar_type());
}

// The candidates, each made contiguous (a copy only where one is not).
inline std::vector<at::Tensor> contiguous_all(at::TensorList ys) {
  std::vector<at::Tensor> out;
  out.reserve(ys.size());
  for (const auto& y : ys) out.push_back(y.contiguous());
  return out;
}

}  // namespace milenas_fast

// Shape/dtype contract of edge_reduce, shared by the CPU and CUDA kernels.
#pragma once
#include <ATen/ATen.h>

namespace milenas_fast {

inline void check_edge_reduce_inputs(const at::Tensor& y, const at::Tensor& w, const at::Tensor& mean,
                                     const at::Tensor& rstd) {
  TORCH_CHECK(y.dim() == 5, "edge_reduce: y must be [K, N, C, H, W], got ", y.sizes());
  const auto st = y.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf,
              "edge_reduce: y must be float32, bfloat16 or float16, got ", st);
  const int64_t K = y.size(0), C = y.size(2);
  TORCH_CHECK(K >= 1, "edge_reduce: need at least one candidate (K >= 1)");
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

inline void check_grad_out(const at::Tensor& grad_out, const at::Tensor& y) {
  TORCH_CHECK(grad_out.sizes() == y.sizes().slice(1) && grad_out.scalar_type() == y.scalar_type() &&
                  grad_out.device() == y.device(),
              "edge_reduce_backward: grad_out must match y[0] (", y.sizes().slice(1), ", ", y.scalar_type(),
              "), got ", grad_out.sizes(), ", ", grad_out.scalar_type());
}

}  // namespace milenas_fast

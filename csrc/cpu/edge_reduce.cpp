// CPU kernels of edge_reduce. Every output element and every reduction is computed by one thread in a
// fixed order, so results do not depend on the thread count (bit-reproducible).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../edge_reduce.h"

namespace milenas_fast {
namespace {

constexpr int kLanes = 8;  // independent fp32 accumulators: lets the compiler vectorise the dot products

// sum_i g[i] * (y[i] - m), and sum_i g[i], over one H*W plane.
template <typename T>
inline void plane_sums(const T* g, const T* y, float m, int64_t n, float& sgy, float& sg) {
  float a[kLanes] = {}, b[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const float gv = static_cast<float>(g[i + j]);
      a[j] += gv * (static_cast<float>(y[i + j]) - m);
      b[j] += gv;
    }
  }
  for (; i < n; ++i) {
    const float gv = static_cast<float>(g[i]);
    a[0] += gv * (static_cast<float>(y[i]) - m);
    b[0] += gv;
  }
  for (int j = 0; j < kLanes; ++j) {
    sgy += a[j];
    sg += b[j];
  }
}

// The candidates' data pointers, in order.
template <typename T>
std::vector<const T*> pointers(const std::vector<at::Tensor>& ys) {
  std::vector<const T*> out;
  for (const auto& y : ys) out.push_back(y.const_data_ptr<T>());
  return out;
}

template <typename T>
void forward_impl(const std::vector<const T*>& ys, const float* w, const float* mean, const float* rstd,
                  const T* start, T* out, int64_t NC, int64_t C, int64_t HW) {
  const int64_t K = static_cast<int64_t>(ys.size());
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, K * HW));
  at::parallel_for(0, NC, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(HW);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t c = p % C;
      if (start) {
        for (int64_t i = 0; i < HW; ++i) acc[i] = static_cast<float>(start[p * HW + i]);
      } else {
        std::fill(acc.begin(), acc.end(), 0.f);
      }
      for (int64_t k = 0; k < K; ++k) {
        const float a = w[k] * rstd[k * C + c], m = mean[k * C + c];
        const T* yp = ys[k] + p * HW;
        for (int64_t i = 0; i < HW; ++i) acc[i] += (static_cast<float>(yp[i]) - m) * a;
      }
      T* op = out + p * HW;
      for (int64_t i = 0; i < HW; ++i) op[i] = static_cast<T>(acc[i]);
    }
  });
}

at::Tensor edge_reduce_cpu(at::TensorList ys_, const at::Tensor& w_, const at::Tensor& mean_,
                           const at::Tensor& rstd_, const std::optional<at::Tensor>& acc_) {
  check_edge_reduce_inputs(ys_, w_, mean_, rstd_);
  check_acc(acc_, ys_);
  const at::Tensor acc = acc_.has_value() ? acc_->contiguous() : at::Tensor();
  const auto ys = contiguous_all(ys_);
  const auto w = w_.contiguous(), mean = mean_.contiguous(), rstd = rstd_.contiguous();
  const auto& y = ys[0];
  const int64_t N = y.size(0), C = y.size(1), HW = y.size(2) * y.size(3);
  auto out = at::empty(y.sizes(), y.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "edge_reduce_cpu", [&] {
    forward_impl<scalar_t>(pointers<scalar_t>(ys), w.const_data_ptr<float>(), mean.const_data_ptr<float>(),
                           rstd.const_data_ptr<float>(), acc.defined() ? acc.const_data_ptr<scalar_t>() : nullptr,
                           out.mutable_data_ptr<scalar_t>(), N * C, C, HW);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> edge_reduce_backward_cpu(
    const at::Tensor& grad_out_, at::TensorList ys_, const at::Tensor& w_, const at::Tensor& mean_,
    const at::Tensor& rstd_, std::array<bool, 4> mask) {
  check_edge_reduce_inputs(ys_, w_, mean_, rstd_);
  check_grad_out(grad_out_, ys_);
  const auto ys = contiguous_all(ys_);
  const auto g = grad_out_.contiguous(), w = w_.contiguous(), mean = mean_.contiguous(), rstd = rstd_.contiguous();
  const auto& y = ys[0];
  const int64_t K = static_cast<int64_t>(ys.size()), N = y.size(0), C = y.size(1), HW = y.size(2) * y.size(3),
                NC = N * C;
  const float* wp = w.const_data_ptr<float>();
  const float* mp = mean.const_data_ptr<float>();
  const float* rp = rstd.const_data_ptr<float>();
  const auto fopts = w.options();
  at::Tensor grad_y, grad_w, grad_mean, grad_rstd;
  if (mask[0]) {
    std::vector<int64_t> sizes{K};
    sizes.insert(sizes.end(), y.sizes().begin(), y.sizes().end());
    grad_y = at::empty(sizes, y.options());
  }
  if (mask[1]) grad_w = at::empty({K}, fopts);
  if (mask[2]) grad_mean = at::empty({K, C}, fopts);
  if (mask[3]) grad_rstd = at::empty({K, C}, fopts);
  const bool need_sums = mask[1] || mask[2] || mask[3];
  // Per-(k, c) sums over (n, h, w): sgy = sum g * (y_k - mean_k), sg = sum g (the same for every k).
  std::vector<float> sgy(K * C, 0.f), sg(K * C, 0.f);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "edge_reduce_backward_cpu", [&] {
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const auto yp = pointers<scalar_t>(ys);
    if (mask[0]) {
      scalar_t* gyp = grad_y.mutable_data_ptr<scalar_t>();
      const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, HW));
      at::parallel_for(0, K * NC, grain, [&](int64_t begin, int64_t end) {
        for (int64_t q = begin; q < end; ++q) {
          const int64_t k = q / NC, p = q % NC, c = p % C;
          const float a = wp[k] * rp[k * C + c];
          const scalar_t* src = gp + p * HW;
          scalar_t* dst = gyp + q * HW;
          for (int64_t i = 0; i < HW; ++i) dst[i] = static_cast<scalar_t>(a * static_cast<float>(src[i]));
        }
      });
    }
    if (need_sums && NC * HW > 0) {
      at::parallel_for(0, K * C, 1, [&](int64_t begin, int64_t end) {
        for (int64_t kc = begin; kc < end; ++kc) {
          const int64_t k = kc / C, c = kc % C;
          float a = 0.f, b = 0.f;
          for (int64_t n = 0; n < N; ++n) {
            float pa = 0.f, pb = 0.f;  // per-plane partials keep the fp32 sums short
            plane_sums(gp + (n * C + c) * HW, yp[k] + (n * C + c) * HW, mp[kc], HW, pa, pb);
            a += pa;
            b += pb;
          }
          sgy[kc] = a;
          sg[kc] = b;
        }
      });
    }
  });

  for (int64_t k = 0; k < K; ++k) {
    float acc = 0.f;
    for (int64_t c = 0; c < C; ++c) {
      const int64_t kc = k * C + c;
      acc += rp[kc] * sgy[kc];
      if (mask[2]) grad_mean.mutable_data_ptr<float>()[kc] = -wp[k] * rp[kc] * sg[kc];
      if (mask[3]) grad_rstd.mutable_data_ptr<float>()[kc] = wp[k] * sgy[kc];
    }
    if (mask[1]) grad_w.mutable_data_ptr<float>()[k] = acc;
  }
  return {grad_y, grad_w, grad_mean, grad_rstd};
}

std::tuple<at::Tensor, at::Tensor> edge_reduce_partials_cpu(const at::Tensor& grad_out_, at::TensorList ys_,
                                                            const at::Tensor& w_, const at::Tensor& mean_,
                                                            const at::Tensor& rstd_) {
  check_edge_reduce_inputs(ys_, w_, mean_, rstd_);
  check_grad_out(grad_out_, ys_);
  const auto ys = contiguous_all(ys_);
  const auto g = grad_out_.contiguous(), mean = mean_.contiguous();
  const auto& y = ys[0];
  const int64_t K = static_cast<int64_t>(ys.size()), N = y.size(0), C = y.size(1), HW = y.size(2) * y.size(3);
  auto part_gy = at::zeros({K, C, 1}, w_.options()), part_g = at::zeros({C, 1}, w_.options());
  if (y.numel() == 0) return {part_gy, part_g};
  float* pgy = part_gy.mutable_data_ptr<float>();
  float* pg = part_g.mutable_data_ptr<float>();
  const float* mp = mean.const_data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "edge_reduce_partials_cpu", [&] {
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const auto yp = pointers<scalar_t>(ys);
    at::parallel_for(0, K * C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t kc = begin; kc < end; ++kc) {  // the order of edge_reduce_backward_cpu's sums
        const int64_t k = kc / C, c = kc % C;
        float a = 0.f, b = 0.f;
        for (int64_t n = 0; n < N; ++n) {
          float pa = 0.f, pb = 0.f;
          plane_sums(gp + (n * C + c) * HW, yp[k] + (n * C + c) * HW, mp[kc], HW, pa, pb);
          a += pa;
          b += pb;
        }
        pgy[kc] = a;
        if (k == 0) pg[c] = b;
      }
    });
  });
  return {part_gy, part_g};
}

}  // namespace

TORCH_LIBRARY_IMPL(milenas_fast, CPU, m) {
  m.impl("edge_reduce", &edge_reduce_cpu);
  m.impl("edge_reduce_backward", &edge_reduce_backward_cpu);
  m.impl("edge_reduce_partials", &edge_reduce_partials_cpu);
}

}  // namespace milenas_fast

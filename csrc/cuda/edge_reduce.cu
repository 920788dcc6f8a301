// CUDA kernels of edge_reduce, on the current stream. Reductions are two-stage with a split count that
// depends only on the shape and fixed per-thread/per-block orders, so results are bit-reproducible
// (no atomics) on any GPU.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../edge_reduce.h"

namespace milenas_fast {
namespace {

constexpr int kThreads = 256;

// The candidates' data pointers, passed by value (kernel parameter space): no stack of the candidates.
template <typename T>
struct Cands {
  const T* p[kMaxCandidates];
};

template <typename T>
Cands<T> cands_of(const std::vector<at::Tensor>& ys) {
  Cands<T> c{};
  for (size_t k = 0; k < ys.size(); ++k) c.p[k] = ys[k].const_data_ptr<T>();
  return c;
}

// c.p[k] for a run-time k, by constant indices only (a dynamic index would copy the struct to local memory).
template <typename T>
__device__ __forceinline__ const T* pick(const Cands<T>& c, int64_t k) {
  const T* p = c.p[0];
#pragma unroll
  for (int j = 1; j < kMaxCandidates; ++j) {
    if (j == k) p = c.p[j];
  }
  return p;
}

__device__ __forceinline__ float block_sum(float v, float* smem) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // smem may still be read from a previous call
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = 0.f;
  if (warp == 0) {
    if (lane < (blockDim.x >> 5)) v = smem[lane];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  }
  return v;  // valid in thread 0
}

template <typename T>
__global__ void forward_kernel(const Cands<T> y, const float* __restrict__ w,
                               const float* __restrict__ mean, const float* __restrict__ rstd,
                               const T* __restrict__ start, T* __restrict__ out, int64_t K, int64_t C, int64_t HW,
                               int64_t numel) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < numel;
       i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t c = (i / HW) % C;
    float acc = start ? static_cast<float>(start[i]) : 0.f;
    // unrolled: constant indices into y.p (see pick)
#pragma unroll
    for (int k = 0; k < kMaxCandidates; ++k) {
      if (k < K) {
        const float a = w[k] * rstd[k * C + c];
        acc += (static_cast<float>(y.p[k][i]) - mean[k * C + c]) * a;
      }
    }
    out[i] = static_cast<T>(acc);
  }
}

// grid (K*C, S): block (kc, s) covers channel c of candidate k over images [s*nps, (s+1)*nps).
// Writes grad_y there (GY) and the partial sums of g*(y_k - mean_k) and g (SUMS).
template <typename T, bool GY, bool SUMS>
__global__ void backward_partial_kernel(const T* __restrict__ g, const Cands<T> ys,
                                        const float* __restrict__ w, const float* __restrict__ mean,
                                        const float* __restrict__ rstd, T* __restrict__ grad_y,
                                        float* __restrict__ part_gy, float* __restrict__ part_g, int64_t N,
                                        int64_t C, int64_t HW, int64_t nps) {
  __shared__ float smem[32];
  const int64_t kc = blockIdx.x, k = kc / C, c = kc % C, s = blockIdx.y, S = gridDim.y;
  const int64_t n0 = s * nps, n1 = min(N, n0 + nps), numel = N * C * HW;
  const float a = w[k] * rstd[kc], m = mean[kc];
  const T* __restrict__ y = pick(ys, k);
  float sgy = 0.f, sg = 0.f;
  for (int64_t j = threadIdx.x; j < (n1 - n0) * HW; j += blockDim.x) {
    const int64_t n = n0 + j / HW, i = (n * C + c) * HW + j % HW;
    const float gv = static_cast<float>(g[i]);
    if (GY) grad_y[k * numel + i] = static_cast<T>(a * gv);
    if (SUMS) {
      sgy += gv * (static_cast<float>(y[i]) - m);
      sg += gv;
    }
  }
  if (SUMS) {
    sgy = block_sum(sgy, smem);
    sg = block_sum(sg, smem);
    if (threadIdx.x == 0) {
      part_gy[kc * S + s] = sgy;
      if (k == 0) part_g[c * S + s] = sg;
    }
  }
}

// One block per candidate k: finish the per-(k, c) sums in split order, then reduce over c for grad_w.
__global__ void backward_final_kernel(const float* __restrict__ part_gy, const float* __restrict__ part_g,
                                      const float* __restrict__ w, const float* __restrict__ rstd,
                                      float* grad_w, float* grad_mean, float* grad_rstd, int64_t C,
                                      int64_t S) {
  __shared__ float smem[32];
  const int64_t k = blockIdx.x;
  const float wk = w[k];
  float acc = 0.f;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    const int64_t kc = k * C + c;
    float sgy = 0.f, sg = 0.f;
    for (int64_t s = 0; s < S; ++s) {
      sgy += part_gy[kc * S + s];
      sg += part_g[c * S + s];
    }
    acc += rstd[kc] * sgy;
    if (grad_mean) grad_mean[kc] = -wk * rstd[kc] * sg;
    if (grad_rstd) grad_rstd[kc] = wk * sgy;
  }
  acc = block_sum(acc, smem);
  if (grad_w && threadIdx.x == 0) grad_w[k] = acc;
}

at::Tensor edge_reduce_cuda(at::TensorList ys_, const at::Tensor& w_, const at::Tensor& mean_,
                            const at::Tensor& rstd_, const std::optional<at::Tensor>& acc_) {
  check_edge_reduce_inputs(ys_, w_, mean_, rstd_);
  check_acc(acc_, ys_);
  const c10::cuda::CUDAGuard guard(ys_[0].device());
  const auto ys = contiguous_all(ys_);
  const auto w = w_.contiguous(), mean = mean_.contiguous(), rstd = rstd_.contiguous();
  const at::Tensor acc = acc_.has_value() ? acc_->contiguous() : at::Tensor();
  const auto& y = ys[0];
  const int64_t K = static_cast<int64_t>(ys.size()), C = y.size(1), HW = y.size(2) * y.size(3);
  auto out = at::empty(y.sizes(), y.options());
  const int64_t numel = out.numel();
  if (numel == 0) return out;
  const int64_t blocks = std::min<int64_t>((numel + kThreads - 1) / kThreads, 65536);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "edge_reduce_cuda", [&] {
    forward_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        cands_of<scalar_t>(ys), w.const_data_ptr<float>(), mean.const_data_ptr<float>(),
        rstd.const_data_ptr<float>(), acc.defined() ? acc.const_data_ptr<scalar_t>() : nullptr,
        out.mutable_data_ptr<scalar_t>(), K, C, HW, numel);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// Splits of the batch for the backward's partial sums: ~2048 blocks from the shape alone (not the GPU), so every
// GPU sums in the same order. Returns (images per split, splits).
std::pair<int64_t, int64_t> splits(int64_t N, int64_t K, int64_t C) {
  const int64_t want = std::max<int64_t>(1, std::min<int64_t>(N, (2048 + K * C - 1) / (K * C)));
  const int64_t nps = (N + want - 1) / want;
  return {nps, (N + nps - 1) / nps};
}

template <typename T, bool GY, bool SUMS>
void launch_partial(dim3 grid, cudaStream_t stream, const at::Tensor& g, const std::vector<at::Tensor>& ys,
                    const at::Tensor& w, const at::Tensor& mean, const at::Tensor& rstd, at::Tensor& grad_y,
                    at::Tensor& part_gy, at::Tensor& part_g, int64_t N, int64_t C, int64_t HW, int64_t nps) {
  backward_partial_kernel<T, GY, SUMS><<<grid, kThreads, 0, stream>>>(
      g.const_data_ptr<T>(), cands_of<T>(ys), w.const_data_ptr<float>(), mean.const_data_ptr<float>(),
      rstd.const_data_ptr<float>(), GY ? grad_y.mutable_data_ptr<T>() : nullptr,
      SUMS ? part_gy.mutable_data_ptr<float>() : nullptr, SUMS ? part_g.mutable_data_ptr<float>() : nullptr,
      N, C, HW, nps);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> edge_reduce_backward_cuda(
    const at::Tensor& grad_out_, at::TensorList ys_, const at::Tensor& w_, const at::Tensor& mean_,
    const at::Tensor& rstd_, std::array<bool, 4> mask) {
  check_edge_reduce_inputs(ys_, w_, mean_, rstd_);
  check_grad_out(grad_out_, ys_);
  const c10::cuda::CUDAGuard guard(ys_[0].device());
  const auto ys = contiguous_all(ys_);
  const auto g = grad_out_.contiguous(), w = w_.contiguous(), mean = mean_.contiguous(), rstd = rstd_.contiguous();
  const auto& y = ys[0];
  const int64_t K = static_cast<int64_t>(ys.size()), N = y.size(0), C = y.size(1), HW = y.size(2) * y.size(3);
  const auto fopts = w.options();
  at::Tensor grad_y, grad_w, grad_mean, grad_rstd;
  if (mask[0]) {
    std::vector<int64_t> sizes{K};
    sizes.insert(sizes.end(), y.sizes().begin(), y.sizes().end());
    grad_y = at::empty(sizes, y.options());
  }
  const bool sums = mask[1] || mask[2] || mask[3];
  if (y.numel() == 0) {  // nothing to launch; empty sums are zero
    if (mask[1]) grad_w = at::zeros({K}, fopts);
    if (mask[2]) grad_mean = at::zeros({K, C}, fopts);
    if (mask[3]) grad_rstd = at::zeros({K, C}, fopts);
    return {grad_y, grad_w, grad_mean, grad_rstd};
  }
  if (mask[1]) grad_w = at::empty({K}, fopts);
  if (mask[2]) grad_mean = at::empty({K, C}, fopts);
  if (mask[3]) grad_rstd = at::empty({K, C}, fopts);
  if (!mask[0] && !sums) return {grad_y, grad_w, grad_mean, grad_rstd};

  const auto sp = splits(N, K, C);
  const int64_t nps = sp.first, S = sp.second;
  TORCH_CHECK(S <= 65535, "edge_reduce_backward: too many splits");
  at::Tensor part_gy, part_g;
  if (sums) {
    part_gy = at::empty({K * C * S}, fopts);
    part_g = at::empty({C * S}, fopts);
  }
  const dim3 grid(static_cast<unsigned>(K * C), static_cast<unsigned>(S));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "edge_reduce_backward_cuda", [&] {
    if (mask[0] && sums)
      launch_partial<scalar_t, true, true>(grid, stream, g, ys, w, mean, rstd, grad_y, part_gy, part_g, N, C, HW, nps);
    else if (mask[0])
      launch_partial<scalar_t, true, false>(grid, stream, g, ys, w, mean, rstd, grad_y, part_gy, part_g, N, C, HW, nps);
    else
      launch_partial<scalar_t, false, true>(grid, stream, g, ys, w, mean, rstd, grad_y, part_gy, part_g, N, C, HW, nps);
  });
  if (sums) {
    backward_final_kernel<<<static_cast<unsigned>(K), kThreads, 0, stream>>>(
        part_gy.const_data_ptr<float>(), part_g.const_data_ptr<float>(), w.const_data_ptr<float>(),
        rstd.const_data_ptr<float>(), mask[1] ? grad_w.mutable_data_ptr<float>() : nullptr,
        mask[2] ? grad_mean.mutable_data_ptr<float>() : nullptr,
        mask[3] ? grad_rstd.mutable_data_ptr<float>() : nullptr, C, S);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {grad_y, grad_w, grad_mean, grad_rstd};
}

std::tuple<at::Tensor, at::Tensor> edge_reduce_partials_cuda(const at::Tensor& grad_out_, at::TensorList ys_,
                                                             const at::Tensor& w_, const at::Tensor& mean_,
                                                             const at::Tensor& rstd_) {
  check_edge_reduce_inputs(ys_, w_, mean_, rstd_);
  check_grad_out(grad_out_, ys_);
  const c10::cuda::CUDAGuard guard(ys_[0].device());
  const auto ys = contiguous_all(ys_);
  const auto g = grad_out_.contiguous(), w = w_.contiguous(), mean = mean_.contiguous(), rstd = rstd_.contiguous();
  const auto& y = ys[0];
  const int64_t K = static_cast<int64_t>(ys.size()), N = y.size(0), C = y.size(1), HW = y.size(2) * y.size(3);
  const auto sp = splits(std::max<int64_t>(N, 1), K, C);
  const int64_t nps = sp.first, S = sp.second;
  TORCH_CHECK(S <= 65535, "edge_reduce_partials: too many splits");
  if (y.numel() == 0) return {at::zeros({K, C, S}, w.options()), at::zeros({C, S}, w.options())};
  auto part_gy = at::empty({K, C, S}, w.options()), part_g = at::empty({C, S}, w.options());
  at::Tensor none;
  const dim3 grid(static_cast<unsigned>(K * C), static_cast<unsigned>(S));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "edge_reduce_partials_cuda", [&] {
    launch_partial<scalar_t, false, true>(grid, stream, g, ys, w, mean, rstd, none, part_gy, part_g, N, C, HW, nps);
  });
  return {part_gy, part_g};
}

}  // namespace

TORCH_LIBRARY_IMPL(milenas_fast, CUDA, m) {
  m.impl("edge_reduce", &edge_reduce_cuda);
  m.impl("edge_reduce_backward", &edge_reduce_backward_cuda);
  m.impl("edge_reduce_partials", &edge_reduce_partials_cuda);
}

}  // namespace milenas_fast

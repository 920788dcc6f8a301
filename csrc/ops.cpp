// Schemas of the milenas_fast ops, declared once; backends register in cpu/ and cuda/.
// New ops: add an m.def here (or a TORCH_LIBRARY_FRAGMENT next to their kernels).
#include <torch/library.h>

#ifdef MILENAS_FAST_PYTHON_MODULE
#include <Python.h>
// An empty module so that `import milenas_fast._C` dlopens this library and runs the registrations.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&def);
}
#endif

TORCH_LIBRARY(milenas_fast, m) {
  // out[n,c,h,w] = acc[n,c,h,w] + sum_k w[k] * (ys[k][n,c,h,w] - mean[k,c]) * rstd[k,c]: the mixed-op / node sum
  // with the candidates' non-affine BatchNorm folded in. ys: 1 to 8 candidates [N, C, H, W], read where they are;
  // acc (optional, ys[0]'s shape and dtype): what the sum is added to (a node's running sum), in fp32, one rounding.
  m.def("edge_reduce(Tensor[] ys, Tensor w, Tensor mean, Tensor rstd, Tensor? acc=None) -> Tensor");
  // output_mask selects (grad_y, grad_w, grad_mean, grad_rstd); unselected outputs are undefined (None).
  // grad_y is ONE [K, N, C, H, W] buffer (autograd hands out its rows).
  m.def(
      "edge_reduce_backward(Tensor grad_out, Tensor[] ys, Tensor w, Tensor mean, Tensor rstd, "
      "bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
  // The backward's reductions left as partial sums, for a consumer that finishes them as it loads (bn_fold_grad):
  // part_gy [K, C, S] = sums of grad_out * (ys[k] - mean[k]) and part_g [C, S] = sums of grad_out, over S
  // implementation-chosen slices of (n, h, w) (1 on the CPU).
  m.def("edge_reduce_partials(Tensor grad_out, Tensor[] ys, Tensor w, Tensor mean, Tensor rstd) -> (Tensor, Tensor)");
}

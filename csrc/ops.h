// The entry points of inl_kernels._C, declared once: csrc/bindings.cpp binds them, and the file
// that defines each includes this header, so the compiler holds the two to the same signature.
// Python calls them only from inl_kernels/cpu/*.py and inl_kernels/cuda/*.py, which check the
// arguments first; `table` (the [T, d] excitation) is None when no dim is excited.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <vector>

namespace inl {

// csrc/cpu/iterate.cpp: returns x_T, v_T, iterations, energy, distance, trajectory_x, trajectory_v
// (None unless `trajectory`), hidden (the controller's activations for the backward, None unless
// `save_hidden`)
std::vector<at::Tensor> iterate_forward(const at::Tensor& h, const at::Tensor& x, const c10::optional<at::Tensor>& v,
                                        const at::Tensor& w_h, const at::Tensor& w_x, const at::Tensor& w_v,
                                        const at::Tensor& w_o, const at::Tensor& bias, const at::Tensor& b_o,
                                        const at::Tensor& mod, const at::Tensor& mu,
                                        const c10::optional<at::Tensor>& table, double dt, c10::optional<double> kappa,
                                        int64_t num_iterations, c10::optional<double> tol, int64_t min_iterations,
                                        bool trajectory, bool save_hidden);
// returns the gradients of h, x, v, w_h, w_x, w_v, w_o, bias, b_o, mod, mu, table (None without a table)
std::vector<at::Tensor> iterate_backward(const at::Tensor& h, const at::Tensor& x, const c10::optional<at::Tensor>& v,
                                         const at::Tensor& w_h, const at::Tensor& w_x, const at::Tensor& w_v,
                                         const at::Tensor& w_o, const at::Tensor& bias, const at::Tensor& b_o,
                                         const at::Tensor& mod, const at::Tensor& mu,
                                         const c10::optional<at::Tensor>& table, double dt,
                                         c10::optional<double> kappa, int64_t num_iterations, const at::Tensor& grad_x,
                                         const at::Tensor& grad_v, const at::Tensor& grad_energy,
                                         const at::Tensor& grad_distance, const c10::optional<at::Tensor>& hidden);

// csrc/cpu/rms_norm.cpp: returns y, x + residual (None without a residual), rstd
std::vector<at::Tensor> rms_norm_forward(const at::Tensor& x, const at::Tensor& weight, double eps,
                                         const c10::optional<at::Tensor>& residual);
std::vector<at::Tensor> rms_norm_backward(const at::Tensor& grad_y, const c10::optional<at::Tensor>& grad_s,
                                          const at::Tensor& x, const at::Tensor& weight, const at::Tensor& rstd);

#ifdef INL_WITH_CUDA
// csrc/cuda/iterate.cu, with the launch plan (blocks, columns per block, shared memory bytes)
// made by inl_kernels/cuda/iterate.py: returns x_T, v_T, iterations, energy, distance
std::vector<at::Tensor> iterate_forward_cuda(const at::Tensor& h, const at::Tensor& x, const c10::optional<at::Tensor>& v,
                                             const at::Tensor& w_h, const at::Tensor& w_x, const at::Tensor& w_v,
                                             const at::Tensor& w_o, const at::Tensor& bias, const at::Tensor& b_o,
                                             const at::Tensor& mod, const at::Tensor& mu,
                                             const c10::optional<at::Tensor>& table, double dt,
                                             c10::optional<double> kappa, int64_t num_iterations,
                                             c10::optional<double> tol, int64_t min_iterations, int64_t blocks,
                                             int64_t cols, int64_t shared_bytes);
// the planner's two questions to the GPU: (multiprocessors, shared memory a block may opt in to)
std::vector<int64_t> iterate_decode_limits(int64_t device);
// blocks of the decode kernel for `dtype` resident on one multiprocessor with this much shared memory
int64_t iterate_decode_resident(at::ScalarType dtype, int64_t shared_bytes, int64_t device);
#endif

}  // namespace inl

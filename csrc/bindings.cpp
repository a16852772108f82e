// inl_kernels._C: the compiled backends. Only inl_kernels/cpu/*.py and inl_kernels/cuda/*.py
// call these; they wrap them in autograd Functions and check arguments first.
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>  // at::Tensor casters, lighter to compile than torch/extension.h

#include "cpu/simd.h"

namespace inl {
std::vector<at::Tensor> iterate_forward(const at::Tensor& h, const at::Tensor& x, const c10::optional<at::Tensor>& v,
                                        const at::Tensor& w_h, const at::Tensor& w_x, const at::Tensor& w_v,
                                        const at::Tensor& w_o, const at::Tensor& bias, const at::Tensor& b_o,
                                        const at::Tensor& mod, const at::Tensor& mu, const at::Tensor& table,
                                        double dt, c10::optional<double> kappa, int64_t num_iterations,
                                        c10::optional<double> tol, int64_t min_iterations, bool trajectory,
                                        bool save_hidden);
std::vector<at::Tensor> iterate_backward(const at::Tensor& h, const at::Tensor& x, const c10::optional<at::Tensor>& v,
                                         const at::Tensor& w_h, const at::Tensor& w_x, const at::Tensor& w_v,
                                         const at::Tensor& w_o, const at::Tensor& bias, const at::Tensor& b_o,
                                         const at::Tensor& mod, const at::Tensor& mu, const at::Tensor& table,
                                         double dt, c10::optional<double> kappa, int64_t num_iterations,
                                         const at::Tensor& grad_x, const at::Tensor& grad_v,
                                         const at::Tensor& grad_energy, const at::Tensor& grad_distance,
                                         const c10::optional<at::Tensor>& hidden);
std::vector<at::Tensor> rms_norm_forward(const at::Tensor& x, const at::Tensor& weight, double eps,
                                         const c10::optional<at::Tensor>& residual);
std::vector<at::Tensor> rms_norm_backward(const at::Tensor& grad_y, const c10::optional<at::Tensor>& grad_s,
                                          const at::Tensor& x, const at::Tensor& weight, const at::Tensor& rstd);
#ifdef INL_WITH_CUDA
std::vector<at::Tensor> iterate_forward_cuda(const at::Tensor& h, const at::Tensor& x, const c10::optional<at::Tensor>& v,
                                             const at::Tensor& w_h, const at::Tensor& w_x, const at::Tensor& w_v,
                                             const at::Tensor& w_o, const at::Tensor& bias, const at::Tensor& b_o,
                                             const at::Tensor& mod, const at::Tensor& mu, const at::Tensor& table,
                                             double dt, c10::optional<double> kappa, int64_t num_iterations,
                                             c10::optional<double> tol, int64_t min_iterations);
#endif
}  // namespace inl

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace pybind11::literals;
  m.doc() = "Compiled INL-Kernels backends (C++ CPU kernels; CUDA kernels when built with CUDA)";
  m.def("iterate_forward", &inl::iterate_forward, "The integrator iterate on CPU tensors (SPEC §2)", "h"_a, "x"_a,
        "v"_a, "w_h"_a, "w_x"_a, "w_v"_a, "w_o"_a, "bias"_a, "b_o"_a, "mod"_a, "mu"_a, "table"_a, "dt"_a, "kappa"_a,
        "num_iterations"_a, "tol"_a, "min_iterations"_a, "trajectory"_a, "save_hidden"_a = false);
  m.def("iterate_backward", &inl::iterate_backward, "Gradients of iterate_forward (no early exit)", "h"_a, "x"_a,
        "v"_a, "w_h"_a, "w_x"_a, "w_v"_a, "w_o"_a, "bias"_a, "b_o"_a, "mod"_a, "mu"_a, "table"_a, "dt"_a, "kappa"_a,
        "num_iterations"_a, "grad_x"_a, "grad_v"_a, "grad_energy"_a, "grad_distance"_a, "hidden"_a = pybind11::none());
  m.def("rms_norm_forward", &inl::rms_norm_forward, "RMSNorm on CPU tensors (SPEC §3)", "x"_a, "weight"_a, "eps"_a,
        "residual"_a);
  m.def("rms_norm_backward", &inl::rms_norm_backward, "Gradients of rms_norm_forward", "grad_y"_a, "grad_s"_a, "x"_a,
        "weight"_a, "rstd"_a);
#ifdef INL_WITH_CUDA
  m.def("iterate_forward_cuda", &inl::iterate_forward_cuda, "The iterate's forward on CUDA tensors (decode shapes)",
        "h"_a, "x"_a, "v"_a, "w_h"_a, "w_x"_a, "w_v"_a, "w_o"_a, "bias"_a, "b_o"_a, "mod"_a, "mu"_a, "table"_a, "dt"_a,
        "kappa"_a, "num_iterations"_a, "tol"_a, "min_iterations"_a);
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.attr("cpu_vector_width") = inl::kVec;
}

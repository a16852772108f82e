// The integrator iterate (SPEC §2), forward only, for decode shapes (N up to a few hundred rows)
// on a CUDA GPU.
//
// For each row and step t:
//   c = relu(h·w_hᵀ + bias + x·w_xᵀ + v·w_vᵀ);  a,b,g,u = split(c·w_oᵀ + b_o, 4)
//   alpha = sigmoid(ms0·a + mb0)·s (s = 1 - exp(-kappa·rms(x - mu)), or 1);  beta = softplus(ms1·b + mb1)
//   gate = sigmoid(ms2·g + mb2);  v_cand = ms3·u + mb3
//   v' = alpha·v + (1 - alpha)·v_cand - beta·(x - mu) + table[t];  x' = x + dt·gate·v'
// with energy = mean v'², distance = mean |x' - mu| per step and the per-row early exit.
//
// Decode is latency bound: a few rows, the weights re-read every step. So the work is split
// along d, not along rows: one persistent cooperative kernel whose block g owns columns
// [g·cols, (g+1)·cols) of every row for all T steps, with its slices of w_x, w_v, w_o and its
// part of the state in shared memory, read from global memory once. What couples the columns,
// the controller pre-activation x·w_xᵀ + v·w_vᵀ and the row sums (‖x' - x‖², Σv'², Σ|x' - mu|,
// Σ(x' - mu)²), each block computes over its own columns; the partial sums are added across
// blocks in block order (deterministic, no atomics) between two grid barriers per step, every
// block then holding the same totals and taking the same early-exit decisions.
//
// The column split (blocks, columns per block, shared memory) is planned in Python, once per
// shape and device (inl_kernels/cuda/iterate.py): a cooperative launch needs every block
// resident at once, so the planner asks iterate_decode_resident_blocks below how many fit.
//
// NaN propagates as in the reference (torch.relu(NaN) is NaN, fmaxf(NaN, 0) is 0): the relu
// and the max in softplus are written as compare-and-select.
//
// This file compiles on its own (`nvcc -c`, no torch): the ATen entry point at the bottom is
// compiled only with -DINL_ATEN_LAUNCHER (setup.py passes it).
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "iterate_layout.h"

namespace inl {
namespace cuda {

namespace cg = cooperative_groups;

// Raw pointers and sizes; weights in fp32, h/x/v and the outputs x_T/v_T in the input type.
struct IterateArgs {
  const void *h, *x, *v;  // [N][d]; v may be null (zeros)
  const float *w_h, *w_x, *w_v;  // [H][d]
  const float *w_o, *b_o;        // [4d][H], [4d]
  const float *bias;             // [H]  b_h + b_x + b_v
  const float *mod;              // [8]  mod_scale, mod_bias
  const float *mu;               // [d]
  const float *table;            // [T][d] excitation, or null without excited dims
  void *x_out, *v_out;           // [N][d]
  int32_t* iterations;           // [N]
  float *energy, *distance;      // [N][T]
  float *partial;                // workspace [blocks][N][H + kRowSums]
  float *ctx_partial;            // workspace [blocks][N][H]
  float *sums;                   // workspace [N][H + kRowSums]: partials added over blocks
  float *ctx;                    // workspace [N][H]
  int N, d, H, T, cols, min_iterations;
  float dt, kappa, tol;
  bool has_kappa, early_exit;
};

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half(v); }

__device__ __forceinline__ float relu(float z) { return z < 0.f ? 0.f : z; }  // NaN stays NaN
__device__ __forceinline__ float sigmoid(float z) { return 1.f / (1.f + expf(-z)); }
__device__ __forceinline__ float softplus(float z) { return relu(z) + log1pf(expf(-fabsf(z))); }

// sums[e] = Σ_block partial[block][e] for this block's share of the entries, blocks in order.
__device__ void add_partials(const float* partial, float* sums, int entries, int blocks) {
  const int per_block = (entries + gridDim.x - 1) / gridDim.x;
  const int e0 = blockIdx.x * per_block, e1 = min(entries, e0 + per_block);
  for (int e = e0 + threadIdx.x; e < e1; e += blockDim.x) {
    float s = 0.f;
    for (int b = 0; b < blocks; ++b) s += partial[size_t(b) * entries + e];
    sums[e] = s;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) iterate_decode_kernel(IterateArgs a) {
  cg::grid_group grid = cg::this_grid();
  extern __shared__ float smem[];
  const int N = a.N, d = a.d, H = a.H, cols = a.cols, W = H + kRowSums;
  const int blocks = gridDim.x, c0 = blockIdx.x * cols;
  const int ncols = max(0, min(cols, d - c0));
  // the order of iterate_decode_shared_bytes (iterate_layout.h)
  float* w_out = smem;                       // [4][H][cols]: w_out[(s·H + k)·cols + jj] = w_o[s·d + c0 + jj][k]
  float* w_in = w_out + 4 * H * cols;        // [2][cols][H]: w_x, w_v
  float* xs = w_in + 2 * H * cols;           // [N][cols]
  float* vs = xs + N * cols;                 // [N][cols]
  float* dx2 = vs + N * cols;                // [N][cols]
  float* c = dx2 + N * cols;                 // [N][H]
  float* s_row = c + N * H;                  // [N]
  float* active = s_row + N;                 // [N] 1 while the row runs
  float* rms_row = active + N;               // [N]
  const float* ms = a.mod;
  const float* mb = a.mod + 4;
  const T* h = static_cast<const T*>(a.h);
  const T* x = static_cast<const T*>(a.x);
  const T* v = static_cast<const T*>(a.v);

  for (int i = threadIdx.x; i < 4 * H * cols; i += blockDim.x) {
    const int jj = i % cols, k = (i / cols) % H, s = i / (cols * H);
    w_out[i] = jj < ncols ? a.w_o[(size_t(s) * d + c0 + jj) * H + k] : 0.f;
  }
  for (int i = threadIdx.x; i < 2 * H * cols; i += blockDim.x) {
    const int k = i % H, jj = (i / H) % cols, which = i / (cols * H);
    w_in[i] = jj < ncols ? (which ? a.w_v : a.w_x)[size_t(k) * d + c0 + jj] : 0.f;
  }
  for (int i = threadIdx.x; i < N * cols; i += blockDim.x) {
    const int jj = i % cols, n = i / cols;
    const size_t at = size_t(n) * d + c0 + jj;
    xs[i] = jj < ncols ? to_float(x[at]) : 0.f;
    vs[i] = (jj < ncols && v) ? to_float(v[at]) : 0.f;
    dx2[i] = 0.f;
  }
  for (int n = threadIdx.x; n < N; n += blockDim.x) active[n] = 1.f;
  __syncthreads();

  // this block's share of the pre-activation for the current state, and of the row sums
  auto write_partials = [&]() {
    float* part = a.partial + size_t(blockIdx.x) * N * W;
    for (int i = threadIdx.x; i < N * H; i += blockDim.x) {
      const int k = i % H, n = i / H;
      float s = 0.f;
      for (int jj = 0; jj < ncols; ++jj)
        s += xs[n * cols + jj] * w_in[jj * H + k] + vs[n * cols + jj] * w_in[(cols + jj) * H + k];
      part[size_t(n) * W + k] = s;
    }
    for (int n = threadIdx.x; n < N; n += blockDim.x) {
      float step = 0.f, energy = 0.f, dist = 0.f, err2 = 0.f;
      for (int jj = 0; jj < ncols; ++jj) {
        const float e = xs[n * cols + jj] - a.mu[c0 + jj], vv = vs[n * cols + jj];
        step += dx2[n * cols + jj];
        energy += vv * vv;
        dist += fabsf(e);
        err2 += e * e;
      }
      float* row = part + size_t(n) * W + H;
      row[0] = step, row[1] = energy, row[2] = dist, row[3] = err2;
    }
  };

  // the context h·w_hᵀ, once
  for (int i = threadIdx.x; i < N * H; i += blockDim.x) {
    const int k = i % H, n = i / H;
    float s = 0.f;
    for (int jj = 0; jj < ncols; ++jj) s += to_float(h[size_t(n) * d + c0 + jj]) * a.w_h[size_t(k) * d + c0 + jj];
    a.ctx_partial[size_t(blockIdx.x) * N * H + i] = s;
  }
  write_partials();
  grid.sync();
  add_partials(a.ctx_partial, a.ctx, N * H, blocks);
  add_partials(a.partial, a.sums, N * W, blocks);
  grid.sync();

  int t = 0;
  for (;; ++t) {
    // every block reads the same totals, so every block takes the same decisions
    for (int i = threadIdx.x; i < N * H; i += blockDim.x) {
      const int k = i % H, n = i / H;
      c[i] = relu(a.ctx[i] + a.bias[k] + a.sums[size_t(n) * W + k]);
    }
    for (int n = threadIdx.x; n < N; n += blockDim.x) {
      const float* row = a.sums + size_t(n) * W + H;
      if (t > 0) {  // the row sums describe the state after step t - 1
        if (blockIdx.x == 0) {
          a.energy[size_t(n) * a.T + t - 1] = row[1] / d;
          a.distance[size_t(n) * a.T + t - 1] = row[2] / d;
        }
        if (a.early_exit && active[n] != 0.f && t >= a.min_iterations && sqrtf(row[0]) < a.tol) {
          active[n] = 0.f;
          if (blockIdx.x == 0) a.iterations[n] = t;
        }
      }
      rms_row[n] = sqrtf(row[3] / d);
      s_row[n] = a.has_kappa ? 1.f - expf(-a.kappa * rms_row[n]) : 1.f;
    }
    __syncthreads();
    int running = 0;
    for (int n = 0; n < N; ++n) running += active[n] != 0.f;
    if (t == a.T || (a.early_exit && running == 0)) break;

    for (int i = threadIdx.x; i < N * cols; i += blockDim.x) {
      const int jj = i % cols, n = i / cols;
      if (jj >= ncols || active[n] == 0.f) {
        dx2[i] = 0.f;
        continue;
      }
      const int j = c0 + jj;
      float o[4];
      for (int s = 0; s < 4; ++s) {
        float acc = a.b_o[size_t(s) * d + j];
        for (int k = 0; k < H; ++k) acc += c[n * H + k] * w_out[(s * H + k) * cols + jj];
        o[s] = acc;
      }
      const float alpha = sigmoid(ms[0] * o[0] + mb[0]) * s_row[n];
      const float beta = softplus(ms[1] * o[1] + mb[1]);
      const float gate = sigmoid(ms[2] * o[2] + mb[2]);
      const float v_cand = ms[3] * o[3] + mb[3];
      const float xo = xs[i], vo = vs[i], err = xo - a.mu[j];
      const float exc = a.table ? a.table[size_t(t) * d + j] : 0.f;
      const float vn = alpha * vo + (1.f - alpha) * v_cand - beta * err + exc;
      const float xn = xo + a.dt * gate * vn;
      xs[i] = xn;
      vs[i] = vn;
      dx2[i] = (xn - xo) * (xn - xo);
    }
    __syncthreads();
    write_partials();
    grid.sync();
    add_partials(a.partial, a.sums, N * W, blocks);
    grid.sync();
  }

  // rows frozen before the end repeat their last statistics; a row still running ran all T steps
  if (blockIdx.x == 0)
    for (int n = threadIdx.x; n < N; n += blockDim.x) {
      for (int u = t; u < a.T; ++u) {
        a.energy[size_t(n) * a.T + u] = a.energy[size_t(n) * a.T + t - 1];
        a.distance[size_t(n) * a.T + u] = a.distance[size_t(n) * a.T + t - 1];
      }
      if (active[n] != 0.f) a.iterations[n] = a.T;
    }
  T* x_out = static_cast<T*>(a.x_out);
  T* v_out = static_cast<T*>(a.v_out);
  for (int i = threadIdx.x; i < N * cols; i += blockDim.x) {
    const int jj = i % cols, n = i / cols;
    if (jj < ncols) {
      x_out[size_t(n) * d + c0 + jj] = from_float<T>(xs[i]);
      v_out[size_t(n) * d + c0 + jj] = from_float<T>(vs[i]);
    }
  }
}

// How many blocks of the kernel for T fit on one multiprocessor with `shared_bytes` of shared
// memory each (*per_sm), the question the planner asks for each column split it considers. The
// kernel first opts in to the device's whole shared memory per block, so that any plan the
// planner picks may launch on this device without another call.
template <typename T>
cudaError_t iterate_decode_resident_blocks(size_t shared_bytes, int* per_sm) {
  int device = 0, max_shared = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&max_shared, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err == cudaSuccess)
    err = cudaFuncSetAttribute(iterate_decode_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, max_shared);
  if (err == cudaSuccess)
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(per_sm, iterate_decode_kernel<T>, kThreads, shared_bytes);
  return err;
}

template <typename T>
cudaError_t launch_iterate_decode(IterateArgs args, int blocks, size_t shared_bytes, cudaStream_t stream) {
  void* params[] = {&args};
  return cudaLaunchCooperativeKernel(reinterpret_cast<void*>(iterate_decode_kernel<T>), dim3(blocks), dim3(kThreads),
                                     params, shared_bytes, stream);
}

template cudaError_t iterate_decode_resident_blocks<float>(size_t, int*);
template cudaError_t iterate_decode_resident_blocks<__nv_bfloat16>(size_t, int*);
template cudaError_t iterate_decode_resident_blocks<__half>(size_t, int*);
template cudaError_t launch_iterate_decode<float>(IterateArgs, int, size_t, cudaStream_t);
template cudaError_t launch_iterate_decode<__nv_bfloat16>(IterateArgs, int, size_t, cudaStream_t);
template cudaError_t launch_iterate_decode<__half>(IterateArgs, int, size_t, cudaStream_t);

}  // namespace cuda
}  // namespace inl

#ifdef INL_ATEN_LAUNCHER
// The entry points inl_kernels._C.iterate_forward_cuda (checks, allocation, launch: no query of
// the GPU, the plan comes with the call) and the planner's two questions.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <vector>

#include "../ops.h"

namespace inl {

namespace {
template <typename F>
cudaError_t dispatch_cuda(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: return f(float{});
    case at::kBFloat16: return f(__nv_bfloat16{});
    default: return f(__half{});
  }
}
}  // namespace

std::vector<int64_t> iterate_decode_limits(int64_t device) {
  int sms = 0, max_shared = 0;
  cudaError_t err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, int(device));
  if (err == cudaSuccess)
    err = cudaDeviceGetAttribute(&max_shared, cudaDevAttrMaxSharedMemoryPerBlockOptin, int(device));
  TORCH_CHECK(err == cudaSuccess, "iterate_decode_limits: ", cudaGetErrorString(err));
  return {sms, max_shared};
}

int64_t iterate_decode_resident(at::ScalarType dtype, int64_t shared_bytes, int64_t device) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "the cuda iterate runs float32, bfloat16 and float16 inputs, got ", dtype);
  const c10::cuda::CUDAGuard guard(c10::Device(c10::DeviceType::CUDA, c10::DeviceIndex(device)));
  int per_sm = 0;
  const cudaError_t err = dispatch_cuda(dtype, [&](auto tag) {
    return cuda::iterate_decode_resident_blocks<decltype(tag)>(size_t(shared_bytes), &per_sm);
  });
  TORCH_CHECK(err == cudaSuccess, "iterate_decode_resident: ", cudaGetErrorString(err));
  return per_sm;
}

std::vector<at::Tensor> iterate_forward_cuda(const at::Tensor& h, const at::Tensor& x, const c10::optional<at::Tensor>& v,
                                             const at::Tensor& w_h, const at::Tensor& w_x, const at::Tensor& w_v,
                                             const at::Tensor& w_o, const at::Tensor& bias, const at::Tensor& b_o,
                                             const at::Tensor& mod, const at::Tensor& mu,
                                             const c10::optional<at::Tensor>& table, double dt,
                                             c10::optional<double> kappa, int64_t num_iterations,
                                             c10::optional<double> tol, int64_t min_iterations, int64_t blocks,
                                             int64_t cols, int64_t shared_bytes) {
  TORCH_CHECK(h.is_cuda() && h.dim() == 2 && h.is_contiguous(), "h must be a contiguous [N, d] CUDA tensor");
  const auto dtype = h.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "the cuda iterate runs float32, bfloat16 and float16 inputs, got ", dtype);
  TORCH_CHECK(x.sizes() == h.sizes() && x.scalar_type() == dtype && x.is_contiguous() && x.device() == h.device(),
              "x must match h");
  if (v)
    TORCH_CHECK(v->sizes() == h.sizes() && v->scalar_type() == dtype && v->is_contiguous() && v->device() == h.device(),
                "v must match h");
  std::vector<const at::Tensor*> weights = {&w_h, &w_x, &w_v, &w_o, &bias, &b_o, &mod, &mu};
  if (table) weights.push_back(&*table);
  for (const at::Tensor* t : weights)
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->device() == h.device(),
                "weights must be contiguous float32 tensors on h's device");
  const int64_t N = h.size(0), d = h.size(1), H = w_h.size(0), T = num_iterations;
  // the kernel divides by d, and a plan exists only for H, T >= 1
  TORCH_CHECK(d >= 1 && H >= 1 && T >= 1, "iterate_forward_cuda: d, H and num_iterations must be at least 1, got d = ",
              d, ", H = ", H, ", num_iterations = ", T);
  TORCH_CHECK(w_o.dim() == 2 && w_o.size(0) == 4 * d && w_o.size(1) == H && mod.numel() == 8 &&
                  (!table || (table->dim() == 2 && table->size(0) == T && table->size(1) == d)),
              "iterate_forward_cuda: inconsistent weight shapes");
  TORCH_CHECK(blocks >= 1 && cols >= 1 && blocks * cols >= d && (blocks - 1) * cols < d &&
                  shared_bytes >= cuda::iterate_decode_shared_bytes(N, H, cols),
              "iterate_forward_cuda: the plan (blocks = ", blocks, ", cols = ", cols, ", shared_bytes = ", shared_bytes,
              ") does not fit N = ", N, ", d = ", d, ", H = ", H,
              "; take it from inl_kernels.cuda.iterate.decode_plan");
  const c10::cuda::CUDAGuard guard(h.device());
  at::Tensor x_out = at::empty_like(x), v_out = at::empty_like(x);
  at::Tensor iterations = at::empty({N}, h.options().dtype(at::kInt));
  at::Tensor energy = at::empty({N, T}, h.options().dtype(at::kFloat));
  at::Tensor distance = at::empty({N, T}, h.options().dtype(at::kFloat));
  if (N == 0) return {x_out, v_out, iterations, energy, distance};

  const int64_t W = H + cuda::kRowSums;
  at::Tensor work = at::empty({blocks * N * (W + H) + N * (W + H)}, h.options().dtype(at::kFloat));
  float* w = work.data_ptr<float>();
  cuda::IterateArgs a{};
  a.h = h.data_ptr(), a.x = x.data_ptr(), a.v = v ? v->data_ptr() : nullptr;
  a.w_h = w_h.data_ptr<float>(), a.w_x = w_x.data_ptr<float>(), a.w_v = w_v.data_ptr<float>();
  a.w_o = w_o.data_ptr<float>(), a.b_o = b_o.data_ptr<float>(), a.bias = bias.data_ptr<float>();
  a.mod = mod.data_ptr<float>(), a.mu = mu.data_ptr<float>(), a.table = table ? table->data_ptr<float>() : nullptr;
  a.x_out = x_out.data_ptr(), a.v_out = v_out.data_ptr(), a.iterations = iterations.data_ptr<int32_t>();
  a.energy = energy.data_ptr<float>(), a.distance = distance.data_ptr<float>();
  a.partial = w;
  a.ctx_partial = a.partial + size_t(blocks) * N * W;
  a.sums = a.ctx_partial + size_t(blocks) * N * H;
  a.ctx = a.sums + size_t(N) * W;
  a.N = int(N), a.d = int(d), a.H = int(H), a.T = int(T), a.cols = int(cols), a.min_iterations = int(min_iterations);
  a.dt = float(dt), a.has_kappa = kappa.has_value(), a.kappa = kappa ? float(*kappa) : 0.f;
  a.early_exit = tol.has_value(), a.tol = tol ? float(*tol) : 0.f;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const cudaError_t err = dispatch_cuda(dtype, [&](auto tag) {
    return cuda::launch_iterate_decode<decltype(tag)>(a, int(blocks), size_t(shared_bytes), stream);
  });
  TORCH_CHECK(err == cudaSuccess, "iterate_forward_cuda: launch failed: ", cudaGetErrorString(err));
  return {x_out, v_out, iterations, energy, distance};
}

}  // namespace inl
#endif  // INL_ATEN_LAUNCHER

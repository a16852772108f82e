// The ATen-facing CPU ops (declared in csrc/ops.h): argument checks, output allocation, and the
// choice of the instruction-set path whose kernels run them.
//
// This file and the bindings are compiled for the x86-64 baseline; the kernels are compiled once
// per instruction set (setup.py), each into its own namespace, and reached through a table of
// function pointers (kernels.h). At first use the path is chosen from the CPU's features, as
// ATen's CPU-capability dispatch does: AVX-512 (x86-64-v4), else AVX2 + FMA (x86-64-v3), else
// the baseline. INL_KERNELS_CPU_CAPABILITY=avx512|avx2|base pins one; naming a path that this
// build lacks or this CPU cannot run makes the ops raise an error that says so (never SIGILL).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#if defined(__linux__)
#include <dirent.h>
#endif

#include "../ops.h"
#include "kernels.h"

namespace inl {
namespace {

// the paths this build holds, best first (a build pinned to one target holds one)
std::vector<const CpuKernels*> built_paths() {
  std::vector<const CpuKernels*> paths;
  for (const CpuKernels* k : {&avx512::kernels, &avx2::kernels, &base::kernels})
    if (k != nullptr) paths.push_back(k);
  return paths;
}

bool cpu_can_run(const CpuKernels& k) {
#if defined(__x86_64__) || defined(__i386__)
  const std::string name = k.name;
  if (name == "avx512") return __builtin_cpu_supports("x86-64-v4");
  if (name == "avx2") return __builtin_cpu_supports("x86-64-v3");
#endif
  return true;  // the baseline (or a non-x86 build, compiled for its own target)
}

std::string names(const std::vector<const CpuKernels*>& paths) {
  std::string s;
  for (const CpuKernels* k : paths) s += (s.empty() ? "" : ", ") + std::string(k->name);
  return s;
}

struct Selection {
  std::mutex mutex;
  bool chosen = false;
  const CpuKernels* kernels = nullptr;
  std::string error;  // why no path runs (a bad INL_KERNELS_CPU_CAPABILITY)
};
Selection& selection() {
  static Selection s;
  return s;
}

// the path called `name` ("" or "auto": the best this CPU runs), or an error message
const CpuKernels* find_path(const std::string& name, std::string& error) {
  const auto paths = built_paths();
  if (name.empty() || name == "auto") {
    for (const CpuKernels* k : paths)
      if (cpu_can_run(*k)) return k;
    error = "no CPU path of this build runs on this CPU (built: " + names(paths) +
            "; the build was pinned with INL_KERNELS_MARCH: rebuild without it)";
    return nullptr;
  }
  for (const CpuKernels* k : paths)
    if (name == k->name) {
      if (cpu_can_run(*k)) return k;
      error = "the " + name + " path cannot run on this CPU (it lacks the " +
              (name == "avx512" ? std::string("x86-64-v4 (AVX-512)") : std::string("x86-64-v3 (AVX2 + FMA)")) +
              " instructions)";
      return nullptr;
    }
  error = "no CPU path called '" + name + "' in this build (built: " + names(paths) + ")";
  return nullptr;
}

void choose_locked(Selection& s) {
  if (s.chosen) return;
  const char* env = std::getenv("INL_KERNELS_CPU_CAPABILITY");
  std::string error;
  s.kernels = find_path(env ? env : "", error);
  if (!s.kernels) s.error = (env ? "INL_KERNELS_CPU_CAPABILITY=" + std::string(env) + ": " : "") + error;
  s.chosen = true;
}

// ---- threads on a shared machine --------------------------------------------------------------
//
// A parallel region ends when its last thread does. When the machine has more runnable threads
// than cores, a thread of ours sits on a run queue for whole time slices, the region waits for
// it, and OpenMP's spinning waiters burn the slices the others need: on 2 cores loaded by two
// other processes, 2 threads trained the demo 10× slower than 1 (README, "Threads"). So the ops
// watch how long this process's threads wait for a core (the kernel's per-thread schedstat) and,
// while that is a large share of their time, run torch (and themselves) on one thread, probing
// the configured count again after a while (every 2 s, doubling up to 64 s while the load lasts).
// On a machine with a core free per thread the wait is ~0 and nothing changes.
// INL_KERNELS_ADAPTIVE_THREADS=0 turns this off; a thread count the caller sets is the new maximum.
struct ThreadGovernor {
  std::mutex mutex;
  bool enabled = true, reduced = false, probing = false;
  int max_threads = 0, last_set = 0;
  std::chrono::steady_clock::time_point window_start, next_probe;
  std::chrono::seconds backoff{2};
  uint64_t run = 0, wait = 0;  // ns summed over this process's threads at window_start
};

// (time on a CPU, time waiting for one) in ns, summed over this process's threads; false if the
// kernel does not report it (not Linux, no schedstats)
bool process_schedstat(uint64_t& run, uint64_t& wait) {
#if defined(__linux__)
  DIR* dir = opendir("/proc/self/task");
  if (!dir) return false;
  run = wait = 0;
  bool any = false;
  while (const dirent* e = readdir(dir)) {
    if (e->d_name[0] == '.') continue;
    char path[320];
    std::snprintf(path, sizeof(path), "/proc/self/task/%s/schedstat", e->d_name);
    if (FILE* f = std::fopen(path, "r")) {
      unsigned long long r = 0, w = 0;
      if (std::fscanf(f, "%llu %llu", &r, &w) == 2) run += r, wait += w, any = true;
      std::fclose(f);
    }
  }
  closedir(dir);
  return any;
#else
  (void)run, (void)wait;
  return false;
#endif
}

ThreadGovernor& governor() {
  static ThreadGovernor g;
  return g;
}

int threads() {
  ThreadGovernor& g = governor();
  using clock = std::chrono::steady_clock;
  std::lock_guard<std::mutex> lock(g.mutex);
  const int current = at::get_num_threads();
  if (!g.enabled) return current;
  const auto now = clock::now();
  if (g.last_set == 0) {  // first call
    const char* env = std::getenv("INL_KERNELS_ADAPTIVE_THREADS");
    g.enabled = !(env && std::string(env) == "0");
    g.max_threads = g.last_set = current;
    g.window_start = now;
    if (!process_schedstat(g.run, g.wait)) g.enabled = false;
    return current;
  }
  if (current != g.last_set) {  // the caller set a count: that is the maximum from now on
    g.max_threads = g.last_set = current;
    g.reduced = g.probing = false;
  }
  if (g.max_threads <= 1 || now - g.window_start < std::chrono::milliseconds(250)) return current;
  uint64_t run = 0, wait = 0;
  if (!process_schedstat(run, wait)) return current;
  const double d_run = double(run - g.run), d_wait = double(wait - g.wait);
  const double waiting = d_wait / std::max(1.0, d_run + d_wait);
  g.run = run, g.wait = wait, g.window_start = now;
  auto set = [&](int n) {
    at::set_num_threads(n);
    g.last_set = n;
  };
  if (!g.reduced && waiting > 0.3) {  // contended: one thread (a failed probe waits twice as long)
    set(1);
    g.reduced = true;
    g.backoff = g.probing ? std::min(g.backoff * 2, std::chrono::seconds(64)) : std::chrono::seconds(2);
    g.probing = false;
    g.next_probe = now + g.backoff;
  } else if (g.reduced && (waiting < 0.1 || now >= g.next_probe)) {  // free cores, or time to try again
    set(g.max_threads);
    g.reduced = false;
    g.probing = waiting >= 0.1;
  } else if (!g.reduced && g.probing && waiting < 0.1) {
    g.probing = false;  // the probe held: the load has gone
  }
  return g.last_set;
}

}  // namespace

// torch.set_num_threads(n) by the caller (inl_kernels.cpu wraps it): n is the maximum from now on,
// also when it equals the count the governor itself last set (which `threads()` cannot tell apart)
void threads_set_by_caller(int64_t n) {
  ThreadGovernor& g = governor();
  std::lock_guard<std::mutex> lock(g.mutex);
  if (g.last_set == 0) return;  // not started: the first call reads the count
  g.max_threads = g.last_set = int(std::max<int64_t>(1, n));
  g.reduced = g.probing = false;
}

namespace {

DType dtype_of(const at::Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default: TORCH_CHECK(false, "the cpu ", what, " runs float32, bfloat16 and float16, got ", t.scalar_type());
  }
}

// ---- iterate ---------------------------------------------------------------------------------

void check_fp32(const char* name, const at::Tensor* t, std::initializer_list<int64_t> shape) {
  if (!t) return;  // an absent optional input
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->device().is_cpu(), name,
              " must be a contiguous float32 CPU tensor");
  TORCH_CHECK(t->sizes().equals(shape), name, " must have shape ", at::IntArrayRef(shape), ", got ", t->sizes());
}

void check_iterate(const at::Tensor& h, const at::Tensor& x, const c10::optional<at::Tensor>& v, const at::Tensor& w_h,
                   const at::Tensor& w_x, const at::Tensor& w_v, const at::Tensor& w_o, const at::Tensor& bias,
                   const at::Tensor& b_o, const at::Tensor& mod, const at::Tensor& mu,
                   const c10::optional<at::Tensor>& table, int64_t num_iterations) {
  TORCH_CHECK(h.device().is_cpu() && h.dim() == 2 && h.is_contiguous(), "h must be a contiguous [N, d] CPU tensor");
  dtype_of(h, "iterate");
  TORCH_CHECK(x.sizes() == h.sizes() && x.scalar_type() == h.scalar_type() && x.is_contiguous() && x.device().is_cpu(),
              "x must match h");
  if (v)
    TORCH_CHECK(v->sizes() == h.sizes() && v->scalar_type() == h.scalar_type() && v->is_contiguous() &&
                    v->device().is_cpu(),
                "v must match h");
  // the kernels divide by d, H and T (means over columns, work per step): zero is no size; the
  // largest T keeps the step arithmetic and the [T, d] table in range (kernels.h)
  TORCH_CHECK(num_iterations >= 1 && num_iterations <= kMaxIterations, "iterate: num_iterations must be in [1, ",
              kMaxIterations, "], got ", num_iterations);
  TORCH_CHECK(w_h.dim() == 2, "w_h must be [H, d]");
  const int64_t d = h.size(1), H = w_h.size(0);
  TORCH_CHECK(d >= 1 && H >= 1 && d <= (int64_t(1) << 24) && H <= (int64_t(1) << 20),
              "iterate: d and H must be at least 1 (and d < 2^24, H < 2^20), got d = ", d, ", H = ", H);
  check_fp32("w_h", &w_h, {H, d});
  check_fp32("w_x", &w_x, {H, d});
  check_fp32("w_v", &w_v, {H, d});
  check_fp32("w_o", &w_o, {4 * d, H});
  check_fp32("bias", &bias, {H});
  check_fp32("b_o", &b_o, {4 * d});
  check_fp32("mod", &mod, {8});
  check_fp32("mu", &mu, {d});
  check_fp32("table", table ? &*table : nullptr, {num_iterations, d});
}

// the pack to use: the caller's when it was made by `kernels` for these weights, else a new one
IteratePackPtr pack_for(const CpuKernels& kernels, const IteratePackPtr& given, const at::Tensor& w_h,
                        const at::Tensor& w_x, const at::Tensor& w_v, const at::Tensor& w_o, const at::Tensor& mod,
                        bool backward) {
  const float* ms = mod.data_ptr<float>();
  if (given && given->kernels == &kernels && given->d == w_h.size(1) && given->H == w_h.size(0) &&
      (given->backward || !backward) && std::memcmp(given->mod_scale, ms, sizeof(float) * 4) == 0)
    return given;
  return iterate_pack(w_h, w_x, w_v, w_o, mod.narrow(0, 0, 4), backward);
}

IteratePackPtr pack_with(const CpuKernels& kernels, const at::Tensor& w_h, const at::Tensor& w_x,
                         const at::Tensor& w_v, const at::Tensor& w_o, const at::Tensor& mod_scale, bool backward) {
  const int64_t d = w_h.size(1), H = w_h.size(0);
  check_fp32("w_h", &w_h, {H, d});
  check_fp32("w_x", &w_x, {H, d});
  check_fp32("w_v", &w_v, {H, d});
  check_fp32("w_o", &w_o, {4 * d, H});
  TORCH_CHECK(mod_scale.numel() == 4 && mod_scale.scalar_type() == at::kFloat, "mod_scale must be 4 float32 values");
  at::Tensor ms = mod_scale.contiguous();
  IterateWeights W{int(d), int(H), w_h.data_ptr<float>(), w_x.data_ptr<float>(), w_v.data_ptr<float>(),
                   w_o.data_ptr<float>(), {}, backward};
  std::memcpy(W.mod_scale, ms.data_ptr<float>(), sizeof(float) * 4);
  auto pack = std::make_shared<IteratePack>(&kernels, kernels.iterate_pack(W));
  pack->d = d, pack->H = H, pack->backward = backward;
  std::memcpy(pack->mod_scale, W.mod_scale, sizeof(W.mod_scale));
  return pack;
}

void fill_args(IterateArgs& a, const at::Tensor& h, const at::Tensor& x, const c10::optional<at::Tensor>& v,
               const at::Tensor& w_o, const at::Tensor& bias, const at::Tensor& b_o, const at::Tensor& mod,
               const at::Tensor& mu, const c10::optional<at::Tensor>& table, double dt, c10::optional<double> kappa,
               int64_t num_iterations, const IteratePack& pack) {
  a.dtype = dtype_of(h, "iterate");
  a.N = h.size(0);
  a.d = int(h.size(1));
  a.H = int(w_o.size(1));
  a.T = int(num_iterations);
  a.h = h.data_ptr();
  a.x = x.data_ptr();
  a.v = v ? v->data_ptr() : nullptr;
  a.bias = bias.data_ptr<float>();
  a.w_o = w_o.data_ptr<float>();
  a.b_o = b_o.data_ptr<float>();
  a.mod = mod.data_ptr<float>();
  a.mu = mu.data_ptr<float>();
  a.table = table ? table->data_ptr<float>() : nullptr;
  a.dt = float(dt);
  a.has_kappa = kappa.has_value();
  a.kappa = kappa ? float(*kappa) : 0.f;
  a.threads = threads();
  a.pack = pack.data;
}

}  // namespace

// ---- the paths ---------------------------------------------------------------------------------

std::vector<std::string> cpu_built_capabilities() {
  std::vector<std::string> out;
  for (const CpuKernels* k : built_paths()) out.push_back(k->name);
  return out;
}

std::vector<std::string> cpu_capabilities() {
  std::vector<std::string> out;
  for (const CpuKernels* k : built_paths())
    if (cpu_can_run(*k)) out.push_back(k->name);
  return out;
}

const CpuKernels& cpu_kernels() {
  Selection& s = selection();
  std::lock_guard<std::mutex> lock(s.mutex);
  choose_locked(s);
  TORCH_CHECK(s.kernels, s.error);
  return *s.kernels;
}

std::string cpu_capability() {
  Selection& s = selection();
  std::lock_guard<std::mutex> lock(s.mutex);
  choose_locked(s);
  TORCH_CHECK(s.kernels, s.error);
  return s.kernels->name;
}

void set_cpu_capability(const std::string& name) {
  std::string error;
  const CpuKernels* k = find_path(name, error);
  TORCH_CHECK(k, error);
  Selection& s = selection();
  std::lock_guard<std::mutex> lock(s.mutex);
  s.kernels = k;
  s.error.clear();
  s.chosen = true;
}

// ---- iterate ---------------------------------------------------------------------------------

IteratePackPtr iterate_pack(const at::Tensor& w_h, const at::Tensor& w_x, const at::Tensor& w_v, const at::Tensor& w_o,
                            const at::Tensor& mod_scale, bool backward) {
  TORCH_CHECK(w_h.dim() == 2, "w_h must be [H, d]");
  return pack_with(cpu_kernels(), w_h, w_x, w_v, w_o, mod_scale, backward);
}

std::vector<at::Tensor> iterate_forward(const at::Tensor& h, const at::Tensor& x, const c10::optional<at::Tensor>& v,
                                        const at::Tensor& w_h, const at::Tensor& w_x, const at::Tensor& w_v,
                                        const at::Tensor& w_o, const at::Tensor& bias, const at::Tensor& b_o,
                                        const at::Tensor& mod, const at::Tensor& mu,
                                        const c10::optional<at::Tensor>& table, double dt, c10::optional<double> kappa,
                                        int64_t num_iterations, c10::optional<double> tol, int64_t min_iterations,
                                        bool trajectory, bool save_hidden, const IteratePackPtr& pack) {
  check_iterate(h, x, v, w_h, w_x, w_v, w_o, bias, b_o, mod, mu, table, num_iterations);
  const CpuKernels& kernels = cpu_kernels();
  IteratePackPtr pk = pack_for(kernels, pack, w_h, w_x, w_v, w_o, mod, false);
  const int64_t N = h.size(0), T = num_iterations, d = h.size(1);
  auto opts = h.options();
  at::Tensor x_out = at::empty_like(x), v_out = at::empty_like(x);
  at::Tensor iterations = at::empty({N}, opts.dtype(at::kInt));
  at::Tensor energy = at::empty({N, T}, opts.dtype(at::kFloat));
  at::Tensor distance = at::empty({N, T}, opts.dtype(at::kFloat));
  at::Tensor traj_x, traj_v, hidden;
  if (trajectory) {
    traj_x = at::empty({N, T + 1, d}, opts);
    traj_v = at::empty({N, T + 1, d}, opts);
  }
  // c of every step for the backward, in the kernel's own block layout
  if (save_hidden) hidden = at::empty({kernels.iterate_hidden_floats(N, int(T), int(w_h.size(0)))}, opts.dtype(at::kFloat));
  IterateForwardArgs a{};
  fill_args(a, h, x, v, w_o, bias, b_o, mod, mu, table, dt, kappa, num_iterations, *pk);
  a.early_exit = tol.has_value();
  a.tol = tol ? float(*tol) : 0.f;
  a.min_iterations = int(std::min<int64_t>(min_iterations, kMaxIterations + 1));
  a.x_out = x_out.data_ptr();
  a.v_out = v_out.data_ptr();
  a.traj_x = trajectory ? traj_x.data_ptr() : nullptr;
  a.traj_v = trajectory ? traj_v.data_ptr() : nullptr;
  a.iterations = iterations.data_ptr<int32_t>();
  a.energy = energy.data_ptr<float>();
  a.distance = distance.data_ptr<float>();
  a.hidden = save_hidden ? hidden.data_ptr<float>() : nullptr;
  if (N > 0) kernels.iterate_forward(a);
  return {x_out, v_out, iterations, energy, distance, traj_x, traj_v, hidden};
}

std::vector<at::Tensor> iterate_backward(const at::Tensor& h, const at::Tensor& x, const c10::optional<at::Tensor>& v,
                                         const at::Tensor& w_h, const at::Tensor& w_x, const at::Tensor& w_v,
                                         const at::Tensor& w_o, const at::Tensor& bias, const at::Tensor& b_o,
                                         const at::Tensor& mod, const at::Tensor& mu,
                                         const c10::optional<at::Tensor>& table, double dt,
                                         c10::optional<double> kappa, int64_t num_iterations, const at::Tensor& grad_x,
                                         const at::Tensor& grad_v, const at::Tensor& grad_energy,
                                         const at::Tensor& grad_distance, const c10::optional<at::Tensor>& hidden,
                                         const IteratePackPtr& pack, const c10::optional<at::Tensor>& table_columns) {
  check_iterate(h, x, v, w_h, w_x, w_v, w_o, bias, b_o, mod, mu, table, num_iterations);
  TORCH_CHECK(grad_x.sizes() == h.sizes() && grad_x.scalar_type() == h.scalar_type() && grad_x.is_contiguous() &&
                  grad_x.device().is_cpu() && grad_v.sizes() == h.sizes() && grad_v.scalar_type() == h.scalar_type() &&
                  grad_v.is_contiguous() && grad_v.device().is_cpu(),
              "iterate_backward: grad_x and grad_v must be contiguous CPU tensors matching h");
  const int64_t N = h.size(0), d = h.size(1), H = w_h.size(0), T = num_iterations;
  check_fp32("grad_energy", &grad_energy, {N, T});
  check_fp32("grad_distance", &grad_distance, {N, T});
  const CpuKernels& kernels = pack ? *pack->kernels : cpu_kernels();
  IteratePackPtr pk = pack_for(kernels, pack, w_h, w_x, w_v, w_o, mod, true);
  if (hidden)
    TORCH_CHECK(hidden->scalar_type() == at::kFloat && hidden->is_contiguous() && hidden->device().is_cpu() &&
                    hidden->numel() == kernels.iterate_hidden_floats(N, int(T), int(H)),
                "iterate_backward: hidden must be what iterate_forward(save_hidden=True) returned for these inputs, "
                "on the same CPU path");
  auto f32 = h.options().dtype(at::kFloat);
  at::Tensor gh = at::empty({N, d}, f32), gx = at::empty({N, d}, f32), gv = at::empty({N, d}, f32);
  at::Tensor gw_h = at::empty({H, d}, f32), gw_x = at::empty({H, d}, f32), gw_v = at::empty({H, d}, f32);
  at::Tensor gw_o = at::empty({4 * d, H}, f32), gbias = at::empty({H}, f32), gb_o = at::empty({4 * d}, f32);
  at::Tensor gmod = at::empty({8}, f32), gmu = at::empty({d}, f32);
  at::Tensor gtable = table ? at::empty({T, d}, f32) : at::Tensor();
  IterateBackwardArgs a{};
  fill_args(a, h, x, v, w_o, bias, b_o, mod, mu, table, dt, kappa, num_iterations, *pk);
  a.grad_x = grad_x.data_ptr();
  a.grad_v = grad_v.data_ptr();
  a.grad_energy = grad_energy.data_ptr<float>();
  a.grad_distance = grad_distance.data_ptr<float>();
  a.hidden = hidden ? hidden->data_ptr<float>() : nullptr;
  a.gh = gh.data_ptr<float>(), a.gx = gx.data_ptr<float>(), a.gv = gv.data_ptr<float>();
  a.gw_h = gw_h.data_ptr<float>(), a.gw_x = gw_x.data_ptr<float>(), a.gw_v = gw_v.data_ptr<float>();
  a.gw_o = gw_o.data_ptr<float>(), a.gbias = gbias.data_ptr<float>(), a.gb_o = gb_o.data_ptr<float>();
  a.gmod = gmod.data_ptr<float>(), a.gmu = gmu.data_ptr<float>();
  a.gtable = table ? gtable.data_ptr<float>() : nullptr;
  // the table's gradient is only wanted in the excited columns (autograd reads no other)
  std::vector<uint8_t> wanted;
  if (table && table_columns) {
    TORCH_CHECK(table_columns->dim() == 1 && table_columns->scalar_type() == at::kLong && table_columns->device().is_cpu(),
                "table_columns must be the excited dims, an int64 CPU tensor");
    wanted.assign(size_t(d), 0);
    at::Tensor cols = table_columns->contiguous();
    for (int64_t i = 0; i < cols.numel(); ++i) {
      const int64_t j = cols.data_ptr<int64_t>()[i];
      TORCH_CHECK(j >= 0 && j < d, "table_columns must lie in [0, d)");
      wanted[size_t(j)] = 1;
    }
    a.table_columns = wanted.data();
  }
  if (table) std::fill_n(a.gtable, size_t(T) * d, 0.f);
  kernels.iterate_backward(a);
  return {gh, gx, gv, gw_h, gw_x, gw_v, gw_o, gbias, gb_o, gmod, gmu, gtable};
}

// ---- rms_norm --------------------------------------------------------------------------------

namespace {
void check_rms_norm(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() && x.dim() >= 1 && x.size(-1) > 0,
              "x must be a contiguous CPU tensor with a non-empty last dimension");
  dtype_of(x, "rms_norm");
  TORCH_CHECK(weight.device().is_cpu() && weight.is_contiguous() && weight.numel() == x.size(-1) &&
                  (weight.scalar_type() == at::kFloat || weight.scalar_type() == x.scalar_type()),
              "weight must be a contiguous [D] CPU tensor of x's dtype or float32");
}
}  // namespace

std::vector<at::Tensor> rms_norm_forward(const at::Tensor& x, const at::Tensor& weight, double eps,
                                         const c10::optional<at::Tensor>& residual) {
  check_rms_norm(x, weight);
  if (residual)
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type() &&
                    residual->is_contiguous() && residual->device().is_cpu(),
                "residual must be a contiguous CPU tensor matching x");
  const CpuKernels& kernels = cpu_kernels();
  at::Tensor y = at::empty_like(x), s = residual ? at::empty_like(x) : at::Tensor();
  at::Tensor rstd = at::empty({x.numel() / x.size(-1)}, x.options().dtype(at::kFloat));
  RmsNormArgs a{dtype_of(x, "rms_norm"), x.numel() / x.size(-1), x.size(-1), x.data_ptr(),
                residual ? residual->data_ptr() : nullptr, weight.data_ptr(), weight.scalar_type() == at::kFloat,
                float(eps), y.data_ptr(), residual ? s.data_ptr() : nullptr, rstd.data_ptr<float>(), threads()};
  if (a.rows > 0) kernels.rms_norm_forward(a);
  return {y, s, rstd};
}

// x is what was normalised (x + residual with a residual); grad_s the gradient of that sum.
std::vector<at::Tensor> rms_norm_backward(const at::Tensor& grad_y, const c10::optional<at::Tensor>& grad_s,
                                          const at::Tensor& x, const at::Tensor& weight, const at::Tensor& rstd) {
  check_rms_norm(x, weight);
  TORCH_CHECK(grad_y.sizes() == x.sizes() && grad_y.scalar_type() == x.scalar_type() && grad_y.is_contiguous() &&
                  grad_y.device().is_cpu(),
              "grad_y must be a contiguous CPU tensor matching x");
  if (grad_s)
    TORCH_CHECK(grad_s->sizes() == x.sizes() && grad_s->scalar_type() == x.scalar_type() && grad_s->is_contiguous() &&
                    grad_s->device().is_cpu(),
                "grad_s must be a contiguous CPU tensor matching x");
  TORCH_CHECK(rstd.scalar_type() == at::kFloat && rstd.is_contiguous() && rstd.device().is_cpu() &&
                  rstd.numel() == x.numel() / x.size(-1),
              "rstd must be what rms_norm_forward returned for x");
  const CpuKernels& kernels = cpu_kernels();
  at::Tensor gx = at::empty(x.sizes(), x.options().dtype(at::kFloat));
  at::Tensor gw = at::zeros({x.size(-1)}, x.options().dtype(at::kFloat));
  RmsNormBackwardArgs a{dtype_of(x, "rms_norm"), x.numel() / x.size(-1), x.size(-1), grad_y.data_ptr(),
                        grad_s ? grad_s->data_ptr() : nullptr, x.data_ptr(), weight.data_ptr(),
                        weight.scalar_type() == at::kFloat, rstd.data_ptr<float>(), gx.data_ptr<float>(),
                        gw.data_ptr<float>(), threads()};
  if (a.rows > 0) kernels.rms_norm_backward(a);
  return {gx, gw};
}

// ---- swiglu ----------------------------------------------------------------------------------

namespace {
void check_swiglu(const at::Tensor& gate, const at::Tensor& up) {
  TORCH_CHECK(gate.device().is_cpu() && gate.is_contiguous(), "gate must be a contiguous CPU tensor");
  dtype_of(gate, "swiglu");
  TORCH_CHECK(up.sizes() == gate.sizes() && up.scalar_type() == gate.scalar_type() && up.is_contiguous() &&
                  up.device().is_cpu(),
              "up must be a contiguous CPU tensor matching gate");
}
}  // namespace

at::Tensor swiglu_forward(const at::Tensor& gate, const at::Tensor& up, const c10::optional<at::Tensor>& out_arg) {
  check_swiglu(gate, up);
  const CpuKernels& kernels = cpu_kernels();
  // out may be gate itself: each element is read before it is written
  if (out_arg)
    TORCH_CHECK(out_arg->sizes() == gate.sizes() && out_arg->scalar_type() == gate.scalar_type() &&
                    out_arg->is_contiguous() && out_arg->device().is_cpu() &&
                    (out_arg->data_ptr() == gate.data_ptr()
                         ? (!up.is_alias_of(gate) || up.data_ptr() == gate.data_ptr())
                         : (!out_arg->is_alias_of(up) && !out_arg->is_alias_of(gate))),
                "out must be a contiguous CPU tensor matching gate: gate itself (with up not overlapping it "
                "elsewhere), or sharing no memory with gate or up");
  at::Tensor out = out_arg ? *out_arg : at::empty_like(gate);
  SwigluArgs a{dtype_of(gate, "swiglu"), gate.numel(), gate.data_ptr(), up.data_ptr(), nullptr, out.data_ptr(),
               nullptr, threads()};
  if (a.n > 0) kernels.swiglu_forward(a);
  return out;
}

std::vector<at::Tensor> swiglu_backward(const at::Tensor& grad, const at::Tensor& gate, const at::Tensor& up) {
  check_swiglu(gate, up);
  TORCH_CHECK(grad.sizes() == gate.sizes() && grad.scalar_type() == gate.scalar_type() && grad.is_contiguous() &&
                  grad.device().is_cpu(),
              "grad must be a contiguous CPU tensor matching gate");
  const CpuKernels& kernels = cpu_kernels();
  at::Tensor grad_gate = at::empty_like(gate), grad_up = at::empty_like(up);
  SwigluArgs a{dtype_of(gate, "swiglu"), gate.numel(), gate.data_ptr(), up.data_ptr(), grad.data_ptr(),
               grad_gate.data_ptr(), grad_up.data_ptr(), threads()};
  if (a.n > 0) kernels.swiglu_backward(a);
  return {grad_gate, grad_up};
}

at::Tensor swiglu_rows(const at::Tensor& x, const at::Tensor& w_gate, const at::Tensor& w_up,
                       const at::Tensor& w_down) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) >= 1 && x.size(0) <= kSwigluRows,
              "x must be [rows, d] with 1 to ", kSwigluRows, " rows, got ", x.sizes());
  const int64_t d = x.size(1), F = w_gate.dim() == 2 ? w_gate.size(0) : -1;
  TORCH_CHECK(w_gate.dim() == 2 && w_gate.size(1) == d && F >= 1, "w_gate must be [F, ", d, "], got ", w_gate.sizes());
  TORCH_CHECK(w_up.sizes() == w_gate.sizes(), "w_up must be [", F, ", ", d, "], got ", w_up.sizes());
  TORCH_CHECK(w_down.dim() == 2 && w_down.size(0) == d && w_down.size(1) == F, "w_down must be [", d, ", ", F,
              "], got ", w_down.sizes());
  for (const at::Tensor* t : {&x, &w_gate, &w_up, &w_down}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous(),
                "swiglu_rows takes contiguous float32 CPU tensors");
  }
  TORCH_CHECK(d * F < (int64_t(1) << 31), "swiglu_rows: d·F must stay below 2^31");
  at::Tensor out = at::empty({x.size(0), d}, x.options());
  SwigluRowsArgs a{int(x.size(0)), int(d), int(F), x.data_ptr<float>(), w_gate.data_ptr<float>(),
                   w_up.data_ptr<float>(), w_down.data_ptr<float>(), out.data_ptr<float>(), threads()};
  cpu_kernels().swiglu_rows(a);
  return out;
}

std::vector<at::Tensor> linear_rows_parts(const at::Tensor& x, const std::vector<at::Tensor>& weights,
                                          const c10::optional<at::Tensor>& bias) {
  // x [..., K]: its rows are every index of the leading dimensions (the caller's shape, kept)
  const int64_t K = x.dim() >= 1 ? x.size(-1) : 0;
  int64_t rows = x.dim() >= 1 ? 1 : 0;
  for (int64_t i = 0; i + 1 < x.dim(); ++i) rows *= x.size(i);
  TORCH_CHECK(x.dim() >= 1 && rows <= kLinearRows, "x must be [..., K] with at most ", kLinearRows,
              " rows, got ", x.sizes());
  TORCH_CHECK(weights.size() >= 1 && weights.size() <= size_t(kLinearParts), "linear_rows takes 1 to ",
              kLinearParts, " weights of one x, got ", weights.size());
  TORCH_CHECK(!bias.has_value() || weights.size() == 1, "a bias goes with a single weight");
  for (const at::Tensor& weight : weights)
    TORCH_CHECK(weight.dim() == 2 && weight.size(1) == K, "weight must be [O, ", K, "], got ", weight.sizes());
  const int64_t O0 = weights[0].size(0);
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == O0), "bias must be [", O0, "], got ",
              bias.has_value() ? bias->sizes() : at::IntArrayRef{});
  std::vector<const at::Tensor*> inputs{&x};
  for (const at::Tensor& weight : weights) inputs.push_back(&weight);
  if (bias.has_value()) inputs.push_back(&*bias);
  for (const at::Tensor* t : inputs) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous(),
                "linear_rows takes contiguous float32 CPU tensors");
  }
  LinearRowsArgs a{int(rows), int(K), x.data_ptr<float>(), 0, {}, threads()};
  std::vector<at::Tensor> outs;
  for (const at::Tensor& weight : weights) {
    const int64_t O = weight.size(0);
    TORCH_CHECK(O * K < (int64_t(1) << 31) && O < (int64_t(1) << 31), "linear_rows: O·K must stay below 2^31");
    std::vector<int64_t> sizes = x.sizes().vec();
    sizes.back() = O;
    outs.push_back(at::empty(sizes, x.options()));
    if (O > 0 && rows > 0)
      a.part[a.parts++] = LinearPart{int(O), weight.data_ptr<float>(),
                                     bias.has_value() ? bias->data_ptr<float>() : nullptr,
                                     outs.back().data_ptr<float>()};
  }
  if (a.parts > 0) cpu_kernels().linear_rows(a);
  return outs;
}

at::Tensor linear_rows(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  return linear_rows_parts(x, {weight}, bias)[0];
}

// ---- attention (decode) -----------------------------------------------------------------------

std::vector<at::Tensor> rope_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                     const at::Tensor& sin, const at::Tensor& q_pos, const at::Tensor& k_pos,
                                     bool inverse) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4, "q and k must be [B, H, S, D]");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu(), "q and k must be CPU tensors");
  const DType dtype = dtype_of(q, "rope");
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), "q and k must share a dtype");
  const int64_t B = q.size(0), Hq = q.size(1), Sq = q.size(2), D = q.size(3), Hkv = k.size(1), Sk = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(3) == D, "k must be [B, Hkv, Sk, D] with q's B and D");
  TORCH_CHECK(D >= 2 && D % 2 == 0, "RoPE needs an even head dimension, got ", D);
  for (const at::Tensor* t : {&q, &k}) TORCH_CHECK(t->stride(3) == 1, "q and k must have a contiguous last dimension");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.dim() == 2 &&
                  cos.size(1) == D / 2 && sin.sizes() == cos.sizes() && cos.is_contiguous() && sin.is_contiguous() &&
                  cos.device().is_cpu() && sin.device().is_cpu(),
              "cos and sin must be contiguous float32 CPU tensors [rows, D/2]");
  const bool per_row = q_pos.dim() == 2;
  auto check_positions = [&](const at::Tensor& pos, int64_t S, const char* name) {
    TORCH_CHECK(pos.scalar_type() == at::kLong && pos.device().is_cpu() && pos.is_contiguous(), name,
                " must be a contiguous int64 CPU tensor");
    TORCH_CHECK(per_row ? (pos.dim() == 2 && pos.size(0) == B && pos.size(1) == S) : (pos.dim() == 1 && pos.size(0) == S),
                name, " must be [S] or, for both, [B, S]");
    const int64_t* p = pos.data_ptr<int64_t>();
    for (int64_t i = 0; i < pos.numel(); ++i)
      TORCH_CHECK(p[i] >= 0 && p[i] < cos.size(0), name, " values must lie in [0, ", cos.size(0), "), got ", p[i]);
  };
  check_positions(q_pos, Sq, "q_pos");
  check_positions(k_pos, Sk, "k_pos");
  for (int64_t size : {B, Hq, Hkv, Sq, Sk, D})
    TORCH_CHECK(size <= INT32_MAX, "rope: every size of q and k must stay below 2^31, got q ", q.sizes(), ", k ",
                k.sizes());
  at::Tensor q_out = at::empty({B, Hq, Sq, D}, q.options()), k_out = at::empty({B, Hkv, Sk, D}, k.options());
  RopeArgs a{dtype, int(B), int(Hq), int(Hkv), int(Sq), int(Sk), int(D), q.data_ptr(), k.data_ptr(),
             {q.stride(0), q.stride(1), q.stride(2)}, {k.stride(0), k.stride(1), k.stride(2)}, cos.data_ptr<float>(),
             sin.data_ptr<float>(), q_pos.data_ptr<int64_t>(), k_pos.data_ptr<int64_t>(), per_row, inverse,
             q_out.data_ptr(), k_out.data_ptr(), threads()};
  if (q_out.numel() + k_out.numel() > 0) cpu_kernels().rope(a);
  return {q_out, k_out};
}

at::Tensor attention_decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal, double scale,
                            const c10::optional<at::Tensor>& cos, const c10::optional<at::Tensor>& sin,
                            const c10::optional<at::Tensor>& kv_lens, const c10::optional<at::Tensor>& kv_starts) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be [B, H, S, D]");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "q, k, v must be CPU tensors");
  const DType dtype = dtype_of(q, "attention");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "q, k, v must share a dtype");
  const int64_t B = q.size(0), Hq = q.size(1), Sq = q.size(2), D = q.size(3), Hkv = k.size(1), Skv = k.size(2);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && v.size(1) == Hkv && v.size(2) == Skv && k.size(3) == D &&
                  v.size(3) == D,
              "k and v must be [B, Hkv, Skv, D] with q's B and D");
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "the query heads must be a multiple of the K/V heads");
  for (int64_t size : {B, Hq, Hkv, Sq, Skv, D})
    TORCH_CHECK(size <= INT32_MAX, "attention_decode: every size of q, k, v must stay below 2^31, got q ", q.sizes(),
                ", k ", k.sizes());
  for (const at::Tensor* t : {&q, &k, &v})
    TORCH_CHECK(t->size(3) <= 1 || t->stride(3) == 1, "q, k, v must have a contiguous last dimension");
  TORCH_CHECK(cos.has_value() == sin.has_value(), "cos and sin come together");
  at::Tensor c, s;
  if (cos) {
    TORCH_CHECK(D % 2 == 0, "RoPE needs an even head dimension");
    TORCH_CHECK(cos->device().is_cpu() && sin->device().is_cpu(), "cos and sin must be CPU tensors");
    c = cos->contiguous(), s = sin->contiguous();
    TORCH_CHECK(c.scalar_type() == at::kFloat && s.scalar_type() == at::kFloat && c.dim() == 2 &&
                    c.size(1) == D / 2 && s.sizes() == c.sizes(),
                "cos and sin must be float32 [rows, D/2]");
    TORCH_CHECK(c.size(0) >= Skv, "the RoPE tables must cover every key position (", Skv, "), got ", c.size(0),
                " rows");
  }
  auto row_values = [&](const c10::optional<at::Tensor>& t, const char* name) {
    if (!t) return at::Tensor();
    TORCH_CHECK(t->dim() == 1 && t->size(0) == B, name, " must be [B]");
    TORCH_CHECK(t->device().is_cpu(), name, " must be a CPU tensor");
    TORCH_CHECK(!at::isFloatingType(t->scalar_type()) && t->scalar_type() != at::kBool, name,
                " must be an integer tensor, got ", t->scalar_type());
    at::Tensor r = t->to(at::kLong).contiguous();
    const int64_t* p = r.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b)
      TORCH_CHECK(p[b] >= 0 && p[b] <= Skv, name, " values must lie in [0, ", Skv, "], got ", p[b]);
    return r;
  };
  at::Tensor lens = row_values(kv_lens, "kv_lens"), starts = row_values(kv_starts, "kv_starts");
  at::Tensor out = at::empty({B, Hq, Sq, D}, q.options());
  AttentionDecodeArgs a{dtype, int(B), int(Hq), int(Hkv), int(Sq), int(Skv), int(D), q.data_ptr(), k.data_ptr(),
                        v.data_ptr(), {q.stride(0), q.stride(1), q.stride(2)}, {k.stride(0), k.stride(1), k.stride(2)},
                        {v.stride(0), v.stride(1), v.stride(2)}, cos ? c.data_ptr<float>() : nullptr,
                        cos ? s.data_ptr<float>() : nullptr, lens.defined() ? lens.data_ptr<int64_t>() : nullptr,
                        starts.defined() ? starts.data_ptr<int64_t>() : nullptr, causal, float(scale),
                        out.data_ptr(), threads()};
  if (out.numel() > 0) cpu_kernels().attention_decode(a);
  return out;
}

namespace {
// q [B, Hq, S, D], k and v [B, Hkv, S, D] of one dtype, CPU, unit last stride: the prefill's inputs
DType check_prefill(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be [B, H, S, D]");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "q, k, v must be CPU tensors");
  const DType dtype = dtype_of(q, "attention");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "q, k, v must share a dtype");
  const int64_t B = q.size(0), Hq = q.size(1), S = q.size(2), D = q.size(3), Hkv = k.size(1);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && v.size(1) == Hkv && k.size(2) == S && v.size(2) == S &&
                  k.size(3) == D && v.size(3) == D,
              "k and v must be [B, Hkv, S, D] with q's B, S and D");
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "the query heads must be a multiple of the K/V heads");
  for (int64_t size : {B, Hq, Hkv, S, D})
    TORCH_CHECK(size <= INT32_MAX, "attention_prefill: every size of q, k, v must stay below 2^31, got q ",
                q.sizes(), ", k ", k.sizes());
  for (const at::Tensor* t : {&q, &k, &v})
    TORCH_CHECK(t->size(3) <= 1 || t->stride(3) == 1, "q, k, v must have a contiguous last dimension");
  return dtype;
}

std::vector<at::Tensor> prefill(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                                double scale, bool with_lse) {
  const DType dtype = check_prefill(q, k, v);
  const int64_t B = q.size(0), Hq = q.size(1), S = q.size(2), D = q.size(3), Hkv = k.size(1);
  at::Tensor out = at::empty({B, Hq, S, D}, q.options());
  at::Tensor lse = with_lse ? at::empty({B, Hq, S}, q.options().dtype(at::kFloat)) : at::Tensor();
  AttentionPrefillArgs a{dtype, int(B), int(Hq), int(Hkv), int(S), int(D), q.data_ptr(), k.data_ptr(), v.data_ptr(),
                         {q.stride(0), q.stride(1), q.stride(2)}, {k.stride(0), k.stride(1), k.stride(2)},
                         {v.stride(0), v.stride(1), v.stride(2)}, causal, float(scale), out.data_ptr(),
                         with_lse ? lse.data_ptr<float>() : nullptr, threads()};
  // with D = 0 the kernel still gives lse (the log of the keys each query sees)
  if (B * Hq * S > 0) cpu_kernels().attention_prefill(a);
  if (with_lse) return {out, lse};
  return {out};
}
}  // namespace

at::Tensor attention_prefill(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                             double scale) {
  return prefill(q, k, v, causal, scale, false)[0];
}

std::vector<at::Tensor> attention_prefill_lse(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                              bool causal, double scale) {
  return prefill(q, k, v, causal, scale, true);
}

std::vector<at::Tensor> attention_prefill_backward(const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k,
                                                   const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                                   bool causal, double scale) {
  const DType dtype = check_prefill(q, k, v);
  for (const at::Tensor* t : {&grad, &out}) {
    TORCH_CHECK(t->sizes() == q.sizes() && t->scalar_type() == q.scalar_type() && t->device().is_cpu(),
                "grad and out must be CPU tensors of q's shape and dtype");
    TORCH_CHECK(t->size(3) <= 1 || t->stride(3) == 1, "grad and out must have a contiguous last dimension");
  }
  const int64_t B = q.size(0), Hq = q.size(1), S = q.size(2), D = q.size(3), Hkv = k.size(1);
  TORCH_CHECK(lse.device().is_cpu() && lse.scalar_type() == at::kFloat && lse.is_contiguous() && lse.dim() == 3 &&
                  lse.size(0) == B && lse.size(1) == Hq && lse.size(2) == S,
              "lse must be a contiguous float32 CPU tensor [B, Hq, S]");
  at::Tensor gq = at::empty({B, Hq, S, D}, q.options()), gk = at::empty({B, Hkv, S, D}, k.options()),
             gv = at::empty({B, Hkv, S, D}, v.options());
  AttentionPrefillBackwardArgs a{dtype, int(B), int(Hq), int(Hkv), int(S), int(D), q.data_ptr(), k.data_ptr(),
                                 v.data_ptr(), out.data_ptr(), grad.data_ptr(),
                                 {q.stride(0), q.stride(1), q.stride(2)}, {k.stride(0), k.stride(1), k.stride(2)},
                                 {v.stride(0), v.stride(1), v.stride(2)}, {out.stride(0), out.stride(1), out.stride(2)},
                                 {grad.stride(0), grad.stride(1), grad.stride(2)}, lse.data_ptr<float>(), causal,
                                 float(scale), gq.data_ptr(), gk.data_ptr(), gv.data_ptr(), threads()};
  if (gq.numel() > 0 && gk.numel() > 0) {
    cpu_kernels().attention_prefill_backward(a);
  } else {
    gq.zero_(), gk.zero_(), gv.zero_();
  }
  return {gq, gk, gv};
}

}  // namespace inl

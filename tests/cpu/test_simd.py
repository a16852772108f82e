"""The vector helpers of csrc/cpu/simd.h on every instruction set they compile to: a small driver
built for each x86 level (AVX-512, AVX2 and SSE2, the generic compare-and-select path as on NEON)
checks that they keep NaN and their accuracy. The extension holds the same three paths
(tests/cpu/test_capability.py); these drivers test the helpers on their own."""
import os
import platform
import shutil
import subprocess

import pytest

CSRC = os.path.join(os.path.dirname(__file__), "..", "..", "csrc", "cpu")

# Each function on a vector with a NaN in lane 1 and numbers elsewhere (below, around and above
# the clamps): lane 1 must be NaN, the other lanes must not. Exit code 77: this CPU cannot run
# the target.
DRIVER = r"""
#include <cstdio>
#include "simd.h"
using namespace inl::INL_ISA;

static int failures = 0;
static void expect(const char* what, Vec got) {
  for (int i = 0; i < kVec; ++i)
    if (std::isnan(got[i]) != (i == 1)) {
      std::printf("%s: lane %d is %g\n", what, i, got[i]);
      ++failures;
    }
}

int main() {
#if defined(__AVX512F__)
  if (!__builtin_cpu_supports("avx512f")) return 77;
#elif defined(__AVX2__)
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return 77;
#endif
  const float values[] = {-200.f, 7.f, -90.f, -1.f, 0.f, 0.5f, 95.f, 300.f};
  Vec z;
  for (int i = 0; i < kVec; ++i) z[i] = values[i % 8];
  z[1] = NAN;
  expect("relu", vmax(splat(0.f), z));
  expect("vexp", vexp(z));
  expect("vsigmoid", vsigmoid(z));
  expect("vsoftplus", vsoftplus<false>(z, nullptr));
  Vec slope;
  expect("vsoftplus", vsoftplus<true>(z, &slope));
  expect("vsoftplus slope", slope);
  expect("vlog1p_unit", vlog1p_unit(vexp(neg_abs(z))));
  return failures ? 1 : 0;
}
"""


def build_and_run(tmp_path, driver, march):
    """Compiles a driver against csrc/ with the flags of setup.py's build for `march`, runs it
    and returns the finished process; skips when this CPU cannot run that target (exit 77)."""
    source = tmp_path / "driver.cpp"
    source.write_text(driver)
    binary = tmp_path / "driver"
    build = subprocess.run(["g++", "-O3", "-std=c++17", "-ffp-contract=fast", f"-march={march}", "-I", CSRC,
                            str(source), "-o", str(binary)], capture_output=True, text=True, timeout=120)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=60)
    if run.returncode == 77:
        pytest.skip(f"this CPU cannot run -march={march}")
    assert run.returncode == 0, run.stdout + run.stderr
    return run


@pytest.mark.skipif(shutil.which("g++") is None or platform.machine() != "x86_64", reason="needs g++ on x86-64")
@pytest.mark.parametrize("march", ["x86-64-v4", "x86-64-v3", "x86-64"])
def test_nan_survives_every_vector_path(tmp_path, march):
    build_and_run(tmp_path, DRIVER, march)


# vexp, vsigmoid and vsoftplus against double on a fine grid of [-103, 88]: the worst errors
ACCURACY_DRIVER = r"""
#include <cmath>
#include <cstdio>
#include "simd.h"
using namespace inl::INL_ISA;

int main() {
#if defined(__AVX512F__)
  if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512dq")) return 77;
#elif defined(__AVX2__)
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return 77;
#endif
  double exp_rel = 0, exp_rel_small = 0, sig_abs = 0, sp_rel = 0;
  for (double x0 = -103.0; x0 < 88.0; x0 += 0.00371) {
    Vec x;
    for (int i = 0; i < kVec; ++i) x[i] = float(x0 + i * 1.3e-4);
    Vec e = vexp(x), s = vsigmoid(x), sp = vsoftplus<false>(x, nullptr);
    for (int i = 0; i < kVec; ++i) {
      const double xd = x[i], ref = std::exp(xd);
      if (ref > 1e-37) {
        const double r = std::fabs(e[i] / ref - 1);
        exp_rel = std::fmax(exp_rel, r);
        if (std::fabs(xd) <= 20) exp_rel_small = std::fmax(exp_rel_small, r);
      }
      sig_abs = std::fmax(sig_abs, std::fabs(s[i] - 1 / (1 + std::exp(-xd))));
      const double spr = xd > 0 ? xd + std::log1p(std::exp(-xd)) : std::log1p(std::exp(xd));
      sp_rel = std::fmax(sp_rel, std::fabs(sp[i] - spr) / std::fmax(1.0, spr));
    }
  }
  std::printf("%g %g %g %g\n", exp_rel, exp_rel_small, sig_abs, sp_rel);
  return 0;
}
"""


@pytest.mark.skipif(shutil.which("g++") is None or platform.machine() != "x86_64", reason="needs g++ on x86-64")
@pytest.mark.parametrize("march", ["x86-64-v4", "x86-64-v3", "x86-64"])
def test_transcendentals_accuracy(tmp_path, march):
    """The kernels' tests hold results to 1e-5 of fp64; these bounds keep the helpers' own error
    two orders below that: vexp's up to |x|·5e-8 relative where it rounds x·log2(e) (AVX-512 DQ),
    sigmoid and softplus near an fp32 ulp everywhere."""
    run = build_and_run(tmp_path, ACCURACY_DRIVER, march)
    exp_rel, exp_rel_small, sig_abs, sp_rel = (float(v) for v in run.stdout.split())
    assert exp_rel < 6e-6 and exp_rel_small < 1.5e-6, (exp_rel, exp_rel_small)
    assert sig_abs < 3e-7 and sp_rel < 4e-7, (sig_abs, sp_rel)


# rows.h's lane_sum against the fixed scalar tree it stands for (a[i] += a[i + w], w = kVec/2..1),
# bit for bit: values of mixed magnitudes and signs, whose sum depends on the order of additions
LANE_SUM_DRIVER = r"""
#include <cstdio>
#include <cstring>
#include "rows.h"
using namespace inl::INL_ISA;

int main() {
#if defined(__AVX512F__)
  if (!__builtin_cpu_supports("avx512f")) return 77;
#elif defined(__AVX2__)
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return 77;
#endif
  unsigned state = 12345u;
  int failures = 0;
  for (int trial = 0; trial < 20000; ++trial) {
    Vec v;
    float a[kVec];
    for (int i = 0; i < kVec; ++i) {
      state = state * 1664525u + 1013904223u;
      const float mag = float(1u << ((state >> 8) % 24));
      v[i] = a[i] = (float((state >> 12) % 2001) - 1000.f) * mag / 997.f;
    }
    for (int w = kVec / 2; w > 0; w /= 2)
      for (int i = 0; i < w; ++i) a[i] += a[i + w];
    const float got = lane_sum(v);
    if (std::memcmp(&got, &a[0], sizeof(float)) != 0 && ++failures < 5) std::printf("%.9g != %.9g\n", got, a[0]);
  }
  return failures ? 1 : 0;
}
"""


@pytest.mark.skipif(shutil.which("g++") is None or platform.machine() != "x86_64", reason="needs g++ on x86-64")
@pytest.mark.parametrize("march", ["x86-64-v4", "x86-64-v3", "x86-64"])
def test_lane_sum_is_the_fixed_scalar_tree(tmp_path, march):
    """The matrix-vector kernels' sums (rows.h) end in lane_sum, which on AVX-512 and AVX2 adds the
    lanes in registers: the same additions as the scalar tree, so the same bits."""
    build_and_run(tmp_path, LANE_SUM_DRIVER, march)

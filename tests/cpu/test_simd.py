"""The vector helpers of csrc/cpu/simd.h keep NaN on every instruction set they compile to: the
installed extension was built for one (-march=native), so this compiles a small driver for each
x86 level: AVX-512, AVX2 and SSE2 (the generic compare-and-select path, as on NEON)."""
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
using namespace inl;

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


@pytest.mark.skipif(shutil.which("g++") is None or platform.machine() != "x86_64", reason="needs g++ on x86-64")
@pytest.mark.parametrize("march", ["x86-64-v4", "x86-64-v3", "x86-64"])
def test_nan_survives_every_vector_path(tmp_path, march):
    source = tmp_path / "driver.cpp"
    source.write_text(DRIVER)
    binary = tmp_path / "driver"
    # the flags of setup.py's build, for another target
    build = subprocess.run(["g++", "-O3", "-std=c++17", "-ffp-contract=fast", f"-march={march}", "-I", CSRC,
                            str(source), "-o", str(binary)], capture_output=True, text=True, timeout=120)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=60)
    if run.returncode == 77:
        pytest.skip(f"this CPU cannot run -march={march}")
    assert run.returncode == 0, run.stdout + run.stderr

"""inl_kernels.pin_inductor_vec_isa: torch.compile's on-disk cache, shared by two processes that
generate CPU code for different vector ISAs (two machines on one filesystem; here one process
under ATEN_CPU_CAPABILITY), gives each its own code. Without it torch 2.13 serves the second
process the first one's C++ source, compiled for the wrong vector length: half or twice the
right sums, or a crash (measured; see the function's docstring)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import json, sys
import torch
import inl_kernels

isa = inl_kernels.pin_inductor_vec_isa()
g = torch.Generator().manual_seed(0)
x, w = torch.randn(37, 64, generator=g), torch.randn(64, 48, generator=g)

def f(x, w):  # a vectorised row reduction over 48 columns: 3 AVX-512 vectors, 6 AVX2 ones
    return (torch.softmax(x @ w, -1) * torch.sigmoid(x[:, :48]) + 1).sum(-1)

want = f(x.double(), w.double())
got = torch.compile(f)(x, w)
print(json.dumps({"isa": isa, "err": (got.double() - want).abs().max().item()}))
"""


def _run(cache_dir, capability=None):
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache_dir),
               PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "python"), os.environ.get("PYTHONPATH", "")]))
    env.pop("ATEN_CPU_CAPABILITY", None)
    if capability:
        env["ATEN_CPU_CAPABILITY"] = capability
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_cache_shared_between_vector_isas_gives_each_its_own_code(tmp_path):
    from torch._inductor.cpu_vec_isa import valid_vec_isa_list

    names = [str(isa) for isa in valid_vec_isa_list()]
    if any("avx512" in n for n in names) and any(n == "avx2" for n in names):
        other = "avx2"  # an AVX-512 machine: the second process generates AVX2 code
    elif any(n == "avx2" for n in names):
        other = "default"  # an AVX2-only machine: the second process generates scalar code
    else:
        pytest.skip(f"needs an x86 CPU with AVX2 (inductor's ISAs here: {names})")
    first = _run(tmp_path)  # fills the cache with the best ISA's code
    second = _run(tmp_path, other)  # the same graph under another ISA, from the same cache
    assert first["isa"] != second["isa"], (first, second)
    # the sums are ~48: an fp32 result off by any lane count is off by > 1
    assert first["err"] < 1e-3 and second["err"] < 1e-3, (first, second)

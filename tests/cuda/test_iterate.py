"""The CUDA decode iterate (csrc/cuda/iterate.cu): its source compiles with nvcc wherever nvcc is
found (CI has nvcc but a CPU torch), and on a GPU it equals the fp64 reference."""
import os
import shutil
import subprocess

import pytest
import torch

from inl_kernels import inl_iterate
from inl_kernels.cuda import unavailable_reason
from tests.iterate_cases import CONVERGE_TOL, converging_args, make_args

SOURCE = os.path.join(os.path.dirname(__file__), "..", "..", "csrc", "cuda", "iterate.cu")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
def test_kernel_source_compiles(tmp_path):
    """The kernel and its raw launcher alone (the ATen entry point needs a CUDA build of torch)."""
    result = subprocess.run(["nvcc", "-c", "-O3", "-std=c++17", "-arch=sm_90", SOURCE, "-o", str(tmp_path / "iterate.o")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "iterate.o").stat().st_size > 0


def cast(kw, dtype, device):
    return {k: (t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype) if isinstance(t, torch.Tensor)
                else t) for k, t in kw.items()}


@pytest.mark.cuda
@pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))
@pytest.mark.parametrize("n,d,H,E,T,kappa,with_v", [(1, 2048, 64, 204, 5, 0.7, False), (64, 2048, 64, 204, 5, None, True),
                                                     (7, 37, 5, 1, 3, 0.5, True), (256, 512, 64, 51, 7, 0.7, True)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_matches_reference(n, d, H, E, T, kappa, with_v, dtype, tol):
    h, x, kw = make_args(n=n, d=d, H=H, E=E, T=T, kappa=kappa, with_v=with_v, dtype=torch.float64)
    h, x, kw = h.to(dtype).cuda(), x.to(dtype).cuda(), cast(kw, dtype, "cuda")
    out, info = inl_iterate(h, x, **kw, return_info=True, backend="cuda")
    ref, rinfo = inl_iterate(h.double(), x.double(), **cast(kw, torch.float64, "cuda"), return_info=True,
                             backend="reference")
    assert out.dtype == dtype and info.energy.dtype == torch.float32
    for a, b in ((out, ref), (info.v, rinfo.v), (info.energy, rinfo.energy), (info.distance, rinfo.distance)):
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol)
    again, _ = inl_iterate(h, x, **kw, return_info=True, backend="cuda")
    assert torch.equal(out, again)


@pytest.mark.cuda
@pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))
def test_early_exit_matches_reference():
    h, x, kw = converging_args(n=40, dtype=torch.float32, device="cuda")
    out, info = inl_iterate(h, x, **kw, tol=CONVERGE_TOL, return_info=True, backend="cuda")
    ref, rinfo = inl_iterate(h.double(), x.double(), **cast(kw, torch.float64, "cuda"), tol=CONVERGE_TOL,
                             return_info=True, backend="reference")
    assert info.iterations.tolist() == rinfo.iterations.tolist()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(info.energy.double(), rinfo.energy, rtol=1e-5, atol=1e-5)

"""The CUDA decode iterate (csrc/cuda/iterate.cu): its source compiles with nvcc wherever nvcc is
found (CI has nvcc but a CPU torch), its launch planner agrees with the kernel's shared-memory
layout and refuses what cannot launch (both checked without a GPU), and on a GPU it equals the
fp64 reference."""
import importlib
import os
import shutil
import subprocess

import pytest
import torch

from inl_kernels import inl_iterate
from inl_kernels.cpu import unavailable_reason as extension_missing
from inl_kernels.cuda import unavailable_reason
from tests.iterate_cases import (CONVERGE_TOL, call_backend, NAN_CASES, assert_nan_where_reference, cast, converging_args,
                                 make_args, nan_case)

cuda_iterate = importlib.import_module("inl_kernels.cuda.iterate")

SOURCE = os.path.join(os.path.dirname(__file__), "..", "..", "csrc", "cuda", "iterate.cu")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
def test_kernel_source_compiles(tmp_path):
    """The kernel and its raw launcher alone (the ATen entry point needs a CUDA build of torch)."""
    result = subprocess.run(["nvcc", "-c", "-O3", "-std=c++17", "-arch=sm_90", SOURCE, "-o", str(tmp_path / "iterate.o")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "iterate.o").stat().st_size > 0


# an H100 SXM: 132 multiprocessors, 227 KiB of shared memory per block (opt-in), 228 KiB per
# multiprocessor with 1 KiB reserved per block, and at most 5 blocks of this kernel (48 registers
# × 256 threads) per multiprocessor
H100 = dict(sms=132, max_shared=232448, resident=lambda nbytes: min(5, 233472 // (nbytes + 1024)))


@pytest.mark.skipif(extension_missing() is not None, reason=str(extension_missing()))
def test_shared_bytes_matches_the_kernel_layout():
    """The planner's formula is the one the extension was compiled with (iterate_layout.h)."""
    from inl_kernels import _C
    assert cuda_iterate.MIN_COLS == _C.iterate_decode_min_cols
    for N in (1, 7, 64, 256, 300):
        for H in (16, 64, 128):
            for cols in (32, 64, 256):
                assert cuda_iterate.shared_bytes(N, H, cols) == _C.iterate_decode_shared_bytes(N, H, cols)


@pytest.mark.parametrize("N,d,H,expected", [
    (256, 512, 64, (16, 32, 216064)),  # 4·(6·64·32 + 3·256·32 + 256·64 + 3·256): just fits 227 KiB
    (256, 512, 128, None),  # 330752 bytes at 32 columns
    (1, 2048, 64, (64, 32, 49804)),
    (64, 8192, 64, (256, 32, 90880)),  # 256 blocks, 2 resident per multiprocessor: 264 places
    (256, 8192, 64, None),  # 256 blocks, 1 per multiprocessor; 64 columns need 363520 bytes
    # 2048 blocks of 32 columns and 1024 of 64 do not fit 5·132 places; 512 of 128 fit 4·132
    (1, 65536, 16, (512, 128, 50764)),
    (3, 1, 64, (1, 32, 51108)),  # one block holds all of d
])
def test_plan_hand_values(N, d, H, expected):
    got = cuda_iterate.plan(N, d, H, **H100)
    assert (None if got is None else tuple(got)) == expected


def test_plan_needs_at_least_one_resident_block():
    assert cuda_iterate.plan(1, 64, 16, sms=132, max_shared=232448, resident=lambda nbytes: 0) is None


def test_supports_names_shapes_without_a_plan_and_asks_the_gpu_once(monkeypatch):
    """supports() refuses, with a ValueError's reason, what the kernel cannot launch; the GPU is
    asked about each shape once, then the plan comes from the cache."""
    asked = []
    monkeypatch.setattr(cuda_iterate, "_limits", lambda device: (H100["sms"], H100["max_shared"]))
    monkeypatch.setattr(cuda_iterate, "_resident",
                        lambda dtype, device: lambda nbytes: asked.append(nbytes) or H100["resident"](nbytes))
    cuda_iterate.decode_plan.cache_clear()
    try:
        def why(n, d, H, v=None):
            h, x, kw = make_args(n=n, d=d, H=H, E=1, T=2, dtype=torch.float32, with_v=False)
            return call_backend(cuda_iterate.supports, h, x, **dict(kw, v=v), return_trajectory=False)

        assert why(256, 512, 64) is None
        assert why(256, 512, 64) is None
        assert asked == [216064]
        reason = why(256, 512, 128)
        assert "N = 256 rows with H = 128" in reason and "330752 bytes" in reason and "232448" in reason
        assert "do not all fit" in why(256, 8192, 64)
    finally:
        cuda_iterate.decode_plan.cache_clear()


@pytest.mark.cuda
@pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))
@pytest.mark.parametrize("n,d,H,E,T,kappa,with_v", [(1, 2048, 64, 204, 5, 0.7, False), (64, 2048, 64, 204, 5, None, True),
                                                     (7, 37, 5, 1, 3, 0.5, True), (256, 512, 64, 51, 7, 0.7, True)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_matches_reference(n, d, H, E, T, kappa, with_v, dtype, tol):
    h, x, kw = make_args(n=n, d=d, H=H, E=E, T=T, kappa=kappa, with_v=with_v, dtype=torch.float64)
    h, x, kw = h.to(dtype).cuda(), x.to(dtype).cuda(), cast(kw, dtype, "cuda")
    out, info = inl_iterate(h, x, **kw, return_info=True, backend="cuda")
    ref, rinfo = inl_iterate(h.double(), x.double(), **cast(kw, torch.float64), return_info=True,
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
    ref, rinfo = inl_iterate(h.double(), x.double(), **cast(kw, torch.float64), tol=CONVERGE_TOL,
                             return_info=True, backend="reference")
    assert info.iterations.tolist() == rinfo.iterations.tolist()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(info.energy.double(), rinfo.energy, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))
@pytest.mark.parametrize("name,index,T,kappa", NAN_CASES)
def test_nan_propagates_like_reference(name, index, T, kappa):
    assert_nan_where_reference("cuda", *nan_case(name, index, T, kappa, device="cuda"))


@pytest.mark.cuda
@pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))
def test_nan_row_never_converges():
    h, x, kw = converging_args(dtype=torch.float32, device="cuda")
    h[5, 2] = float("nan")
    _, rinfo = assert_nan_where_reference("cuda", h, x, kw, tol=CONVERGE_TOL, min_iterations=0)
    assert rinfo.iterations[5] == kw["num_iterations"] and len(set(rinfo.iterations.tolist())) >= 3


@pytest.mark.cuda
@pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))
def test_shapes_without_a_plan_raise_a_value_error():
    """N = 256 rows with H = 128 need more shared memory than any GPU block has (323 KiB)."""
    h, x, kw = make_args(n=256, d=64, H=128, E=1, T=2, dtype=torch.float32, device="cuda")
    with pytest.raises(ValueError, match="N = 256 rows with H = 128"):
        inl_iterate(h, x, **kw, backend="cuda")


@pytest.mark.cuda
@pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))
def test_no_excited_dims():
    """Without excited dims the kernel gets no table (None) and adds nothing."""
    h, x, kw = make_args(n=5, d=40, H=16, E=0, T=3, dtype=torch.float32, device="cuda")
    out, info = inl_iterate(h, x, **kw, return_info=True, backend="cuda")
    ref, rinfo = inl_iterate(h.double(), x.double(), **cast(kw, torch.float64), return_info=True,
                             backend="reference")
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(info.energy.double(), rinfo.energy, rtol=1e-5, atol=1e-5)
